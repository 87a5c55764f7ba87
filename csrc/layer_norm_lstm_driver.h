// The recurrence of one LayerNorm-LSTM layer in one direction, forward and
// backward, over the same Backend as lstm_driver.h plus three LayerNorm-LSTM
// kernels:
//   layer_norm_forward_step(LayerNormStepParams<T>)
//   layer_norm_backward_step(LayerNormBackwardStepParams<T>)
//   layer_norm_param_grads(LayerNormParamGradsParams<T>)
//
// The cell (Ba, Kiros & Hinton 2016, section 3.1):
//   gates = LN_ih(W_ih x_t) + LN_hh(W_hh h_{t-1}) + b_ih + b_hh   (LN over 4H)
//   c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)
//   h_t = sigmoid(o) tanh(LN_cell(c_t))                           (LN over H)
//
// Memory traffic, not arithmetic, bounds everything but the GEMMs, so each
// step does all of its LayerNorm work in one pass over rows that are still in
// cache: the forward normalises W_ih x_t and W_hh h_{t-1} in place (the
// backward's only [N, 4H] inputs) and saves no gates; the backward recomputes
// the gates from them and writes the gradients w.r.t. both products; groups
// of steps (kParamGradRows) add their share of the LayerNorm parameter
// gradients and blocks of steps (kGradBlockRows) run their input and weight
// gradient GEMMs while their rows are still in cache.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "activation_cache.h"
#include "lstm_driver.h"
#include "lstm_params.h"

namespace rnnfast {

struct LayerNormWeights {
  at::Tensor weight_ih;  // [4H, I]
  at::Tensor weight_hh;  // [4H, H] contiguous
  at::Tensor gate_bias;  // [4H] ln_ih_bias + ln_hh_bias (+ b_ih + b_hh)
  at::Tensor ln_ih_weight, ln_hh_weight;    // [4H]
  at::Tensor ln_cell_weight, ln_cell_bias;  // [H]
};

struct LayerNormForwardResult {
  at::Tensor output;         // [N, H]
  at::Tensor hy, cy;         // [B, H]
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
  // W_ih x for every step at once; each step normalises its rows in place.
  at::Tensor ih = empty_activation({l.rows, G}, opts);
  at::mm_out(ih, x, w.weight_ih.t());
  // W_hh h_{t-1}: kept for every step when training, else one step's rows.
  at::Tensor hh = empty_activation({training ? l.rows : l.batch, G}, opts);
  r.output = at::empty({l.rows, H}, opts);
  at::Tensor h_state = hx.contiguous().clone();
  at::Tensor c_state = cx.contiguous().clone();
  if (training) {
    r.cells = empty_activation({l.rows, H}, opts);
    r.stats = empty_activation({l.rows, kStatsWidth}, opts);
  }

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
    p.ih = ih.data_ptr<T>() + off * G;
    p.hh = hh_rows;
    p.gamma_ih = w.ln_ih_weight.data_ptr<T>();
    p.gamma_hh = w.ln_hh_weight.data_ptr<T>();
    p.bias = w.gate_bias.data_ptr<T>();
    p.gamma_cell = w.ln_cell_weight.data_ptr<T>();
    p.beta_cell = w.ln_cell_bias.data_ptr<T>();
    p.cell_state = c_state.data_ptr<T>();
    p.cell_save = training ? r.cells.data_ptr<T>() + off * H : nullptr;
    p.stats = training ? r.stats.data_ptr<T>() + off * kStatsWidth : nullptr;
    p.h_out = r.output.data_ptr<T>() + off * H;
    p.h_out2 = hs;
    Backend::layer_norm_forward_step(p);
  }
  r.hy = h_state;
  r.cy = c_state;
  if (training) {
    r.normalized_ih = ih;
    r.normalized_hh = hh;
  }
  return r;
}

// The backward keeps the gradients w.r.t. W_ih x_t and W_hh h_{t-1} for a
// block of consecutive steps of about this many rows: each block goes
// through the input- and weight-gradient GEMMs while it is still in cache,
// and no [N, 4H] gradient buffer is ever allocated (fresh memory costs page
// faults on every call).
constexpr int64_t kGradBlockRows = 1024;
// The LayerNorm parameter gradients are summed over groups of consecutive
// steps of at least this many rows: one step at larger batches (its rows are
// in cache), several at small ones (fewer, longer passes).
constexpr int64_t kParamGradRows = 64;

