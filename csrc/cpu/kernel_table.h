// The dispatch table of the CPU step kernels. Each is compiled once per CPU
// capability (pointwise_{default,avx2,avx512}.cpp include
// step_kernels.h); kernel_table() picks the best one the CPU supports,
// honouring ATEN_CPU_CAPABILITY as ATen does.
#pragma once

#include <c10/util/BFloat16.h>

#include "../lstm_params.h"

namespace rnnfast::cpu {

// Each step kernel is compiled once per value of its compile-time flags
// (lstm_params.h): index [Training][ZoneoutCell] or
// [AddOutputGrad][ZoneoutCell]. T is the compute type, S the storage type
// of the hidden states and the gradients w.r.t. the products (S = T, or
// bfloat16 for T = float: a bfloat16 op on a CPU with bfloat16
// instructions, blas.h, native_bfloat16).
template <typename T, typename S = T>
struct TypedKernels {
  void (*forward_step[2][2])(const ForwardStepParams<T, S>&);
  void (*backward_step[2][2])(const BackwardStepParams<T, S>&);
  void (*layer_norm_forward_step[2][2])(const LayerNormStepParams<T, S>&);
  void (*layer_norm_backward_step[2][2])(
      const LayerNormBackwardStepParams<T, S>&);
};

struct KernelTable {
  TypedKernels<float> f;
  TypedKernels<double> d;
  TypedKernels<float, c10::BFloat16> bf;
  const char* capability;
};

const KernelTable& kernel_table_default();
const KernelTable& kernel_table_avx2();
const KernelTable& kernel_table_avx512();

// Zoneout on a step's hidden rows, h_t = a h_{t-1} + (1 - a) h~_t, as the
// CPU backend runs it (cpu_backend.cpp), for the int8 driver to reuse.
void zoneout_hidden_rows(const HiddenZoneoutParams<float>& p);

// The table for this process's CPU (chosen once).
const KernelTable& kernel_table();

// The kernels for compute type T and storage type S of the table in use.
template <typename T, typename S = T>
inline const TypedKernels<T, S>& kernels();
template <>
inline const TypedKernels<float>& kernels<float>() {
  return kernel_table().f;
}
template <>
inline const TypedKernels<double>& kernels<double>() {
  return kernel_table().d;
}
template <>
inline const TypedKernels<float, c10::BFloat16>&
kernels<float, c10::BFloat16>() {
  return kernel_table().bf;
}

}  // namespace rnnfast::cpu
