// The LSTM forward step kernel for the dtypes the recurrence runs in (half
// types run in float, see compute_dtype in lstm_ops.h).
#include "lstm_kernels.cuh"

namespace rnnfast::cuda {
template void lstm_forward_step<float>(const ForwardStepParams<float>&);
template void lstm_forward_step<double>(const ForwardStepParams<double>&);
}  // namespace rnnfast::cuda
