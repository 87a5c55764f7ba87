// The step kernels of the CUDA backend (cuda_backend.h), declared for the
// host code; defined in lstm_kernels.cuh and layer_norm_kernels.cuh and
// instantiated by the .cu files.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../lstm_params.h"

namespace rnnfast::cuda {

// One launch each on the current stream, over rows x hidden, computing the
// cell math of lstm_cell.h in T. Instantiated for (T, S) = (float, float),
// (double, double), (float, Half), (float, BFloat16) and both values of the
// flags (lstm_forward_step.cu, lstm_backward_step.cu).
template <bool Training, bool ZoneoutCell, typename T, typename S>
void lstm_forward_step(const ForwardStepParams<T, S>& p);
template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
void lstm_backward_step(const BackwardStepParams<T, S>& p);

// A forward step of at most kFusedStepRows rows in one launch: the recurrent
// product h_{t-1} W_hh^T added to the pre-activations in step.gates, then
// the cell, as lstm_forward_step (lstm_kernels.cuh). Same instantiations.
constexpr int64_t kFusedStepRows = 8;
template <typename T, typename S>
struct FusedForwardStepParams {
  ForwardStepParams<T, S> step;  // step.rows <= kFusedStepRows
  PreviousHidden<S> previous;    // h_{t-1} of the step's rows, [rows, width]
  const S* weight = nullptr;     // W_hh [4H, width], row k H + j at
  int64_t weight_ld = 0;         //   weight + (k H + j) weight_ld
  int64_t width = 0;             // P
};
template <bool Training, bool ZoneoutCell, typename T, typename S>
void lstm_fused_forward_step(const FusedForwardStepParams<T, S>& p);

// The LayerNorm-LSTM kernels (layer_norm_lstm_driver.h), one launch each on
// the current stream: one group of threads per row, block reductions for the
// row statistics, the math of layer_norm.h and lstm_cell.h in T;
// deterministic (no atomics). Instantiated for the same types
// (layer_norm_forward_step.cu, layer_norm_backward_step.cu).
template <bool Training, bool ZoneoutCell, typename T, typename S>
void layer_norm_forward_step(const LayerNormStepParams<T, S>& p);
template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
void layer_norm_backward_step(const LayerNormBackwardStepParams<T, S>& p);
template <typename T>
void layer_norm_param_grads(const LayerNormParamGradsParams<T>& p);

}  // namespace rnnfast::cuda
