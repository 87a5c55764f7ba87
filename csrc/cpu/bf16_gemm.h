// rnnfast's own bfloat16 product for the per-step recurrent GEMM of a
// native-bfloat16 LSTM or LayerNorm-LSTM (blas.h,
// StepWeight<c10::BFloat16>) on CPUs with
// AMX-BF16: C[m, n] = A[m, k] op(B) + beta C with A and the weight in
// bfloat16 and C in float (float products and sums: tdpbf16ps), the weight
// packed once per call into AMX tiles. MKL's bfloat16 GEMM (the other
// path) repacks the weight at every product, which at a step's size is a
// large share of its time.
//
// Packed weight layout, for op(B) [k, n]: the n columns in blocks of
// kBlockCols = 16 (the 16 float lanes of a C tile row), k in pairs (the two
// bfloat16 one lane of tdpbf16ps sums), zero padded to whole blocks and to a
// depth Kp of whole 32-element rows of an A tile (kDepthAlign):
//   element (block b, pair g, column c, e) at b * 16 * Kp + g * 32 + c * 2 + e
// so 16 pairs of a block are a B tile as loaded (16 rows of 64 bytes).
//
// The product reads A rows as they lie (lda elements apart) in whole tile
// rows of 32 elements and C in whole blocks of 16 columns, so it runs only
// where k is a multiple of 32 and n of 16 (supported()); other shapes go to
// MKL.
#pragma once

#include <cstdint>

namespace rnnfast::cpu::bf16 {

constexpr int64_t kBlockCols = 16;
constexpr int64_t kDepthAlign = 32;

inline int64_t column_blocks(int64_t n) {
  return (n + kBlockCols - 1) / kBlockCols;
}
inline int64_t padded_depth(int64_t k) {
  return (k + kDepthAlign - 1) / kDepthAlign * kDepthAlign;
}
// Elements (bfloat16, as uint16_t bits) of the packed form of a [k, n]
// operand.
inline int64_t packed_elements(int64_t n, int64_t k) {
  return column_blocks(n) * kBlockCols * padded_depth(k);
}

// Whether the product runs the shape: k a multiple of 32, n of 16.
inline bool supported(int64_t n, int64_t k) {
  return n > 0 && k > 0 && n % kBlockCols == 0 && k % kDepthAlign == 0;
}

// Packs op(B) [k, n] (B is [n, k] when trans_b, else [k, n]; row stride
// ldb; bfloat16 bits) into `packed` (packed_elements(n, k)).
void pack(bool trans_b, int64_t n, int64_t k, const uint16_t* b, int64_t ldb,
          uint16_t* packed);

// C[m, blocks [block0, block0 + blocks) of 16 columns] = A[m, k] op(B) +
// beta C on the calling thread (beta 0 or 1; 0: C is not read), for a shape
// supported(n, k). Only where amx::allowed(kBf16) (amx.h).
void multiply_blocks(int64_t m, int64_t k, const uint16_t* a, int64_t lda,
                     const uint16_t* packed, int64_t block0, int64_t blocks,
                     float beta, float* c, int64_t ldc);

}  // namespace rnnfast::cpu::bf16
