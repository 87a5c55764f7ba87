// Pointwise kernels for any CPU without a table of its own: at::vec at its
// DEFAULT capability (generic lanes on x86-64, NEON vectors on aarch64).
#define CPU_CAPABILITY DEFAULT
#include "step_kernels.h"

namespace rnnfast::cpu {
const KernelTable& kernel_table_default() {
  return DEFAULT::make_kernel_table("DEFAULT");
}
}  // namespace rnnfast::cpu
