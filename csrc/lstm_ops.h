// The host side of the lstm_forward / lstm_backward ops, written once over a
// Backend (see lstm_driver.h): checks, layout, dtype dispatch. Each backend's
// .cpp/.cu registers lstm_forward_op<ItsBackend> for its dispatch key.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "lstm_checks.h"
#include "layer_norm_lstm_driver.h"
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

// `flat` (contiguous) reshaped to `sizes` and cast to `dtype`, as a tensor of
// its own rather than a view: autograd forbids in-place changes to an output
// of a custom op that is a view, and nn.LSTM allows them (out.relu_()). The
// result is contiguous, as the fake kernels promise.
inline at::Tensor reshaped_result(const at::Tensor& flat, at::IntArrayRef sizes,
                                  at::ScalarType dtype) {
  return at::_unsafe_view(flat.to(dtype), sizes);
}

// A copy of `t` in the contiguous layout the fake kernels promise, whatever
// layout `t` has (a clone would keep a permuted one).
inline at::Tensor contiguous_copy(const at::Tensor& t) {
  return t.clone(at::MemoryFormat::Contiguous);
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
            contiguous_copy(hx), contiguous_copy(cx),
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
  return {reshaped_result(r.output, output_shape(input, s.output), dtype),
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
    return {at::zeros(input.sizes(), input.options()),
            contiguous_copy(grad_hy), contiguous_copy(grad_cy),
            at::zeros(weight_ih.sizes(), weight_ih.options()),
            at::zeros(weight_hh.sizes(), weight_hh.options()),
            at::zeros({4 * s.hidden}, weight_ih.options()),
            weight_hr.has_value()
                ? at::zeros(weight_hr->sizes(), weight_hr->options())
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
  return {reshaped_result(r.grad_input, input.sizes(), dtype),
          r.grad_hx.to(dtype),
          r.grad_cx.to(dtype), r.grad_weight_ih.to(dtype),
          r.grad_weight_hh.to(dtype), r.grad_bias.to(dtype),
          s.has_projection() ? r.grad_weight_hr.to(dtype)
                             : at::empty({0}, weight_ih.options())};
}

using LayerNormForwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor>;
using LayerNormBackwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline LayerNormWeights layer_norm_weights(
    at::ScalarType cdt, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias_ih,
    const c10::optional<at::Tensor>& bias_hh, const at::Tensor& ln_ih_weight,
    const at::Tensor& ln_ih_bias, const at::Tensor& ln_hh_weight,
    const at::Tensor& ln_hh_bias, const at::Tensor& ln_cell_weight,
    const at::Tensor& ln_cell_bias) {
  LayerNormWeights w;
  w.weight_ih = as_compute(weight_ih, cdt);
  w.weight_hh = as_compute(weight_hh, cdt);
  // The four gate biases enter the pre-activations alike: one sum serves.
  w.gate_bias = as_compute(ln_ih_bias, cdt) + as_compute(ln_hh_bias, cdt);
  if (bias_ih.has_value()) {
    w.gate_bias += as_compute(*bias_ih, cdt) + as_compute(*bias_hh, cdt);
  }
  w.ln_ih_weight = as_compute(ln_ih_weight, cdt);
  w.ln_hh_weight = as_compute(ln_hh_weight, cdt);
  w.ln_cell_weight = as_compute(ln_cell_weight, cdt);
  w.ln_cell_bias = as_compute(ln_cell_bias, cdt);
  return w;
}

template <typename Backend>
LayerNormForwardOutputs layer_norm_lstm_forward_op(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih,
    const c10::optional<at::Tensor>& bias_hh, const at::Tensor& ln_ih_weight,
    const at::Tensor& ln_ih_bias, const at::Tensor& ln_hh_weight,
    const at::Tensor& ln_hh_bias, const at::Tensor& ln_cell_weight,
    const at::Tensor& ln_cell_bias,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, bool training,
    double eps) {
  const LstmSizes s =
      check_lstm_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                      c10::nullopt, batch_sizes);
  check_layer_norm_args(input, s,
                        {ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias},
                        {ln_cell_weight, ln_cell_bias});
  const SequenceLayout l = make_layout(input, batch_sizes, reverse);
  const at::ScalarType dtype = input.scalar_type();
  const at::ScalarType cdt = compute_dtype(dtype);
  const auto copts = input.options().dtype(cdt);
  const int64_t H = s.hidden, G = 4 * s.hidden;
  auto empty_workspace = [&] {
    return LayerNormForwardOutputs{
        at::Tensor(), at::Tensor(), at::Tensor(), at::empty({0, H}, copts),
        at::empty({0, G}, copts), at::empty({0, G}, copts),
        at::empty({0, kStatsWidth}, copts)};
  };
  if (l.rows == 0) {
    auto out = empty_workspace();
    std::get<0>(out) = at::empty(output_shape(input, H), input.options());
    std::get<1>(out) = contiguous_copy(hx);
    std::get<2>(out) = contiguous_copy(cx);
    return out;
  }
  const LayerNormWeights w = layer_norm_weights(
      cdt, weight_ih, weight_hh, bias_ih, bias_hh, ln_ih_weight, ln_ih_bias,
      ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias);
  LayerNormForwardResult r;
  AT_DISPATCH_FLOATING_TYPES(cdt, "rnnfast::layer_norm_lstm_forward", [&] {
    r = layer_norm_lstm_forward_recurrence<Backend, scalar_t>(
        l, s, as_compute(input, cdt).view({l.rows, s.input}),
        as_compute(hx, cdt), as_compute(cx, cdt), w, eps, training);
  });
  auto out = empty_workspace();
  std::get<0>(out) = reshaped_result(r.output, output_shape(input, H), dtype);
  std::get<1>(out) = r.hy.to(dtype);
  std::get<2>(out) = r.cy.to(dtype);
  if (training) {
    std::get<3>(out) = r.cells;
    std::get<4>(out) = r.normalized_ih;
    std::get<5>(out) = r.normalized_hh;
    std::get<6>(out) = r.stats;
  }
  return out;
}

template <typename Backend>
LayerNormBackwardOutputs layer_norm_lstm_backward_op(
    const at::Tensor& grad_output, const at::Tensor& grad_hy,
    const at::Tensor& grad_cy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias_ih,
    const c10::optional<at::Tensor>& bias_hh, const at::Tensor& ln_ih_weight,
    const at::Tensor& ln_ih_bias, const at::Tensor& ln_hh_weight,
    const at::Tensor& ln_hh_bias, const at::Tensor& ln_cell_weight,
    const at::Tensor& ln_cell_bias,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    const at::Tensor& output, const at::Tensor& cells,
    const at::Tensor& normalized_ih, const at::Tensor& normalized_hh,
    const at::Tensor& stats) {
  const LstmSizes s =
      check_lstm_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                      c10::nullopt, batch_sizes);
  check_layer_norm_args(input, s,
                        {ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias},
                        {ln_cell_weight, ln_cell_bias});
  const SequenceLayout l = make_layout(input, batch_sizes, reverse);
  const at::ScalarType dtype = input.scalar_type();
  const at::ScalarType cdt = compute_dtype(dtype);
  const int64_t H = s.hidden, G = 4 * s.hidden;
  TORCH_CHECK(grad_output.sizes() == output.sizes(),
              "rnnfast.layer_norm_lstm_backward: grad_output has size ",
              grad_output.sizes(), ", expected ", output.sizes());
  TORCH_CHECK(l.rows == 0 || (cells.size(0) == l.rows &&
                              normalized_ih.size(0) == l.rows &&
                              normalized_hh.size(0) == l.rows &&
                              stats.size(0) == l.rows),
              "rnnfast.layer_norm_lstm_backward: the forward was run without "
              "training=True, so nothing was saved for the backward");
  if (l.rows == 0) {
    const auto zeros_g = at::zeros({G}, weight_ih.options());
    return {at::zeros(input.sizes(), input.options()),
            contiguous_copy(grad_hy), contiguous_copy(grad_cy),
            at::zeros(weight_ih.sizes(), weight_ih.options()),
            at::zeros(weight_hh.sizes(), weight_hh.options()), zeros_g,
            zeros_g.clone(), zeros_g.clone(), at::zeros({H}, weight_ih.options()),
            at::zeros({H}, weight_ih.options())};
  }
  // The biases recompute the gates from the saved normalised products.
  const LayerNormWeights w = layer_norm_weights(
      cdt, weight_ih, weight_hh, bias_ih, bias_hh, ln_ih_weight, ln_ih_bias,
      ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias);
  LayerNormBackwardResult r;
  AT_DISPATCH_FLOATING_TYPES(cdt, "rnnfast::layer_norm_lstm_backward", [&] {
    r = layer_norm_lstm_backward_recurrence<Backend, scalar_t>(
        l, s, as_compute(grad_output, cdt).view({l.rows, H}),
        as_compute(grad_hy, cdt), as_compute(grad_cy, cdt),
        as_compute(input, cdt).view({l.rows, s.input}), as_compute(hx, cdt),
        as_compute(cx, cdt), w, as_compute(output, cdt).view({l.rows, H}),
        cells.contiguous(), normalized_ih.contiguous(),
        normalized_hh.contiguous(), stats.contiguous());
  });
  return {reshaped_result(r.grad_input, input.sizes(), dtype),
          r.grad_hx.to(dtype),
          r.grad_cx.to(dtype),
          r.grad_weight_ih.to(dtype),
          r.grad_weight_hh.to(dtype),
          r.grad_bias.to(dtype),
          r.grad_ln_ih_weight.to(dtype),
          r.grad_ln_hh_weight.to(dtype),
          r.grad_ln_cell_weight.to(dtype),
          r.grad_ln_cell_bias.to(dtype)};
}

}  // namespace rnnfast
