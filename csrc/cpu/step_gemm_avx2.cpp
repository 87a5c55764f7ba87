// The AVX2 (FMA) tiles of step_gemm.h, for x86 CPUs without AVX-512 (AMD
// EPYC before Zen 4, older Intel): two 256-bit vectors per 16-column panel,
// up to 6 rows x 1 panel (12 accumulators of the 16 registers), 1 row x 4
// panels or 2-3 rows x 2 panels for fewer rows. Only called on CPUs with
// AVX2 and FMA (step_gemm.cpp checks). No ATen header (see step_gemm.h).
#include "step_gemm.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "step_gemm_stored_tiles.h"
#include "step_gemm_tiles.h"

namespace rnnfast::cpu::step_gemm {

bool avx2_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

namespace {
struct Avx2 {
  using Vec = __m256;
  using Elem = float;  // multiply_stored's operands
  using In = Vec;
  static constexpr int64_t kWidth = 8;
  static constexpr int kMaxTileRows = 6;
  static constexpr int panels_per_tile(int rows) {
    return rows == 1 ? 4 : rows <= 3 ? 2 : 1;
  }
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Vec load(const float* p) { return _mm256_load_ps(p); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* c, Vec v, int64_t count, bool add) {
    if (count >= kWidth) {
      if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(c));
      _mm256_storeu_ps(c, v);
    } else if (count > 0) {
      const __m256i m = _mm256_cmpgt_epi32(
          _mm256_set1_epi32(static_cast<int>(count)),
          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      if (add) v = _mm256_add_ps(v, _mm256_maskload_ps(c, m));
      _mm256_maskstore_ps(c, m, v);
    }
  }
  // multiply_stored (step_gemm_stored_tiles.h): up to 4 rows of A x 3 rows
  // of B (12 accumulators, the 3 vectors of B in registers, A's read by
  // the multiply-adds from memory), 3 x 4, 2 x 5, 1 x 8 (the fastest of
  // the shapes that fit, measured on the Xeon with AVX2 only).
  static constexpr int kMaxStoredRows = 4;
  static constexpr int stored_columns(int rows) {
    return rows == 1 ? 8 : rows == 2 ? 5 : rows == 3 ? 4 : 3;
  }
  static Vec loadu(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load_first(const float* p, int64_t count) {
    const __m256i m = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(static_cast<int>(count)),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(p, m);
  }
  static __m256 fold(Vec v) { return v; }
  using WeightElem = float;
  // multiply_stored_bf16_weight (Bf16WeightOf): eight bfloat16 as floats
  static Vec widen_bf16(const uint16_t* p) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
};
}  // namespace

void multiply_panels_avx2(int64_t m, int64_t n, int64_t k, const float* a,
                          int64_t lda, const float* packed,
                          int64_t panel_begin, int64_t panel_end, float beta,
                          float* c, int64_t ldc) {
  multiply_panels<Avx2>(m, n, k, a, lda, packed, panel_begin, panel_end, beta,
                        c, ldc);
}

void multiply_stored_columns_avx2(int64_t m, int64_t n, int64_t k,
                                  const float* a, int64_t lda, const float* b,
                                  int64_t ldb, int64_t col_begin,
                                  int64_t col_end, const float* bias, bool add,
                                  float* c, int64_t ldc) {
  multiply_stored_columns<Avx2>(m, n, k, a, lda, b, ldb, col_begin, col_end,
                                bias, add, c, ldc);
}

void multiply_stored_columns_avx2_bf16_weight(
    int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
    const uint16_t* b, int64_t ldb, int64_t col_begin, int64_t col_end,
    const float* bias, bool add, float* c, int64_t ldc) {
  multiply_stored_columns<Bf16WeightOf<Avx2>>(m, n, k, a, lda, b, ldb,
                                              col_begin, col_end, bias, add,
                                              c, ldc);
}

}  // namespace rnnfast::cpu::step_gemm
#else
namespace rnnfast::cpu::step_gemm {
bool avx2_supported() { return false; }
void multiply_panels_avx2(int64_t, int64_t, int64_t, const float*, int64_t,
                          const float*, int64_t, int64_t, float, float*,
                          int64_t) {}
void multiply_stored_columns_avx2(int64_t, int64_t, int64_t, const float*,
                                  int64_t, const float*, int64_t, int64_t,
                                  int64_t, const float*, bool, float*,
                                  int64_t) {}
void multiply_stored_columns_avx2_bf16_weight(int64_t, int64_t, int64_t,
                                              const float*, int64_t,
                                              const uint16_t*, int64_t,
                                              int64_t, int64_t, const float*,
                                              bool, float*, int64_t) {}
}  // namespace rnnfast::cpu::step_gemm
#endif
