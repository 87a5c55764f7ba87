#include "arg_checks.h"

namespace rnnfast {
namespace {

// Every message starts with the op's name ("rnnfast.lstm_forward: ...") and
// names the argument at fault, except a device mismatch's, which starts with
// torch.nn.LSTM's words (ATen's check of _VF.lstm's arguments: a model on the
// GPU called with an input on the CPU is the usual cause), then names the op
// and the argument. `kind` is "hidden" for hx and cx, else "parameter".
void check_same(const char* op, const at::Tensor& t, const char* name,
                const at::Tensor& input, const char* kind = "parameter") {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name,
              " must have the dtype of input (", input.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "Input and ", kind,
              " tensors are not at the same device, found input tensor at ",
              input.device(), " and ", kind, " tensor at ", t.device(), " (",
              op, ": ", name, ")");
}

void check_shape(const char* op, const at::Tensor& t, const char* name,
                 at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of size ",
              expected, ", got ", t.sizes());
}

}  // namespace

LstmSizes check_lstm_args(const char* op, const at::Tensor& input,
                          const at::Tensor& hx, const at::Tensor& cx,
                          const at::Tensor& weight_ih,
                          const at::Tensor& weight_hh,
                          const c10::optional<at::Tensor>& bias_ih,
                          const c10::optional<at::Tensor>& bias_hh,
                          const c10::optional<at::Tensor>& weight_hr,
                          const c10::optional<at::Tensor>& batch_sizes) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              op, ": input must be a floating point tensor, got ",
              input.scalar_type());
  const bool packed = batch_sizes.has_value();
  TORCH_CHECK(input.dim() == (packed ? 2 : 3), op, ": expected ",
              packed ? "packed input of 2 dimensions [N, input_size]"
                     : "input of 3 dimensions [T, B, input_size]",
              ", got ", input.dim(), " dimensions");
  TORCH_CHECK(weight_ih.dim() == 2 && weight_hh.dim() == 2,
              op, ": weights must be 2-D");
  LstmSizes s;
  s.input = input.size(-1);
  TORCH_CHECK(weight_ih.size(0) % 4 == 0 && weight_ih.size(0) > 0,
              op, ": weight_ih must have 4 * hidden_size rows, got ",
              weight_ih.size(0));
  s.hidden = weight_ih.size(0) / 4;
  s.output = weight_hr.has_value() ? weight_hr->size(0) : s.hidden;
  // Checked before anything reads it on the host (a CUDA tensor would be
  // dereferenced as host memory).
  TORCH_CHECK(!packed || (batch_sizes->device().is_cpu() &&
                          batch_sizes->scalar_type() == at::kLong &&
                          batch_sizes->dim() == 1),
              op, ": batch_sizes must be a 1-D int64 CPU tensor");
  const int64_t batch = packed ? (batch_sizes->numel() > 0
                                      ? batch_sizes->data_ptr<int64_t>()[0]
                                      : 0)
                               : input.size(1);
  check_same(op, hx, "hx", input, "hidden");
  check_same(op, cx, "cx", input, "hidden");
  check_same(op, weight_ih, "weight_ih", input);
  check_same(op, weight_hh, "weight_hh", input);
  check_shape(op, weight_ih, "weight_ih", {4 * s.hidden, s.input});
  check_shape(op, weight_hh, "weight_hh", {4 * s.hidden, s.output});
  check_shape(op, hx, "hx", {batch, s.output});
  check_shape(op, cx, "cx", {batch, s.hidden});
  TORCH_CHECK(bias_ih.has_value() == bias_hh.has_value(),
              op, ": give both biases or neither");
  if (bias_ih.has_value()) {
    check_same(op, *bias_ih, "bias_ih", input);
    check_same(op, *bias_hh, "bias_hh", input);
    check_shape(op, *bias_ih, "bias_ih", {4 * s.hidden});
    check_shape(op, *bias_hh, "bias_hh", {4 * s.hidden});
  }
  if (weight_hr.has_value()) {
    check_same(op, *weight_hr, "weight_hr", input);
    TORCH_CHECK(s.output > 0 && s.output < s.hidden,
                op, ": proj_size must be between 0 and hidden_size (",
                s.hidden, "), got ", s.output);
    check_shape(op, *weight_hr, "weight_hr", {s.output, s.hidden});
  }
  if (packed) {
    const auto& bs = *batch_sizes;
    TORCH_CHECK(bs.numel() > 0,
                op, ": expected sequence length to be larger than 0");
    const int64_t* b = bs.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t t = 0; t < bs.numel(); ++t) {
      TORCH_CHECK(b[t] > 0 && (t == 0 || b[t] <= b[t - 1]),
                  op, ": batch_sizes must be positive and "
                  "non-increasing, got ", bs);
      total += b[t];
    }
    TORCH_CHECK(total == input.size(0), op, ": batch_sizes sum to ",
                total, " but the packed input has ", input.size(0), " rows");
  } else {
    TORCH_CHECK(input.size(0) > 0,
                op, ": expected sequence length to be larger than 0");
  }
  return s;
}

