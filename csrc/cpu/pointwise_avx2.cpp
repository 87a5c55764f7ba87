// Pointwise kernels built for AVX2 + FMA; only called on CPUs that have them.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
// The target pragma enables the instructions for the code below but, unlike
// -m flags, does not define the feature macros that sleef.h and at::vec test.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "step_kernels.h"

namespace rnnfast::cpu {
const KernelTable& kernel_table_avx2() {
  return AVX2::make_kernel_table("AVX2");
}
}  // namespace rnnfast::cpu
#else
#include "kernel_table.h"
namespace rnnfast::cpu {
const KernelTable& kernel_table_avx2() { return kernel_table_default(); }
}  // namespace rnnfast::cpu
#endif
