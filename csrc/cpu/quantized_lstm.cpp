// The int8 (dynamic-quantized, inference-only) LSTM and LayerNorm-LSTM ops on
// the CPU: schemas, checks and their time loops.
//
// Each layer runs as the float inference path does (lstm_driver.h,
// layer_norm_lstm_driver.h): the input product for every step hoisted before
// the loop, then per step the recurrent product and the float step kernel of
// the cell (cpu/step_kernels.h, the cell math of lstm_cell.h and
// layer_norm_lstm_cell.h). Only the products differ: int8 ones (int8_gemm.h)
// whose activations are quantized per row at each use, dequantized into the
// float gates. The loops are written here, not as a Backend of the float
// drivers, because those read the weights as tensors of the activations'
// type (a float StepWeight, at::addmm for the input product); they reuse the
// drivers' helpers for reading h_{t-1} in place and gathering h_n.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "../arg_checks.h"
#include "../lstm_driver.h"
#include "activation_cache.h"
#include "int8_gemm.h"
#include "kernel_table.h"

TORCH_LIBRARY_FRAGMENT(rnnfast, m) {
  // The packed form of an int8 weight [n, k] (rows: outputs) for the
  // quantized ops: a 1-D int8 tensor of opaque layout (cpu/int8_gemm.h)
  // holding the weight and its column sums.
  m.def("quantized_pack_weight(Tensor weight) -> Tensor");
  // The int8 product alone (for tests and measurements): float32 input
  // [M, k] quantized per row, times the packed int8 weight of n outputs
  // with its scale [n], dequantized, plus bias [n]: returns [M, n]. kernels:
  // "auto" (as the layers choose) or one family by its build_info name
  // ("AMX-INT8", "AVX512-VNNI", "AVX2", "portable"), refused where it does
  // not run.
  m.def(
      "quantized_linear(Tensor input, Tensor packed, Tensor scale, Tensor? bias, "
      "str kernels=\"auto\") -> Tensor");
  // One int8 LSTM layer in one direction over a whole time-major sequence,
  // inference only. input [T, B, I] or packed rows [N, I] with batch_sizes,
  // float32; hx [B, P], cx [B, H]; packed_* from quantized_pack_weight of
  // the int8 weight_ih [4H, I], weight_hh [4H, P], weight_hr [P, H], each
  // with its per-row float32 scale_* ([4H], [4H], [P]); float32 biases [4H].
  // zoneout_hidden, zoneout_cell: the rates of a module trained with zoneout,
  // applied as its evaluation formula s_t = z s_{t-1} + (1 - z) s~_t.
  // Returns output ([T, B, P] or [N, P]), hy [B, P], cy [B, H].
  m.def(
      "quantized_lstm_forward(Tensor input, Tensor hx, Tensor cx, "
      "Tensor packed_ih, Tensor scale_ih, Tensor packed_hh, Tensor scale_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? packed_hr, Tensor? scale_hr, "
      "Tensor? batch_sizes, bool reverse, float zoneout_hidden=0., "
      "float zoneout_cell=0.) -> (Tensor output, Tensor hy, Tensor cy)");
  // One int8 LayerNorm-LSTM layer (the cell of layer_norm_lstm_forward),
  // inference only; weights as quantized_lstm_forward's (P = H), LayerNorm
  // parameters float32 as layer_norm_lstm_forward's.
  m.def(
      "quantized_layer_norm_lstm_forward(Tensor input, Tensor hx, Tensor cx, "
      "Tensor packed_ih, Tensor scale_ih, Tensor packed_hh, Tensor scale_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor ln_ih_weight, "
      "Tensor ln_ih_bias, Tensor ln_hh_weight, Tensor ln_hh_bias, "
      "Tensor ln_cell_weight, Tensor ln_cell_bias, Tensor? batch_sizes, "
      "bool reverse, float eps, float zoneout_hidden=0., float zoneout_cell=0.) "
      "-> (Tensor output, Tensor hy, Tensor cy)");
  // The stacked forms: num_layers layers (x 2 directions when
  // bidirectional) of the ops above in one call, as rnnfast.functional
  // composes the float layers (a direction's input is the previous layer's
  // outputs, both directions concatenated); one call, so a one-step decode
  // call does not pay a Python round trip per layer. weights: per layer,
  // then direction, the op's weight arguments in its order (8 for the LSTM:
  // packed_ih ... scale_hr; 12 for the LayerNorm-LSTM: packed_ih ...
  // ln_cell_bias). hx [L*D, B, P], cx [L*D, B, H]; returns (output, h_n
  // [L*D, B, P], c_n [L*D, B, H]).
  m.def(
      "quantized_lstm_stack(Tensor input, Tensor hx, Tensor cx, Tensor?[] weights, "
      "int num_layers, bool bidirectional, Tensor? batch_sizes, "
      "float zoneout_hidden=0., float zoneout_cell=0.) -> (Tensor output, Tensor hy, "
      "Tensor cy)");
  m.def(
      "quantized_layer_norm_lstm_stack(Tensor input, Tensor hx, Tensor cx, "
      "Tensor?[] weights, int num_layers, bool bidirectional, Tensor? batch_sizes, "
      "float eps, float zoneout_hidden=0., float zoneout_cell=0.) -> (Tensor output, "
      "Tensor hy, Tensor cy)");
}

