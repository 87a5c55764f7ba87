// The register tiles of step_gemm.h, written once over a vector type and
// included by step_gemm_avx512.cpp and step_gemm_avx2.cpp, each under its own
// target pragma (everything here has internal linkage, so no function is
// shared between the two units).
//
// Traits: Vec (the register type), kWidth (floats per vector),
// kMaxTileRows, panels_per_tile(rows) (how many 16-column panels a tile of
// that many rows covers, so that rows x vectors accumulators and the
// operands fit the register file), zero(), broadcast(const float*),
// load(const float*) (aligned), fmadd(a, b, c) = a b + c, and
// store(float* c, Vec v, int64_t count, bool add) writing lanes
// [0, count) of v (+ C's lanes when add) to C (count may be 0).
#pragma once

#include <cstdint>

#include "step_gemm.h"

namespace rnnfast::cpu::step_gemm {
namespace {

template <typename Tr, int MR, int NP>
inline void tile(int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* packed, int64_t panel, float beta, float* c,
                 int64_t ldc) {
  using Vec = typename Tr::Vec;
  constexpr int kVecs = static_cast<int>(kPanelCols / Tr::kWidth);
  constexpr int NV = NP * kVecs;
  const int64_t panel_floats = kPanelCols * k;
  const float* b = packed + panel * panel_floats;
  Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Tr::zero();
  for (int64_t kk = 0; kk < k; ++kk) {
    Vec w[NV];
    for (int v = 0; v < NV; ++v) {
      w[v] = Tr::load(b + (v / kVecs) * panel_floats + kk * kPanelCols +
                      (v % kVecs) * Tr::kWidth);
    }
    for (int r = 0; r < MR; ++r) {
      const Vec x = Tr::broadcast(a + r * lda + kk);
      for (int v = 0; v < NV; ++v) acc[r][v] = Tr::fmadd(x, w[v], acc[r][v]);
    }
  }
  const int64_t col0 = panel * kPanelCols;
  const bool add = beta != 0.0f;
  // Unrolled, as the loops above are: a loop here indexing acc by a
  // run-time r or v makes GCC give acc a home on the stack and store every
  // accumulator to it at every kk, which cut the AVX2 kernel's rate on
  // AMD EPYC (one 256-bit store per cycle against two multiply-adds) to a
  // third to a half.
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* row = c + r * ldc;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const int64_t col = col0 + v * Tr::kWidth;
      const int64_t left = n - col;
      Tr::store(row + col, acc[r][v],
                left >= Tr::kWidth ? Tr::kWidth : (left > 0 ? left : 0), add);
    }
  }
}

// A tile of MR rows over np <= NP panels (np a run-time count).
template <typename Tr, int MR, int NP>
inline void tile_upto(int np, int64_t n, int64_t k, const float* a,
                      int64_t lda, const float* packed, int64_t panel,
                      float beta, float* c, int64_t ldc) {
  if constexpr (NP > 1) {
    if (np < NP) {
      return tile_upto<Tr, MR, NP - 1>(np, n, k, a, lda, packed, panel, beta,
                                       c, ldc);
    }
  }
  tile<Tr, MR, NP>(n, k, a, lda, packed, panel, beta, c, ldc);
}

// Rows [0, MR) over panels [panel, panel + np).
template <typename Tr, int MR>
inline void tile_rows(int np, int64_t n, int64_t k, const float* a,
                      int64_t lda, const float* packed, int64_t panel,
                      float beta, float* c, int64_t ldc) {
  tile_upto<Tr, MR, Tr::panels_per_tile(MR)>(np, n, k, a, lda, packed, panel,
                                             beta, c, ldc);
}

// rows (1 .. Tr::kMaxTileRows) as a compile-time count.
template <typename Tr, int MR = Tr::kMaxTileRows>
inline void tile_any_rows(int rows, int np, int64_t n, int64_t k,
                          const float* a, int64_t lda, const float* packed,
                          int64_t panel, float beta, float* c, int64_t ldc) {
  if constexpr (MR > 1) {
    if (rows < MR) {
      return tile_any_rows<Tr, MR - 1>(rows, np, n, k, a, lda, packed, panel,
                                       beta, c, ldc);
    }
  }
  tile_rows<Tr, MR>(np, n, k, a, lda, packed, panel, beta, c, ldc);
}

// C[m, columns of panels [panel_begin, panel_end)]: the rows in balanced
// blocks of at most kMaxTileRows; for each group of panels a tile covers,
// every row block, so the group's panels are read from L1 after the first.
template <typename Tr>
void multiply_panels(int64_t m, int64_t n, int64_t k, const float* a,
                     int64_t lda, const float* packed, int64_t panel_begin,
                     int64_t panel_end, float beta, float* c, int64_t ldc) {
  if (m <= 0 || panel_begin >= panel_end) return;
  const int64_t blocks = (m + Tr::kMaxTileRows - 1) / Tr::kMaxTileRows;
  const int64_t base = m / blocks, extra = m % blocks;  // rows per block
  // The widest tile of the smallest block decides the panels per group.
  const int group = Tr::panels_per_tile(static_cast<int>(base + (extra > 0)));
  for (int64_t p = panel_begin; p < panel_end; p += group) {
    const int np = static_cast<int>(panel_end - p < group ? panel_end - p : group);
    // C's lines of the next group, asked for while this group's tiles run
    // (a few us at 16-32 rows): a tile reads or writes C only at its end,
    // and an LSTM step adds its product to gates the input projection wrote
    // long before, out of every cache at B >= 32 (26 MiB at T=100 B=64
    // H=256), so each tile waited on memory there. On the AMD EPYC Zen 3
    // (one thread, 100 products [32, 256] x [256, 1024] into rows 8 KiB
    // apart of a 26 MiB buffer, caches flushed, medians of 12): beta 1
    // 40.6-43.3 ms without, 30.2-34.7 with; beta 0 into one hot buffer
    // 29.2-32.2 either way. T=100 B=64 H=256 inference on 2 threads,
    // rnnfast.LSTM's time over nn.LSTM's, median of 15 interleaved rounds:
    // 1.08-1.11 without, 0.98-1.05 with.
    if (p + group < panel_end) {
      const int64_t next = p + group;
      const int64_t next_end =
          (next + group < panel_end ? next + group : panel_end) * kPanelCols;
      prefetch_rows(m, c, ldc, next * kPanelCols, next_end < n ? next_end : n);
    }
    int64_t row = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int rows = static_cast<int>(base + (blk < extra));
      tile_any_rows<Tr>(rows, np, n, k, a + row * lda, lda, packed, p, beta,
                        c + row * ldc, ldc);
      row += rows;
    }
  }
}

}  // namespace
}  // namespace rnnfast::cpu::step_gemm
