// The AMX-BF16 product of bf16_gemm.h (its packing is bf16_gemm.cpp, built
// without ISA flags). Like the int8 AMX unit it includes no ATen header (the
// target pragma below would change what they compile to); the caller
// (blas.cpp) threads it.
#include "bf16_gemm.h"

#include <cstring>

#if defined(__x86_64__) && defined(__linux__)
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#include <immintrin.h>

namespace rnnfast::cpu::bf16 {
namespace {

constexpr int kTileRows = 16;   // rows of an A or C tile, pairs of a B tile
constexpr int kTileBytes = 64;  // bytes per tile row

// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];  // bytes per row of each tile register
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// Tile registers (GCC's tile intrinsics paste their numbers into the
// assembly, so the calls spell them as literals): C[r][b] = tmm(2r + b),
// A[r] = tmm(4 + r), B[b] = tmm(6 + b).
constexpr int kC00 = 0, kC01 = 1, kC10 = 2, kC11 = 3, kA0 = 4, kA1 = 5, kB0 = 6,
              kB1 = 7;

// Configures row tile 0 with rows0 rows and row tile 1 with rows1 (0: left
// unconfigured); loading a configuration zeroes the tiles.
void configure(int rows0, int rows1) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  auto set = [&](int tile, int rows) {
    cfg.rows[tile] = static_cast<uint8_t>(rows);
    cfg.colsb[tile] = rows > 0 ? kTileBytes : 0;
  };
  set(kC00, rows0);
  set(kC01, rows0);
  set(kA0, rows0);
  set(kC10, rows1);
  set(kC11, rows1);
  set(kA1, rows1);
  set(kB0, kTileRows);
  set(kB1, kTileRows);
  _tile_loadconfig(&cfg);
}

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
    const int rows0 = static_cast<int>(m - r < kTileRows ? m - r : kTileRows);
    const int64_t rest = m - r - kTileRows;
    const int rows1 = static_cast<int>(rest <= 0 ? 0 : rest < kTileRows ? rest : kTileRows);
    configure(rows0, rows1);
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
