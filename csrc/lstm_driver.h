// The recurrence of one LSTM layer in one direction, forward and backward,
// written once over a Backend that supplies the GEMMs, the pointwise step
// kernels and row copies for raw pointers. Bulk work before and after the
// time loop uses ATen ops (or Backend::gemm for mixed dtypes), which run on
// the tensors' device.
//
// Types (lstm_params.h): S is the storage type of what the GEMMs read
// (input, weights, hidden states, output, gradients w.r.t. pre-activations),
// T the compute type of the gates, cell states and saved activations.
// Float and double ops have S == T; CUDA runs half-type ops with S = half /
// bfloat16 and T = float, and the CPU bfloat16 ops with S = bfloat16 on
// CPUs with bfloat16 instructions (cpu/blas.h, native_bfloat16), else with
// S = T = float.
//
// Backend interface (all row-major):
//   template <typename S> class StepWeight: a weight multiplied at every
//     step, prepared once per op (packed on the CPU, the cuBLAS handle taken
//     on CUDA) by
//     StepWeight(bool trans_b, int64_t max_m, int64_t n, int64_t k,
//                const S* b, int64_t ldb), then
//     multiply(int64_t m, const S* a, int64_t lda, C beta, C* c, int64_t ldc)
//     computes C[m, n] = A[m, k] op(B) + beta C (beta 0 or 1; C is S or T,
//     and where S is not T, C = S only with beta 0).
//   gemm(trans_a, trans_b, m, n, k, const S* a, lda, const S* b, ldb,
//        C beta, C* c, ldc): a one-off product, C = op(A) op(B) + beta C.
//   template <bool Training, bool ZoneoutCell>
//     forward_step(const ForwardStepParams<T, S>&);
//   template <bool Training, bool ZoneoutCell>
//     recurrent_forward_step(const StepWeight<S>& whh,
//                            const PreviousHidden<S>& h,
//                            const ForwardStepParams<T, S>& p):
//     the LSTM's step, p.gates += h W_hh^T then forward_step, in whatever
//     order and threading the backend finds fastest.
//   template <bool AddOutputGrad, bool ZoneoutCell>
//     backward_step(const BackwardStepParams<T, S>&);
//   template <bool AddOutputGrad, bool ZoneoutCell>
//     recurrent_backward_step(const StepWeight<S>& whh,
//                             const BackwardStepParams<T, S>& p, T beta,
//                             T* grad_prev, int64_t ld):
//     backward_step, then grad_prev = p.dgates W_hh + beta grad_prev (its
//     p.rows rows, stride ld), in whatever threading the backend finds
//     fastest.
//   run_steps(const StepWeight<S>& whh, int64_t rows, int64_t steps,
//             StepLoop loop, const F& step): step(0) .. step(steps - 1) in
//     order, the steps of a time loop whose recurrent weight is whh and
//     whose steps have at most `rows` rows and call what `loop` says
//     (lstm_params.h). Unless kMixed, the CPU may run them on a team of
//     threads (cpu/step_team.h) or run them on every thread at once, each
//     over its group of rows (the recurrent steps and zoneout passes then
//     keep to the calling thread's rows, cpu_backend.cpp).
//   zoneout_hidden(const HiddenZoneoutParams<T, S>&) and
//     zoneout_hidden_backward(const HiddenZoneoutBackwardParams<T, S, C>&):
//     zoneout on the hidden state, one pass over a step's rows.
//   copy(S* dst, const S* src, int64_t count);
//   copy_rows(const RowCopy*, int64_t n, int64_t width, S* dst,
//             const S* first, const S* second): runs of rows, one pass.
//   add(S* dst, const T* a, const S* b, int64_t count): dst = a + b.
//   empty_activation(sizes, options): a large workspace or saved activation
//     (the CPU reuses freed blocks, cpu/activation_cache.h).
//   input_block_rows(int64_t row_bytes, int64_t weight_bytes): how many
//     rows of an evaluating LSTM's input projection (row_bytes each, by a
//     weight of weight_bytes) to compute at a time, a block of steps just
//     before their recurrence (0: all at once).
//   small_input_projection(at::Tensor& out, const at::Tensor& x,
//     const at::Tensor& weight, const at::Tensor& bias): out = x W^T
//     (+ bias), all of S == T, where the backend has its own product for
//     it (the CPU, for a few rows: a weight used once, cpu/blas.h
//     multiply_once); false, out untouched, where it leaves it to ATen.
//   bulk_product(c, a, b, accumulate, steady): c = a b (c += a b when
//     accumulate) for S == C products over many rows (matmul_into,
//     input_projection) where the backend has its own way to run them (the
//     CPU: oneDNN where it is faster than the BLAS, cpu/blas.h); false, c
//     untouched, where it leaves them to ATen. steady: the product's shape
//     comes back call after call (a padded batch's products, which depend
//     on its steps and batch only, and an evaluating LSTM's blocks of input
//     projection), where a packed batch's depend on the sum of its
//     lengths, new at almost every call; bulk_product_runs<S>():
//     whether it takes products of S (then an evaluating LSTM's blocks of
//     input projection go through it rather than a packed StepWeight).
//   grad_block_rows(int64_t row_bytes): the rows of a block of the
//     LayerNorm-LSTM backward, whose gradients w.r.t. the two products take
//     row_bytes a row (layer_norm_lstm_driver.h), and
//     kParamGradsInStep: whether the backward steps add up the parameter
//     gradients that are sums over rows (the LSTM's bias gradient,
//     BackwardStepParams::bias_grad_sums; the LayerNorm-LSTM's LayerNorm
//     parameter gradients, layer_norm_lstm_driver.h); kNativeStorage<S> and
//     native_storage(dtype): whether S may be a half type, at compile time
//     and for this call (op_impls.h); kBiasInStep: whether the LSTM's forward_step
//     adds the bias (ForwardStepParams::bias) instead of the input
//     projection.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "lstm_params.h"

