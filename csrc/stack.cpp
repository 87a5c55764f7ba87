// rnnfast::stacked_inference: a whole multi-layer, optionally bidirectional
// network's forward for inference, one op call from Python instead of one
// per layer and direction (see rnnfast.cpp's schema).
//
// Why in C++: a streaming-decode call reads every layer's weights once, and
// at H >= 256 that stream evicts the L2 cache, so each return to Python and
// each Python-side op call between layers ran from L3 (on the Xeon, one
// small op call took 24 us after a small product and 110 us after 4 MiB of
// weights; a two-layer call spent ~90 us more in its Python between the
// op calls than two bare op calls did). Here the layers follow each other
// with only the dispatcher between them.
//
// The composition is rnnfast.functional._stack's without dropout between
// layers (the caller sends such calls, and every call that needs a
// gradient or draws a random mask, down the per-layer route): the same ops
// in the same order (select, the layer ops, cat, transpose, stack), so the
// same bits.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "op_signatures.h"

namespace rnnfast {
namespace {

using Tensor = at::Tensor;
using OptionalTensor = c10::optional<at::Tensor>;

std::tuple<Tensor, Tensor, Tensor> stacked_inference(
    const Tensor& input, const Tensor& h0, const Tensor& c0,
    at::TensorList weights, int64_t num_layers, bool bidirectional,
    bool batch_first, const OptionalTensor& batch_sizes, bool has_biases,
    bool layer_norm, double eps, double zoneout_hidden, double zoneout_cell) {
  constexpr const char* kOp = "rnnfast.stacked_inference";
  TORCH_CHECK(num_layers > 0, kOp, ": num_layers must be positive, got ",
              num_layers);
  const int64_t directions = bidirectional ? 2 : 1;
  const int64_t groups = num_layers * directions;
  const int64_t plain = has_biases ? 4 : 2;  // w_ih, w_hh[, b_ih, b_hh]
  const int64_t count = static_cast<int64_t>(weights.size());
  TORCH_CHECK(count % groups == 0, kOp, ": ", count,
              " weights for ", groups, " layer-directions");
  const int64_t per = count / groups;
  // After the plain weights: the LayerNorm parameters (6), or the LSTM's
  // projection (0 or 1).
  TORCH_CHECK(layer_norm ? per == plain + 6 : (per == plain || per == plain + 1),
              kOp, ": ", per, " weights per layer-direction do not match ",
              layer_norm ? "a LayerNorm-LSTM" : "an LSTM", " with has_biases=",
              has_biases);
  // h0 and c0 are read as torch._VF.lstm reads them, h0.select(0, idx): too
  // few layer-directions is its IndexError, more go unused, and each
  // layer's op checks what it is given.
  // The op is not differentiable: a call whose result needs a gradient
  // goes by the per-layer ops, whose autograd formulas are registered.
  if (c10::GradMode::is_enabled()) {
    bool needs = input.requires_grad() || h0.requires_grad() || c0.requires_grad();
    for (const Tensor& w : weights) needs = needs || w.requires_grad();
    TORCH_CHECK(!needs, kOp, ": inference only; with grad mode on, no ",
                "argument may require grad");
  }

  static const auto lstm = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("rnnfast::lstm_forward", "")
                               .typed<LstmForwardSignature>();
  static const auto ln_lstm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnnfast::layer_norm_lstm_forward", "")
          .typed<LayerNormLstmForwardSignature>();

  const bool packed = batch_sizes.has_value();
  Tensor x = batch_first && !packed ? input.transpose(0, 1) : input;
  std::vector<Tensor> h_n, c_n, outputs;
  h_n.reserve(groups);
  c_n.reserve(groups);
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    outputs.clear();
    for (int64_t direction = 0; direction < directions; ++direction) {
      const int64_t idx = layer * directions + direction;
      const Tensor* w = weights.data() + idx * per;
      const OptionalTensor b_ih = has_biases ? OptionalTensor(w[2]) : c10::nullopt;
      const OptionalTensor b_hh = has_biases ? OptionalTensor(w[3]) : c10::nullopt;
      const bool reverse = direction == 1;
      Tensor out, hy, cy;
      if (layer_norm) {
        const Tensor* ln = w + plain;
        std::tie(out, hy, cy, std::ignore, std::ignore, std::ignore, std::ignore,
                 std::ignore) =
            ln_lstm.call(x, h0.select(0, idx), c0.select(0, idx), w[0], w[1],
                         b_ih, b_hh, ln[0], ln[1], ln[2], ln[3], ln[4], ln[5],
                         batch_sizes, reverse, /*training=*/false, eps,
                         c10::nullopt, c10::nullopt, zoneout_hidden,
                         zoneout_cell);
      } else {
        const OptionalTensor w_hr = per > plain ? OptionalTensor(w[plain]) : c10::nullopt;
        std::tie(out, hy, cy, std::ignore, std::ignore, std::ignore) =
            lstm.call(x, h0.select(0, idx), c0.select(0, idx), w[0], w[1], b_ih,
                      b_hh, w_hr, batch_sizes, reverse, /*training=*/false,
                      c10::nullopt, c10::nullopt, zoneout_hidden, zoneout_cell);
      }
      outputs.push_back(std::move(out));
      h_n.push_back(std::move(hy));
      c_n.push_back(std::move(cy));
    }
    x = directions == 1 ? outputs[0] : at::cat(outputs, -1);
  }
  Tensor output = batch_first && !packed ? x.transpose(0, 1) : x;
  return {output, at::stack(h_n), at::stack(c_n)};
}

}  // namespace
}  // namespace rnnfast

// One kernel for every device (the layer ops it calls dispatch by device,
// autocast included) and no autograd kernel: see the GradMode check.
TORCH_LIBRARY_IMPL(rnnfast, CompositeExplicitAutograd, m) {
  m.impl("stacked_inference", &rnnfast::stacked_inference);
}
