// The LSTM backward step kernel for the dtypes the recurrence runs in (half
// types run in float, see compute_dtype in lstm_ops.h).
#include "lstm_kernels.cuh"

namespace rnnfast::cuda {
template void lstm_backward_step<float>(const BackwardStepParams<float>&);
template void lstm_backward_step<double>(const BackwardStepParams<double>&);
}  // namespace rnnfast::cuda