namespace rnnfast {

struct ForwardResult {
  at::Tensor output;  // [N, P] (S)
  at::Tensor hy;      // [B, P] (S)
  at::Tensor cy;      // [B, H] (T)
  at::Tensor gates;   // [N, 4H] activated gates (training), else empty (T)
  at::Tensor cells;   // [N, H] c~_t, from which the output was computed
                      // (training), else empty (T)
  at::Tensor cell_states;  // [N, H] carried c_t (training with zoneout on
                           // c), else undefined (T)
};

// Zoneout (Krueger et al. 2016) of one layer and direction, as the ops take
// it: per state, a bool mask of the output's rows (training: 1 keeps the
// previous value) or, without one, a rate (evaluation: the expectation).
struct ZoneoutArgs {
  at::Tensor hidden_mask;  // [N, P] bool contiguous, or undefined
  at::Tensor cell_mask;    // [N, H] bool contiguous, or undefined
  double hidden_rate = 0.0, cell_rate = 0.0;
  bool on_hidden() const { return hidden_mask.defined() || hidden_rate != 0.0; }
  bool on_cell() const { return cell_mask.defined() || cell_rate != 0.0; }
};

// The cell zoneout of the rows from packed row `row` on.
template <typename T>
CellZoneout<T> cell_zoneout(const ZoneoutArgs& z, int64_t row, int64_t H) {
  CellZoneout<T> c;
  c.mask = z.cell_mask.defined() ? z.cell_mask.data_ptr<bool>() + row * H
                                 : nullptr;
  c.rate = static_cast<T>(z.cell_rate);
  return c;
}

// f(std::bool_constant<a>{}, std::bool_constant<b>{}): two run-time flags
// as the compile-time flags of a step kernel.
template <typename F>
void with_flags(bool a, bool b, const F& f) {
  if (a) {
    if (b) return f(std::true_type{}, std::true_type{});
    return f(std::true_type{}, std::false_type{});
  }
  if (b) return f(std::false_type{}, std::true_type{});
  return f(std::false_type{}, std::false_type{});
}

// Zoneout on the hidden state of step t, whose output rows (h~_t) are
// complete: h_t = a h_{t-1} + (1 - a) h~_t, h_{t-1} read where it lies.
// The hidden-state zoneout mask of step t's rows, or null (use the rate).
inline const bool* hidden_mask_at(const SequenceLayout& l, int64_t t,
                                  const ZoneoutArgs& z, int64_t P) {
  return z.hidden_mask.defined()
             ? z.hidden_mask.data_ptr<bool>() + l.offsets[t] * P
             : nullptr;
}

template <typename Backend, typename S, typename T>
void zoneout_hidden_step(const SequenceLayout& l, int64_t t,
                         const ZoneoutArgs& z, S* output, const S* h0,
                         int64_t P) {
  const int64_t prev = l.previous(t);
  HiddenZoneoutParams<T, S> q;
  q.rows = l.batch_sizes[t];
  q.width = P;
  q.rows_from_previous = l.rows_from_previous(t);
  q.hidden = output + l.offsets[t] * P;
  q.hidden_prev = prev >= 0 ? output + l.offsets[prev] * P : nullptr;
  q.hidden_init = h0;
  q.mask = hidden_mask_at(l, t, z, P);
  q.rate = static_cast<T>(z.hidden_rate);
  Backend::zoneout_hidden(q);
}

// Its backward at step t: from dL/dh_t = grad_hidden + grad_output (the
// step's rows), the gradient w.r.t. h~_t into grad_candidate and the share
// of dL/dh_{t-1} into grad_hidden.
template <typename Backend, typename S, typename T, typename C>
void zoneout_hidden_step_backward(const SequenceLayout& l, int64_t t,
                                  const ZoneoutArgs& z, T* grad_hidden,
                                  const S* grad_output, C* grad_candidate,
                                  int64_t P) {
  HiddenZoneoutBackwardParams<T, S, C> q;
  q.rows = l.batch_sizes[t];
  q.width = P;
  q.grad_hidden = grad_hidden;
  q.grad_output = grad_output + l.offsets[t] * P;
  q.grad_candidate = grad_candidate;
  q.mask = hidden_mask_at(l, t, z, P);
  q.rate = static_cast<T>(z.hidden_rate);
  Backend::zoneout_hidden_backward(q);
}

// grad_input is in S, the others in T.
struct BackwardResult {
  at::Tensor grad_input;      // [N, I]
  at::Tensor grad_hx;         // [B, P]
  at::Tensor grad_cx;         // [B, H]
  at::Tensor grad_weight_ih;  // [4H, I]
  at::Tensor grad_weight_hh;  // [4H, P]
  at::Tensor grad_bias;       // [4H], the gradient of each of the two biases
  at::Tensor grad_weight_hr;  // [P, H], or empty without a projection
};

// Which gradients a backward is asked for: its op's output_mask, one flag per
// output in the order of BackwardResult (as ATen's _cudnn_rnn_backward).
// The reverse time loop runs whatever is asked (every gradient needs its
// dgates; grad_hx and grad_cx are its by-products); a gradient not asked for
// is left undefined and its bulk GEMM or reduction after the loop skipped.
struct LstmGradMask {
  bool input = true, hx = true, cx = true, weight_ih = true, weight_hh = true,
       bias = true, weight_hr = true;
};

// ---- Products and row copies shared by both cells' drivers ----------------

// How a 2-D tensor lies in memory as a row-major GEMM operand: a row-major
// matrix (trans false) or the transpose of one (a .t() view).
struct MatrixLayout {
  bool trans;
  int64_t ld;
};

inline MatrixLayout matrix_layout(const at::Tensor& m) {
  if (m.stride(1) == 1 && m.stride(0) >= std::max<int64_t>(1, m.size(1))) {
    return {false, m.stride(0)};
  }
  if (m.stride(0) == 1 && m.stride(1) >= std::max<int64_t>(1, m.size(0))) {
    return {true, m.stride(1)};
  }
  TORCH_CHECK(false, "rnnfast: internal error: a GEMM operand of strides ",
              m.strides(), " is neither row- nor column-major");
}

// c = a b, or c += a b when accumulate; a and b hold S, c holds C (S, or T
// for a product kept in the compute type). Same types go through ATen
// (float and double ops, and half-type products kept in S), mixed ones
// through Backend::gemm.
// steady: the product's shape comes back call after call
// (Backend::bulk_product).
template <typename Backend, typename S, typename C>
void matmul_into(at::Tensor& c, const at::Tensor& a, const at::Tensor& b,
                 bool accumulate, bool steady = false) {
  if constexpr (std::is_same_v<S, C>) {
    if (Backend::bulk_product(c, a, b, accumulate, steady)) return;
    if (accumulate) {
      c.addmm_(a, b);
    } else {
      at::mm_out(c, a, b);
    }
  } else {
    const MatrixLayout la = matrix_layout(a), lb = matrix_layout(b);
    TORCH_CHECK(c.is_contiguous(), "rnnfast: internal error: GEMM output");
    Backend::gemm(la.trans, lb.trans, a.size(0), b.size(1), a.size(1),
                  a.data_ptr<S>(), la.ld, b.data_ptr<S>(), lb.ld,
                  C(accumulate ? 1 : 0), c.data_ptr<C>(), c.size(1));
  }
}

// out [N, 4H] (T) = x W^T + bias, x and W in S, bias in T or undefined;
// steady: its shape comes back call after call (Backend::bulk_product).
template <typename Backend, typename S, typename T>
void input_projection(at::Tensor& out, const at::Tensor& x,
                      const at::Tensor& weight, const at::Tensor& bias,
                      bool steady = false) {
  if constexpr (std::is_same_v<S, T>) {
    if (Backend::small_input_projection(out, x, weight, bias)) return;
    if (!bias.defined() &&
        Backend::bulk_product(out, x, weight.t(), false, steady)) {
      return;
    }
    if (bias.defined()) {
      at::addmm_out(out, bias, x, weight.t());
    } else {
      at::mm_out(out, x, weight.t());
    }
  } else {
    if (bias.defined()) out.copy_(bias.expand_as(out));
    matmul_into<Backend, S, T>(out, x, weight.t(), bias.defined());
  }
}

// Where step t's h_{t-1} lies: the previous step's output rows (P wide) for
// the rows that continue, the initial state's for those that start at t.
template <typename S>
PreviousHidden<S> previous_hidden(const SequenceLayout& l, int64_t t,
                                  const S* output, const S* h0, int64_t P) {
  PreviousHidden<S> h;
  h.continuing_rows = l.rows_from_previous(t);
  if (h.continuing_rows > 0) {
    h.continuing = output + l.offsets[l.previous(t)] * P;
  }
  h.starting_rows = l.batch_sizes[t] - h.continuing_rows;
  h.starting = h0 + h.continuing_rows * P;
  h.ld = P;
  return h;
}

// C[rows of step t, n] = h_{t-1} op(W) + beta C, with h_{t-1} read where it
// lies (previous_hidden), so no step copies a hidden state.
template <typename Weight, typename S, typename C>
void multiply_previous_hidden(const SequenceLayout& l, int64_t t,
                              const Weight& w, const S* output, const S* h0,
                              int64_t P, C beta, C* c, int64_t ldc) {
  multiply_hidden_rows(previous_hidden(l, t, output, h0, P), 0,
                       l.batch_sizes[t], w, beta, c, ldc);
}

// hy [B, P] = the output of every sequence's last step: step 0 of a
// reverse layer (all B rows), else the rows each step has that the next
// one has not (one copy per distinct length).
template <typename Backend, typename S>
void copy_final_hidden(const SequenceLayout& l, const S* output, int64_t P,
                       S* hy) {
  if (l.reverse) {
    Backend::copy(hy, output + l.offsets[0] * P, l.batch_sizes[0] * P);
    return;
  }
  for (int64_t t = 0; t < l.steps; ++t) {
    const int64_t next = t + 1 < l.steps ? l.batch_sizes[t + 1] : 0;
    if (l.batch_sizes[t] > next) {
      Backend::copy(hy + next * P, output + (l.offsets[t] + next) * P,
                    (l.batch_sizes[t] - next) * P);
    }
  }
}

// grad_w [G, P] (T) = dgates^T h_{t-1} (+= when accumulate) over the steps
// [first, last], whose gradients w.r.t. the pre-activations (S) are the rows
// of dgates (row 0 is packed row offsets[first]). A uniform layout reads h_{t-1} in place: the
// steps that continue against the rows of their previous steps (contiguous,
// one step apart), the step that starts the sequence against hx, so at most
// two products. Otherwise the rows of h_{t-1} are gathered into scratch
// ([>= the steps' rows, P], S) in one Backend::copy_rows and multiplied once.
template <typename Backend, typename S, typename T>
void add_recurrent_weight_grad(const SequenceLayout& l, at::Tensor& grad_w,
                               const at::Tensor& dgates,
                               const at::Tensor& output,  // [N, P]
                               const at::Tensor& hx,      // [B, P]
                               int64_t first, int64_t last,
                               at::Tensor& scratch, bool accumulate) {
  const int64_t lo = l.offsets[first];
  const int64_t n = l.offsets[last + 1] - lo;
  if (l.uniform()) {
    const int64_t B = l.batch;
    const int64_t start = l.reverse ? l.steps - 1 : 0;  // reads hx
    int64_t a = first, b = last;  // the others, contiguous
    if (start == first) {
      ++a;
    } else if (start == last) {
      --b;
    }
    if (a <= b) {
      const int64_t rows = l.offsets[b + 1] - l.offsets[a];
      const int64_t prev = l.offsets[a] + (l.reverse ? B : -B);
      matmul_into<Backend, S, T>(
          grad_w, dgates.narrow(0, l.offsets[a] - lo, rows).t(),
          output.narrow(0, prev, rows), accumulate, true);
      accumulate = true;
    }
    if (start >= first && start <= last) {
      matmul_into<Backend, S, T>(
          grad_w, dgates.narrow(0, l.offsets[start] - lo, B).t(), hx,
          accumulate, true);
    }
    return;
  }
  std::vector<RowCopy> copies;
  copies.reserve(2 * (last - first + 1));
  for (int64_t t = first; t <= last; ++t) {
    const int64_t rows = l.batch_sizes[t];
    const int64_t from_prev = l.rows_from_previous(t);
    const int64_t dst = l.offsets[t] - lo;
    if (from_prev > 0) {
      copies.push_back({dst, l.offsets[l.previous(t)], from_prev, 0});
    }
    if (rows > from_prev) {
      copies.push_back({dst + from_prev, from_prev, rows - from_prev, 1});
    }
  }
  Backend::copy_rows(copies.data(), static_cast<int64_t>(copies.size()),
                     output.size(1), scratch.data_ptr<S>(),
                     output.data_ptr<S>(), hx.data_ptr<S>());
  matmul_into<Backend, S, T>(grad_w, dgates.t(), scratch.narrow(0, 0, n),
                             accumulate);
}

// The StepWeight of a [n, k] weight multiplied as B^T by products of at
// most max_m rows: a weight of S, or, where the backend reads one so
// (Backend::kBf16WeightInPlace), a bfloat16 weight of an op computing in
// float (a one-step call's, Backend::one_step_weight_dtype).
template <typename Backend, typename S>
typename Backend::template StepWeight<S> step_weight(int64_t max_m,
                                                     const at::Tensor& w) {
  using Weight = typename Backend::template StepWeight<S>;
  if constexpr (Backend::kBf16WeightInPlace && std::is_same_v<S, float>) {
    if (w.scalar_type() == at::kBFloat16) {
      return Weight(true, max_m, w.size(0), w.size(1),
                    w.data_ptr<c10::BFloat16>(), w.size(1));
    }
  }
  return Weight(true, max_m, w.size(0), w.size(1), w.data_ptr<S>(), w.size(1));
}

template <typename T>
constexpr at::ScalarType compute_scalar_type() {
  return std::is_same_v<T, double> ? at::kDouble : at::kFloat;
}

// ---- The LSTM ------------------------------------------------------------------

template <typename Backend, typename S, typename T>
ForwardResult lstm_forward_recurrence(
    const SequenceLayout& l, const LstmSizes& s,
    const at::Tensor& x,          // [N, I] contiguous (S)
    const at::Tensor& hx,         // [B, P] contiguous (S)
    const at::Tensor& cx,         // [B, H] (T)
    // [4H, I] and [4H, P] contiguous (S, or in a one-step call bfloat16
    // for S = float: Backend::one_step_weight_dtype)
    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& bias,       // [4H] b_ih + b_hh (T), or undefined
    const at::Tensor& weight_hr,  // [P, H] contiguous (S), or undefined
    bool training, const ZoneoutArgs& z) {
  const int64_t H = s.hidden, P = s.output, G = 4 * s.hidden;
  const auto sopts = x.options();
  const auto topts = sopts.dtype(compute_scalar_type<T>());
  ForwardResult r;
  // Input projection: gates = x W_ih^T (+ b, unless each step adds it), for
  // every step at once, or when evaluating a block of consecutive steps at a
  // time into a buffer that stays in cache (Backend::input_block_rows).
  const bool bias_in_step = Backend::kBiasInStep && bias.defined();
  const at::Tensor proj_bias = bias_in_step ? at::Tensor() : bias;
  const int64_t block_rows =
      training ? 0
               : Backend::input_block_rows(G * int64_t(sizeof(T)),
                                           weight_ih.numel() *
                                               int64_t(sizeof(S)));
  // (never with a weight in another dtype than S: a one-step call's,
  // Backend::one_step_weight_dtype, op_impls.h)
  const bool blocked = block_rows > 0 && block_rows < l.rows &&
                       !proj_bias.defined() &&
                       weight_ih.scalar_type() == x.scalar_type();
  // the most rows a block projects (a step's at least)
  const int64_t block_capacity = std::max(block_rows, l.batch);
  at::Tensor gates =
      Backend::empty_activation({blocked ? block_capacity : l.rows, G}, topts);
  if (!blocked) {
    input_projection<Backend, S, T>(gates, x, weight_ih, proj_bias,
                                    l.uniform());
  }
  int64_t block_end = 0;  // the end of the current run of steps
  int64_t block_first_row = 0;  // the packed row of the block's gates row 0
  r.output = at::empty({l.rows, P}, sopts);
  at::Tensor c_state = cx.contiguous().clone();
  if (training) r.cells = Backend::empty_activation({l.rows, H}, topts);
  const bool zoneout_cell = z.on_cell(), zoneout_h = z.on_hidden();
  if (training && zoneout_cell) {
    r.cell_states = Backend::empty_activation({l.rows, H}, topts);
  }
  at::Tensor r_buf;
  if (s.has_projection()) r_buf = at::empty({l.batch, H}, sopts);

  T* g = gates.data_ptr<T>();
  S* out = r.output.data_ptr<S>();
  const S* h0 = hx.data_ptr<S>();
  T* cs = c_state.data_ptr<T>();
  T* cells = training ? r.cells.data_ptr<T>() : nullptr;
  using Weight = typename Backend::template StepWeight<S>;
  // gates += h W_hh^T; h = r W_hr^T
  const Weight whh = step_weight<Backend, S>(l.batch, weight_hh);
  std::unique_ptr<Weight> whr;
  if (s.has_projection()) {
    whr = std::make_unique<Weight>(true, l.batch, P, H,
                                   weight_hr.data_ptr<S>(), H);
  }
  // blocked: gates = x W_ih^T a block at a time, the bias added by the
  // steps. Over four blocks or more, W_ih is packed once for all of them
  // (at its second use, as the per-step weights) instead of by the GEMM at
  // every block. Measured on the Xeon (interleaved builds, T=100 B=64
  // I=H=128, 13 blocks): bfloat16 inference 4.5 -> 4.0 ms on 2 threads
  // (AMX product), 6.0 -> 5.0 ms on 1; float32 unchanged on 2 threads,
  // 15.7 -> 14.5 ms on 1; with two blocks (T=200 B=4) packing for one
  // product cost 4-7%.
  std::unique_ptr<Weight> wih;
  if (blocked && l.rows >= 4 * block_rows &&
      !Backend::template bulk_product_runs<S>()) {
    wih = std::make_unique<Weight>(true, block_capacity, G, s.input,
                                   weight_ih.data_ptr<S>(), s.input);
  }

  const auto run_step = [&](int64_t step) {
    const int64_t t = l.step_at(step);
    const int64_t rows = l.batch_sizes[t];
    const int64_t off = l.offsets[t];
    ForwardStepParams<T, S> p;
    p.rows = rows;
    p.hidden = H;
    p.gates = g + (off - block_first_row) * G;
    p.cell_state = cs;
    p.cell_save = training ? cells + off * H : nullptr;
    p.hidden_out = s.has_projection() ? r_buf.data_ptr<S>() : out + off * P;
    p.bias = bias_in_step ? bias.data_ptr<T>() : nullptr;
    if (zoneout_cell) {
      p.zoneout = cell_zoneout<T>(z, off, H);
      if (training) p.cell_state_save = r.cell_states.data_ptr<T>() + off * H;
    }
    // gates[t] += h_{t-1} W_hh^T, then the cell
    const PreviousHidden<S> h = previous_hidden(l, t, out, h0, P);
    with_flags(training, zoneout_cell, [&](auto tr, auto zc) {
      Backend::template recurrent_forward_step<decltype(tr)::value,
                                               decltype(zc)::value>(whh, h, p);
    });
    // h_t = r_t W_hr^T
    if (s.has_projection()) {
      whr->multiply(rows, p.hidden_out, H, S(0), out + off * P, P);
    }
    // zoneout on h (the projected h with a projection)
    if (zoneout_h) zoneout_hidden_step<Backend, S, T>(l, t, z, out, h0, P);
  };
  // The steps, in runs: blocked, each block's after its projection
  for (int64_t step = 0; step < l.steps; step = block_end) {
    block_end = l.steps;
    if (blocked) {
      // the next steps whose rows fit the block (at least this one): their
      // rows are contiguous, from the lowest time index's on
      const int64_t t = l.step_at(step);
      int64_t block = l.batch_sizes[t];
      block_end = step + 1;
      while (block_end < l.steps &&
             block + l.batch_sizes[l.step_at(block_end)] <= block_rows) {
        block += l.batch_sizes[l.step_at(block_end)];
        ++block_end;
      }
      block_first_row = l.offsets[std::min(t, l.step_at(block_end - 1))];
      if (wih) {
        wih->multiply(block, x.data_ptr<S>() + block_first_row * s.input,
                      s.input, T(0), g, G);
      } else {
        at::Tensor out = gates.narrow(0, 0, block);
        input_projection<Backend, S, T>(out, x.narrow(0, block_first_row, block),
                                        weight_ih, proj_bias, true);
      }
    }
    const int64_t first = step;
    Backend::run_steps(whh, l.batch, block_end - first,
                       s.has_projection() ? StepLoop::kMixed
                                          : StepLoop::kLstmForward,
                       [&](int64_t k) { run_step(first + k); });
  }
  r.hy = at::empty({l.batch, P}, sopts);
  copy_final_hidden<Backend>(l, out, P, r.hy.data_ptr<S>());
  r.cy = c_state;
  if (training) r.gates = gates;
  return r;
}

template <typename Backend, typename S, typename T>
BackwardResult lstm_backward_recurrence(
    const SequenceLayout& l, const LstmSizes& s,
    const at::Tensor& grad_output,  // [N, P] contiguous (S)
    const at::Tensor& grad_hy,      // [B, P] contiguous (T)
    const at::Tensor& grad_cy,      // [B, H] contiguous (T)
    const at::Tensor& x,            // [N, I] contiguous (S)
    const at::Tensor& hx,           // [B, P] contiguous (S)
    const at::Tensor& cx,           // [B, H] contiguous (T)
    const at::Tensor& weight_ih,    // [4H, I] (S)
    const at::Tensor& weight_hh,    // [4H, P] contiguous (S)
    const at::Tensor& weight_hr,    // [P, H] contiguous (S), or undefined
    const at::Tensor& output,       // [N, P] contiguous (S)
    const at::Tensor& gates,        // [N, 4H] activated gates (T)
    const at::Tensor& cells,        // [N, H] c~_t (T)
    const at::Tensor& cell_states,  // [N, H] carried c_t (T), with zoneout
                                    // on c only
    const ZoneoutArgs& z, const LstmGradMask& mask) {
  const int64_t H = s.hidden, P = s.output, G = 4 * s.hidden;
  const auto sopts = x.options();
  const auto topts = sopts.dtype(compute_scalar_type<T>());
  const bool zoneout_cell = z.on_cell(), zoneout_h = z.on_hidden();
  BackwardResult r;
  at::Tensor dgates = Backend::empty_activation({l.rows, G}, sopts);
  at::Tensor dh_state = grad_hy.clone();  // dL/dh of the rows' current step
  at::Tensor dc_state = grad_cy.clone();
  at::Tensor dh_total, dr_buf;  // with a projection, or zoneout on h
  if (s.has_projection()) {
    // dL/dh~_t (= dL/dh_t without zoneout), kept for grad_weight_hr
    dh_total = Backend::empty_activation({l.rows, P}, sopts);
  }
  if (s.has_projection() || zoneout_h) dr_buf = at::empty({l.batch, H}, topts);

  const S* dy = grad_output.data_ptr<S>();
  const T* g = gates.data_ptr<T>();
  const T* c = cells.data_ptr<T>();
  // c_{t-1} as carried: the zoned-out states, or c~ itself without zoneout
  const T* c_carried = zoneout_cell ? cell_states.data_ptr<T>() : c;
  const T* c0 = cx.data_ptr<T>();
  using Weight = typename Backend::template StepWeight<S>;
  // dh = dgates W_hh; dr = dh W_hr
  const Weight whh(false, l.batch, P, G, weight_hh.data_ptr<S>(), P);
  std::unique_ptr<Weight> whr;
  if (s.has_projection()) {
    whr = std::make_unique<Weight>(false, l.batch, H, P,
                                   weight_hr.data_ptr<S>(), H);
  }
  // The bias gradient: per-task sums the steps add to (kParamGradsInStep:
  // one row per task a parallel region may run, added in task order after
  // the steps), else one reduction over dgates after the steps.
  at::Tensor bias_sums;
  if constexpr (Backend::kParamGradsInStep) {
    if (mask.bias) bias_sums = at::zeros({at::get_num_threads(), G}, topts);
  }
  S* dg = dgates.data_ptr<S>();
  T* dhs = dh_state.data_ptr<T>();
  T* dcs = dc_state.data_ptr<T>();

  const auto run_step = [&](int64_t step) {
    const int64_t t = l.step_at(step);
    const int64_t rows = l.batch_sizes[t];
    const int64_t off = l.offsets[t];
    const int64_t prev = l.previous(t);
    BackwardStepParams<T, S> p;
    p.rows = rows;
    p.hidden = H;
    p.rows_from_previous = l.rows_from_previous(t);
    p.gates = g + off * G;
    p.cell = c + off * H;
    p.cell_prev = prev >= 0 ? c_carried + l.offsets[prev] * H : nullptr;
    p.cell_init = c0;
    p.dcell_state = dcs;
    p.dgates = dg + off * G;
    if (zoneout_cell) p.zoneout = cell_zoneout<T>(z, off, H);
    if (bias_sums.defined()) {
      p.bias_grad_sums = bias_sums.data_ptr<T>();
      p.bias_grad_tasks = bias_sums.size(0);
    }
    bool add_output_grad = false;
    if (s.has_projection()) {
      // dL/dh~_t, kept for grad_weight_hr; dr = dh~ W_hr. With zoneout on
      // h, dhs keeps the share of dL/dh_{t-1}.
      S* dht = dh_total.data_ptr<S>() + off * P;
      if (zoneout_h) {
        zoneout_hidden_step_backward<Backend>(l, t, z, dhs, dy, dht, P);
      } else {
        Backend::add(dht, dhs, dy + off * P, rows * P);
      }
      whr->multiply(rows, dht, P, T(0), dr_buf.data_ptr<T>(), H);
      p.grad_hidden = dr_buf.data_ptr<T>();
    } else if (zoneout_h) {
      zoneout_hidden_step_backward<Backend>(l, t, z, dhs, dy,
                                            dr_buf.data_ptr<T>(), P);
      p.grad_hidden = dr_buf.data_ptr<T>();
    } else {
      p.grad_hidden = dhs;
      p.grad_output = dy + off * P;
      add_output_grad = true;
    }
    // The step, then dh_{t-1} = dgates W_hh (+ the zoneout share already
    // in dhs)
    with_flags(add_output_grad, zoneout_cell, [&](auto add, auto zc) {
      Backend::template recurrent_backward_step<decltype(add)::value,
                                                decltype(zc)::value>(
          whh, p, T(zoneout_h ? 1 : 0), dhs, P);
    });
  };
  Backend::run_steps(whh, l.batch, l.steps,
                     s.has_projection() ? StepLoop::kMixed
                                        : StepLoop::kLstmBackward,
                     [&](int64_t k) { run_step(l.steps - 1 - k); });
  r.grad_hx = dh_state;
  r.grad_cx = dc_state;
  if (mask.input) {
    r.grad_input = at::empty({l.rows, s.input}, sopts);
    matmul_into<Backend, S, S>(r.grad_input, dgates, weight_ih, false,
                               l.uniform());
  }
  if (mask.weight_ih) {
    r.grad_weight_ih = at::empty({G, s.input}, topts);
    matmul_into<Backend, S, T>(r.grad_weight_ih, dgates.t(), x, false,
                               l.uniform());
  }
  if (mask.weight_hh) {
    r.grad_weight_hh = at::empty({G, P}, topts);
    at::Tensor scratch;  // h_{t-1} of a packed layout
    if (!l.uniform()) scratch = Backend::empty_activation({l.rows, P}, sopts);
    add_recurrent_weight_grad<Backend, S, T>(l, r.grad_weight_hh, dgates,
                                             output, hx, 0, l.steps - 1,
                                             scratch, /*accumulate=*/false);
  }
  if (bias_sums.defined()) {
    r.grad_bias = bias_sums.sum(0);
  } else if (mask.bias) {
    r.grad_bias = std::is_same_v<S, T>
                      ? dgates.sum(0)
                      : at::sum(dgates, {0}, false, compute_scalar_type<T>());
  }
  if (s.has_projection() && mask.weight_hr) {
    const at::Tensor rr =
        (gates.narrow(1, 3 * H, H) * cells.tanh()).to(sopts.dtype());
    r.grad_weight_hr = at::empty({P, H}, topts);
    matmul_into<Backend, S, T>(r.grad_weight_hr, dh_total.t(), rr, false,
                               l.uniform());
  }
  return r;
}

}  // namespace rnnfast
