// The CPU pointwise kernels' entry points. Each is compiled once per CPU
// capability (pointwise_{default,avx2,avx512}.cpp include
// pointwise_impl.h); kernel_table() picks the best one the CPU supports,
// honouring ATEN_CPU_CAPABILITY as ATen does.
#pragma once

#include "../lstm_params.h"

namespace rnnfast::cpu {

struct KernelTable {
  void (*forward_step_f)(const ForwardStepParams<float>&);
  void (*forward_step_d)(const ForwardStepParams<double>&);
  void (*backward_step_f)(const BackwardStepParams<float>&);
  void (*backward_step_d)(const BackwardStepParams<double>&);
  const char* capability;
};

const KernelTable& kernel_table_default();
const KernelTable& kernel_table_avx2();
const KernelTable& kernel_table_avx512();

// The table for this process's CPU (chosen once).
const KernelTable& kernel_table();

template <typename T>
inline void forward_step(const ForwardStepParams<T>& p);
template <>
inline void forward_step<float>(const ForwardStepParams<float>& p) {
  kernel_table().forward_step_f(p);
}
template <>
inline void forward_step<double>(const ForwardStepParams<double>& p) {
  kernel_table().forward_step_d(p);
}

template <typename T>
inline void backward_step(const BackwardStepParams<T>& p);
template <>
inline void backward_step<float>(const BackwardStepParams<float>& p) {
  kernel_table().backward_step_f(p);
}
template <>
inline void backward_step<double>(const BackwardStepParams<double>& p) {
  kernel_table().backward_step_d(p);
}

}  // namespace rnnfast::cpu
