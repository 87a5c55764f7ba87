// The LSTM forward step kernel for every (compute, storage) type pair of
// the ops (step_kernels.h) and both values of Training.
#include "lstm_kernels.cuh"

namespace rnnfast::cuda {
#define RNNFAST_FORWARD_STEP(T, S)                                       \
  template void lstm_forward_step<false, T, S>(                          \
      const ForwardStepParams<T, S>&);                                   \
  template void lstm_forward_step<true, T, S>(const ForwardStepParams<T, S>&);
RNNFAST_FORWARD_STEP(float, float)
RNNFAST_FORWARD_STEP(double, double)
RNNFAST_FORWARD_STEP(float, c10::Half)
RNNFAST_FORWARD_STEP(float, c10::BFloat16)
#undef RNNFAST_FORWARD_STEP
}  // namespace rnnfast::cuda
