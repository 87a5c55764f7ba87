// The AVX-512 VNNI kernels of int8_gemm.h: vpdpbusd (64 u8 x s8 products
// summed into 16 int32 lanes per instruction, 4x the multiplies of a float
// FMA) over register tiles of up to 6 rows x 4 column blocks (24 int32
// accumulators), dequantized in registers. Only called on CPUs that have
// AVX-512 F/BW/VL and VNNI (int8_gemm.cpp checks).
//
// This unit includes no ATen header, so no inline function that other units
// share is compiled here with AVX-512 instructions.
#include "int8_gemm.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")
// GCC 12's own intrinsics (_mm512_reduce_max_ps, the down-converting
// stores) initialise a vector from itself to leave it undefined on purpose,
// which it then reports as used uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "int8_gemm_avx512.h"

namespace rnnfast::cpu::int8 {

bool avx512_vnni_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

namespace {

constexpr int kMaxRows = 6;    // rows of a register tile
constexpr int kMaxBlocks = 4;  // column blocks (of 16) of a register tile

inline int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

// One register tile: MR rows x NB column blocks, all k.
template <int MR, int NB>
void tile(int64_t groups, int64_t n, int64_t block0, int64_t kp,
          const uint8_t* q, int64_t ldq, const float* a_scale,
          const int8_t* packed, const int32_t* col_sums, const float* w_scale,
          const float* bias, float beta, float* c, int64_t ldc) {
  __m512i acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_si512();
  const int8_t* w = packed + block0 * kBlockCols * kp;
  const int64_t wstride = kBlockCols * kp;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i wv[NB];
    for (int b = 0; b < NB; ++b) {
      wv[b] = _mm512_loadu_si512(w + b * wstride + g * 64);
    }
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, q + r * ldq + g * kGroupDepth, sizeof quad);
      const __m512i av = _mm512_set1_epi32(quad);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], av, wv[b]);
    }
  }
  // Dequantize: (acc - 128 colsum) * (a_scale * w_scale) (+ bias) (+ C).
  for (int b = 0; b < NB; ++b) {
    const int64_t col = (block0 + b) * kBlockCols;
    const __mmask16 m = lanes(n - col);
    const __m512i offset = _mm512_slli_epi32(
        _mm512_loadu_si512(col_sums + col), 7);  // 128 * column sum
    const __m512 ws = _mm512_maskz_loadu_ps(m, w_scale + col);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + col) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(a_scale[r]), ws);
      const __m512 x = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][b], offset));
      float* out = c + r * ldc + col;
      _mm512_mask_storeu_ps(out, m, dequantized(x, s, bias != nullptr, bv, beta, m, out));
    }
  }
}

using TileFn = void (*)(int64_t, int64_t, int64_t, int64_t, const uint8_t*,
                        int64_t, const float*, const int8_t*, const int32_t*,
                        const float*, const float*, float, float*, int64_t);

template <int MR>
constexpr TileFn tile_for_blocks(int nb) {
  return nb == 1 ? &tile<MR, 1> : nb == 2 ? &tile<MR, 2> : nb == 3 ? &tile<MR, 3> : &tile<MR, 4>;
}

TileFn tile_fn(int mr, int nb) {
  switch (mr) {
    case 1: return tile_for_blocks<1>(nb);
    case 2: return tile_for_blocks<2>(nb);
    case 3: return tile_for_blocks<3>(nb);
    case 4: return tile_for_blocks<4>(nb);
    case 5: return tile_for_blocks<5>(nb);
    default: return tile_for_blocks<6>(nb);
  }
}

}  // namespace

void gemm_tile_avx512_vnni(int64_t m, int64_t n, int64_t k, int64_t block0,
                           int64_t blocks, const uint8_t* q, int64_t ldq,
                           const float* a_scale, const int8_t* packed,
                           const float* w_scale, const float* bias,
                           float beta, float* c, int64_t ldc) {
  const int64_t kp = padded_depth(k);
  const int64_t groups = depth_groups(k);
  const int32_t* col_sums = column_sums(packed, n, k);
  // Column groups outermost: a group's weights (4 blocks x Kp bytes, 32 KiB
  // at k = 512) stay in L1 while every row tile streams past them.
  for (int64_t b = 0; b < blocks; b += kMaxBlocks) {
    const int nb = static_cast<int>(smaller(kMaxBlocks, blocks - b));
    for (int64_t r = 0; r < m; r += kMaxRows) {
      const int mr = static_cast<int>(smaller(kMaxRows, m - r));
      tile_fn(mr, nb)(groups, n, block0 + b, kp, q + r * ldq, ldq, a_scale + r,
                      packed, col_sums, w_scale, bias, beta, c + r * ldc, ldc);
    }
  }
}

void quantize_rows_avx512(int64_t m, int64_t k, const float* a, int64_t lda,
                          uint8_t* q, int64_t ldq, float* scale) {
  const int64_t kp = padded_depth(k);
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t r = 0; r < m; ++r) {
    const float* x = a + r * lda;
    uint8_t* out = q + r * ldq;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(lanes(k - j), x + j);
      // max_ps returns its second operand when either is NaN: keep a NaN.
      mx = _mm512_max_ps(_mm512_and_ps(v, sign_off), mx);
    }
    const float absmax = _mm512_reduce_max_ps(mx);
    bool finite = absmax <= std::numeric_limits<float>::max();
    // A NaN lane can be lost by the reduction's order: check the row.
    for (int64_t j = 0; finite && j < k; j += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(lanes(k - j), x + j);
      finite = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) == 0;
    }
    if (!finite) {
      scale[r] = std::numeric_limits<float>::quiet_NaN();
      std::memset(out, kActivationOffset, kp);
      continue;
    }
    scale[r] = absmax / 127.0f;
    const __m512 inv = _mm512_set1_ps(absmax > 0.0f ? 127.0f / absmax : 0.0f);
    const __m512i off = _mm512_set1_epi32(kActivationOffset);
    for (int64_t j = 0; j < kp; j += 16) {
      const __mmask16 mk = lanes(k - j);
      const __m512 v = _mm512_maskz_loadu_ps(mk, x + j);
      // Round half to even (the default rounding mode), as std::nearbyint.
      __m512i qi = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), off);
      qi = _mm512_mask_blend_epi32(mk, off, qi);  // padding: the offset
      _mm_mask_storeu_epi8(out + j, lanes(kp - j), _mm512_cvtusepi32_epi8(qi));
    }
  }
}

}  // namespace rnnfast::cpu::int8

#else  // not x86-64: only the portable kernels exist

namespace rnnfast::cpu::int8 {
bool avx512_vnni_supported() { return false; }
void gemm_tile_avx512_vnni(int64_t, int64_t, int64_t, int64_t, int64_t,
                           const uint8_t*, int64_t, const float*, const int8_t*,
                           const float*, const float*, float, float*, int64_t) {}
void quantize_rows_avx512(int64_t, int64_t, const float*, int64_t, uint8_t*,
                          int64_t, float*) {}
}  // namespace rnnfast::cpu::int8

#endif