// A block of consecutive time steps [first, last] of the backward.
struct StepBlock {
  int64_t first = 0, last = 0;
};

// The backward's blocks in the order it visits them: consecutive steps of
// at most max(block_rows, the largest step) rows together.
inline std::vector<StepBlock> backward_blocks(const SequenceLayout& l,
                                              int64_t block_rows) {
  std::vector<StepBlock> blocks;
  for (int64_t step = l.steps - 1; step >= 0;) {
    int64_t t = l.step_at(step--);
    StepBlock b{t, t};
    int64_t rows = l.batch_sizes[t];
    while (step >= 0 && rows + l.batch_sizes[l.step_at(step)] <= block_rows) {
      t = l.step_at(step--);
      rows += l.batch_sizes[t];
      b.first = std::min(b.first, t);
      b.last = std::max(b.last, t);
    }
    blocks.push_back(b);
  }
  return blocks;
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
    const at::Tensor& cells,          // [N, H]
    const at::Tensor& normalized_ih,  // [N, 4H]
    const at::Tensor& normalized_hh,  // [N, 4H]
    const at::Tensor& stats) {        // [N, kStatsWidth]
  const int64_t H = s.hidden, G = 4 * s.hidden;
  const auto opts = x.options();
  LayerNormBackwardResult r;
  const std::vector<StepBlock> blocks =
      backward_blocks(l, std::max(kGradBlockRows, l.batch));
  int64_t max_block_rows = 0;
  for (const StepBlock& b : blocks) {
    max_block_rows = std::max(
        max_block_rows, l.offsets[b.last + 1] - l.offsets[b.first]);
  }
  // One block's gradients w.r.t. W_ih x_t and W_hh h_{t-1}, and its h_{t-1}.
  at::Tensor dih = empty_activation({max_block_rows, G}, opts);
  at::Tensor dhh = empty_activation({max_block_rows, G}, opts);
  at::Tensor h_prev = empty_activation({max_block_rows, H}, opts);
  // One group's gradients w.r.t. the pre-activations and LN_cell(c_t), in
  // row order: a reverse layer's backward visits the rows upwards and fills
  // the buffer from its start, a forward layer's visits them downwards and
  // fills it towards its end.
  const int64_t group_capacity = kParamGradRows + l.batch;
  at::Tensor dgates = at::empty({group_capacity, G}, opts);
  at::Tensor dcell_norm = at::empty({group_capacity, H}, opts);
  at::Tensor dh_state = grad_hy.clone();
  at::Tensor dc_state = grad_cy.clone();
  r.grad_input = at::empty({l.rows, s.input}, opts);
  r.grad_weight_ih = at::zeros({G, s.input}, opts);
  r.grad_weight_hh = at::zeros({G, H}, opts);
  r.grad_bias = at::zeros({G}, opts);
  r.grad_ln_ih_weight = at::zeros({G}, opts);
  r.grad_ln_hh_weight = at::zeros({G}, opts);
  r.grad_ln_cell_weight = at::zeros({H}, opts);
  r.grad_ln_cell_bias = at::zeros({H}, opts);

  using Weight = typename Backend::template StepWeight<T>;
  const Weight whh(false, l.batch, H, G, w.weight_hh.data_ptr<T>(), H);
  const T* c = cells.data_ptr<T>();
  // The first row of the group buffers that holds the sequence's row `row`
  // of a group whose rows start at `g_lo` and end before `g_hi`.
  auto group_row = [&](int64_t row, int64_t g_lo, int64_t g_hi) {
    return l.reverse ? row - g_lo : group_capacity - (g_hi - row);
  };
  // Adds the LayerNorm parameter gradients of steps [first, last] (a group).
  auto add_param_grads = [&](int64_t first, int64_t last) {
    const int64_t g_lo = l.offsets[first], g_hi = l.offsets[last + 1];
    const int64_t at = group_row(g_lo, g_lo, g_hi);
    LayerNormParamGradsParams<T> q;
    q.rows = g_hi - g_lo;
    q.hidden = H;
    q.dgates = dgates.data_ptr<T>() + at * G;
    q.normalized_ih = normalized_ih.data_ptr<T>() + g_lo * G;
    q.normalized_hh = normalized_hh.data_ptr<T>() + g_lo * G;
    q.dcell_norm = dcell_norm.data_ptr<T>() + at * H;
    q.cell = c + g_lo * H;
    q.stats = stats.data_ptr<T>() + g_lo * kStatsWidth;
    q.grad_bias = r.grad_bias.data_ptr<T>();
    q.grad_gamma_ih = r.grad_ln_ih_weight.data_ptr<T>();
    q.grad_gamma_hh = r.grad_ln_hh_weight.data_ptr<T>();
    q.grad_gamma_cell = r.grad_ln_cell_weight.data_ptr<T>();
    q.grad_beta_cell = r.grad_ln_cell_bias.data_ptr<T>();
    Backend::layer_norm_param_grads(q);
  };
  for (const StepBlock& b : blocks) {
    const int64_t lo = l.offsets[b.first];
    const int64_t n = l.offsets[b.last + 1] - lo;
    // Steps whose parameter gradients are not added yet: [g_first, g_last],
    // whose first step's rows are [g_lo, g_hi).
    int64_t g_first = -1, g_last = -1, g_rows = 0, g_lo = 0, g_hi = 0;
    for (int64_t k = 0; k <= b.last - b.first; ++k) {
      const int64_t t = l.reverse ? b.first + k : b.last - k;
      const int64_t rows = l.batch_sizes[t];
      const int64_t off = l.offsets[t];
      const int64_t prev = l.previous(t);
      LayerNormBackwardStepParams<T> p;
      p.rows = rows;
      p.hidden = H;
      p.rows_from_previous = l.rows_from_previous(t);
      p.normalized_ih = normalized_ih.data_ptr<T>() + off * G;
      p.normalized_hh = normalized_hh.data_ptr<T>() + off * G;
      p.stats = stats.data_ptr<T>() + off * kStatsWidth;
      p.gamma_ih = w.ln_ih_weight.data_ptr<T>();
      p.gamma_hh = w.ln_hh_weight.data_ptr<T>();
      p.bias = w.gate_bias.data_ptr<T>();
      p.gamma_cell = w.ln_cell_weight.data_ptr<T>();
      p.beta_cell = w.ln_cell_bias.data_ptr<T>();
      p.cell = c + off * H;
      p.cell_prev = prev >= 0 ? c + l.offsets[prev] * H : nullptr;
      p.cell_init = cx.data_ptr<T>();
      p.dh = dh_state.data_ptr<T>();
      p.dh2 = grad_output.data_ptr<T>() + off * H;
      p.dcell_state = dc_state.data_ptr<T>();
      // The group's first step fixes its end (rows shrink) or start (grow).
      if (g_first < 0) {
        g_lo = off;
        g_hi = off + rows;
      }
      const int64_t at = group_row(off, g_lo, g_hi);
      p.dgates = dgates.data_ptr<T>() + at * G;
      p.dcell_norm = dcell_norm.data_ptr<T>() + at * H;
      p.dih = dih.data_ptr<T>() + (off - lo) * G;
      p.dhh = dhh.data_ptr<T>() + (off - lo) * G;
      Backend::layer_norm_backward_step(p);
      // dh_{t-1} = dhh W_hh
      whh.multiply(rows, p.dhh, G, T(0), dh_state.data_ptr<T>(), H);
      // The LayerNorm parameter gradients, every kParamGradRows rows or so
      // (while the steps' rows are still in cache).
      g_first = g_first < 0 ? t : std::min(g_first, t);
      g_last = std::max(g_last, t);
      g_rows += rows;
      if (g_rows >= kParamGradRows || k == b.last - b.first) {
        add_param_grads(g_first, g_last);
        g_first = g_last = -1;
        g_rows = 0;
      }
    }
    // The block's share of the input and weight gradients.
    const at::Tensor dih_b = dih.narrow(0, 0, n);
    const at::Tensor dhh_b = dhh.narrow(0, 0, n);
    at::Tensor grad_input_b = r.grad_input.narrow(0, lo, n);
    at::mm_out(grad_input_b, dih_b, w.weight_ih);
    r.grad_weight_ih.addmm_(dih_b.t(), x.narrow(0, lo, n));
    gather_previous_hidden<Backend, T>(l, output, hx, b.first, b.last,
                                       h_prev.data_ptr<T>());
    r.grad_weight_hh.addmm_(dhh_b.t(), h_prev.narrow(0, 0, n));
  }
  r.grad_hx = dh_state;
  r.grad_cx = dc_state;
  return r;
}

}  // namespace rnnfast
