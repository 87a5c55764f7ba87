// The host side of the lstm_forward / lstm_backward ops, written once over a
// Backend (see lstm_driver.h): checks, layout, dtype dispatch. Each backend's
// .cpp/.cu registers lstm_forward_op<ItsBackend> for its dispatch key.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/record_function.h>

#include <array>
#include <functional>

#include "arg_checks.h"
#include "layer_norm_lstm_driver.h"
#include "lstm_driver.h"

namespace rnnfast {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor>;
using BackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor,
                                   at::Tensor, at::Tensor, at::Tensor,
                                   at::Tensor>;

// The dtype the recurrence computes in (T of lstm_driver.h): float for half
// types, else the input's. Gates, cell states and every saved activation are
// in it.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// The dtype the GEMMs read (S of lstm_driver.h): for a half-type op, the
// half type itself where the backend runs the GEMMs in it
// (Backend::native_storage: CUDA always, on tensor cores with float
// accumulation; the CPU for bfloat16 on CPUs with bfloat16 instructions),
// else the compute dtype (the op upcasts).
template <typename Backend>
at::ScalarType storage_dtype(at::ScalarType t) {
  const bool half = t == at::kHalf || t == at::kBFloat16;
  return half && Backend::native_storage(t) ? t : compute_dtype(t);
}

// Calls f(S{}, T{}) for the storage dtype sdt (storage_dtype's) and its
// compute type. Only the half types a backend builds
// (Backend::kNativeStorage<S>) are instantiated.
template <typename Backend, typename F>
void dispatch_types(at::ScalarType sdt, const char* name, const F& f) {
  if constexpr (Backend::template kNativeStorage<at::Half>) {
    if (sdt == at::kHalf) return f(at::Half{}, float{});
  }
  if constexpr (Backend::template kNativeStorage<at::BFloat16>) {
    if (sdt == at::kBFloat16) return f(at::BFloat16{}, float{});
  }
  switch (sdt) {
    case at::kFloat:
      return f(float{}, float{});
    case at::kDouble:
      return f(double{}, double{});
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", sdt);
  }
}

// ---- Conversions between float and the half types, small ones on the CPU
// by a plain loop ------------------------------------------------------------
//
// A bfloat16 (or float16) op that computes in float converts what it reads
// and returns: a streaming-decode step of such an op on a CPU without
// bfloat16 instructions converts its input, states and biases and its three
// results at every layer, a few KiB each. Through ATen (aten::to ->
// _to_copy -> empty_strided and copy_ through a TensorIterator) each cost
// ~2.5 us of dispatch, ~40 us of a two-layer H=256 decode step that took
// 0.23 ms in bfloat16 against 0.16 ms in float32 on the AMD EPYC (Zen 3).
// Up to kSmallConversion elements of a contiguous CPU tensor are converted
// here instead, on the calling thread, to the same values: widening is
// exact, and narrowing rounds to nearest even as ATen's copy does (c10's
// conversions; a NaN stays a NaN).
constexpr int64_t kSmallConversion = int64_t{1} << 15;

inline bool is_float_or_half(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Calls f(E{}) for E the C++ type of float, bfloat16 or float16 `t`.
template <typename F>
void with_float_or_half(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    case at::kHalf:
      return f(at::Half{});
    default:
      TORCH_INTERNAL_ASSERT(false, "not float or a half type: ", t);
  }
}

// Whether `t` (converted to `dtype`) is one the loop below takes.
inline bool small_cpu_conversion(const at::Tensor& t, at::ScalarType dtype) {
  return t.is_cpu() && t.layout() == at::kStrided &&
         t.numel() <= kSmallConversion && is_float_or_half(t.scalar_type()) &&
         is_float_or_half(dtype) && t.is_contiguous();
}

// `t` (small_cpu_conversion) converted to `dtype`: a new contiguous tensor.
// Shown to torch.profiler as "rnnfast::convert" (with the tensor's shape
// under record_shapes), where ATen's would show aten::_to_copy.
inline at::Tensor small_cpu_converted(const at::Tensor& t,
                                      at::ScalarType dtype) {
  RECORD_FUNCTION("rnnfast::convert", std::vector<c10::IValue>({t}));
  at::Tensor out = at::detail::empty_cpu(t.sizes(), dtype);
  const int64_t n = t.numel();
  with_float_or_half(t.scalar_type(), [&](auto from) {
    using From = decltype(from);
    with_float_or_half(dtype, [&](auto to) {
      using To = decltype(to);
      const From* in = t.const_data_ptr<From>();
      To* o = out.mutable_data_ptr<To>();
      for (int64_t i = 0; i < n; ++i) {
        o[i] = static_cast<To>(static_cast<float>(in[i]));
      }
    });
  });
  return out;
}

// `t` in `dtype`, contiguous. Most calls find it so already: then `t`
// itself, without the two dispatched calls (to, contiguous) that would also
// return it. An op takes ~10 of these per layer; in a decode step at small H
// the dispatcher's overhead, not the arithmetic, is the cost.
inline at::Tensor as_compute(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  if (small_cpu_conversion(t, dtype)) return small_cpu_converted(t, dtype);
  return t.to(dtype).contiguous();
}

// `t` in `dtype` (a result handed back in the input's dtype).
inline at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  if (small_cpu_conversion(t, dtype)) return small_cpu_converted(t, dtype);
  return t.to(dtype);
}

