// Per-element LayerNorm math shared by every backend. Row statistics (the
// sums over a row) are the only per-backend code: loops on the CPU, warp
// reductions on CUDA; they call these for everything else.
//
// LN(v) = (v - mean) * rstd * gamma + beta, rstd = 1 / sqrt(var + eps), with
// the biased variance, as torch.nn.functional.layer_norm.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>

namespace rnnfast {

template <typename T>
C10_HOST_DEVICE inline T layer_norm_rstd(T variance, T eps) {
  return T(1) / ::sqrt(variance + eps);
}

// Gradient w.r.t. an input element of a normalised row, given
//   dxhat      = dL/dy * gamma of this element
//   xhat       = the normalised value of this element
//   mean_dxhat = mean over the row of dxhat
//   mean_dxhat_xhat = mean over the row of dxhat * xhat
template <typename T>
C10_HOST_DEVICE inline T layer_norm_input_grad(T dxhat, T xhat, T rstd,
                                               T mean_dxhat,
                                               T mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

}  // namespace rnnfast
