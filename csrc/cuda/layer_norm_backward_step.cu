// The LayerNorm-LSTM backward step kernel for every (compute, storage) type
// pair of the ops (step_kernels.h) and every value of AddOutputGrad and
// ZoneoutCell, and the LayerNorm parameter gradients (compute type only).
#include "layer_norm_kernels.cuh"

namespace rnnfast::cuda {
#define RNNFAST_LN_BACKWARD_STEP_FLAGS(AO, ZC, T, S)  \
  template void layer_norm_backward_step<AO, ZC, T, S>( \
      const LayerNormBackwardStepParams<T, S>&);
#define RNNFAST_LN_BACKWARD_STEP(T, S)                \
  RNNFAST_LN_BACKWARD_STEP_FLAGS(false, false, T, S)  \
  RNNFAST_LN_BACKWARD_STEP_FLAGS(false, true, T, S)   \
  RNNFAST_LN_BACKWARD_STEP_FLAGS(true, false, T, S)   \
  RNNFAST_LN_BACKWARD_STEP_FLAGS(true, true, T, S)
RNNFAST_LN_BACKWARD_STEP(float, float)
RNNFAST_LN_BACKWARD_STEP(double, double)
RNNFAST_LN_BACKWARD_STEP(float, c10::Half)
RNNFAST_LN_BACKWARD_STEP(float, c10::BFloat16)
#undef RNNFAST_LN_BACKWARD_STEP
#undef RNNFAST_LN_BACKWARD_STEP_FLAGS
template void layer_norm_param_grads<float>(
    const LayerNormParamGradsParams<float>&);
template void layer_norm_param_grads<double>(
    const LayerNormParamGradsParams<double>&);
}  // namespace rnnfast::cuda