namespace rnnfast::cpu {
namespace {

namespace q8 = int8;

// A prepacked int8 weight [n, k] and its per-row scales, multiplied at every
// step by float rows that it quantizes first (the interface of
// multiply_previous_hidden in lstm_driver.h).
class QuantizedStepWeight {
 public:
  QuantizedStepWeight(int64_t max_m, int64_t n, int64_t k, const int8_t* packed,
                      const float* scale)
      : n_(n), k_(k), kp_(q8::padded_depth(k)), packed_(packed), scale_(scale),
        rows_(max_m * kp_), row_scale_(max_m) {}

  // C[m, n] = dequantized(quantized(A[m, k]) W^T) + beta C
  void multiply(int64_t m, const float* a, int64_t lda, float beta, float* c,
                int64_t ldc) const {
    q8::quantize_rows(m, k_, a, lda, rows_.data(), kp_, row_scale_.data());
    q8::gemm(m, n_, k_, rows_.data(), kp_, row_scale_.data(), packed_, scale_,
             nullptr, beta, c, ldc);
  }

  // A[m, k] quantized, as a second term of another product (a one-step
  // call adds h_0 W_hh^T to the input product, one pass over the gates).
  q8::SecondTerm as_second_term(int64_t m, const float* a, int64_t lda) const {
    q8::quantize_rows(m, k_, a, lda, rows_.data(), kp_, row_scale_.data());
    return {rows_.data(), kp_, row_scale_.data(), k_, packed_, scale_};
  }

 private:
  int64_t n_, k_, kp_;
  const int8_t* packed_;
  const float* scale_;
  mutable std::vector<uint8_t> rows_;   // [max_m, Kp] quantized rows
  mutable std::vector<float> row_scale_;  // [max_m]
};

// out [N, n] = dequantized(quantized(x) W^T) + bias: the hoisted input
// product of every step, on the kernels gemm picks or on `forced`.
void quantized_input_projection(at::Tensor& out, const at::Tensor& x,
                                const at::Tensor& packed, const at::Tensor& scale,
                                const at::Tensor& bias,
                                const q8::Kernels* forced = nullptr,
                                const q8::SecondTerm* second = nullptr) {
  const int64_t rows = x.size(0), k = x.size(1), n = out.size(1);
  const int64_t kp = q8::padded_depth(k);
  at::Tensor qx = at::empty({rows, kp}, x.options().dtype(at::kByte));
  at::Tensor qs = at::empty({rows}, x.options());
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (forced) {
    q8::quantize_rows_with(*forced, rows, k, x.data_ptr<float>(), k,
                           qx.data_ptr<uint8_t>(), kp, qs.data_ptr<float>());
    q8::gemm_with(*forced, rows, n, k, qx.data_ptr<uint8_t>(), kp, qs.data_ptr<float>(),
                  packed.data_ptr<int8_t>(), scale.data_ptr<float>(), b, 0.0f,
                  out.data_ptr<float>(), n);
    return;
  }
  q8::quantize_rows_parallel(rows, k, x.data_ptr<float>(), k, qx.data_ptr<uint8_t>(),
                             kp, qs.data_ptr<float>());
  q8::gemm(rows, n, k, qx.data_ptr<uint8_t>(), kp, qs.data_ptr<float>(),
           packed.data_ptr<int8_t>(), scale.data_ptr<float>(), b, 0.0f,
           out.data_ptr<float>(), n, second);
}

// out [N, n] = dequantized(q1 W^T) + dequantized(q2 W^T), where q1 is x's
// per-row int8 quantization (scale s1) and q2 that of what it leaves,
// r = x - s1 q1 (in double, where s1 q1 is exact, rounded once to float):
// two int8 products that carry x to about 15 bits. The LayerNorm-LSTM's
// input product: LN_ih normalises W_ih x to unit variance, so the
// rounding of x, a small share of the LSTM's gates, becomes a large one of
// the LayerNorm-LSTM's (the second layer's input h is small). The weight
// stays int8 and both products exact in int32.
void quantized_input_projection_two_terms(at::Tensor& out, const at::Tensor& x,
                                          const at::Tensor& packed,
                                          const at::Tensor& scale) {
  const int64_t rows = x.size(0), k = x.size(1), n = out.size(1);
  const int64_t kp = q8::padded_depth(k);
  at::Tensor qx = at::empty({2, rows, kp}, x.options().dtype(at::kByte));
  at::Tensor qs = at::empty({2, rows}, x.options());
  at::Tensor residual = at::empty({rows, k}, x.options());
  uint8_t* q1 = qx.data_ptr<uint8_t>();
  uint8_t* q2 = q1 + rows * kp;
  float* s1 = qs.data_ptr<float>();
  float* s2 = s1 + rows;
  const float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  q8::quantize_rows_parallel(rows, k, xp, k, q1, kp, s1);
  at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, k)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const double sr = s1[r];
                       for (int64_t j = 0; j < k; ++j) {
                         const double q = int32_t(q1[r * kp + j]) - q8::kActivationOffset;
                         rp[r * k + j] = static_cast<float>(double(xp[r * k + j]) - sr * q);
                       }
                     }
                   });
  q8::quantize_rows_parallel(rows, k, rp, k, q2, kp, s2);
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* ws = scale.data_ptr<float>();
  const q8::SecondTerm residual_term{q2, kp, s2, k, w, ws};
  q8::gemm(rows, n, k, q1, kp, s1, w, ws, nullptr, 0.0f, out.data_ptr<float>(), n,
           &residual_term);
}

