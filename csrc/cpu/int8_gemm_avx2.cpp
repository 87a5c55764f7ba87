// The AVX2 kernel of int8_gemm.h, for x86 CPUs without AVX-512 VNNI. AVX2 has
// no u8 x s8 -> s32 instruction; vpmaddubsw (u8 x s8 -> pairs summed in s16)
// saturates on the offset activations (255 * 127 * 2 > 32767), so the
// activations are taken back to signed bytes (q + 128 xor 0x80 = q) and the
// sign moved onto the weight: |q| * sign(q) w, whose pair sums stay within
// 2 * 127 * 127 < 32767, so the products are exact and need no column-sum
// correction. vpmaddwd with ones then sums the pairs into int32 lanes.
// Four instructions per 32 multiplies: as many multiplies per instruction
// as a float FMA, with a quarter of the weight bytes to stream.
//
// This unit includes no ATen header (see int8_gemm_avx512.cpp).
#include "int8_gemm.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include <cstring>

namespace rnnfast::cpu::int8 {

bool avx2_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

namespace {

// Rows a tile: 3 x 2 accumulators leave AVX2's 16 registers room for the
// weight, the activation and the constants; at 4 rows GCC spilled three
// accumulators to the stack inside the loop (AMD EPYC, Zen 3, T=100 B=64
// I=H=512 2 layers: 361 -> 338 ms at 3 rows, with the unrolled write below).
constexpr int kMaxRows = 3;

inline int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

// Lanes [0, n) of 8 set (n clamped to [0, 8]).
inline __m256i lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(smaller(n < 0 ? 0 : n, 8))),
                            idx);
}

// MR rows x one column block (16 columns, two vectors of 8), all k.
template <int MR>
void tile(int64_t groups, int64_t n, int64_t block, int64_t kp, const uint8_t* q,
          int64_t ldq, const float* a_scale, const int8_t* packed, const float* w_scale,
          const float* bias, float beta, float* c, int64_t ldc) {
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const int8_t* w = packed + block * kBlockCols * kp;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64 + 32));
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, q + r * ldq + g * kGroupDepth, sizeof quad);
      const __m256i a = _mm256_xor_si256(_mm256_set1_epi32(quad), flip);  // q as s8
      const __m256i a_abs = _mm256_abs_epi8(a);
      acc[r][0] = _mm256_add_epi32(
          acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a_abs, _mm256_sign_epi8(w0, a)),
                                       ones));
      acc[r][1] = _mm256_add_epi32(
          acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a_abs, _mm256_sign_epi8(w1, a)),
                                       ones));
    }
  }
  // Unrolled, so that acc stays in registers (as step_gemm_tiles.h: a loop
  // indexing it at run time gives it a home on the stack, kept current at
  // every group).
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const int64_t col = block * kBlockCols + h * 8;
    const __m256i m = lane_mask(n - col);
    const __m256 ws = _mm256_maskload_ps(w_scale + col, m);
    const __m256 bv = bias ? _mm256_maskload_ps(bias + col, m) : _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 s = _mm256_mul_ps(_mm256_set1_ps(a_scale[r]), ws);
      const __m256 x = _mm256_cvtepi32_ps(acc[r][h]);
      float* out = c + r * ldc + col;
      __m256 v;  // the roundings of int8_gemm_avx512.cpp's dequantized()
      if (bias) {
        v = _mm256_fmadd_ps(x, s, bv);
        if (beta != 0.0f) v = _mm256_add_ps(_mm256_maskload_ps(out, m), v);
      } else {
        v = beta != 0.0f ? _mm256_fmadd_ps(x, s, _mm256_maskload_ps(out, m))
                         : _mm256_mul_ps(x, s);
      }
      _mm256_maskstore_ps(out, m, v);
    }
  }
}

using TileFn = void (*)(int64_t, int64_t, int64_t, int64_t, const uint8_t*, int64_t,
                        const float*, const int8_t*, const float*, const float*, float,
                        float*, int64_t);

TileFn tile_fn(int mr) {
  switch (mr) {
    case 1: return &tile<1>;
    case 2: return &tile<2>;
    default: return &tile<3>;
  }
}

}  // namespace

void gemm_tile_avx2(int64_t m, int64_t n, int64_t k, int64_t block0, int64_t blocks,
                    const uint8_t* q, int64_t ldq, const float* a_scale,
                    const int8_t* packed, const float* w_scale, const float* bias,
                    float beta, float* c, int64_t ldc) {
  const int64_t kp = padded_depth(k);
  for (int64_t b = block0; b < block0 + blocks; ++b) {
    for (int64_t r = 0; r < m; r += kMaxRows) {
      const int mr = static_cast<int>(smaller(kMaxRows, m - r));
      tile_fn(mr)(depth_groups(k), n, b, kp, q + r * ldq, ldq, a_scale + r, packed,
                  w_scale, bias, beta, c + r * ldc, ldc);
    }
  }
}

}  // namespace rnnfast::cpu::int8

#else  // not x86-64

namespace rnnfast::cpu::int8 {
bool avx2_supported() { return false; }
void gemm_tile_avx2(int64_t, int64_t, int64_t, int64_t, int64_t, const uint8_t*, int64_t,
                    const float*, const int8_t*, const float*, const float*, float, float*,
                    int64_t) {}
}  // namespace rnnfast::cpu::int8

#endif
