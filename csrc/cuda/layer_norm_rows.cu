// The LayerNorm kernels over every row at once (LN_ih forward and backward)
// and the column sums of the LayerNorm gain and bias gradients, for the
// dtypes the recurrence runs in (half types run in float, see compute_dtype
// in lstm_ops.h).
#include "layer_norm_kernels.cuh"

namespace rnnfast::cuda {
template void layer_norm_rows<float>(const LayerNormRowsParams<float>&);
template void layer_norm_rows<double>(const LayerNormRowsParams<double>&);
template void layer_norm_rows_backward<float>(
    const LayerNormRowsBackwardParams<float>&);
template void layer_norm_rows_backward<double>(
    const LayerNormRowsBackwardParams<double>&);
template void column_sums<float>(const ColumnSumsParams<float>&);
template void column_sums<double>(const ColumnSumsParams<double>&);
}  // namespace rnnfast::cuda
