// The CUDA backend of the LSTM ops: CudaBackendBase's GEMM, copy and add plus
// the two fused pointwise step kernels of the LSTM cell.
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

struct CudaBackend : CudaBackendBase {
  template <typename T>
  static void forward_step(const ForwardStepParams<T>& p) {
    lstm_forward_step(p);
  }
  template <typename T>
  static void backward_step(const BackwardStepParams<T>& p) {
    lstm_backward_step(p);
  }
};

}  // namespace rnnfast::cuda
