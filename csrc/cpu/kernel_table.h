// The dispatch table of the CPU step kernels. Each is compiled once per CPU
// capability (pointwise_{default,avx2,avx512}.cpp include
// step_kernels.h); kernel_table() picks the best one the CPU supports,
// honouring ATEN_CPU_CAPABILITY as ATen does.
#pragma once

#include "../lstm_params.h"

namespace rnnfast::cpu {

// Each step kernel is compiled once per value of its compile-time flags
// (lstm_params.h): index [Training][ZoneoutCell] or
// [AddOutputGrad][ZoneoutCell].
template <typename T>
struct TypedKernels {
  void (*forward_step[2][2])(const ForwardStepParams<T>&);
  void (*backward_step[2][2])(const BackwardStepParams<T>&);
  void (*layer_norm_forward_step[2][2])(const LayerNormStepParams<T>&);
  void (*layer_norm_backward_step[2][2])(const LayerNormBackwardStepParams<T>&);
};

struct KernelTable {
  TypedKernels<float> f;
  TypedKernels<double> d;
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

// The kernels for element type T of the table in use.
template <typename T>
inline const TypedKernels<T>& kernels();
template <>
inline const TypedKernels<float>& kernels<float>() {
  return kernel_table().f;
}
template <>
inline const TypedKernels<double>& kernels<double>() {
  return kernel_table().d;
}

}  // namespace rnnfast::cpu
