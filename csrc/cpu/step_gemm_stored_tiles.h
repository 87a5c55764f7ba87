// The tiles of step_gemm.h's products of a weight in its stored layout
// (multiply_stored, multiply_stored_bf16), written once over a vector type
// and included by step_gemm_avx512.cpp, step_gemm_avx2.cpp and
// step_gemm_avx512bf16.cpp, each under its own target pragma (internal
// linkage, as step_gemm_tiles.h).
//
// Dot-product form: C[r, j] = sum_kk A[r, kk] B[j, kk], both operands read
// along k, where they are contiguous. A tile of MR rows of A by NC rows of
// B (NC columns of C) keeps MR x NC vector accumulators: each holds the
// partial sums of one element over the depths kk = lane (mod kWidth) (a
// pair of depths per lane for bfloat16), in ascending kk; a last, partial
// vector of k is read with a mask. The tile's accumulators are then
// summed across their lanes eight at a time (each folded to 256 bits where
// wider, then one transpose-add tree, the same order of additions for every
// element wherever it lies in the tile), and written with the bias and C. Every B vector loaded stays in a
// register for the MR rows' multiply-adds; B's rows of a tile are read
// from L1 again for the next block of A's rows.
//
// Traits: Elem (A's element: float, or bfloat16 bits as uint16_t),
// WeightElem (B's: Elem, or bfloat16 bits read into float vectors, each
// converted exactly, for a float product of a bfloat16 weight), In (a
// vector of kWidth of them, as loaded), Vec (a vector of float
// accumulators), zero(), loadu(const Elem*) and loadu(const WeightElem*)
// (unaligned), load_first(const Elem* or const WeightElem*, count)
// (elements [0, count) read, the others zero, count < kWidth),
// fmadd(In x, In w, Vec acc) (acc plus the products
// of x and w: lane by lane for float; for bfloat16 each float lane adds the
// products of a pair of elements, vdpbf16ps), fold(Vec) -> __m256 (lanes
// summed in pairs down to eight), kMaxStoredRows and stored_columns(rows)
// (how many rows of B a tile of that many rows of A covers, so that the
// accumulators and operands fit the register file).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "step_gemm.h"

