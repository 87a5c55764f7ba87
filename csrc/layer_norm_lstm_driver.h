// The recurrence of one LayerNorm-LSTM layer in one direction, forward and
// backward, over the same Backend as lstm_driver.h plus these LayerNorm-LSTM
// kernels:
//   layer_norm_forward_step<Training, ZoneoutCell>(LayerNormStepParams<T>)
//   recurrent_layer_norm_forward_step<Training, ZoneoutCell>(
//       const StepWeight<S>& whh, const PreviousHidden<S>& h,
//       LayerNormStepParams<T>): p.hh = h W_hh^T then
//       layer_norm_forward_step, in whatever order and threading the
//       backend finds fastest
//   layer_norm_backward_step<AddOutputGrad, ZoneoutCell>(
//       LayerNormBackwardStepParams<T>)
//   recurrent_layer_norm_backward_step<AddOutputGrad, ZoneoutCell>(
//       const StepWeight<S>& whh, LayerNormBackwardStepParams<T> p, T beta,
//       T* grad_prev, int64_t ld): layer_norm_backward_step then
//       grad_prev = p.dhh W_hh + beta grad_prev, threaded as the backend
//       finds fastest
//   layer_norm_param_grads(LayerNormParamGradsParams<T>): without
//       kParamGradsInStep
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
// the gates from them and writes the gradients w.r.t. both products, and
// blocks of steps (Backend::grad_block_rows) run their input and weight
// gradient GEMMs while their rows are still in cache. The LayerNorm parameter
// gradients are sums over every row: on the CPU each step adds its rows'
// share while they are in registers (Backend::kParamGradsInStep, into
// per-task sums, LayerNormParamGradSum); on CUDA one reduction over every
// step's gradients follows the steps (one launch). The block size is the
// backend's: cache-sized on the CPU, the whole sequence on CUDA (whole bulk
// GEMMs).
//
// Types as lstm_driver.h: S for the weights, input, output and the
// gradients w.r.t. the two products (what the GEMMs read), T for everything
// else (the normalised products, cell states, statistics and LayerNorm
// parameters).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "lstm_driver.h"
#include "lstm_params.h"

