// The packing of bf16_gemm.h: plain C++, built without ISA flags (it may
// run before anything has checked the CPU).
#include "bf16_gemm.h"

#include <cstring>

namespace rnnfast::cpu::bf16 {

void pack(bool trans_b, int64_t n, int64_t k, const uint16_t* b, int64_t ldb,
          uint16_t* packed) {
  const int64_t kp = padded_depth(k);
  std::memset(packed, 0, sizeof(uint16_t) * packed_elements(n, k));
  for (int64_t j = 0; j < n; ++j) {
    uint16_t* block = packed + (j / kBlockCols) * kBlockCols * kp;
    const int64_t col = j % kBlockCols;
    for (int64_t d = 0; d < k; ++d) {
      // op(B)[d, j]
      const uint16_t v = trans_b ? b[j * ldb + d] : b[d * ldb + j];
      block[(d / 2) * 2 * kBlockCols + col * 2 + (d % 2)] = v;
    }
  }
}

}  // namespace rnnfast::cpu::bf16