// What the shared driver helpers (copy_final_hidden, zoneout_hidden_step)
// need of a backend.
struct QuantizedBackend {
  static void copy(float* dst, const float* src, int64_t count) {
    std::memcpy(dst, src, sizeof(float) * count);
  }
  static void zoneout_hidden(const HiddenZoneoutParams<float>& p) {
    zoneout_hidden_rows(p);
  }
};

// The evaluation-mode zoneout of a quantized op (rates only: no masks).
ZoneoutArgs zoneout_rates(const char* op, double hidden, double cell) {
  TORCH_CHECK(hidden >= 0.0 && hidden < 1.0, op,
              ": zoneout_hidden must be in [0, 1), got ", hidden);
  TORCH_CHECK(cell >= 0.0 && cell < 1.0, op,
              ": zoneout_cell must be in [0, 1), got ", cell);
  ZoneoutArgs z;
  z.hidden_rate = hidden;
  z.cell_rate = cell;
  return z;
}

void check_float(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name,
              " must be a CPU tensor (the int8 kernels run on the CPU), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name,
              " must be float32, got ", t.scalar_type());
}

void check_size(const char* op, const at::Tensor& t, const char* name,
                at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of size ",
              expected, ", got ", t.sizes());
}

// Checks a packed weight of n outputs and depth k and its scale [n].
void check_packed(const char* op, const at::Tensor& packed, const char* name,
                  const at::Tensor& scale, const char* scale_name, int64_t n,
                  int64_t k) {
  check_float(op, scale, scale_name);
  check_size(op, scale, scale_name, {n});
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kChar &&
                  packed.dim() == 1 && packed.is_contiguous() &&
                  packed.numel() == q8::packed_bytes(n, k),
              op, ": ", name, " must be the packed int8 CPU weight of ", n,
              " outputs and ", k, " inputs (", q8::packed_bytes(n, k),
              " bytes, from quantized_pack_weight), got a ", packed.scalar_type(),
              " tensor of size ", packed.sizes(), " on ", packed.device());
  const int64_t packed_k = q8::packed_depth(packed.data_ptr<int8_t>(), packed.numel());
  TORCH_CHECK(packed_k == k, op, ": ", name, " was packed for ", packed_k,
              " inputs, but its input has ", k);
}

struct QuantizedSizes {
  LstmSizes s;
  SequenceLayout l;
};