// (a + b) + (c + d) in `dtype`, each converted first (c and d may be
// undefined: a + b): the gate biases' sum an op adds to its
// pre-activations. Small float sums of CPU vectors by a plain loop (as the
// conversions above), to the same values as the ATen expression below.
inline at::Tensor sum_in(at::ScalarType dtype, const at::Tensor& a,
                         const at::Tensor& b, const at::Tensor& c = {},
                         const at::Tensor& d = {}) {
  const bool four = c.defined();
  const int64_t n = a.numel();
  auto fits = [&](const at::Tensor& t) {
    return small_cpu_conversion(t, at::kFloat) && t.dim() == 1 &&
           t.numel() == n;
  };
  if (dtype == at::kFloat && fits(a) && fits(b) &&
      (!four || (fits(c) && fits(d)))) {
    // as_compute: each operand itself where it is float, else converted
    // by the loop above (fits).
    const at::Tensor fa = as_compute(a, at::kFloat),
                     fb = as_compute(b, at::kFloat);
    const float* pa = fa.const_data_ptr<float>();
    const float* pb = fb.const_data_ptr<float>();
    at::Tensor out = at::detail::empty_cpu({n}, at::kFloat);
    float* o = out.mutable_data_ptr<float>();
    if (!four) {
      for (int64_t i = 0; i < n; ++i) o[i] = pa[i] + pb[i];
    } else {
      const at::Tensor fc = as_compute(c, at::kFloat),
                       fd = as_compute(d, at::kFloat);
      const float* pc = fc.const_data_ptr<float>();
      const float* pd = fd.const_data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) o[i] = (pa[i] + pb[i]) + (pc[i] + pd[i]);
    }
    return out;
  }
  at::Tensor sum = as_compute(a, dtype) + as_compute(b, dtype);
  if (four) sum += as_compute(c, dtype) + as_compute(d, dtype);
  return sum;
}

// in_dtype(t, dtype) when called: a backward's gradient for if_asked.
inline std::function<at::Tensor()> gradient_in(const at::Tensor& t,
                                               at::ScalarType dtype) {
  return [&t, dtype] { return in_dtype(t, dtype); };
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
  return at::_unsafe_view(in_dtype(flat, dtype), sizes);
}

// A copy of `t` in the contiguous layout the fake kernels promise, whatever
// layout `t` has (a clone would keep a permuted one).
inline at::Tensor contiguous_copy(const at::Tensor& t) {
  return t.clone(at::MemoryFormat::Contiguous);
}

