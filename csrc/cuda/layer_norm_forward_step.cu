// The LayerNorm-LSTM forward step kernel for every (compute, storage) type
// pair of the ops (step_kernels.h) and both values of Training.
#include "layer_norm_kernels.cuh"

namespace rnnfast::cuda {
#define RNNFAST_LN_FORWARD_STEP(T, S)                    \
  template void layer_norm_forward_step<false, T, S>(    \
      const LayerNormStepParams<T, S>&);                 \
  template void layer_norm_forward_step<true, T, S>(     \
      const LayerNormStepParams<T, S>&);
RNNFAST_LN_FORWARD_STEP(float, float)
RNNFAST_LN_FORWARD_STEP(double, double)
RNNFAST_LN_FORWARD_STEP(float, c10::Half)
RNNFAST_LN_FORWARD_STEP(float, c10::BFloat16)
#undef RNNFAST_LN_FORWARD_STEP
}  // namespace rnnfast::cuda
