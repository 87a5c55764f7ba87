// The AVX-512 tiles of step_gemm.h: one 512-bit vector per 16-column panel,
// up to 8 rows x 3 panels (24 accumulators of the 32 registers), wider tiles
// for fewer rows (1-2 rows x 8 panels), where the product streams the weight
// and needs independent FMA chains. Only called on CPUs with AVX-512 F
// (step_gemm.cpp checks). No ATen header (see step_gemm.h).
#include "step_gemm.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx2,fma")
#include <immintrin.h>

#include "step_gemm_stored_tiles.h"
#include "step_gemm_tiles.h"

namespace rnnfast::cpu::step_gemm {

bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

namespace {
struct Avx512 : Avx512StoredTiles<> {
  using Vec = __m512;
  using Elem = float;  // multiply_stored's operands
  using In = Vec;
  static constexpr int64_t kWidth = 16;
  static constexpr int kMaxTileRows = 8;
  static constexpr int panels_per_tile(int rows) {
    return rows <= 2 ? 8 : rows == 3 ? 6 : rows <= 6 ? 4 : 3;
  }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Vec load(const float* p) { return _mm512_load_ps(p); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* c, Vec v, int64_t count, bool add) {
    if (count >= kWidth) {
      if (add) v = _mm512_add_ps(v, _mm512_loadu_ps(c));
      _mm512_storeu_ps(c, v);
    } else if (count > 0) {
      const __mmask16 m = static_cast<__mmask16>((1u << count) - 1u);
      if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, c));
      _mm512_mask_storeu_ps(c, m, v);
    }
  }
  // multiply_stored (step_gemm_stored_tiles.h): its shapes and fold are
  // Avx512StoredTiles's.
  static Vec loadu(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load_first(const float* p, int64_t count) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), p);
  }
  using WeightElem = float;
  // multiply_stored_bf16_weight (Bf16WeightOf), on AVX-512 CPUs without
  // AVX512-BF16 (or with RNNFAST_CPU_NATIVE_BF16=0): sixteen bfloat16 as
  // floats
  static Vec widen_bf16(const uint16_t* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
};
}  // namespace

void multiply_panels_avx512(int64_t m, int64_t n, int64_t k, const float* a,
                            int64_t lda, const float* packed,
                            int64_t panel_begin, int64_t panel_end,
                            float beta, float* c, int64_t ldc) {
  multiply_panels<Avx512>(m, n, k, a, lda, packed, panel_begin, panel_end,
                          beta, c, ldc);
}

void multiply_stored_columns_avx512(int64_t m, int64_t n, int64_t k,
                                    const float* a, int64_t lda,
                                    const float* b, int64_t ldb,
                                    int64_t col_begin, int64_t col_end,
                                    const float* bias, bool add, float* c,
                                    int64_t ldc) {
  multiply_stored_columns<Avx512>(m, n, k, a, lda, b, ldb, col_begin, col_end,
                                  bias, add, c, ldc);
}

void multiply_stored_columns_avx512_bf16_weight(
    int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
    const uint16_t* b, int64_t ldb, int64_t col_begin, int64_t col_end,
    const float* bias, bool add, float* c, int64_t ldc) {
  multiply_stored_columns<Bf16WeightOf<Avx512>>(m, n, k, a, lda, b, ldb,
                                                col_begin, col_end, bias, add,
                                                c, ldc);
}

}  // namespace rnnfast::cpu::step_gemm
#else
namespace rnnfast::cpu::step_gemm {
bool avx512_supported() { return false; }
void multiply_panels_avx512(int64_t, int64_t, int64_t, const float*, int64_t,
                            const float*, int64_t, int64_t, float, float*,
                            int64_t) {}
void multiply_stored_columns_avx512(int64_t, int64_t, int64_t, const float*,
                                    int64_t, const float*, int64_t, int64_t,
                                    int64_t, const float*, bool, float*,
                                    int64_t) {}
void multiply_stored_columns_avx512_bf16_weight(int64_t, int64_t, int64_t,
                                                const float*, int64_t,
                                                const uint16_t*, int64_t,
                                                int64_t, int64_t, const float*,
                                                bool, float*, int64_t) {}
}  // namespace rnnfast::cpu::step_gemm
#endif
