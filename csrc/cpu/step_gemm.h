// rnnfast's own float32 product for the per-step recurrent GEMM of a time
// loop at small batch: C[m, n] = A[m, k] B[k, n] + beta C with m <= 16 rows
// (the batch of a decode or a small-batch sequence) and B a weight used at
// every step, packed once per op into this kernel's panel layout.
//
// Why: at m <= 16 a step reads the whole weight (up to 1 MiB at H 256,
// which fits the L2 of a core) for little arithmetic, so the product is
// bound by streaming the weight; MKL's small-GEMM path runs far below that
// on some CPUs (AMD EPYC: 18 GFLOP/s for [4,128]x[128,512], issue 13).
// StepWeight (blas.h) measures this kernel against MKL's packed product at
// the first use of a shape and keeps the faster (never chosen by vendor).
//
// Packed layout: B's n columns in panels of kPanelCols (one 512-bit vector,
// two 256-bit ones), each panel k rows of kPanelCols floats (row kk of a
// panel holds B[kk, panel columns]), the last panel zero padded; panels are
// consecutive and 64-byte aligned:
//   B[kk, j] at packed[(j / 16) * 16 k + kk * 16 + j % 16]
//
// Register tiles of up to kMaxTileRows rows x a few panels, accumulated
// over all of k in registers (no k blocking: k <= a few thousand) with one
// FMA per row and vector; the AVX-512 and the AVX2 (FMA) kernels compute the
// same sums in the same order (k ascending per element).
//
// The kernels include no ATen header (see int8_gemm_avx512.cpp); the
// packing, the dispatch and the threading are in step_gemm.cpp.
#pragma once

#include <cstdint>

namespace rnnfast::cpu::step_gemm {

constexpr int64_t kPanelCols = 16;
// The most rows this product is a candidate for (StepWeight), whose
// one-time measurement then picks it or the BLAS's. On the Xeon (AVX-512,
// one thread) it was still ahead at 32 rows: [32, 256] x [256, 1024] 114
// against MKL's packed 130 us, [32, 1024] x [1024, 256] 111 against 150,
// H=128 23 against 26 (the products of B=64's row groups on two threads);
// beyond that MKL's large-GEMM path is efficient anyway.
constexpr int64_t kMaxRows = 32;

inline int64_t panels(int64_t n) { return (n + kPanelCols - 1) / kPanelCols; }
// Asks for the cache lines of columns [begin, end) (begin < end) of rows
// [0, rows) of a row-major float matrix with row stride ld, so that they
// are on their way before a product reads or writes them: every 64-byte
// line of each row's span once, the span's last one included.
inline void prefetch_rows(int64_t rows, const float* p, int64_t ld,
                          int64_t begin, int64_t end) {
  constexpr int64_t kLineFloats = 64 / int64_t(sizeof(float));
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = p + r * ld;
    for (int64_t j = begin; j < end - 1; j += kLineFloats) {
      __builtin_prefetch(row + j);
    }
    __builtin_prefetch(row + end - 1);
  }
}

// Floats of the packed form of a [k, n] operand.
inline int64_t packed_floats(int64_t n, int64_t k) {
  return panels(n) * kPanelCols * k;
}

// Which kernels this CPU runs (honouring ATEN_CPU_CAPABILITY as the
// pointwise kernels do): "AVX512", "AVX2", or nullptr where neither is
// available (the product is then never chosen).
const char* kernels_in_use();

// packed [packed_floats(n, k)] (64-byte aligned) from op(B) [k, n]: B is
// [k, n] row-major (trans_b false) or [n, k] row-major (trans_b true), with
// row stride ldb.
void pack(bool trans_b, int64_t n, int64_t k, const float* b, int64_t ldb,
          float* packed);

// C[m, n] = A[m, k] B + beta C (beta 0 or 1; with beta 0, C is not read),
// row-major with strides lda and ldc, B packed. Runs on the calling thread
// when serial, else splits the panels over the threads. Requires
// kernels_in_use() != nullptr.
void multiply(bool serial, int64_t m, int64_t n, int64_t k, const float* a,
              int64_t lda, const float* packed, float beta, float* c,
              int64_t ldc);

// multiply, of the columns of panels [panel_begin, panel_end) only, on the
// calling thread (a product split by columns over a StepTeam): each element
// is the same sum, in the same order, as multiply's.
void multiply_panel_range(int64_t m, int64_t n, int64_t k, const float* a,
                          int64_t lda, const float* packed,
                          int64_t panel_begin, int64_t panel_end, float beta,
                          float* c, int64_t ldc);

