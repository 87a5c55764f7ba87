// The AVX512-BF16 tiles of step_gemm.h's one-use product of a bfloat16
// weight (multiply_stored_bf16): the float tiles' shapes
// (step_gemm_avx512.cpp) over 32 bfloat16 of k per vector, each float lane
// adding the products of a pair of them (vdpbf16ps: products exact in float,
// sums rounded to nearest even; like AMX and MKL's bfloat16 GEMM, it reads
// denormal inputs as zero). Only called on CPUs with AVX512-BF16 (and
// AVX512-BW, for the masked loads; step_gemm.cpp checks). No ATen header
// (see step_gemm.h).
#include "step_gemm.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512bf16,avx2,fma")
#include <immintrin.h>

#include "step_gemm_stored_tiles.h"

namespace rnnfast::cpu::step_gemm {

bool avx512bf16_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("avx512bw");
}

namespace {
// The float AVX-512 tiles' shapes and fold (the same accumulators and
// registers).
struct Avx512Bf16 : Avx512StoredTiles<> {
  using Elem = uint16_t;  // bfloat16 bits
  using WeightElem = uint16_t;
  using In = __m512bh;
  using Vec = __m512;
  static constexpr int64_t kWidth = 32;
  static Vec zero() { return _mm512_setzero_ps(); }
  static In loadu(const uint16_t* p) {
    return reinterpret_cast<In>(_mm512_loadu_si512(p));
  }
  static In load_first(const uint16_t* p, int64_t count) {
    const auto mask = static_cast<__mmask32>((uint64_t{1} << count) - 1);
    return reinterpret_cast<In>(_mm512_maskz_loadu_epi16(mask, p));
  }
  static Vec fmadd(In x, In w, Vec acc) { return _mm512_dpbf16_ps(acc, x, w); }
};
}  // namespace

void multiply_stored_columns_avx512bf16(int64_t m, int64_t n, int64_t k,
                                        const uint16_t* a, int64_t lda,
                                        const uint16_t* b, int64_t ldb,
                                        int64_t col_begin, int64_t col_end,
                                        const float* bias, bool add, float* c,
                                        int64_t ldc) {
  multiply_stored_columns<Avx512Bf16>(m, n, k, a, lda, b, ldb, col_begin,
                                      col_end, bias, add, c, ldc);
}

}  // namespace rnnfast::cpu::step_gemm
#else
namespace rnnfast::cpu::step_gemm {
bool avx512bf16_supported() { return false; }
void multiply_stored_columns_avx512bf16(int64_t, int64_t, int64_t,
                                        const uint16_t*, int64_t,
                                        const uint16_t*, int64_t, int64_t,
                                        int64_t, const float*, bool, float*,
                                        int64_t) {}
}  // namespace rnnfast::cpu::step_gemm
#endif
