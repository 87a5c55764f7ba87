// The CUDA backend of the LSTM and LayerNorm-LSTM ops: CudaBackendBase's
// GEMM, copy and add plus the fused pointwise kernels of each cell.
#pragma once

#include "../lstm_params.h"
#include "cuda_backend.h"

namespace rnnfast::cuda {

// One launch each on the current stream, over rows x hidden, computing the
// cell math of lstm_cell.h in at::opmath_type<T>. Instantiated for float and
// double (lstm_forward_step.cu, lstm_backward_step.cu).
template <typename T>
void lstm_forward_step(const ForwardStepParams<T>& p);
template <typename T>
void lstm_backward_step(const BackwardStepParams<T>& p);

// The LayerNorm-LSTM kernels (layer_norm_lstm_driver.h), one launch each on
// the current stream: one group of threads per row, block reductions for the
// row statistics, the math of layer_norm.h and lstm_cell.h in
// at::opmath_type<T>; deterministic (no atomics). Instantiated for float and
// double (layer_norm_forward_step.cu, layer_norm_backward_step.cu).
template <typename T>
void layer_norm_forward_step(const LayerNormStepParams<T>& p);
template <typename T>
void layer_norm_backward_step(const LayerNormBackwardStepParams<T>& p);
template <typename T>
void layer_norm_param_grads(const LayerNormParamGradsParams<T>& p);

struct CudaBackend : CudaBackendBase {
  template <typename T>
  static void forward_step(const ForwardStepParams<T>& p) {
    lstm_forward_step(p);
  }
  template <typename T>
  static void backward_step(const BackwardStepParams<T>& p) {
    lstm_backward_step(p);
  }
  template <typename T>
  static void layer_norm_forward_step(const LayerNormStepParams<T>& p) {
    cuda::layer_norm_forward_step(p);
  }
  template <typename T>
  static void layer_norm_backward_step(const LayerNormBackwardStepParams<T>& p) {
    cuda::layer_norm_backward_step(p);
  }
  template <typename T>
  static void layer_norm_param_grads(const LayerNormParamGradsParams<T>& p) {
    cuda::layer_norm_param_grads(p);
  }
};

}  // namespace rnnfast::cuda