QuantizedSizes check_common(const char* op, const at::Tensor& input,
                            const at::Tensor& hx, const at::Tensor& cx,
                            const at::Tensor& packed_ih, const at::Tensor& scale_ih,
                            const at::Tensor& packed_hh, const at::Tensor& scale_hh,
                            const c10::optional<at::Tensor>& bias_ih,
                            const c10::optional<at::Tensor>& bias_hh,
                            const c10::optional<at::Tensor>& scale_hr,
                            const c10::optional<at::Tensor>& batch_sizes,
                            bool reverse) {
  check_float(op, input, "input");
  const bool packed = batch_sizes.has_value();
  TORCH_CHECK(input.dim() == (packed ? 2 : 3), op, ": expected ",
              packed ? "packed input of 2 dimensions [N, input_size]"
                     : "input of 3 dimensions [T, B, input_size]",
              ", got ", input.dim(), " dimensions");
  TORCH_CHECK(!packed || (batch_sizes->device().is_cpu() &&
                          batch_sizes->scalar_type() == at::kLong &&
                          batch_sizes->dim() == 1),
              op, ": batch_sizes must be a 1-D int64 CPU tensor");
  TORCH_CHECK(scale_ih.dim() == 1 && scale_ih.numel() % 4 == 0 && scale_ih.numel() > 0,
              op, ": scale_ih must have 4 * hidden_size entries, got size ",
              scale_ih.sizes());
  QuantizedSizes r;
  r.s.input = input.size(-1);
  r.s.hidden = scale_ih.numel() / 4;
  r.s.output = scale_hr.has_value() ? scale_hr->numel() : r.s.hidden;
  const int64_t G = 4 * r.s.hidden;
  check_packed(op, packed_ih, "packed_ih", scale_ih, "scale_ih", G, r.s.input);
  check_packed(op, packed_hh, "packed_hh", scale_hh, "scale_hh", G, r.s.output);
  TORCH_CHECK(bias_ih.has_value() == bias_hh.has_value(), op,
              ": bias_ih and bias_hh must both be given or both be None");
  if (bias_ih.has_value()) {
    check_float(op, *bias_ih, "bias_ih");
    check_size(op, *bias_ih, "bias_ih", {G});
    check_float(op, *bias_hh, "bias_hh");
    check_size(op, *bias_hh, "bias_hh", {G});
  }
  if (packed) {
    const auto bs = batch_sizes->contiguous();
    const int64_t* b = bs.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t t = 0; t < bs.numel(); ++t) {
      TORCH_CHECK(b[t] > 0 && (t == 0 || b[t] <= b[t - 1]), op,
                  ": batch_sizes must be positive and non-increasing");
      total += b[t];
    }
    TORCH_CHECK(total == input.size(0), op, ": batch_sizes sum to ", total,
                " but input has ", input.size(0), " rows");
  }
  r.l = make_layout(input, batch_sizes, reverse);
  check_float(op, hx, "hx");
  check_size(op, hx, "hx", {r.l.batch, r.s.output});
  check_float(op, cx, "cx");
  check_size(op, cx, "cx", {r.l.batch, r.s.hidden});
  return r;
}

// The elementwise sum of float32 vectors of one size (the checks have
// made them so), by a plain loop: at::add's dispatch costs as much as the
// sum, and a one-step decode call sums biases once per layer.
at::Tensor sum_of(std::initializer_list<const at::Tensor*> terms) {
  const at::Tensor& first = **terms.begin();
  at::Tensor out = at::zeros({first.numel()}, first.options());
  float* o = out.data_ptr<float>();
  for (const at::Tensor* t : terms) {
    const at::Tensor c = t->contiguous();
    const float* v = c.data_ptr<float>();
    for (int64_t i = 0; i < c.numel(); ++i) o[i] += v[i];
  }
  return out;
}

