// The LayerNorm-LSTM forward step kernel for every (compute, storage) type
// pair of the ops (step_kernels.h) and every value of Training and
// ZoneoutCell.
#include "layer_norm_kernels.cuh"

namespace rnnfast::cuda {
#define RNNFAST_LN_FORWARD_STEP_FLAGS(TR, ZC, T, S)  \
  template void layer_norm_forward_step<TR, ZC, T, S>( \
      const LayerNormStepParams<T, S>&);
#define RNNFAST_LN_FORWARD_STEP(T, S)                \
  RNNFAST_LN_FORWARD_STEP_FLAGS(false, false, T, S)  \
  RNNFAST_LN_FORWARD_STEP_FLAGS(false, true, T, S)   \
  RNNFAST_LN_FORWARD_STEP_FLAGS(true, false, T, S)   \
  RNNFAST_LN_FORWARD_STEP_FLAGS(true, true, T, S)
RNNFAST_LN_FORWARD_STEP(float, float)
RNNFAST_LN_FORWARD_STEP(double, double)
RNNFAST_LN_FORWARD_STEP(float, c10::Half)
RNNFAST_LN_FORWARD_STEP(float, c10::BFloat16)
#undef RNNFAST_LN_FORWARD_STEP
#undef RNNFAST_LN_FORWARD_STEP_FLAGS
}  // namespace rnnfast::cuda
