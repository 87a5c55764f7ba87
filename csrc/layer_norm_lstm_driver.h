// The recurrence of one LayerNorm-LSTM layer in one direction, forward and
// backward, over the same Backend as lstm_driver.h plus four LayerNorm
// kernels:
//   layer_norm_rows(LayerNormRowsParams<T>)
//   layer_norm_rows_backward(LayerNormRowsBackwardParams<T>)
//   layer_norm_forward_step(LayerNormStepParams<T>)
//   layer_norm_backward_step(LayerNormBackwardStepParams<T>)
//   column_sums(ColumnSumsParams<T>)
//
// The cell (Ba, Kiros & Hinton 2016, section 3.1):
//   gates = LN_ih(W_ih x_t) + LN_hh(W_hh h_{t-1}) + b_ih + b_hh   (LN over 4H)
//   c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)
//   h_t = sigmoid(o) tanh(LN_cell(c_t))                           (LN over H)
#pragma once

#include <ATen/ATen.h>

#include "lstm_driver.h"
#include "lstm_params.h"

namespace rnnfast {

struct LayerNormWeights {
  at::Tensor weight_ih;  // [4H, I]
  at::Tensor weight_hh;  // [4H, H] contiguous
  at::Tensor bias;       // [4H] b_ih + b_hh, or undefined
  at::Tensor ln_ih_weight, ln_ih_bias;      // [4H] (biases: forward only)
  at::Tensor ln_hh_weight, ln_hh_bias;      // [4H]
  at::Tensor ln_cell_weight, ln_cell_bias;  // [H]
};

struct LayerNormForwardResult {
  at::Tensor output;         // [N, H]
  at::Tensor hy, cy;         // [B, H]
  at::Tensor gates;          // [N, 4H] activated gates (training)
  at::Tensor cells;          // [N, H] c_t (training)
  at::Tensor normalized_ih;  // [N, 4H] xhat of W_ih x (training)
  at::Tensor normalized_hh;  // [N, 4H] xhat of W_hh h (training)
  at::Tensor stats;          // [N, kStatsWidth] (training)
};

struct LayerNormBackwardResult {
  at::Tensor grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh;
  at::Tensor grad_bias;  // of b_ih, b_hh, ln_ih_bias and ln_hh_bias alike
  at::Tensor grad_ln_ih_weight, grad_ln_hh_weight;
  at::Tensor grad_ln_cell_weight, grad_ln_cell_bias;
};

template <typename Backend, typename T>
LayerNormForwardResult layer_norm_lstm_forward_recurrence(
    const SequenceLayout& l, const LstmSizes& s,
    const at::Tensor& x,   // [N, I] contiguous
    const at::Tensor& hx,  // [B, H]
    const at::Tensor& cx,  // [B, H]
    const LayerNormWeights& w, double eps, bool training) {
  const int64_t H = s.hidden, G = 4 * s.hidden;
  const auto opts = x.options();
  LayerNormForwardResult r;
  // W_ih x for every step at once, then LN_ih (+ all biases) in one pass.
  at::Tensor ih = at::mm(x, w.weight_ih.t());
  // Training keeps xhat of W_ih x (in ih) for the backward; inference
  // normalises in place.
  at::Tensor gates = training ? at::empty({l.rows, G}, opts) : ih;
  at::Tensor stats = at::empty({training ? l.rows : l.batch, kStatsWidth}, opts);
  {
    LayerNormRowsParams<T> p;
    p.rows = l.rows;
    p.width = G;
    p.eps = static_cast<T>(eps);
    p.input = ih.data_ptr<T>();
    p.normalized = training ? ih.data_ptr<T>() : nullptr;
    p.output = gates.data_ptr<T>();
    p.gamma = w.ln_ih_weight.data_ptr<T>();
    p.beta = w.ln_ih_bias.data_ptr<T>();
    p.bias = w.bias.defined() ? w.bias.data_ptr<T>() : nullptr;
    p.rstd = training ? stats.data_ptr<T>() + kRstdIh : nullptr;
    p.rstd_stride = kStatsWidth;
    Backend::layer_norm_rows(p);
  }
  at::Tensor hh = at::empty({training ? l.rows : l.batch, G}, opts);
  r.output = at::empty({l.rows, H}, opts);
  at::Tensor h_state = hx.contiguous().clone();
  at::Tensor c_state = cx.contiguous().clone();
  if (training) r.cells = at::empty({l.rows, H}, opts);

  using Weight = typename Backend::template StepWeight<T>;
  const Weight whh(true, l.batch, G, H, w.weight_hh.data_ptr<T>(), H);
  T* hs = h_state.data_ptr<T>();
  for (int64_t step = 0; step < l.steps; ++step) {
    const int64_t t = l.step_at(step);
    const int64_t rows = l.batch_sizes[t];
    const int64_t off = l.offsets[t];
    T* hh_rows = hh.data_ptr<T>() + (training ? off * G : 0);
    whh.multiply(rows, hs, H, T(0), hh_rows, G);  // W_hh h_{t-1}
    LayerNormStepParams<T> p;
    p.rows = rows;
    p.hidden = H;
    p.eps = static_cast<T>(eps);
    p.gates = gates.data_ptr<T>() + off * G;
    p.hh = hh_rows;
    p.save_normalized_hh = training;
    p.gamma_hh = w.ln_hh_weight.data_ptr<T>();
    p.beta_hh = w.ln_hh_bias.data_ptr<T>();
    p.gamma_cell = w.ln_cell_weight.data_ptr<T>();
    p.beta_cell = w.ln_cell_bias.data_ptr<T>();
    p.cell_state = c_state.data_ptr<T>();
    p.cell_save = training ? r.cells.data_ptr<T>() + off * H : nullptr;
    p.stats = training ? stats.data_ptr<T>() + off * kStatsWidth : nullptr;
    p.h_out = r.output.data_ptr<T>() + off * H;
    p.h_out2 = hs;
    Backend::layer_norm_forward_step(p);
  }
  r.hy = h_state;
  r.cy = c_state;
  if (training) {
    r.gates = gates;
    r.normalized_ih = ih;
    r.normalized_hh = hh;
    r.stats = stats;
  }
  return r;
}

template <typename Backend, typename T>
LayerNormBackwardResult layer_norm_lstm_backward_recurrence(
    const SequenceLayout& l, const LstmSizes& s,
    const at::Tensor& grad_output,  // [N, H] contiguous
    const at::Tensor& grad_hy,      // [B, H] contiguous
    const at::Tensor& grad_cy,      // [B, H] contiguous
    const at::Tensor& x,            // [N, I] contiguous
    const at::Tensor& hx,           // [B, H] contiguous
    const at::Tensor& cx,           // [B, H] contiguous
    const LayerNormWeights& w,
    const at::Tensor& output,         // [N, H]
    const at::Tensor& gates,          // [N, 4H]
    const at::Tensor& cells,          // [N, H]
    const at::Tensor& normalized_ih,  // [N, 4H]
    const at::Tensor& normalized_hh,  // [N, 4H]
    const at::Tensor& stats) {        // [N, kStatsWidth]
  const int64_t H = s.hidden, G = 4 * s.hidden;
  const auto opts = x.options();
  LayerNormBackwardResult r;
  at::Tensor dgates = at::empty({l.rows, G}, opts);
  at::Tensor dhh = at::empty({l.rows, G}, opts);
  at::Tensor dcell_norm = at::empty({l.rows, H}, opts);
  at::Tensor dh_state = grad_hy.clone();
  at::Tensor dc_state = grad_cy.clone();

  using Weight = typename Backend::template StepWeight<T>;
  const Weight whh(false, l.batch, H, G, w.weight_hh.data_ptr<T>(), H);
  const T* c = cells.data_ptr<T>();
  for (int64_t step = l.steps - 1; step >= 0; --step) {
    const int64_t t = l.step_at(step);
    const int64_t rows = l.batch_sizes[t];
    const int64_t off = l.offsets[t];
    const int64_t prev = l.previous(t);
    LayerNormBackwardStepParams<T> p;
    p.rows = rows;
    p.hidden = H;
    p.rows_from_previous = l.rows_from_previous(t);
    p.gates = gates.data_ptr<T>() + off * G;
    p.cell = c + off * H;
    p.cell_prev = prev >= 0 ? c + l.offsets[prev] * H : nullptr;
    p.cell_init = cx.data_ptr<T>();
    p.normalized_hh = normalized_hh.data_ptr<T>() + off * G;
    p.stats = stats.data_ptr<T>() + off * kStatsWidth;
    p.gamma_hh = w.ln_hh_weight.data_ptr<T>();
    p.gamma_cell = w.ln_cell_weight.data_ptr<T>();
    p.beta_cell = w.ln_cell_bias.data_ptr<T>();
    p.dh = dh_state.data_ptr<T>();
    p.dh2 = grad_output.data_ptr<T>() + off * H;
    p.dcell_state = dc_state.data_ptr<T>();
    p.dgates = dgates.data_ptr<T>() + off * G;
    p.dhh = dhh.data_ptr<T>() + off * G;
    p.dcell_norm = dcell_norm.data_ptr<T>() + off * H;
    Backend::layer_norm_backward_step(p);
    // dh_{t-1} = dhh W_hh
    whh.multiply(rows, p.dhh, G, T(0), dh_state.data_ptr<T>(), H);
  }
  r.grad_hx = dh_state;
  r.grad_cx = dc_state;
  r.grad_weight_hh =
      at::mm(dhh.t(), gather_previous_hidden<Backend, T>(l, output, hx));
  // LN_ih backward over every row at once, into dhh's memory (free now).
  at::Tensor dih = dhh;
  {
    LayerNormRowsBackwardParams<T> p;
    p.rows = l.rows;
    p.width = G;
    p.grad_output = dgates.data_ptr<T>();
    p.normalized = normalized_ih.data_ptr<T>();
    p.gamma = w.ln_ih_weight.data_ptr<T>();
    p.rstd = stats.data_ptr<T>() + kRstdIh;
    p.rstd_stride = kStatsWidth;
    p.grad_input = dih.data_ptr<T>();
    Backend::layer_norm_rows_backward(p);
  }
  r.grad_input = at::mm(dih, w.weight_ih);
  r.grad_weight_ih = at::mm(dih.t(), x);
  r.grad_bias = at::empty({G}, opts);
  r.grad_ln_ih_weight = at::empty({G}, opts);
  r.grad_ln_hh_weight = at::empty({G}, opts);
  {
    ColumnSumsParams<T> p;
    p.rows = l.rows;
    p.width = G;
    p.a = dgates.data_ptr<T>();
    p.b = normalized_ih.data_ptr<T>();
    p.sum_a = r.grad_bias.data_ptr<T>();
    p.sum_ab = r.grad_ln_ih_weight.data_ptr<T>();
    Backend::column_sums(p);
    p.b = normalized_hh.data_ptr<T>();
    p.sum_a = nullptr;
    p.sum_ab = r.grad_ln_hh_weight.data_ptr<T>();
    Backend::column_sums(p);
  }
  const at::Tensor cell_xhat =
      (cells - stats.select(1, kMeanCell).unsqueeze(1)) *
      stats.select(1, kRstdCell).unsqueeze(1);
  r.grad_ln_cell_weight = (dcell_norm * cell_xhat).sum(0);
  r.grad_ln_cell_bias = dcell_norm.sum(0);
  return r;
}

}  // namespace rnnfast
