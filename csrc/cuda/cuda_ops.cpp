// CUDA kernels of the rnnfast ops: the host code shared with the CPU
// (op_impls.h, lstm_driver.h, layer_norm_lstm_driver.h) over CudaBackend.
// Host code only, so the host compiler builds it and nvcc never parses ATen;
// the kernels are in the .cu files.
#include <torch/library.h>

#include "../op_impls.h"
#include "cuda_backend.h"
#include "op_guard.h"

TORCH_LIBRARY_IMPL(rnnfast, CUDA, m) {
  using rnnfast::cuda::CudaBackend;
  using rnnfast::cuda::OnDeviceOfFirst;
  m.impl("lstm_forward",
         &OnDeviceOfFirst<&rnnfast::lstm_forward_op<CudaBackend>>::call);
  m.impl("lstm_backward",
         &OnDeviceOfFirst<&rnnfast::lstm_backward_op<CudaBackend>>::call);
  m.impl("layer_norm_lstm_forward",
         &OnDeviceOfFirst<
             &rnnfast::layer_norm_lstm_forward_op<CudaBackend>>::call);
  m.impl("layer_norm_lstm_backward",
         &OnDeviceOfFirst<
             &rnnfast::layer_norm_lstm_backward_op<CudaBackend>>::call);
}
