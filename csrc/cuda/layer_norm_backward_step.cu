// The LayerNorm-LSTM backward step kernel for every (compute, storage) type
// pair of the ops (step_kernels.h), and the LayerNorm parameter gradients
// (compute type only).
#include "layer_norm_kernels.cuh"

namespace rnnfast::cuda {
template void layer_norm_backward_step<float, float>(
    const LayerNormBackwardStepParams<float, float>&);
template void layer_norm_backward_step<double, double>(
    const LayerNormBackwardStepParams<double, double>&);
template void layer_norm_backward_step<float, c10::Half>(
    const LayerNormBackwardStepParams<float, c10::Half>&);
template void layer_norm_backward_step<float, c10::BFloat16>(
    const LayerNormBackwardStepParams<float, c10::BFloat16>&);
template void layer_norm_param_grads<float>(
    const LayerNormParamGradsParams<float>&);
template void layer_norm_param_grads<double>(
    const LayerNormParamGradsParams<double>&);
}  // namespace rnnfast::cuda
