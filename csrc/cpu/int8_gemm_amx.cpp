// The AMX-INT8 kernel of int8_gemm.h: tdpbusd (u8 x s8 -> s32, the integers
// of vpdpbusd) on tiles of 16 rows x 64 bytes, 16x16x64 multiplies per
// instruction. Tile registers: four int32 accumulators C[r][b] (2 row tiles
// of 16 rows x 2 column blocks of 16), two A tiles (16 quantized rows x 64
// depth bytes, straight from q) and two B tiles (16 groups of one column
// block: the packed weight as it lies, stride 64). The accumulators are
// stored to a small buffer and dequantized there with AVX-512, by the same
// float operations as the VNNI kernel's, so both give identical floats.
//
// Only called where amx::allowed(kInt8) and the AVX-512 VNNI kernels are
// (int8_gemm.cpp checks). Like int8_gemm_avx512.cpp this unit includes no
// ATen header.
#include "int8_gemm.h"

#if defined(__x86_64__) && defined(__linux__)
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// As in int8_gemm_avx512.cpp: GCC 12's intrinsics leave vectors undefined
// on purpose and then report them as used uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

#define RNNFAST_AMX_UNIT
#include "amx.h"
#include "int8_gemm_avx512.h"

namespace rnnfast::cpu::int8 {
namespace {

using amx::kTileBytes;
using amx::kTileRows;

// The rows of the calling thread's two row tiles as configured (-1: none).
thread_local int configured_rows = -1;

// amx::configure, unless the calling thread's tiles hold that already.
void configure(int rows0, int rows1) {
  const int key = rows0 * (kTileRows + 1) + rows1;
  if (configured_rows == key) return;
  amx::configure(rows0, rows1);
  configured_rows = key;
}

// Accumulators of one (row tile pair x column block pair): [32 rows][32].
struct alignas(64) Accumulators {
  int32_t v[2 * kTileRows][2 * 16];
};
constexpr int kAccStride = 2 * 16 * sizeof(int32_t);

// RT row tiles (of rows0, rows1 rows) x NB column blocks from block `block`,
// all of Kp; leaves the integers in acc.
template <int RT, int NB>
void multiply(int64_t kp, const uint8_t* q, int64_t ldq, const int8_t* w,
              int64_t wstride, Accumulators& acc) {
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (RT == 2) {
    _tile_zero(2);
    if constexpr (NB == 2) _tile_zero(3);
  }
  const uint8_t* q1 = q + kTileRows * ldq;
  for (int64_t d = 0; d < kp; d += kTileBytes) {
    // B: groups d/4 .. d/4 + 15 of the block, 64 bytes each.
    _tile_loadd(6, w + d * 16, kTileBytes);
    _tile_loadd(4, q + d, ldq);
    _tile_dpbusd(0, 4, 6);
    if constexpr (RT == 2) {
      _tile_loadd(5, q1 + d, ldq);
      _tile_dpbusd(2, 5, 6);
    }
    if constexpr (NB == 2) {
      _tile_loadd(7, w + wstride + d * 16, kTileBytes);
      _tile_dpbusd(1, 4, 7);
      if constexpr (RT == 2) _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, &acc.v[0][0], kAccStride);
  if constexpr (NB == 2) _tile_stored(1, &acc.v[0][16], kAccStride);
  if constexpr (RT == 2) {
    _tile_stored(2, &acc.v[kTileRows][0], kAccStride);
    if constexpr (NB == 2) _tile_stored(3, &acc.v[kTileRows][16], kAccStride);
  }
}

using MultiplyFn = void (*)(int64_t, const uint8_t*, int64_t, const int8_t*, int64_t,
                            Accumulators&);

MultiplyFn multiply_fn(int rt, int nb) {
  if (rt == 2) return nb == 2 ? &multiply<2, 2> : &multiply<2, 1>;
  return nb == 2 ? &multiply<1, 2> : &multiply<1, 1>;
}

// C rows [0, rows) x blocks [block, block + nb) from acc: (acc - 128
// colsum) * (a_scale * w_scale) (+ bias) (+ C), as the VNNI kernel.
void dequantize(const Accumulators& acc, int64_t rows, int64_t nb, int64_t n,
                int64_t block, const float* a_scale, const int32_t* col_sums,
                const float* w_scale, const float* bias, float beta, float* c,
                int64_t ldc) {
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t col = (block + b) * kBlockCols;
    const __mmask16 m = lanes(n - col);
    const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(col_sums + col), 7);
    const __m512 ws = _mm512_maskz_loadu_ps(m, w_scale + col);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + col) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const __m512i a = _mm512_load_si512(&acc.v[r][b * 16]);
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(a_scale[r]), ws);
      const __m512 x = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, offset));
      float* out = c + r * ldc + col;
      _mm512_mask_storeu_ps(out, m, dequantized(x, s, bias != nullptr, bv, beta, m, out));
    }
  }
}

}  // namespace

void amx_release() {
  if (configured_rows >= 0) {
    _tile_release();
    configured_rows = -1;
  }
}

void gemm_tile_amx_int8(int64_t m, int64_t n, int64_t k, int64_t block0,
                        int64_t blocks, const uint8_t* q, int64_t ldq,
                        const float* a_scale, const int8_t* packed,
                        const float* w_scale, const float* bias, float beta,
                        float* c, int64_t ldc) {
  const int64_t kp = padded_depth(k);
  const int64_t wstride = kBlockCols * kp;
  const int32_t* col_sums = column_sums(packed, n, k);
  Accumulators acc;
  // Pairs of row tiles outermost: their A rows (32 x Kp bytes, 16 KiB at
  // k = 512) stay in L1 while the task's column blocks pass.
  for (int64_t r = 0; r < m; r += 2 * kTileRows) {
    int rows0, rows1;
    amx::row_tiles(m, r, rows0, rows1);
    configure(rows0, rows1);
    for (int64_t b = 0; b < blocks; b += 2) {
      const int nb = blocks - b >= 2 ? 2 : 1;
      multiply_fn(rows1 > 0 ? 2 : 1, nb)(kp, q + r * ldq, ldq,
                                         packed + (block0 + b) * wstride, wstride, acc);
      dequantize(acc, rows0 + rows1, nb, n, block0 + b, a_scale + r, col_sums, w_scale,
                 bias, beta, c + r * ldc, ldc);
    }
  }
}

}  // namespace rnnfast::cpu::int8

#else  // not x86-64 Linux: no AMX

namespace rnnfast::cpu::int8 {
void amx_release() {}
void gemm_tile_amx_int8(int64_t, int64_t, int64_t, int64_t, int64_t, const uint8_t*,
                        int64_t, const float*, const int8_t*, const float*,
                        const float*, float, float*, int64_t) {}
}  // namespace rnnfast::cpu::int8

#endif
