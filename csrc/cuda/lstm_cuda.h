// The CUDA backend of the LSTM and LayerNorm-LSTM ops: CudaBackendBase's
// GEMMs, copies and add plus the fused pointwise kernels of each cell.
#pragma once

#include "../lstm_params.h"
#include "cuda_backend.h"

namespace rnnfast::cuda {

// One launch each on the current stream, over rows x hidden, computing the
// cell math of lstm_cell.h in T. Instantiated for (T, S) = (float, float),
// (double, double), (float, Half), (float, BFloat16) and both values of the
// flag (lstm_forward_step.cu, lstm_backward_step.cu).
template <bool Training, typename T, typename S>
void lstm_forward_step(const ForwardStepParams<T, S>& p);
template <bool AddOutputGrad, typename T, typename S>
void lstm_backward_step(const BackwardStepParams<T, S>& p);

// The LayerNorm-LSTM kernels (layer_norm_lstm_driver.h), one launch each on
// the current stream: one group of threads per row, block reductions for the
// row statistics, the math of layer_norm.h and lstm_cell.h in T;
// deterministic (no atomics). Instantiated for the same types
// (layer_norm_forward_step.cu, layer_norm_backward_step.cu).
template <bool Training, typename T, typename S>
void layer_norm_forward_step(const LayerNormStepParams<T, S>& p);
template <typename T, typename S>
void layer_norm_backward_step(const LayerNormBackwardStepParams<T, S>& p);
template <typename T>
void layer_norm_param_grads(const LayerNormParamGradsParams<T>& p);

struct CudaBackend : CudaBackendBase {
  template <bool Training, typename T, typename S>
  static void forward_step(const ForwardStepParams<T, S>& p) {
    lstm_forward_step<Training>(p);
  }
  template <bool AddOutputGrad, typename T, typename S>
  static void backward_step(const BackwardStepParams<T, S>& p) {
    lstm_backward_step<AddOutputGrad>(p);
  }
  template <bool Training, typename T, typename S>
  static void layer_norm_forward_step(const LayerNormStepParams<T, S>& p) {
    cuda::layer_norm_forward_step<Training>(p);
  }
  template <typename T, typename S>
  static void layer_norm_backward_step(
      const LayerNormBackwardStepParams<T, S>& p) {
    cuda::layer_norm_backward_step(p);
  }
  template <typename T>
  static void layer_norm_param_grads(const LayerNormParamGradsParams<T>& p) {
    cuda::layer_norm_param_grads(p);
  }
};

}  // namespace rnnfast::cuda
