// The LSTM backward step kernel for every (compute, storage) type pair of
// the ops (step_kernels.h) and every value of AddOutputGrad and ZoneoutCell.
#include "lstm_kernels.cuh"

namespace rnnfast::cuda {
#define RNNFAST_BACKWARD_STEP_FLAGS(AO, ZC, T, S) \
  template void lstm_backward_step<AO, ZC, T, S>(const BackwardStepParams<T, S>&);
#define RNNFAST_BACKWARD_STEP(T, S)                  \
  RNNFAST_BACKWARD_STEP_FLAGS(false, false, T, S)    \
  RNNFAST_BACKWARD_STEP_FLAGS(false, true, T, S)     \
  RNNFAST_BACKWARD_STEP_FLAGS(true, false, T, S)     \
  RNNFAST_BACKWARD_STEP_FLAGS(true, true, T, S)
RNNFAST_BACKWARD_STEP(float, float)
RNNFAST_BACKWARD_STEP(double, double)
RNNFAST_BACKWARD_STEP(float, c10::Half)
RNNFAST_BACKWARD_STEP(float, c10::BFloat16)
#undef RNNFAST_BACKWARD_STEP
#undef RNNFAST_BACKWARD_STEP_FLAGS
}  // namespace rnnfast::cuda
