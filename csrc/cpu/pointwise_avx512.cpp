// Pointwise kernels built for AVX-512 (F, BW, VL, DQ); only called on CPUs
// that have them.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "step_kernels.h"

namespace rnnfast::cpu {
const KernelTable& kernel_table_avx512() {
  return AVX512::make_kernel_table("AVX512");
}
}  // namespace rnnfast::cpu
#else
#include "kernel_table.h"
namespace rnnfast::cpu {
const KernelTable& kernel_table_avx512() { return kernel_table_default(); }
}  // namespace rnnfast::cpu
#endif