namespace rnnfast::cpu::step_gemm {
namespace {

// The eight sums of the lanes of v[0..8): lane i of the result is v[i]'s.
inline __m256 sum_lanes8(const __m256 v[8]) {
  // [v0 01, v0 23, v1 01, v1 23 | v0 45, v0 67, v1 45, v1 67], ...
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  // [v0 0-3, v1 0-3, v2 0-3, v3 0-3 | v0 4-7, v1 4-7, v2 4-7, v3 4-7]
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  const __m256 low = _mm256_permute2f128_ps(u0, u1, 0x20);
  const __m256 high = _mm256_permute2f128_ps(u0, u1, 0x31);
  return _mm256_add_ps(low, high);
}

// The traits of a float product of a bfloat16 weight over those of a float
// ISA (Base, which adds widen_bf16(const uint16_t*): kWidth bfloat16
// widened to floats, exactly, a bfloat16's bits being a float's top half):
// B read through it, a last partial vector through a zeroed buffer; A and
// everything else as Base.
template <typename Base>
struct Bf16WeightOf : Base {
  using WeightElem = uint16_t;
  using Vec = typename Base::Vec;
  using Base::load_first;
  using Base::loadu;
  static Vec loadu(const uint16_t* p) { return Base::widen_bf16(p); }
  static Vec load_first(const uint16_t* p, int64_t count) {
    alignas(64) uint16_t part[Base::kWidth] = {};
    for (int64_t i = 0; i < count; ++i) part[i] = p[i];
    return Base::widen_bf16(part);
  }
};

// What the AVX-512 traits of the float and the bfloat16 tiles share (both
// accumulate in __m512): the tile shapes and the fold to 256 bits. Shapes
// measured for float on the Xeon (one thread, [n, k] = [1024, 256] in L2
// and [2048, 512] from L3): 8 x 3 tiles ran at 0.48-0.57 ns per
// multiply-add of vectors against 0.32-0.34 for 6 x 4 and 4 x 6 (8 rows
// run as two blocks of 4), and a single row streamed the weight fastest 4
// rows of B at a time; so up to 6 rows of A x 4 rows of B, or 4 x 6, 2-3 x
// 6, 1 x 4. A template, so that the AVX2 unit, which includes this header
// too, never compiles its AVX-512 code.
template <typename V = __m512>
struct Avx512StoredTiles {
  static constexpr int kMaxStoredRows = 6;
  static constexpr int stored_columns(int rows) {
    return rows == 1 ? 4 : rows <= 4 ? 6 : 4;
  }
  static __m256 fold(V v) {
    const __m256 high =
        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return _mm256_add_ps(_mm512_castps512_ps256(v), high);
  }
};

// C[rows [0, MR), columns [j0, j0 + cols)]: A's rows [0, MR) by B's rows
// [j0, j0 + cols), cols <= NC (fewer in the last tile of a range).
template <typename Tr, int MR, int NC, typename E = typename Tr::Elem,
          typename W = typename Tr::WeightElem>
inline void stored_tile(int cols, int64_t k, const E* a, int64_t lda,
                        const W* b, int64_t ldb, int64_t j0, const float* bias,
                        bool add, float* c, int64_t ldc) {
  using Vec = typename Tr::Vec;
  using In = typename Tr::In;
  Vec acc[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NC; ++j) acc[r][j] = Tr::zero();
  const W* rows[NC];
  for (int j = 0; j < NC; ++j) {
    // a missing row reads the last one again (its sums are not stored)
    rows[j] = b + (j0 + (j < cols ? j : cols - 1)) * ldb;
  }
  int64_t kk = 0;
  for (; kk + Tr::kWidth <= k; kk += Tr::kWidth) {
    In w[NC];
    for (int j = 0; j < NC; ++j) {
      w[j] = Tr::loadu(rows[j] + kk);
      // Kept in a register: left to itself, GCC folds the load into each
      // row's multiply-add, loading B MR times (AVX-512, [1024, 256] in
      // L2: 2 rows 19.9 -> 14.4 us, 3 rows 25.4 -> 18.2 us).
      if constexpr (MR > 1) asm("" : "+v"(w[j]));
    }
    for (int r = 0; r < MR; ++r) {
      const In x = Tr::loadu(a + r * lda + kk);
      for (int j = 0; j < NC; ++j) acc[r][j] = Tr::fmadd(x, w[j], acc[r][j]);
    }
  }
  if (kk < k) {  // a last, partial vector, masked
    const int64_t left = k - kk;
    In w[NC];
    for (int j = 0; j < NC; ++j) w[j] = Tr::load_first(rows[j] + kk, left);
    for (int r = 0; r < MR; ++r) {
      const In x = Tr::load_first(a + r * lda + kk, left);
      for (int j = 0; j < NC; ++j) acc[r][j] = Tr::fmadd(x, w[j], acc[r][j]);
    }
  }
  // The MR x NC sums, eight at a time in row-major order.
  constexpr int kSums = MR * NC, kGroups = (kSums + 7) / 8;
  alignas(32) float sums[kGroups * 8];
  for (int g = 0; g < kGroups; ++g) {
    __m256 folded[8];
    for (int i = 0; i < 8; ++i) {
      const int e = g * 8 + i;
      folded[i] = e < kSums ? Tr::fold(acc[e / NC][e % NC]) : _mm256_setzero_ps();
    }
    _mm256_store_ps(sums + g * 8, sum_lanes8(folded));
  }
  for (int r = 0; r < MR; ++r) {
    float* row = c + r * ldc + j0;
    const float* sum = sums + r * NC;
    for (int j = 0; j < cols; ++j) {
      float v = sum[j];
      if (bias != nullptr) v += bias[j0 + j];
      row[j] = add ? row[j] + v : v;
    }
  }
}

// One tile of MR rows at column j0: NC columns, or those left before n.
template <typename Tr, int MR, typename E = typename Tr::Elem,
          typename W = typename Tr::WeightElem>
inline void stored_rows(int64_t n, int64_t k, const E* a, int64_t lda,
                        const W* b, int64_t ldb, int64_t j0, const float* bias,
                        bool add, float* c, int64_t ldc) {
  constexpr int NC = Tr::stored_columns(MR);
  const int64_t left = n - j0;
  stored_tile<Tr, MR, NC>(static_cast<int>(left < NC ? left : NC), k, a, lda,
                          b, ldb, j0, bias, add, c, ldc);
}

// rows (1 .. Tr::kMaxStoredRows) as a compile-time count.
template <typename Tr, int MR = Tr::kMaxStoredRows,
          typename E = typename Tr::Elem, typename W = typename Tr::WeightElem>
inline void stored_any_rows(int rows, int64_t n, int64_t k, const E* a,
                            int64_t lda, const W* b, int64_t ldb, int64_t j0,
                            const float* bias, bool add, float* c,
                            int64_t ldc) {
  if constexpr (MR > 1) {
    if (rows < MR) {
      return stored_any_rows<Tr, MR - 1>(rows, n, k, a, lda, b, ldb, j0, bias,
                                         add, c, ldc);
    }
  }
  stored_rows<Tr, MR>(n, k, a, lda, b, ldb, j0, bias, add, c, ldc);
}

// C[m, columns [col_begin, col_end)] = A B^T (+ bias) (+ C when add): the
// rows in balanced blocks of at most kMaxStoredRows; for each group of
// columns (the width of the largest block's tile), every row block, so the
// group's rows of B are read from L1 after the first block. Each element
// is the same sum whatever the column range (a split over threads).
template <typename Tr, typename E = typename Tr::Elem,
          typename W = typename Tr::WeightElem>
void multiply_stored_columns(int64_t m, int64_t n, int64_t k, const E* a,
                             int64_t lda, const W* b, int64_t ldb,
                             int64_t col_begin, int64_t col_end,
                             const float* bias, bool add, float* c,
                             int64_t ldc) {
  if (m <= 0 || col_begin >= col_end) return;
  const int64_t blocks = (m + Tr::kMaxStoredRows - 1) / Tr::kMaxStoredRows;
  const int64_t base = m / blocks, extra = m % blocks;  // rows per block
  const int group = Tr::stored_columns(static_cast<int>(base + (extra > 0)));
  for (int64_t j = col_begin; j < col_end; j += group) {
    const int64_t end = j + group < col_end ? j + group : col_end;
    int64_t row = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int rows = static_cast<int>(base + (blk < extra));
      // A smaller block's tile may be wider than the group: it is clipped
      // to the group.
      for (int64_t jj = j; jj < end; jj += Tr::stored_columns(rows)) {
        stored_any_rows<Tr>(rows, end, k, a + row * lda, lda, b, ldb, jj,
                            bias, add, c + row * ldc, ldc);
      }
      row += rows;
    }
  }
}

}  // namespace
}  // namespace rnnfast::cpu::step_gemm