namespace rnnfast {

struct LayerNormWeights {
  // [4H, I] and [4H, H] contiguous (S, or in a forward's one-step call
  // bfloat16 for S = float: Backend::one_step_weight_dtype)
  at::Tensor weight_ih;
  at::Tensor weight_hh;
  // The rest in T.
  at::Tensor gate_bias;  // [4H] ln_ih_bias + ln_hh_bias (+ b_ih + b_hh)
  at::Tensor ln_ih_weight, ln_hh_weight;    // [4H]
  at::Tensor ln_cell_weight, ln_cell_bias;  // [H]
};

struct LayerNormForwardResult {
  at::Tensor output;         // [N, H] (S)
  at::Tensor hy;             // [B, H] (S)
  at::Tensor cy;             // [B, H] (T)
  at::Tensor cells;          // [N, H] c~_t (training)
  at::Tensor normalized_ih;  // [N, 4H] xhat of W_ih x (training)
  at::Tensor normalized_hh;  // [N, 4H] xhat of W_hh h (training)
  at::Tensor stats;          // [N, kStatsWidth] (training)
  at::Tensor cell_states;    // [N, H] carried c_t (training with zoneout on
                             // c), else undefined
};

// grad_input in S, the others in T.
struct LayerNormBackwardResult {
  at::Tensor grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh;
  at::Tensor grad_bias;  // of b_ih, b_hh, ln_ih_bias and ln_hh_bias alike
  at::Tensor grad_ln_ih_weight, grad_ln_hh_weight;
  at::Tensor grad_ln_cell_weight, grad_ln_cell_bias;
};

// Which gradients a LayerNorm-LSTM backward is asked for, one flag per output
// in the order of LayerNormBackwardResult (see LstmGradMask). The bias and
// the four LayerNorm parameter gradients come from one set of sums (the
// steps' own, or one reduction after them): they are formed when any of
// them is asked for, and not at all otherwise.
struct LayerNormGradMask {
  bool input = true, hx = true, cx = true, weight_ih = true, weight_hh = true,
       bias = true, ln_ih_weight = true, ln_hh_weight = true,
       ln_cell_weight = true, ln_cell_bias = true;
  bool param_grads() const {
    return bias || ln_ih_weight || ln_hh_weight || ln_cell_weight ||
           ln_cell_bias;
  }
};

template <typename Backend, typename S, typename T>
LayerNormForwardResult layer_norm_lstm_forward_recurrence(
    const SequenceLayout& l, const LstmSizes& s,
    const at::Tensor& x,   // [N, I] contiguous (S)
    const at::Tensor& hx,  // [B, H] contiguous (S)
    const at::Tensor& cx,  // [B, H] (T)
    const LayerNormWeights& w, double eps, bool training,
    const ZoneoutArgs& z) {
  const int64_t H = s.hidden, G = 4 * s.hidden;
  const bool zoneout_cell = z.on_cell(), zoneout_h = z.on_hidden();
  const auto sopts = x.options();
  const auto topts = sopts.dtype(compute_scalar_type<T>());
  LayerNormForwardResult r;
  // W_ih x for every step at once; each step normalises its rows in place.
  at::Tensor ih = Backend::empty_activation({l.rows, G}, topts);
  input_projection<Backend, S, T>(ih, x, w.weight_ih, at::Tensor(),
                                  l.uniform());
  // W_hh h_{t-1}: kept for every step when training, else one step's rows.
  at::Tensor hh = Backend::empty_activation({training ? l.rows : l.batch, G}, topts);
  r.output = at::empty({l.rows, H}, sopts);
  at::Tensor c_state = cx.contiguous().clone();
  if (training) {
    r.cells = Backend::empty_activation({l.rows, H}, topts);
    r.stats = Backend::empty_activation({l.rows, kStatsWidth}, topts);
    if (zoneout_cell) r.cell_states = Backend::empty_activation({l.rows, H}, topts);
  }
  at::Tensor cand_buf;  // c~_t of a step, evaluating with zoneout on c
  if (!training && zoneout_cell) cand_buf = at::empty({l.batch, H}, topts);

  using Weight = typename Backend::template StepWeight<S>;
  const Weight whh = step_weight<Backend, S>(l.batch, w.weight_hh);
  S* out = r.output.data_ptr<S>();
  const S* h0 = hx.data_ptr<S>();
  Backend::run_steps(whh, l.batch, l.steps, StepLoop::kLayerNormForward,
                     [&](int64_t step) {
    const int64_t t = l.step_at(step);
    const int64_t rows = l.batch_sizes[t];
    const int64_t off = l.offsets[t];
    T* hh_rows = hh.data_ptr<T>() + (training ? off * G : 0);
    LayerNormStepParams<T, S> p;
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
    p.h_out = out + off * H;
    if (training) {
      p.cell_save = r.cells.data_ptr<T>() + off * H;
      p.stats = r.stats.data_ptr<T>() + off * kStatsWidth;
    }
    if (zoneout_cell) {
      p.zoneout = cell_zoneout<T>(z, off, H);
      if (training) {
        p.cell_state_save = r.cell_states.data_ptr<T>() + off * H;
      } else {
        p.cell_save = cand_buf.data_ptr<T>();
      }
    }
    // hh = W_hh h_{t-1} (h_{t-1} read in place), then the cell
    const PreviousHidden<S> h = previous_hidden(l, t, out, h0, H);
    with_flags(training, zoneout_cell, [&](auto tr, auto zc) {
      Backend::template recurrent_layer_norm_forward_step<
          decltype(tr)::value, decltype(zc)::value>(whh, h, p);
    });
    if (zoneout_h) zoneout_hidden_step<Backend, S, T>(l, t, z, out, h0, H);
  });
  r.hy = at::empty({l.batch, H}, sopts);
  copy_final_hidden<Backend>(l, out, H, r.hy.data_ptr<S>());
  r.cy = c_state;
  if (training) {
    r.normalized_ih = ih;
    r.normalized_hh = hh;
  }
  return r;
}

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

// The saved activations and the gradients a LayerNorm-LSTM backward writes,
// shared by its pieces below.
template <typename T, typename S>
struct LayerNormBackwardBuffers {
  const SequenceLayout& l;
  const LstmSizes& s;
  const LayerNormWeights& w;
  const at::Tensor& cx;
  const at::Tensor& grad_output;    // [N, H] (S)
  const at::Tensor& cells;          // [N, H]
  const at::Tensor& normalized_ih;  // [N, 4H]
  const at::Tensor& normalized_hh;  // [N, 4H]
  const at::Tensor& stats;          // [N, kStatsWidth]
  const at::Tensor& cell_states;    // [N, H] carried c_t (zoneout on c)
  const ZoneoutArgs& z;
  at::Tensor dh_state, dc_state;    // [B, H] dL/dh_t, dL/dc_t of the rows
  at::Tensor dh_cand;               // [B, H] dL/dh~_t (zoneout on h)
  at::Tensor dgates, dcell_norm;    // [rows, 4H] / [rows, H]: one step's
                                    // (Backend::kParamGradsInStep), else
                                    // every step's, by packed row
  at::Tensor dih, dhh;              // the block's, [rows, 4H] (S)
  at::Tensor param_grad_sums;       // [tasks, kSumWidth * H]
                                    // (Backend::kParamGradsInStep)
  LayerNormBackwardResult r;
};

// One step's pointwise backward; its gradients w.r.t. W_ih x_t and
// W_hh h_{t-1} go to row `block_row` of the block buffers.
template <typename Backend, typename T, typename S, typename Weight>
void run_layer_norm_backward_step(LayerNormBackwardBuffers<T, S>& b, int64_t t,
                                  int64_t block_row, const Weight& whh) {
  const SequenceLayout& l = b.l;
  const int64_t H = b.s.hidden, G = 4 * b.s.hidden;
  const int64_t off = l.offsets[t];
  const int64_t prev = l.previous(t);
  const T* c = b.cells.template data_ptr<T>();
  const bool zoneout_cell = b.z.on_cell(), zoneout_h = b.z.on_hidden();
  // c_{t-1} as carried: the zoned-out states, or c~ itself without zoneout
  const T* c_carried =
      zoneout_cell ? b.cell_states.template data_ptr<T>() : c;
  LayerNormBackwardStepParams<T, S> p;
  p.rows = l.batch_sizes[t];
  p.hidden = H;
  p.rows_from_previous = l.rows_from_previous(t);
  p.normalized_ih = b.normalized_ih.template data_ptr<T>() + off * G;
  p.normalized_hh = b.normalized_hh.template data_ptr<T>() + off * G;
  p.stats = b.stats.template data_ptr<T>() + off * kStatsWidth;
  p.gamma_ih = b.w.ln_ih_weight.template data_ptr<T>();
  p.gamma_hh = b.w.ln_hh_weight.template data_ptr<T>();
  p.bias = b.w.gate_bias.template data_ptr<T>();
  p.gamma_cell = b.w.ln_cell_weight.template data_ptr<T>();
  p.beta_cell = b.w.ln_cell_bias.template data_ptr<T>();
  p.cell = c + off * H;
  p.cell_prev = prev >= 0 ? c_carried + l.offsets[prev] * H : nullptr;
  p.cell_init = b.cx.template data_ptr<T>();
  if (zoneout_h) {  // dL/dh~_t; dh_state keeps the share of dL/dh_{t-1}
    zoneout_hidden_step_backward<Backend>(
        l, t, b.z, b.dh_state.template data_ptr<T>(),
        b.grad_output.template data_ptr<S>(),
        b.dh_cand.template data_ptr<T>(), H);
    p.grad_hidden = b.dh_cand.template data_ptr<T>();
  } else {
    p.grad_hidden = b.dh_state.template data_ptr<T>();
    p.grad_output = b.grad_output.template data_ptr<S>() + off * H;
  }
  if (zoneout_cell) p.zoneout = cell_zoneout<T>(b.z, off, H);
  p.dcell_state = b.dc_state.template data_ptr<T>();
  const int64_t row = Backend::kParamGradsInStep ? 0 : off;
  p.dgates = b.dgates.template data_ptr<T>() + row * G;
  p.dcell_norm = b.dcell_norm.template data_ptr<T>() + row * H;
  p.dih = b.dih.template data_ptr<S>() + block_row * G;
  p.dhh = b.dhh.template data_ptr<S>() + block_row * G;
  if (b.param_grad_sums.defined()) {
    p.param_grad_sums = b.param_grad_sums.template data_ptr<T>();
    p.param_grad_tasks = b.param_grad_sums.size(0);
  }
  // The step, then dh_{t-1} = dhh W_hh (+ the zoneout share already in
  // dh_state)
  with_flags(!zoneout_h, zoneout_cell, [&](auto add, auto zc) {
    Backend::template recurrent_layer_norm_backward_step<decltype(add)::value,
                                                         decltype(zc)::value>(
        whh, p, T(zoneout_h ? 1 : 0), b.dh_state.template data_ptr<T>(), H);
  });
}

// The LayerNorm parameter gradients of every step at once, after the steps
// (without Backend::kParamGradsInStep).
template <typename Backend, typename T, typename S>
void add_layer_norm_param_grads(LayerNormBackwardBuffers<T, S>& b) {
  LayerNormParamGradsParams<T> q;
  q.rows = b.l.rows;
  q.hidden = b.s.hidden;
  q.dgates = b.dgates.template data_ptr<T>();
  q.normalized_ih = b.normalized_ih.template data_ptr<T>();
  q.normalized_hh = b.normalized_hh.template data_ptr<T>();
  q.dcell_norm = b.dcell_norm.template data_ptr<T>();
  q.cell = b.cells.template data_ptr<T>();
  q.stats = b.stats.template data_ptr<T>();
  q.grad_bias = b.r.grad_bias.template data_ptr<T>();
  q.grad_gamma_ih = b.r.grad_ln_ih_weight.template data_ptr<T>();
  q.grad_gamma_hh = b.r.grad_ln_hh_weight.template data_ptr<T>();
  q.grad_gamma_cell = b.r.grad_ln_cell_weight.template data_ptr<T>();
  q.grad_beta_cell = b.r.grad_ln_cell_bias.template data_ptr<T>();
  Backend::layer_norm_param_grads(q);
}

// A block's share of the input and weight gradients asked for, from its
// gradients w.r.t. the two products.
template <typename Backend, typename T, typename S>
void add_block_input_and_weight_grads(LayerNormBackwardBuffers<T, S>& b,
                                      const LayerNormGradMask& mask,
                                      const StepBlock& block,
                                      const at::Tensor& x,       // [N, I]
                                      const at::Tensor& hx,      // [B, H]
                                      const at::Tensor& output,  // [N, H]
                                      at::Tensor& h_prev) {      // scratch
  const int64_t lo = b.l.offsets[block.first];
  const int64_t n = b.l.offsets[block.last + 1] - lo;
  const at::Tensor dih = b.dih.narrow(0, 0, n);
  const at::Tensor dhh = b.dhh.narrow(0, 0, n);
  if (mask.input) {
    at::Tensor grad_input = b.r.grad_input.narrow(0, lo, n);
    matmul_into<Backend, S, S>(grad_input, dih, b.w.weight_ih, false,
                               b.l.uniform());
  }
  if (mask.weight_ih) {
    matmul_into<Backend, S, T>(b.r.grad_weight_ih, dih.t(),
                               x.narrow(0, lo, n), true, b.l.uniform());
  }
  if (mask.weight_hh) {
    add_recurrent_weight_grad<Backend, S, T>(b.l, b.r.grad_weight_hh, dhh,
                                             output, hx, block.first,
                                             block.last, h_prev,
                                             /*accumulate=*/true);
  }
}

template <typename Backend, typename S, typename T>
LayerNormBackwardResult layer_norm_lstm_backward_recurrence(
    const SequenceLayout& l, const LstmSizes& s,
    const at::Tensor& grad_output,  // [N, H] contiguous (S)
    const at::Tensor& grad_hy,      // [B, H] contiguous (T)
    const at::Tensor& grad_cy,      // [B, H] contiguous (T)
    const at::Tensor& x,            // [N, I] contiguous (S)
    const at::Tensor& hx,           // [B, H] contiguous (S)
    const at::Tensor& cx,           // [B, H] contiguous (T)
    const LayerNormWeights& w,
    const at::Tensor& output,         // [N, H] (S)
    const at::Tensor& cells,          // [N, H]
    const at::Tensor& normalized_ih,  // [N, 4H]
    const at::Tensor& normalized_hh,  // [N, 4H]
    const at::Tensor& stats,          // [N, kStatsWidth]
    const at::Tensor& cell_states,    // [N, H] carried c_t (zoneout on c)
    const ZoneoutArgs& z, const LayerNormGradMask& mask) {
  const int64_t H = s.hidden, G = 4 * s.hidden;
  const auto sopts = x.options();
  const auto topts = sopts.dtype(compute_scalar_type<T>());
  const std::vector<StepBlock> blocks =
      backward_blocks(l, std::max(Backend::grad_block_rows(
                                      2 * G * int64_t(sizeof(S))),
                                  l.batch));
  int64_t max_block_rows = 0;
  for (const StepBlock& b : blocks) {
    max_block_rows = std::max(
        max_block_rows, l.offsets[b.last + 1] - l.offsets[b.first]);
  }
  LayerNormBackwardBuffers<T, S> b{l,     s,     w,
                                   cx,    grad_output, cells,
                                   normalized_ih, normalized_hh, stats,
                                   cell_states,   z};
  if (z.on_hidden()) b.dh_cand = at::empty({l.batch, H}, topts);
  // The LayerNorm parameter gradients: each step adds its rows' share to
  // per-task sums (Backend::kParamGradsInStep), its gradients w.r.t. the
  // pre-activations and LN_cell(c_t) a workspace of one step; or they are
  // kept for every step and reduced once after the steps.
  constexpr bool kSumsInStep = Backend::kParamGradsInStep;
  const bool param_grads = mask.param_grads();
  if constexpr (kSumsInStep) {
    if (param_grads) {  // one row per task a parallel_for may run
      b.param_grad_sums =
          at::zeros({at::get_num_threads(), kSumWidth * H}, topts);
    }
  }
  const int64_t scratch_rows = kSumsInStep ? l.batch : l.rows;
  b.dgates = Backend::empty_activation({scratch_rows, G}, topts);
  b.dcell_norm = Backend::empty_activation({scratch_rows, H}, topts);
  b.dih = Backend::empty_activation({max_block_rows, G}, sopts);
  b.dhh = Backend::empty_activation({max_block_rows, G}, sopts);
  at::Tensor h_prev;  // one block's h_{t-1}, for a packed layout
  if (!l.uniform() && mask.weight_hh) {
    h_prev = Backend::empty_activation({max_block_rows, H}, sopts);
  }
  b.dh_state = grad_hy.clone();
  b.dc_state = grad_cy.clone();
  LayerNormBackwardResult& r = b.r;
  if (mask.input) r.grad_input = at::empty({l.rows, s.input}, sopts);
  if (mask.weight_ih) r.grad_weight_ih = at::zeros({G, s.input}, topts);
  if (mask.weight_hh) r.grad_weight_hh = at::zeros({G, H}, topts);
  if (!kSumsInStep && param_grads) {  // one reduction adds all five
    r.grad_bias = at::zeros({G}, topts);
    r.grad_ln_ih_weight = at::zeros({G}, topts);
    r.grad_ln_hh_weight = at::zeros({G}, topts);
    r.grad_ln_cell_weight = at::zeros({H}, topts);
    r.grad_ln_cell_bias = at::zeros({H}, topts);
  }

  using Weight = typename Backend::template StepWeight<S>;
  const Weight whh(false, l.batch, H, G, w.weight_hh.data_ptr<S>(), H);
  for (const StepBlock& block : blocks) {
    const int64_t lo = l.offsets[block.first];
    Backend::run_steps(whh, l.batch, block.last - block.first + 1,
                       StepLoop::kLayerNormBackward, [&](int64_t k) {
      const int64_t t = l.reverse ? block.first + k : block.last - k;
      const int64_t block_row = l.offsets[t] - lo;
      // the step's backward and dh_{t-1} = dhh W_hh
      run_layer_norm_backward_step<Backend>(b, t, block_row, whh);
    });
    add_block_input_and_weight_grads<Backend>(b, mask, block, x, hx, output,
                                              h_prev);
  }
  if (param_grads) {
    if constexpr (kSumsInStep) {  // the tasks' sums, added in task order
      const at::Tensor total = b.param_grad_sums.sum(0);
      const auto sums = [&](int64_t first, int64_t width) {
        return total.narrow(0, first * H, width).clone();
      };
      r.grad_bias = sums(kSumBias, G);
      r.grad_ln_ih_weight = sums(kSumGammaIh, G);
      r.grad_ln_hh_weight = sums(kSumGammaHh, G);
      r.grad_ln_cell_weight = sums(kSumGammaCell, H);
      r.grad_ln_cell_bias = sums(kSumBetaCell, H);
    } else {
      add_layer_norm_param_grads<Backend>(b);
    }
  }
  r.grad_hx = b.dh_state;
  r.grad_cx = b.dc_state;
  return r;
}

}  // namespace rnnfast