// ---- A weight used once, in its stored layout ------------------------------
// C[m, n] = A[m, k] B^T (+ bias) + beta C with B [n, k] row-major as a
// weight is stored (nn.LSTM's [4H, in]), read once where it lies: the
// products of a one-step call (a streaming decode's input projection and
// recurrent product, or any time loop's first step), whose weight is used
// once, so that packing it (above, or MKL's) could never pay, and where
// MKL's plain product of a few rows runs far below the rate of reading the
// weight (on the 2-core Xeon, one thread, [8, 512] x [512, 2048] from L3:
// MKL 484-534 us, 4 MiB at 8 GB/s; this product 213-226 us). Dot-product
// tiles (step_gemm_stored_tiles.h); the AVX-512 and the AVX2 kernels sum
// each element's products in lanes of their own width, so they round
// differently.
//
// The most rows it is used for (StepWeight's first product and the
// input projection of few rows, blas.h).
constexpr int64_t kMaxStoredRows = 16;

// bias: null, or n values added to every row. beta 0 or 1 (with 0, C is
// not read). Runs on the calling thread when serial, else splits the
// columns (B's rows) over the threads. Requires kernels_in_use() != nullptr.
void multiply_stored(bool serial, int64_t m, int64_t n, int64_t k,
                     const float* a, int64_t lda, const float* b, int64_t ldb,
                     const float* bias, float beta, float* c, int64_t ldc);

// The same for a bfloat16 weight (as uint16_t bits) and float A and C: the
// one-use products of a bfloat16 op that computes in float (on CPUs without
// bfloat16 instructions, blas.h, native_bfloat16), which read the weight
// where it lies instead of a float copy made at every call. Each weight
// element is widened to float exactly as it is loaded, so every element of
// C is the same sum, in the same order, as multiply_stored's of the weight
// converted to float. Requires kernels_in_use() != nullptr.
void multiply_stored_bf16_weight(bool serial, int64_t m, int64_t n, int64_t k,
                                 const float* a, int64_t lda,
                                 const uint16_t* b, int64_t ldb,
                                 const float* bias, float beta, float* c,
                                 int64_t ldc);

// The same for a bfloat16 weight and A (as uint16_t bits), C in float: on
// CPUs with AVX512-BF16 where ATen's capability is AVX512
// (bf16_stored_supported()), whose bfloat16 ops keep their operands in
// bfloat16 (blas.h, native_bfloat16). Each float lane sums products of
// pairs of k. For at most kMaxStoredBf16Rows rows: on the Xeon (one thread,
// against MKL's bfloat16 GEMM, which runs on AMX there) 2-4 rows took
// 0.33-0.63x MKL's time for 0.5-2 MiB weights, 1 row 0.94-1.11x, but 8
// rows 1.06-1.9x and 16 rows 1.9-3.8x (vdpbf16ps ran at a third of the
// rate of float multiply-adds per instruction there).
constexpr int64_t kMaxStoredBf16Rows = 4;
bool bf16_stored_supported();
void multiply_stored_bf16(bool serial, int64_t m, int64_t n, int64_t k,
                          const uint16_t* a, int64_t lda, const uint16_t* b,
                          int64_t ldb, const float* bias, float beta,
                          float* c, int64_t ldc);

// The kernels of one ISA: columns of panels [panel_begin, panel_end) only.
void multiply_panels_avx512(int64_t m, int64_t n, int64_t k, const float* a,
                            int64_t lda, const float* packed,
                            int64_t panel_begin, int64_t panel_end,
                            float beta, float* c, int64_t ldc);
void multiply_panels_avx2(int64_t m, int64_t n, int64_t k, const float* a,
                          int64_t lda, const float* packed,
                          int64_t panel_begin, int64_t panel_end, float beta,
                          float* c, int64_t ldc);
// The kernels of one ISA of multiply_stored: columns [col_begin, col_end).
void multiply_stored_columns_avx512(int64_t m, int64_t n, int64_t k,
                                    const float* a, int64_t lda,
                                    const float* b, int64_t ldb,
                                    int64_t col_begin, int64_t col_end,
                                    const float* bias, bool add, float* c,
                                    int64_t ldc);
void multiply_stored_columns_avx2(int64_t m, int64_t n, int64_t k,
                                  const float* a, int64_t lda, const float* b,
                                  int64_t ldb, int64_t col_begin,
                                  int64_t col_end, const float* bias, bool add,
                                  float* c, int64_t ldc);
void multiply_stored_columns_avx512_bf16_weight(
    int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
    const uint16_t* b, int64_t ldb, int64_t col_begin, int64_t col_end,
    const float* bias, bool add, float* c, int64_t ldc);
void multiply_stored_columns_avx2_bf16_weight(
    int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
    const uint16_t* b, int64_t ldb, int64_t col_begin, int64_t col_end,
    const float* bias, bool add, float* c, int64_t ldc);
void multiply_stored_columns_avx512bf16(int64_t m, int64_t n, int64_t k,
                                        const uint16_t* a, int64_t lda,
                                        const uint16_t* b, int64_t ldb,
                                        int64_t col_begin, int64_t col_end,
                                        const float* bias, bool add, float* c,
                                        int64_t ldc);
bool avx512_supported();
bool avx2_supported();
bool avx512bf16_supported();

}  // namespace rnnfast::cpu::step_gemm