void check_layer_norm_args(const char* op, const at::Tensor& input,
                           const LstmSizes& sizes, at::TensorList ln_gates,
                           at::TensorList ln_cell) {
  static constexpr const char* kGateNames[] = {"ln_ih_weight", "ln_ih_bias",
                                               "ln_hh_weight", "ln_hh_bias"};
  static constexpr const char* kCellNames[] = {"ln_cell_weight",
                                               "ln_cell_bias"};
  TORCH_INTERNAL_ASSERT(ln_gates.size() == 4 && ln_cell.size() == 2);
  for (size_t k = 0; k < ln_gates.size(); ++k) {
    check_same(op, ln_gates[k], kGateNames[k], input);
    check_shape(op, ln_gates[k], kGateNames[k], {4 * sizes.hidden});
  }
  for (size_t k = 0; k < ln_cell.size(); ++k) {
    check_same(op, ln_cell[k], kCellNames[k], input);
    check_shape(op, ln_cell[k], kCellNames[k], {sizes.hidden});
  }
}

void check_zoneout_args(const char* op, const at::Tensor& input,
                        const char* what,
                        const c10::optional<at::Tensor>& mask,
                        at::IntArrayRef mask_shape, double rate) {
  TORCH_CHECK_VALUE(rate >= 0.0 && rate < 1.0, op, ": zoneout_", what,
                    " must be in [0, 1), got ", rate);
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(rate == 0.0, op, ": give zoneout_", what,
              "_mask (training) or a zoneout_", what,
              " rate (evaluation), not both; got the rate ", rate);
  TORCH_CHECK(m.scalar_type() == at::kBool, op, ": zoneout_", what,
              "_mask must be a bool tensor, got ", m.scalar_type());
  TORCH_CHECK(m.device() == input.device(), op, ": zoneout_", what,
              "_mask must be on the device of input (", input.device(),
              "), got ", m.device());
  TORCH_CHECK(m.sizes() == mask_shape, op, ": expected zoneout_", what,
              "_mask of size ", mask_shape, ", got ", m.sizes());
}

void check_backward_tensor(const char* op, const at::Tensor& input,
                           const at::Tensor& t, const char* name,
                           at::IntArrayRef expected) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name,
              " must be on the device of input (", input.device(), "), got ",
              t.device());
  check_shape(op, t, name, expected);
}

SequenceLayout make_layout(const at::Tensor& input,
                           const c10::optional<at::Tensor>& batch_sizes,
                           bool reverse) {
  SequenceLayout l;
  l.reverse = reverse;
  if (batch_sizes.has_value()) {
    const auto bs = batch_sizes->contiguous();
    l.steps = bs.numel();
    l.batch_sizes.assign(bs.data_ptr<int64_t>(),
                         bs.data_ptr<int64_t>() + l.steps);
    l.batch = l.steps > 0 ? l.batch_sizes[0] : 0;
  } else {
    l.steps = input.size(0);
    l.batch = input.size(1);
    l.batch_sizes.assign(l.steps, l.batch);
  }
  l.offsets.resize(l.steps + 1);
  l.offsets[0] = 0;
  for (int64_t t = 0; t < l.steps; ++t) {
    l.offsets[t + 1] = l.offsets[t] + l.batch_sizes[t];
  }
  l.rows = l.offsets[l.steps];
  return l;
}

std::vector<int64_t> output_shape(const at::Tensor& input, int64_t output_size) {
  auto shape = input.sizes().vec();
  shape.back() = output_size;
  return shape;
}

}  // namespace rnnfast