at::Tensor sum_of(const c10::optional<at::Tensor>& a,
                  const c10::optional<at::Tensor>& b) {
  return a.has_value() ? sum_of({&*a, &*b}) : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantized_lstm_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& packed_ih, const at::Tensor& scale_ih,
    const at::Tensor& packed_hh, const at::Tensor& scale_hh,
    const c10::optional<at::Tensor>& bias_ih,
    const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& packed_hr,
    const c10::optional<at::Tensor>& scale_hr,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    double zoneout_hidden, double zoneout_cell) {
  constexpr const char* op = "rnnfast.quantized_lstm_forward";
  const ZoneoutArgs z = zoneout_rates(op, zoneout_hidden, zoneout_cell);
  TORCH_CHECK(packed_hr.has_value() == scale_hr.has_value(), op,
              ": packed_hr and scale_hr must both be given or both be None");
  const QuantizedSizes qs =
      check_common(op, input, hx, cx, packed_ih, scale_ih, packed_hh, scale_hh,
                   bias_ih, bias_hh, scale_hr, batch_sizes, reverse);
  const LstmSizes& s = qs.s;
  const SequenceLayout& l = qs.l;
  const int64_t H = s.hidden, P = s.output, G = 4 * H;
  if (s.has_projection()) {
    TORCH_CHECK(P < H, op, ": the projection must be smaller than the hidden size");
    check_packed(op, *packed_hr, "packed_hr", *scale_hr, "scale_hr", P, H);
  }
  const auto opts = input.options();
  if (l.rows == 0) {
    return {at::empty(output_shape(input, P), opts), hx.clone(at::MemoryFormat::Contiguous),
            cx.clone(at::MemoryFormat::Contiguous)};
  }
  const at::Tensor x = input.contiguous().view({l.rows, s.input});
  // (packed weights are contiguous: check_packed)
  const at::Tensor& w_ih = packed_ih;
  const at::Tensor& w_hh = packed_hh;
  const at::Tensor s_ih = scale_ih.contiguous(), s_hh = scale_hh.contiguous();
  at::Tensor w_hr, s_hr;
  if (s.has_projection()) {
    w_hr = *packed_hr;
    s_hr = scale_hr->contiguous();
  }
  at::Tensor gates = empty_activation({l.rows, G}, opts);
  const at::Tensor h0 = hx.contiguous();
  const QuantizedStepWeight whh(l.batch, G, P, w_hh.data_ptr<int8_t>(),
                                s_hh.data_ptr<float>());
  // One step (a decode call): h_0 W_hh^T joins the input product's pass
  // (the same roundings as the step's own product after it).
  const bool one_step = l.steps == 1;
  q8::SecondTerm h0_term;
  if (one_step) h0_term = whh.as_second_term(l.rows, h0.data_ptr<float>(), P);
  quantized_input_projection(gates, x, w_ih, s_ih, sum_of(bias_ih, bias_hh), nullptr,
                             one_step ? &h0_term : nullptr);
  at::Tensor output = at::empty({l.rows, P}, opts);
  at::Tensor c_state = cx.contiguous().clone();
  at::Tensor r_buf;
  if (s.has_projection()) r_buf = at::empty({l.batch, H}, opts);

  std::unique_ptr<QuantizedStepWeight> whr;
  if (s.has_projection()) {
    whr = std::make_unique<QuantizedStepWeight>(l.batch, P, H, w_hr.data_ptr<int8_t>(),
                                                s_hr.data_ptr<float>());
  }
  float* g = gates.data_ptr<float>();
  float* out = output.data_ptr<float>();
  const auto& step_kernel = kernels<float>().forward_step[false][z.on_cell()];
  for (int64_t step = 0; step < l.steps; ++step) {
    const int64_t t = l.step_at(step);
    const int64_t rows = l.batch_sizes[t];
    const int64_t off = l.offsets[t];
    // gates[t] += h_{t-1} W_hh^T, h_{t-1} quantized where it lies
    if (!one_step) {
      multiply_previous_hidden(l, t, whh, out, h0.data_ptr<float>(), P, 1.0f,
                               g + off * G, G);
    }
    ForwardStepParams<float> p;
    p.rows = rows;
    p.hidden = H;
    p.gates = g + off * G;
    p.cell_state = c_state.data_ptr<float>();
    p.hidden_out = s.has_projection() ? r_buf.data_ptr<float>() : out + off * P;
    if (z.on_cell()) p.zoneout = cell_zoneout<float>(z, off, H);
    step_kernel(p);
    // h_t = r_t W_hr^T
    if (s.has_projection()) whr->multiply(rows, p.hidden_out, H, 0.0f, out + off * P, P);
    // zoneout on h (the projected h with a projection)
    if (z.on_hidden()) {
      zoneout_hidden_step<QuantizedBackend, float, float>(l, t, z, out,
                                                          h0.data_ptr<float>(), P);
    }
  }
  at::Tensor hy = at::empty({l.batch, P}, opts);
  copy_final_hidden<QuantizedBackend>(l, out, P, hy.data_ptr<float>());
  return {at::_unsafe_view(output, output_shape(input, P)), hy, c_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantized_layer_norm_lstm_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& packed_ih, const at::Tensor& scale_ih,
    const at::Tensor& packed_hh, const at::Tensor& scale_hh,
    const c10::optional<at::Tensor>& bias_ih,
    const c10::optional<at::Tensor>& bias_hh, const at::Tensor& ln_ih_weight,
    const at::Tensor& ln_ih_bias, const at::Tensor& ln_hh_weight,
    const at::Tensor& ln_hh_bias, const at::Tensor& ln_cell_weight,
    const at::Tensor& ln_cell_bias, const c10::optional<at::Tensor>& batch_sizes,
    bool reverse, double eps, double zoneout_hidden, double zoneout_cell) {
  constexpr const char* op = "rnnfast.quantized_layer_norm_lstm_forward";
  const ZoneoutArgs z = zoneout_rates(op, zoneout_hidden, zoneout_cell);
  const QuantizedSizes qs =
      check_common(op, input, hx, cx, packed_ih, scale_ih, packed_hh, scale_hh,
                   bias_ih, bias_hh, c10::nullopt, batch_sizes, reverse);
  const LstmSizes& s = qs.s;
  const SequenceLayout& l = qs.l;
  const int64_t H = s.hidden, G = 4 * H;
  const std::pair<const at::Tensor*, const char*> gate_params[] = {
      {&ln_ih_weight, "ln_ih_weight"}, {&ln_ih_bias, "ln_ih_bias"},
      {&ln_hh_weight, "ln_hh_weight"}, {&ln_hh_bias, "ln_hh_bias"}};
  for (const auto& [t, name] : gate_params) {
    check_float(op, *t, name);
    check_size(op, *t, name, {G});
  }
  check_float(op, ln_cell_weight, "ln_cell_weight");
  check_size(op, ln_cell_weight, "ln_cell_weight", {H});
  check_float(op, ln_cell_bias, "ln_cell_bias");
  check_size(op, ln_cell_bias, "ln_cell_bias", {H});
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  const auto opts = input.options();
  if (l.rows == 0) {
    return {at::empty(output_shape(input, H), opts), hx.clone(at::MemoryFormat::Contiguous),
            cx.clone(at::MemoryFormat::Contiguous)};
  }
  const at::Tensor x = input.contiguous().view({l.rows, s.input});
  const at::Tensor& w_hh = packed_hh;  // contiguous: check_packed
  const at::Tensor s_hh = scale_hh.contiguous();
  // W_ih x for every step; each step normalises its rows in place.
  at::Tensor ih = empty_activation({l.rows, G}, opts);
  quantized_input_projection_two_terms(ih, x, packed_ih, scale_ih.contiguous());
  at::Tensor hh = at::empty({l.batch, G}, opts);
  // The four gate biases enter the pre-activations alike: one sum serves.
  const at::Tensor gate_bias = bias_ih.has_value()
                                  ? sum_of({&ln_ih_bias, &ln_hh_bias, &*bias_ih, &*bias_hh})
                                  : sum_of({&ln_ih_bias, &ln_hh_bias});
  const at::Tensor gamma_ih = ln_ih_weight.contiguous(), gamma_hh = ln_hh_weight.contiguous(),
                   gamma_cell = ln_cell_weight.contiguous(),
                   beta_cell = ln_cell_bias.contiguous();
  at::Tensor output = at::empty({l.rows, H}, opts);
  at::Tensor c_state = cx.contiguous().clone();
  const at::Tensor h0 = hx.contiguous();
  const QuantizedStepWeight whh(l.batch, G, H, w_hh.data_ptr<int8_t>(),
                                s_hh.data_ptr<float>());
  float* out = output.data_ptr<float>();
  const auto& step_kernel = kernels<float>().layer_norm_forward_step[false][z.on_cell()];
  at::Tensor cand_buf;  // c~_t of a step, with zoneout on c (the kernel's scratch)
  if (z.on_cell()) cand_buf = at::empty({l.batch, H}, opts);
  for (int64_t step = 0; step < l.steps; ++step) {
    const int64_t t = l.step_at(step);
    const int64_t off = l.offsets[t];
    multiply_previous_hidden(l, t, whh, out, h0.data_ptr<float>(), H, 0.0f,
                             hh.data_ptr<float>(), G);
    LayerNormStepParams<float> p;
    p.rows = l.batch_sizes[t];
    p.hidden = H;
    p.eps = static_cast<float>(eps);
    p.ih = ih.data_ptr<float>() + off * G;
    p.hh = hh.data_ptr<float>();
    p.gamma_ih = gamma_ih.data_ptr<float>();
    p.gamma_hh = gamma_hh.data_ptr<float>();
    p.bias = gate_bias.data_ptr<float>();
    p.gamma_cell = gamma_cell.data_ptr<float>();
    p.beta_cell = beta_cell.data_ptr<float>();
    p.cell_state = c_state.data_ptr<float>();
    p.h_out = out + off * H;
    if (z.on_cell()) {
      p.zoneout = cell_zoneout<float>(z, off, H);
      p.cell_save = cand_buf.data_ptr<float>();
    }
    step_kernel(p);
    if (z.on_hidden()) {
      zoneout_hidden_step<QuantizedBackend, float, float>(l, t, z, out,
                                                          h0.data_ptr<float>(), H);
    }
  }
  at::Tensor hy = at::empty({l.batch, H}, opts);
  copy_final_hidden<QuantizedBackend>(l, out, H, hy.data_ptr<float>());
  return {at::_unsafe_view(output, output_shape(input, H)), hy, c_state};
}

using OptionalTensors = c10::List<c10::optional<at::Tensor>>;

// Runs `layer(input, h0, c0, weights of that layer and direction)` over the
// layers and directions of a stacked op; see the schema.
template <typename Layer>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_stack(
    const char* op, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    const OptionalTensors& weights, int64_t per_direction, int64_t num_layers,
    bool bidirectional, const Layer& layer) {
  const int64_t D = bidirectional ? 2 : 1;
  TORCH_CHECK(num_layers > 0, op, ": num_layers must be positive, got ", num_layers);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_layers * D * per_direction, op,
              ": expected ", num_layers * D * per_direction, " weights (", per_direction,
              " per layer and direction), got ", weights.size());
  TORCH_CHECK(hx.dim() == 3 && cx.dim() == 3 && hx.size(0) == num_layers * D &&
                  cx.size(0) == num_layers * D,
              op, ": expected hx and cx of 3 dimensions [num_layers * directions, B, *] "
              "with ", num_layers * D, " states, got sizes ", hx.sizes(), " and ", cx.sizes());
  std::vector<c10::optional<at::Tensor>> w(weights.begin(), weights.end());
  at::Tensor layer_input = input;
  std::vector<at::Tensor> hs, cs, outs;
  for (int64_t l = 0; l < num_layers; ++l) {
    outs.clear();
    for (int64_t d = 0; d < D; ++d) {
      const int64_t idx = l * D + d;
      auto [out, h, c] = layer(layer_input, hx[idx], cx[idx], &w[idx * per_direction], d == 1);
      outs.push_back(std::move(out));
      hs.push_back(std::move(h));
      cs.push_back(std::move(c));
    }
    layer_input = D == 1 ? outs[0] : at::cat(outs, -1);
  }
  return {layer_input, at::stack(hs), at::stack(cs)};
}

