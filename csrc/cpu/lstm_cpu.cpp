// CPU implementation of the rnnfast ops: the shared recurrence of
// lstm_driver.h over BLAS GEMMs and the vectorised pointwise kernels.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <string>

#include "../lstm_ops.h"
#include "blas.h"
#include "pointwise_kernels.h"

namespace rnnfast::cpu {

const KernelTable& kernel_table() {
  static const KernelTable& table = []() -> const KernelTable& {
    // at::get_cpu_capability() honours ATEN_CPU_CAPABILITY and the CPU.
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return kernel_table_avx512();
    if (cap == "AVX2") return kernel_table_avx2();
    return kernel_table_default();
  }();
  return table;
}

struct CpuBackend {
  template <typename T>
  using StepWeight = cpu::StepWeight<T>;
  template <typename T>
  static void forward_step(const ForwardStepParams<T>& p) {
    kernels<T>().forward_step(p);
  }
  template <typename T>
  static void backward_step(const BackwardStepParams<T>& p) {
    kernels<T>().backward_step(p);
  }
  template <typename T>
  static void layer_norm_forward_step(const LayerNormStepParams<T>& p) {
    kernels<T>().layer_norm_forward_step(p);
  }
  template <typename T>
  static void layer_norm_backward_step(const LayerNormBackwardStepParams<T>& p) {
    kernels<T>().layer_norm_backward_step(p);
  }
  template <typename T>
  static void layer_norm_param_grads(const LayerNormParamGradsParams<T>& p) {
    kernels<T>().layer_norm_param_grads(p);
  }
  template <typename T>
  static void copy(T* dst, const T* src, int64_t count) {
    std::memcpy(dst, src, sizeof(T) * count);
  }
  template <typename T>
  static void add(T* dst, const T* a, const T* b, int64_t count) {
    for (int64_t i = 0; i < count; ++i) dst[i] = a[i] + b[i];
  }
};

}  // namespace rnnfast::cpu

TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("lstm_forward", &rnnfast::lstm_forward_op<rnnfast::cpu::CpuBackend>);
  m.impl("lstm_backward",
         &rnnfast::lstm_backward_op<rnnfast::cpu::CpuBackend>);
  m.impl("layer_norm_lstm_forward",
         &rnnfast::layer_norm_lstm_forward_op<rnnfast::cpu::CpuBackend>);
  m.impl("layer_norm_lstm_backward",
         &rnnfast::layer_norm_lstm_backward_op<rnnfast::cpu::CpuBackend>);
}
