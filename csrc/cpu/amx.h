// What rnnfast's two AMX products share (int8_gemm_amx.cpp: AMX-INT8,
// bf16_gemm_amx.cpp: AMX-BF16): the CPU and OS check (amx.cpp, built
// without ISA flags) and, for the AMX units only (they include this after
// their `#pragma GCC target("amx-tile,...")`, with RNNFAST_AMX_UNIT
// defined), the tile configuration both use: 2 row tiles of up to 16 rows
// (A and C) by 2 column blocks (B and C) of 64-byte tile rows.
#pragma once

#include <cstdint>

namespace rnnfast::cpu::amx {

// The AMX features of CPUID leaf 7, EDX.
enum class Feature : int { kBf16 = 22, kInt8 = 25 };

// Whether an AMX product with `feature` may run: the CPU has AMX tiles and
// `feature`, the OS saves their state, Linux lets this process use them
// (asks Linux once, Linux 5.16+), and ATEN_CPU_CAPABILITY caps nothing
// below AMX (avx2, default, or avx512: ATen's AVX512 level has no AMX), as
// it caps ATen's and rnnfast's other kernels.
bool allowed(Feature feature);

}  // namespace rnnfast::cpu::amx

#ifdef RNNFAST_AMX_UNIT
#include <immintrin.h>

#include <cstring>

namespace rnnfast::cpu::amx {

constexpr int kTileRows = 16;   // rows of an A or C tile, of a B tile
constexpr int kTileBytes = 64;  // bytes per tile row

// Tile registers (GCC's tile intrinsics paste their numbers into the
// assembly, so the kernels spell them as literals): C[r][b] = tmm(2r + b),
// A[r] = tmm(4 + r), B[b] = tmm(6 + b).
constexpr int kC00 = 0, kC01 = 1, kC10 = 2, kC11 = 3, kA0 = 4, kA1 = 5, kB0 = 6,
              kB1 = 7;

// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];  // bytes per row of each tile register
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// Loads the configuration of row tile 0 with rows0 rows and row tile 1
// with rows1 (0: left unconfigured, never touched) on the calling thread;
// loading a configuration zeroes the tiles.
inline void configure(int rows0, int rows1) {
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

// The rows of the two row tiles of the pass over rows [r, m) (at most 32):
// {rows0, rows1}, rows1 0 when one tile holds them.
inline void row_tiles(int64_t m, int64_t r, int& rows0, int& rows1) {
  rows0 = static_cast<int>(m - r < kTileRows ? m - r : kTileRows);
  const int64_t rest = m - r - kTileRows;
  rows1 = static_cast<int>(rest <= 0 ? 0 : rest < kTileRows ? rest : kTileRows);
}

}  // namespace rnnfast::cpu::amx
#endif