const at::Tensor& required(const c10::optional<at::Tensor>& t, const char* op,
                           const char* name) {
  TORCH_CHECK(t.has_value(), op, ": ", name, " must be a tensor, got None");
  return *t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantized_lstm_stack(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    const OptionalTensors& weights, int64_t num_layers, bool bidirectional,
    const c10::optional<at::Tensor>& batch_sizes, double zoneout_hidden,
    double zoneout_cell) {
  constexpr const char* op = "rnnfast.quantized_lstm_stack";
  return run_stack(op, input, hx, cx, weights, 8, num_layers, bidirectional,
                   [&](const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                       const c10::optional<at::Tensor>* w, bool reverse) {
                     return quantized_lstm_forward(
                         x, h0, c0, required(w[0], op, "packed_ih"),
                         required(w[1], op, "scale_ih"), required(w[2], op, "packed_hh"),
                         required(w[3], op, "scale_hh"), w[4], w[5], w[6], w[7],
                         batch_sizes, reverse, zoneout_hidden, zoneout_cell);
                   });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantized_layer_norm_lstm_stack(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    const OptionalTensors& weights, int64_t num_layers, bool bidirectional,
    const c10::optional<at::Tensor>& batch_sizes, double eps, double zoneout_hidden,
    double zoneout_cell) {
  constexpr const char* op = "rnnfast.quantized_layer_norm_lstm_stack";
  static const char* const ln_names[] = {"ln_ih_weight", "ln_ih_bias", "ln_hh_weight",
                                         "ln_hh_bias", "ln_cell_weight", "ln_cell_bias"};
  return run_stack(op, input, hx, cx, weights, 12, num_layers, bidirectional,
                   [&](const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                       const c10::optional<at::Tensor>* w, bool reverse) {
                     return quantized_layer_norm_lstm_forward(
                         x, h0, c0, required(w[0], op, "packed_ih"),
                         required(w[1], op, "scale_ih"), required(w[2], op, "packed_hh"),
                         required(w[3], op, "scale_hh"), w[4], w[5],
                         required(w[6], op, ln_names[0]), required(w[7], op, ln_names[1]),
                         required(w[8], op, ln_names[2]), required(w[9], op, ln_names[3]),
                         required(w[10], op, ln_names[4]), required(w[11], op, ln_names[5]),
                         batch_sizes, reverse, eps, zoneout_hidden, zoneout_cell);
                   });
}

at::Tensor quantized_linear(const at::Tensor& input, const at::Tensor& packed,
                            const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
                            c10::string_view kernels) {
  constexpr const char* op = "rnnfast.quantized_linear";
  check_float(op, input, "input");
  TORCH_CHECK(input.dim() == 2, op, ": expected input of 2 dimensions [M, k], got ",
              input.dim());
  TORCH_CHECK(scale.dim() == 1, op, ": expected scale of 1 dimension [n], got ",
              scale.dim());
  const int64_t n = scale.size(0), k = input.size(1);
  check_packed(op, packed, "packed", scale, "scale", n, k);
  if (bias.has_value()) {
    check_float(op, *bias, "bias");
    check_size(op, *bias, "bias", {n});
  }
  q8::Kernels which = q8::Kernels::kPortable;
  const bool forced = kernels != "auto";
  if (forced) {
    bool known = false;
    for (q8::Kernels k8 : {q8::Kernels::kPortable, q8::Kernels::kAvx2,
                           q8::Kernels::kAvx512Vnni, q8::Kernels::kAmxInt8}) {
      if (kernels == q8::kernels_name(k8)) {
        which = k8;
        known = true;
      }
    }
    TORCH_CHECK(known, op, ": kernels must be \"auto\", \"AMX-INT8\", \"AVX512-VNNI\", "
                "\"AVX2\" or \"portable\", got \"", kernels, "\"");
    TORCH_CHECK(q8::kernels_available(which), op, ": the ", kernels,
                " kernels do not run here (the best here: ",
                q8::kernels_name(q8::best_kernels()), ")");
  }
  at::Tensor out = at::empty({input.size(0), n}, input.options());
  quantized_input_projection(out, input.contiguous(), packed, scale.contiguous(),
                             bias.has_value() ? bias->contiguous() : at::Tensor(),
                             forced ? &which : nullptr);
  return out;
}

at::Tensor quantized_pack_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kChar &&
                  weight.dim() == 2,
              "rnnfast.quantized_pack_weight: expected a 2-D int8 CPU weight, got a ",
              weight.dim(), "-D ", weight.scalar_type(), " tensor on ", weight.device());
  const int64_t n = weight.size(0), k = weight.size(1);
  // The int32 sums hold (q + 128) w, |.| <= 255 * 127 per input.
  TORCH_CHECK(k <= q8::kMaxDepth, "rnnfast.quantized_pack_weight: at most ",
              q8::kMaxDepth, " inputs per output (the int32 sums would overflow), got ", k);
  at::Tensor packed = at::empty({q8::packed_bytes(n, k)}, weight.options());
  q8::pack_weight(weight.contiguous().data_ptr<int8_t>(), n, k, packed.data_ptr<int8_t>());
  return packed;
}

}  // namespace
}  // namespace rnnfast::cpu

namespace rnnfast {
const char* cpu_int8_kernels_in_use() { return cpu::int8::kernels_in_use(); }
}  // namespace rnnfast

// The CPU only, and no autograd formula: the int8 modules refuse training
// before they call these (rnnfast/quantized.py).
TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("quantized_pack_weight", &rnnfast::cpu::quantized_pack_weight);
  m.impl("quantized_linear", &rnnfast::cpu::quantized_linear);
  m.impl("quantized_lstm_stack", &rnnfast::cpu::quantized_lstm_stack);
  m.impl("quantized_layer_norm_lstm_stack", &rnnfast::cpu::quantized_layer_norm_lstm_stack);
  m.impl("quantized_lstm_forward", &rnnfast::cpu::quantized_lstm_forward);
  m.impl("quantized_layer_norm_lstm_forward",
         &rnnfast::cpu::quantized_layer_norm_lstm_forward);
}
