// The host side of the lstm_forward / lstm_backward ops, written once over a
// Backend (see lstm_driver.h): checks, layout, dtype dispatch. Each backend's
// .cpp/.cu registers lstm_forward_op<ItsBackend> for its dispatch key.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "lstm_checks.h"
#include "lstm_driver.h"

namespace rnnfast {

using ForwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor,
                                   at::Tensor, at::Tensor, at::Tensor,
                                   at::Tensor>;

// The dtype the recurrence runs in: float for half types, else the input's.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline at::Tensor as_compute(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

inline at::Tensor as_compute(const c10::optional<at::Tensor>& t,
                             at::ScalarType dtype) {
  return t.has_value() ? as_compute(*t, dtype) : at::Tensor();
}

template <typename Backend>
ForwardOutputs lstm_forward_op(const at::Tensor& input, const at::Tensor& hx,
                               const at::Tensor& cx,
                               const at::Tensor& weight_ih,
                               const at::Tensor& weight_hh,
                               const c10::optional<at::Tensor>& bias_ih,
                               const c10::optional<at::Tensor>& bias_hh,
                               const c10::optional<at::Tensor>& weight_hr,
                               const c10::optional<at::Tensor>& batch_sizes,
                               bool reverse, bool training) {
  const LstmSizes s = check_lstm_args(input, hx, cx, weight_ih, weight_hh,
                                      bias_ih, bias_hh, weight_hr, batch_sizes);
  const SequenceLayout l = make_layout(input, batch_sizes, reverse);
  const at::ScalarType dtype = input.scalar_type();
  const at::ScalarType cdt = compute_dtype(dtype);
  const auto copts = input.options().dtype(cdt);

  if (l.rows == 0) {  // empty batch: nothing to compute
    return {at::empty(output_shape(input, s.output), input.options()),
            hx.clone(), cx.clone(),
            at::empty({0, 4 * s.hidden}, copts),
            at::empty({0, s.hidden}, copts)};
  }
  const at::Tensor x = as_compute(input, cdt).view({l.rows, s.input});
  at::Tensor bias;
  if (bias_ih.has_value()) {
    bias = as_compute(*bias_ih, cdt) + as_compute(*bias_hh, cdt);
  }
  ForwardResult r;
  AT_DISPATCH_FLOATING_TYPES(cdt, "rnnfast::lstm_forward", [&] {
    r = lstm_forward_recurrence<Backend, scalar_t>(
        l, s, x, as_compute(hx, cdt), as_compute(cx, cdt),
        as_compute(weight_ih, cdt), as_compute(weight_hh, cdt), bias,
        as_compute(weight_hr, cdt), training);
  });
  if (!training) {
    r.gates = at::empty({0, 4 * s.hidden}, copts);
    r.cells = at::empty({0, s.hidden}, copts);
  }
  return {r.output.view(output_shape(input, s.output)).to(dtype),
          r.hy.to(dtype), r.cy.to(dtype), r.gates, r.cells};
}

template <typename Backend>
BackwardOutputs lstm_backward_op(
    const at::Tensor& grad_output, const at::Tensor& grad_hy,
    const at::Tensor& grad_cy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& weight_hr,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells) {
  const LstmSizes s =
      check_lstm_args(input, hx, cx, weight_ih, weight_hh, c10::nullopt,
                      c10::nullopt, weight_hr, batch_sizes);
  const SequenceLayout l = make_layout(input, batch_sizes, reverse);
  const at::ScalarType dtype = input.scalar_type();
  const at::ScalarType cdt = compute_dtype(dtype);
  TORCH_CHECK(grad_output.sizes() == output.sizes(),
              "rnnfast.lstm_backward: grad_output has size ",
              grad_output.sizes(), ", expected ", output.sizes());
  TORCH_CHECK(l.rows == 0 || (gates.size(0) == l.rows &&
                              cells.size(0) == l.rows),
              "rnnfast.lstm_backward: the forward was run without "
              "training=True, so nothing was saved for the backward");
  if (l.rows == 0) {
    return {at::zeros_like(input), grad_hy.clone(), grad_cy.clone(),
            at::zeros_like(weight_ih), at::zeros_like(weight_hh),
            at::zeros({4 * s.hidden}, weight_ih.options()),
            weight_hr.has_value() ? at::zeros_like(*weight_hr)
                                  : at::empty({0}, weight_ih.options())};
  }
  BackwardResult r;
  AT_DISPATCH_FLOATING_TYPES(cdt, "rnnfast::lstm_backward", [&] {
    r = lstm_backward_recurrence<Backend, scalar_t>(
        l, s, as_compute(grad_output, cdt).view({l.rows, s.output}),
        as_compute(grad_hy, cdt), as_compute(grad_cy, cdt),
        as_compute(input, cdt).view({l.rows, s.input}), as_compute(hx, cdt),
        as_compute(cx, cdt), as_compute(weight_ih, cdt),
        as_compute(weight_hh, cdt), as_compute(weight_hr, cdt),
        as_compute(output, cdt).view({l.rows, s.output}), gates.contiguous(),
        cells.contiguous());
  });
  return {r.grad_input.view(input.sizes()).to(dtype), r.grad_hx.to(dtype),
          r.grad_cx.to(dtype), r.grad_weight_ih.to(dtype),
          r.grad_weight_hh.to(dtype), r.grad_bias.to(dtype),
          s.has_projection() ? r.grad_weight_hr.to(dtype)
                             : at::empty({0}, weight_ih.options())};
}

}  // namespace rnnfast