// An output a backward's output_mask does not ask for: an empty [0] tensor
// with the options of the argument it would be the gradient of (the fake
// kernels in rnnfast/ops.py promise the same).
inline at::Tensor not_asked_for(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

// `grad` when `asked`, else not_asked_for(like).
inline at::Tensor if_asked(bool asked, const at::Tensor& like,
                           const std::function<at::Tensor()>& grad) {
  return asked ? grad() : not_asked_for(like);
}

// The checked zoneout arguments of an op (see ZoneoutArgs): masks of the
// output's rows, [T, B, P] / [T, B, H] or [N, P] / [N, H] packed, viewed as
// [N, *].
inline ZoneoutArgs zoneout_args(const char* op, const at::Tensor& input,
                                const LstmSizes& s,
                                const c10::optional<at::Tensor>& hidden_mask,
                                const c10::optional<at::Tensor>& cell_mask,
                                double hidden_rate, double cell_rate) {
  check_zoneout_args(op, input, "hidden", hidden_mask,
                     output_shape(input, s.output), hidden_rate);
  check_zoneout_args(op, input, "cell", cell_mask,
                     output_shape(input, s.hidden), cell_rate);
  ZoneoutArgs z;
  if (hidden_mask.has_value()) {
    z.hidden_mask = hidden_mask->contiguous().view({-1, s.output});
  }
  if (cell_mask.has_value()) {
    z.cell_mask = cell_mask->contiguous().view({-1, s.hidden});
  }
  z.hidden_rate = hidden_rate;
  z.cell_rate = cell_rate;
  return z;
}

// The carried cell states a backward with zoneout on c needs, checked.
inline void check_cell_states(const char* op, const at::Tensor& input,
                              int64_t hidden, const ZoneoutArgs& z,
                              const SequenceLayout& l,
                              const c10::optional<at::Tensor>& cell_states) {
  if (!z.on_cell() || l.rows == 0) return;
  TORCH_CHECK(cell_states.has_value() && cell_states->dim() == 2 &&
                  cell_states->size(0) == l.rows,
              op, ": zoneout on the cell state needs the forward's "
              "cell_states (run with training=True and the same zoneout)");
  check_backward_tensor(op, input, *cell_states, "cell_states",
                        {l.rows, hidden});
}

// The tensors a backward reads besides the forward's arguments (which
// check_lstm_args checks), first the gradients and the forward's output,
// then what the forward saved, `saved` as {name, tensor, width} of
// [rows, width] each: a missing one (a forward run without training, whose
// saved tensors are [0, width]) is said so, any other misfit by its size.
struct SavedTensor {
  const char* name;
  const at::Tensor& tensor;
  int64_t width;
};
inline void check_backward_tensors(
    const char* op, const at::Tensor& input, const LstmSizes& s,
    const SequenceLayout& l, const at::Tensor& grad_output,
    const at::Tensor& grad_hy, const at::Tensor& grad_cy,
    const at::Tensor& output, std::initializer_list<SavedTensor> saved) {
  const std::vector<int64_t> out_shape = output_shape(input, s.output);
  check_backward_tensor(op, input, output, "output", out_shape);
  check_backward_tensor(op, input, grad_output, "grad_output", out_shape);
  check_backward_tensor(op, input, grad_hy, "grad_hy", {l.batch, s.output});
  check_backward_tensor(op, input, grad_cy, "grad_cy", {l.batch, s.hidden});
  if (l.rows == 0) return;
  for (const SavedTensor& t : saved) {
    TORCH_CHECK(t.tensor.dim() != 2 || t.tensor.size(0) != 0, op,
                ": the forward was run without training=True, so nothing "
                "was saved for the backward");
  }
  for (const SavedTensor& t : saved) {
    check_backward_tensor(op, input, t.tensor, t.name, {l.rows, t.width});
  }
}

// The dtype a forward hands its input and recurrent weights to the
// recurrence in: sdt, except in a one-step evaluating call (a streaming
// decode's step), whose weights the backend may read in place in their own
// dtype (Backend::one_step_weight_dtype: a bfloat16 op computing in float
// on the CPU), instead of converting them at every call.
template <typename Backend>
at::ScalarType forward_weight_dtype(const SequenceLayout& l,
                                    const LstmSizes& s, at::ScalarType dtype,
                                    at::ScalarType sdt, bool training) {
  return !training && l.steps == 1 && !s.has_projection() && s.input > 0
             ? Backend::one_step_weight_dtype(dtype, sdt, l.batch)
             : sdt;
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
                               bool reverse, bool training,
                               const c10::optional<at::Tensor>& zoneout_hidden_mask,
                               const c10::optional<at::Tensor>& zoneout_cell_mask,
                               double zoneout_hidden, double zoneout_cell) {
  const LstmSizes s =
      check_lstm_args("rnnfast.lstm_forward", input, hx, cx, weight_ih,
                      weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes);
  const ZoneoutArgs z =
      zoneout_args("rnnfast.lstm_forward", input, s, zoneout_hidden_mask,
                   zoneout_cell_mask, zoneout_hidden, zoneout_cell);
  const SequenceLayout l = make_layout(input, batch_sizes, reverse);
  const at::ScalarType dtype = input.scalar_type();
  const at::ScalarType cdt = compute_dtype(dtype);
  const at::ScalarType sdt = storage_dtype<Backend>(dtype);
  const auto copts = input.options().dtype(cdt);

  if (l.rows == 0) {  // empty batch: nothing to compute
    return {at::empty(output_shape(input, s.output), input.options()),
            contiguous_copy(hx), contiguous_copy(cx),
            at::empty({0, 4 * s.hidden}, copts),
            at::empty({0, s.hidden}, copts), at::empty({0, s.hidden}, copts)};
  }
  const at::Tensor x = as_compute(input, sdt).view({l.rows, s.input});
  at::Tensor bias;
  if (bias_ih.has_value()) {
    bias = sum_in(cdt, *bias_ih, *bias_hh);
  }
  const at::ScalarType wdt =
      forward_weight_dtype<Backend>(l, s, dtype, sdt, training);
  ForwardResult r;
  dispatch_types<Backend>(sdt, "rnnfast::lstm_forward", [&](auto s_, auto t_) {
    using S = decltype(s_);
    using T = decltype(t_);
    r = lstm_forward_recurrence<Backend, S, T>(
        l, s, x, as_compute(hx, sdt), as_compute(cx, cdt),
        as_compute(weight_ih, wdt), as_compute(weight_hh, wdt), bias,
        as_compute(weight_hr, sdt), training, z);
  });
  if (!training) {
    r.gates = at::empty({0, 4 * s.hidden}, copts);
    r.cells = at::empty({0, s.hidden}, copts);
  }
  if (!r.cell_states.defined()) r.cell_states = at::empty({0, s.hidden}, copts);
  return {reshaped_result(r.output, output_shape(input, s.output), dtype),
          in_dtype(r.hy, dtype), in_dtype(r.cy, dtype), r.gates, r.cells, r.cell_states};
}

template <typename Backend>
BackwardOutputs lstm_backward_op(
    const at::Tensor& grad_output, const at::Tensor& grad_hy,
    const at::Tensor& grad_cy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& weight_hr,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, std::array<bool, 7> output_mask,
    const c10::optional<at::Tensor>& cell_states,
    const c10::optional<at::Tensor>& zoneout_hidden_mask,
    const c10::optional<at::Tensor>& zoneout_cell_mask, double zoneout_hidden,
    double zoneout_cell) {
  const LstmSizes s =
      check_lstm_args("rnnfast.lstm_backward", input, hx, cx, weight_ih,
                      weight_hh, c10::nullopt, c10::nullopt, weight_hr,
                      batch_sizes);
  const ZoneoutArgs z =
      zoneout_args("rnnfast.lstm_backward", input, s, zoneout_hidden_mask,
                   zoneout_cell_mask, zoneout_hidden, zoneout_cell);
  const SequenceLayout l = make_layout(input, batch_sizes, reverse);
  check_cell_states("rnnfast.lstm_backward", input, s.hidden, z, l,
                    cell_states);
  const at::ScalarType dtype = input.scalar_type();
  const at::ScalarType cdt = compute_dtype(dtype);
  const at::ScalarType sdt = storage_dtype<Backend>(dtype);
  check_backward_tensors("rnnfast.lstm_backward", input, s, l, grad_output,
                         grad_hy, grad_cy, output,
                         {{"gates", gates, 4 * s.hidden},
                          {"cells", cells, s.hidden}});
  const LstmGradMask mask{output_mask[0], output_mask[1], output_mask[2],
                          output_mask[3], output_mask[4], output_mask[5],
                          output_mask[6]};
  const at::Tensor& hr_like = weight_hr.has_value() ? *weight_hr : weight_ih;
  const bool any = mask.input || mask.hx || mask.cx || mask.weight_ih ||
                   mask.weight_hh || mask.bias ||
                   (s.has_projection() && mask.weight_hr);
  if (l.rows == 0 || !any) {  // nothing to compute
    const bool empty = l.rows == 0;
    auto zeros = [&](const at::Tensor& like, at::IntArrayRef sizes) {
      return [&like, sizes = sizes.vec()] {
        return at::zeros(sizes, like.options());
      };
    };
    return {if_asked(empty && mask.input, input, zeros(input, input.sizes())),
            if_asked(empty && mask.hx, hx, [&] { return contiguous_copy(grad_hy); }),
            if_asked(empty && mask.cx, cx, [&] { return contiguous_copy(grad_cy); }),
            if_asked(empty && mask.weight_ih, weight_ih,
                     zeros(weight_ih, weight_ih.sizes())),
            if_asked(empty && mask.weight_hh, weight_hh,
                     zeros(weight_hh, weight_hh.sizes())),
            if_asked(empty && mask.bias, weight_ih,
                     zeros(weight_ih, {4 * s.hidden})),
            if_asked(empty && mask.weight_hr && s.has_projection(), hr_like,
                     zeros(hr_like, hr_like.sizes()))};
  }
  BackwardResult r;
  dispatch_types<Backend>(sdt, "rnnfast::lstm_backward", [&](auto s_, auto t_) {
    using S = decltype(s_);
    using T = decltype(t_);
    r = lstm_backward_recurrence<Backend, S, T>(
        l, s, as_compute(grad_output, sdt).view({l.rows, s.output}),
        as_compute(grad_hy, cdt), as_compute(grad_cy, cdt),
        as_compute(input, sdt).view({l.rows, s.input}), as_compute(hx, sdt),
        as_compute(cx, cdt), as_compute(weight_ih, sdt),
        as_compute(weight_hh, sdt), as_compute(weight_hr, sdt),
        as_compute(output, sdt).view({l.rows, s.output}),
        as_compute(gates, cdt), as_compute(cells, cdt),
        z.on_cell() ? as_compute(*cell_states, cdt) : at::Tensor(), z, mask);
  });
  return {
      if_asked(mask.input, input,
               [&] { return reshaped_result(r.grad_input, input.sizes(), dtype); }),
      if_asked(mask.hx, hx, gradient_in(r.grad_hx, dtype)),
      if_asked(mask.cx, cx, gradient_in(r.grad_cx, dtype)),
      if_asked(mask.weight_ih, weight_ih, gradient_in(r.grad_weight_ih, dtype)),
      if_asked(mask.weight_hh, weight_hh, gradient_in(r.grad_weight_hh, dtype)),
      if_asked(mask.bias, weight_ih, gradient_in(r.grad_bias, dtype)),
      if_asked(mask.weight_hr && s.has_projection(), hr_like,
               gradient_in(r.grad_weight_hr, dtype))};
}

using LayerNormForwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor>;
using LayerNormBackwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// wdt: the dtype of weight_ih and weight_hh (forward_weight_dtype's, or sdt)
inline LayerNormWeights layer_norm_weights(
    at::ScalarType wdt, at::ScalarType cdt, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias_ih,
    const c10::optional<at::Tensor>& bias_hh, const at::Tensor& ln_ih_weight,
    const at::Tensor& ln_ih_bias, const at::Tensor& ln_hh_weight,
    const at::Tensor& ln_hh_bias, const at::Tensor& ln_cell_weight,
    const at::Tensor& ln_cell_bias) {
  LayerNormWeights w;
  w.weight_ih = as_compute(weight_ih, wdt);
  w.weight_hh = as_compute(weight_hh, wdt);
  // The four gate biases enter the pre-activations alike: one sum serves.
  w.gate_bias = bias_ih.has_value()
                    ? sum_in(cdt, ln_ih_bias, ln_hh_bias, *bias_ih, *bias_hh)
                    : sum_in(cdt, ln_ih_bias, ln_hh_bias);
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
    double eps, const c10::optional<at::Tensor>& zoneout_hidden_mask,
    const c10::optional<at::Tensor>& zoneout_cell_mask, double zoneout_hidden,
    double zoneout_cell) {
  const LstmSizes s =
      check_lstm_args("rnnfast.layer_norm_lstm_forward", input, hx, cx,
                      weight_ih, weight_hh, bias_ih, bias_hh, c10::nullopt,
                      batch_sizes);
  check_layer_norm_args("rnnfast.layer_norm_lstm_forward", input, s,
                        {ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias},
                        {ln_cell_weight, ln_cell_bias});
  const ZoneoutArgs z = zoneout_args(
      "rnnfast.layer_norm_lstm_forward", input, s, zoneout_hidden_mask,
      zoneout_cell_mask, zoneout_hidden, zoneout_cell);
  const SequenceLayout l = make_layout(input, batch_sizes, reverse);
  const at::ScalarType dtype = input.scalar_type();
  const at::ScalarType cdt = compute_dtype(dtype);
  const at::ScalarType sdt = storage_dtype<Backend>(dtype);
  const auto copts = input.options().dtype(cdt);
  const int64_t H = s.hidden, G = 4 * s.hidden;
  auto empty_workspace = [&] {
    return LayerNormForwardOutputs{
        at::Tensor(), at::Tensor(), at::Tensor(), at::empty({0, H}, copts),
        at::empty({0, G}, copts), at::empty({0, G}, copts),
        at::empty({0, kStatsWidth}, copts), at::empty({0, H}, copts)};
  };
  if (l.rows == 0) {
    auto out = empty_workspace();
    std::get<0>(out) = at::empty(output_shape(input, H), input.options());
    std::get<1>(out) = contiguous_copy(hx);
    std::get<2>(out) = contiguous_copy(cx);
    return out;
  }
  const LayerNormWeights w = layer_norm_weights(
      forward_weight_dtype<Backend>(l, s, dtype, sdt, training), cdt,
      weight_ih, weight_hh, bias_ih, bias_hh, ln_ih_weight, ln_ih_bias,
      ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias);
  LayerNormForwardResult r;
  dispatch_types<Backend>(
      sdt, "rnnfast::layer_norm_lstm_forward", [&](auto s_, auto t_) {
        using S = decltype(s_);
        using T = decltype(t_);
        r = layer_norm_lstm_forward_recurrence<Backend, S, T>(
            l, s, as_compute(input, sdt).view({l.rows, s.input}),
            as_compute(hx, sdt), as_compute(cx, cdt), w, eps, training, z);
      });
  auto out = empty_workspace();
  std::get<0>(out) = reshaped_result(r.output, output_shape(input, H), dtype);
  std::get<1>(out) = in_dtype(r.hy, dtype);
  std::get<2>(out) = in_dtype(r.cy, dtype);
  if (training) {
    std::get<3>(out) = r.cells;
    std::get<4>(out) = r.normalized_ih;
    std::get<5>(out) = r.normalized_hh;
    std::get<6>(out) = r.stats;
    if (r.cell_states.defined()) std::get<7>(out) = r.cell_states;
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
    const at::Tensor& stats, std::array<bool, 10> output_mask,
    const c10::optional<at::Tensor>& cell_states,
    const c10::optional<at::Tensor>& zoneout_hidden_mask,
    const c10::optional<at::Tensor>& zoneout_cell_mask, double zoneout_hidden,
    double zoneout_cell) {
  const LstmSizes s =
      check_lstm_args("rnnfast.layer_norm_lstm_backward", input, hx, cx,
                      weight_ih, weight_hh, bias_ih, bias_hh, c10::nullopt,
                      batch_sizes);
  check_layer_norm_args("rnnfast.layer_norm_lstm_backward", input, s,
                        {ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias},
                        {ln_cell_weight, ln_cell_bias});
  const ZoneoutArgs z = zoneout_args(
      "rnnfast.layer_norm_lstm_backward", input, s, zoneout_hidden_mask,
      zoneout_cell_mask, zoneout_hidden, zoneout_cell);
  const SequenceLayout l = make_layout(input, batch_sizes, reverse);
  check_cell_states("rnnfast.layer_norm_lstm_backward", input, s.hidden, z,
                    l, cell_states);
  const at::ScalarType dtype = input.scalar_type();
  const at::ScalarType cdt = compute_dtype(dtype);
  const at::ScalarType sdt = storage_dtype<Backend>(dtype);
  const int64_t H = s.hidden;
  check_backward_tensors("rnnfast.layer_norm_lstm_backward", input, s, l,
                         grad_output, grad_hy, grad_cy, output,
                         {{"cells", cells, H},
                          {"normalized_ih", normalized_ih, 4 * H},
                          {"normalized_hh", normalized_hh, 4 * H},
                          {"stats", stats, kStatsWidth}});
  const LayerNormGradMask mask{
      output_mask[0], output_mask[1], output_mask[2], output_mask[3],
      output_mask[4], output_mask[5], output_mask[6], output_mask[7],
      output_mask[8], output_mask[9]};
  const bool any = mask.input || mask.hx || mask.cx || mask.weight_ih ||
                   mask.weight_hh || mask.param_grads();
  if (l.rows == 0 || !any) {  // nothing to compute
    const bool empty = l.rows == 0;
    auto zeros = [](const at::Tensor& like) {
      return [&like] { return at::zeros(like.sizes(), like.options()); };
    };
    return {if_asked(empty && mask.input, input, zeros(input)),
            if_asked(empty && mask.hx, hx, [&] { return contiguous_copy(grad_hy); }),
            if_asked(empty && mask.cx, cx, [&] { return contiguous_copy(grad_cy); }),
            if_asked(empty && mask.weight_ih, weight_ih, zeros(weight_ih)),
            if_asked(empty && mask.weight_hh, weight_hh, zeros(weight_hh)),
            if_asked(empty && mask.bias, ln_ih_bias, zeros(ln_ih_bias)),
            if_asked(empty && mask.ln_ih_weight, ln_ih_weight, zeros(ln_ih_weight)),
            if_asked(empty && mask.ln_hh_weight, ln_hh_weight, zeros(ln_hh_weight)),
            if_asked(empty && mask.ln_cell_weight, ln_cell_weight,
                     zeros(ln_cell_weight)),
            if_asked(empty && mask.ln_cell_bias, ln_cell_bias, zeros(ln_cell_bias))};
  }
  // The biases recompute the gates from the saved normalised products.
  const LayerNormWeights w = layer_norm_weights(
      sdt, cdt, weight_ih, weight_hh, bias_ih, bias_hh, ln_ih_weight,
      ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias);
  LayerNormBackwardResult r;
  dispatch_types<Backend>(
      sdt, "rnnfast::layer_norm_lstm_backward", [&](auto s_, auto t_) {
        using S = decltype(s_);
        using T = decltype(t_);
        r = layer_norm_lstm_backward_recurrence<Backend, S, T>(
            l, s, as_compute(grad_output, sdt).view({l.rows, H}),
            as_compute(grad_hy, cdt), as_compute(grad_cy, cdt),
            as_compute(input, sdt).view({l.rows, s.input}),
            as_compute(hx, sdt), as_compute(cx, cdt), w,
            as_compute(output, sdt).view({l.rows, H}), as_compute(cells, cdt),
            as_compute(normalized_ih, cdt), as_compute(normalized_hh, cdt),
            as_compute(stats, cdt),
            z.on_cell() ? as_compute(*cell_states, cdt) : at::Tensor(), z,
            mask);
      });
  return {
      if_asked(mask.input, input,
               [&] { return reshaped_result(r.grad_input, input.sizes(), dtype); }),
      if_asked(mask.hx, hx, gradient_in(r.grad_hx, dtype)),
      if_asked(mask.cx, cx, gradient_in(r.grad_cx, dtype)),
      if_asked(mask.weight_ih, weight_ih, gradient_in(r.grad_weight_ih, dtype)),
      if_asked(mask.weight_hh, weight_hh, gradient_in(r.grad_weight_hh, dtype)),
      if_asked(mask.bias, ln_ih_bias, gradient_in(r.grad_bias, dtype)),
      if_asked(mask.ln_ih_weight, ln_ih_weight, gradient_in(r.grad_ln_ih_weight, dtype)),
      if_asked(mask.ln_hh_weight, ln_hh_weight, gradient_in(r.grad_ln_hh_weight, dtype)),
      if_asked(mask.ln_cell_weight, ln_cell_weight, gradient_in(r.grad_ln_cell_weight, dtype)),
      if_asked(mask.ln_cell_bias, ln_cell_bias, gradient_in(r.grad_ln_cell_bias, dtype))};
}

}  // namespace rnnfast
