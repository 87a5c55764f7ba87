// The LayerNorm-LSTM forward step kernel for the dtypes the recurrence runs
// in (half types run in float, see compute_dtype in lstm_ops.h).
#include "layer_norm_kernels.cuh"

namespace rnnfast::cuda {
template void layer_norm_forward_step<float>(const LayerNormStepParams<float>&);
template void layer_norm_forward_step<double>(
    const LayerNormStepParams<double>&);
}  // namespace rnnfast::cuda
