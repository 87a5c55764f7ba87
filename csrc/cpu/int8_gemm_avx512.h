// AVX-512 pieces shared by the VNNI (int8_gemm_avx512.cpp) and AMX
// (int8_gemm_amx.cpp) int8 kernels. Include only from a unit compiled for
// AVX-512, after its target pragma; internal linkage, so no copy compiled
// with AVX-512 instructions is shared with any other unit.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace rnnfast::cpu::int8 {
namespace {

// The first n (at most 16) lanes.
inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
}

// x * s, plus bias (bv) when has_bias, plus C (out) when beta is 1: the
// fused multiply-adds written out (fma(x, s, bias) + C, or fma(x, s, C)),
// not left to the compiler's contraction, so that every kernel (the VNNI
// and AMX ones, the AVX2 and portable ones) rounds alike and they agree
// bitwise.
inline __m512 dequantized(__m512 x, __m512 s, bool has_bias, __m512 bv, float beta,
                          __mmask16 m, const float* out) {
  if (has_bias) {
    const __m512 v = _mm512_fmadd_ps(x, s, bv);
    return beta != 0.0f ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, out), v) : v;
  }
  return beta != 0.0f ? _mm512_fmadd_ps(x, s, _mm512_maskz_loadu_ps(m, out))
                      : _mm512_mul_ps(x, s);
}

}  // namespace
}  // namespace rnnfast::cpu::int8
