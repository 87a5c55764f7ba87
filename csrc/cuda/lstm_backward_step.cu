// The LSTM backward step kernel for every (compute, storage) type pair of
// the ops (step_kernels.h) and both values of AddOutputGrad.
#include "lstm_kernels.cuh"

namespace rnnfast::cuda {
#define RNNFAST_BACKWARD_STEP(T, S)                                       \
  template void lstm_backward_step<false, T, S>(                          \
      const BackwardStepParams<T, S>&);                                   \
  template void lstm_backward_step<true, T, S>(const BackwardStepParams<T, S>&);
RNNFAST_BACKWARD_STEP(float, float)
RNNFAST_BACKWARD_STEP(double, double)
RNNFAST_BACKWARD_STEP(float, c10::Half)
RNNFAST_BACKWARD_STEP(float, c10::BFloat16)
#undef RNNFAST_BACKWARD_STEP
}  // namespace rnnfast::cuda
