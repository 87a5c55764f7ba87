// The LSTM forward step kernels (with and without the recurrent product)
// for every (compute, storage) type pair of the ops (step_kernels.h) and
// every value of Training and ZoneoutCell.
#include "lstm_kernels.cuh"

namespace rnnfast::cuda {
#define RNNFAST_FORWARD_STEP_FLAGS(TR, ZC, T, S)                            \
  template void lstm_forward_step<TR, ZC, T, S>(const ForwardStepParams<T, S>&); \
  template void lstm_fused_forward_step<TR, ZC, T, S>(                        \
      const FusedForwardStepParams<T, S>&);
#define RNNFAST_FORWARD_STEP(T, S)                   \
  RNNFAST_FORWARD_STEP_FLAGS(false, false, T, S)     \
  RNNFAST_FORWARD_STEP_FLAGS(false, true, T, S)      \
  RNNFAST_FORWARD_STEP_FLAGS(true, false, T, S)      \
  RNNFAST_FORWARD_STEP_FLAGS(true, true, T, S)
RNNFAST_FORWARD_STEP(float, float)
RNNFAST_FORWARD_STEP(double, double)
RNNFAST_FORWARD_STEP(float, c10::Half)
RNNFAST_FORWARD_STEP(float, c10::BFloat16)
#undef RNNFAST_FORWARD_STEP
#undef RNNFAST_FORWARD_STEP_FLAGS
}  // namespace rnnfast::cuda
