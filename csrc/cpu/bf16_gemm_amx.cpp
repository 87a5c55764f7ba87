// The AMX-BF16 product of bf16_gemm.h (its packing is bf16_gemm.cpp, built
// without ISA flags). Like the int8 AMX unit it includes no ATen header (the
// target pragma below would change what they compile to); the caller
// (blas.cpp) threads it.
#include "bf16_gemm.h"

#if defined(__x86_64__) && defined(__linux__)
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define RNNFAST_AMX_UNIT
#include "amx.h"

namespace rnnfast::cpu::bf16 {
namespace {

using amx::kTileBytes;
using amx::kTileRows;

// C tiles of RT row tiles (from c, ldc floats apart) x NB column blocks
// (from column block pointer w, wstride elements apart) += A op(B) over
// all k, loaded from C first when accumulate, else from zero.
template <int RT, int NB>
void multiply(int64_t k, const uint16_t* a, int64_t lda, const uint16_t* w,
              int64_t wstride, bool accumulate, float* c, int64_t ldc) {
  const int64_t a_stride = lda * 2, c_stride = ldc * 4;  // bytes
  float* c1 = c + kTileRows * ldc;
  if (accumulate) {
    _tile_loadd(0, c, c_stride);
    if constexpr (NB == 2) _tile_loadd(1, c + kBlockCols, c_stride);
    if constexpr (RT == 2) {
      _tile_loadd(2, c1, c_stride);
      if constexpr (NB == 2) _tile_loadd(3, c1 + kBlockCols, c_stride);
    }
  } else {
    _tile_zero(0);
    if constexpr (NB == 2) _tile_zero(1);
    if constexpr (RT == 2) {
      _tile_zero(2);
      if constexpr (NB == 2) _tile_zero(3);
    }
  }
  const uint16_t* a1 = a + kTileRows * lda;
  for (int64_t d = 0; d < k; d += kDepthAlign) {
    // B: pairs d/2 .. d/2 + 15 of the block, 32 elements (64 bytes) each.
    _tile_loadd(6, w + d * kBlockCols, kTileBytes);
    _tile_loadd(4, a + d, a_stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (RT == 2) {
      _tile_loadd(5, a1 + d, a_stride);
      _tile_dpbf16ps(2, 5, 6);
    }
    if constexpr (NB == 2) {
      _tile_loadd(7, w + wstride + d * kBlockCols, kTileBytes);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (RT == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, c_stride);
  if constexpr (NB == 2) _tile_stored(1, c + kBlockCols, c_stride);
  if constexpr (RT == 2) {
    _tile_stored(2, c1, c_stride);
    if constexpr (NB == 2) _tile_stored(3, c1 + kBlockCols, c_stride);
  }
}

using MultiplyFn = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*,
                            int64_t, bool, float*, int64_t);

MultiplyFn multiply_fn(int rt, int nb) {
  if (rt == 2) return nb == 2 ? &multiply<2, 2> : &multiply<2, 1>;
  return nb == 2 ? &multiply<1, 2> : &multiply<1, 1>;
}

}  // namespace

void multiply_blocks(int64_t m, int64_t k, const uint16_t* a, int64_t lda,
                     const uint16_t* packed, int64_t block0, int64_t blocks,
                     float beta, float* c, int64_t ldc) {
  const int64_t wstride = kBlockCols * k;  // k is its own padded depth
  const bool accumulate = beta != 0.0f;
  // Pairs of row tiles outermost: their A rows stay in L1 while the
  // blocks pass.
  for (int64_t r = 0; r < m; r += 2 * kTileRows) {
    int rows0, rows1;
    amx::row_tiles(m, r, rows0, rows1);
    amx::configure(rows0, rows1);
    const MultiplyFn two = multiply_fn(rows1 > 0 ? 2 : 1, 2);
    const MultiplyFn one = multiply_fn(rows1 > 0 ? 2 : 1, 1);
    for (int64_t b = 0; b < blocks; b += 2) {
      const int64_t block = block0 + b;
      (blocks - b >= 2 ? two : one)(k, a + r * lda, lda, packed + block * wstride,
                                    wstride, accumulate,
                                    c + r * ldc + block * kBlockCols, ldc);
    }
  }
  _tile_release();
}

}  // namespace rnnfast::cpu::bf16

#else  // not x86-64 Linux: no AMX

namespace rnnfast::cpu::bf16 {
void multiply_blocks(int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*,
                     int64_t, int64_t, float, float*, int64_t) {}
}  // namespace rnnfast::cpu::bf16

#endif
