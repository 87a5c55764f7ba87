// The C++ signatures of the forward ops declared in rnnfast.cpp, for the
// kernels that call them through the dispatcher (autocast.cpp, stack.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace rnnfast {

using LstmForwardSignature =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor>(
        const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
        const at::Tensor& weight_ih, const at::Tensor& weight_hh,
        const c10::optional<at::Tensor>& bias_ih,
        const c10::optional<at::Tensor>& bias_hh,
        const c10::optional<at::Tensor>& weight_hr,
        const c10::optional<at::Tensor>& batch_sizes, bool reverse,
        bool training, const c10::optional<at::Tensor>& zoneout_hidden_mask,
        const c10::optional<at::Tensor>& zoneout_cell_mask,
        double zoneout_hidden, double zoneout_cell);

using LayerNormLstmForwardSignature =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
        const at::Tensor& weight_ih, const at::Tensor& weight_hh,
        const c10::optional<at::Tensor>& bias_ih,
        const c10::optional<at::Tensor>& bias_hh,
        const at::Tensor& ln_ih_weight, const at::Tensor& ln_ih_bias,
        const at::Tensor& ln_hh_weight, const at::Tensor& ln_hh_bias,
        const at::Tensor& ln_cell_weight, const at::Tensor& ln_cell_bias,
        const c10::optional<at::Tensor>& batch_sizes, bool reverse,
        bool training, double eps,
        const c10::optional<at::Tensor>& zoneout_hidden_mask,
        const c10::optional<at::Tensor>& zoneout_cell_mask,
        double zoneout_hidden, double zoneout_cell);

}  // namespace rnnfast
