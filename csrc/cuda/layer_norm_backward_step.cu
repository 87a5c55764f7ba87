// The LayerNorm-LSTM backward step kernel and the per-step LayerNorm
// parameter gradients, for the dtypes the recurrence runs in (half types run
// in float, see compute_dtype in lstm_ops.h).
#include "layer_norm_kernels.cuh"

namespace rnnfast::cuda {
template void layer_norm_backward_step<float>(
    const LayerNormBackwardStepParams<float>&);
template void layer_norm_backward_step<double>(
    const LayerNormBackwardStepParams<double>&);
template void layer_norm_param_grads<float>(
    const LayerNormParamGradsParams<float>&);
template void layer_norm_param_grads<double>(
    const LayerNormParamGradsParams<double>&);
}  // namespace rnnfast::cuda
