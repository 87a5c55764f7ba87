// Pointwise kernels built for any x86-64 / other CPU (no SIMD assumptions).
#define CPU_CAPABILITY DEFAULT
#include "step_kernels.h"

namespace rnnfast::cpu {
const KernelTable& kernel_table_default() {
  return DEFAULT::make_kernel_table("DEFAULT");
}
}  // namespace rnnfast::cpu
