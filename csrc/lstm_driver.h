// The recurrence of one LSTM layer in one direction, forward and backward,
// written once over a Backend that supplies the GEMM, the pointwise step
// kernels and a row copy for raw pointers of type T. Bulk work before and
// after the time loop uses ATen ops, which run on the tensors' device.
//
// Backend interface (all row-major):
//   template <typename T> class StepWeight: a weight multiplied at every
//     step, prepared once (e.g. packed) by
//     StepWeight(bool trans_b, int64_t max_m, int64_t n, int64_t k,
//                const T* b, int64_t ldb), then
//     multiply(int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc)
//     computes C[m, n] = A[m, k] op(B) + beta C.
//   static void forward_step(const ForwardStepParams<T>&);
//   static void backward_step(const BackwardStepParams<T>&);
//   static void copy(T* dst, const T* src, int64_t count);
//   static void add(T* dst, const T* a, const T* b, int64_t count);
#pragma once

#include <ATen/ATen.h>

#include <memory>

#include "activation_cache.h"
#include "lstm_params.h"

namespace rnnfast {

struct ForwardResult {
  at::Tensor output;  // [N, P]
  at::Tensor hy;      // [B, P]
  at::Tensor cy;      // [B, H]
  at::Tensor gates;   // [N, 4H] activated gates (training), else empty
  at::Tensor cells;   // [N, H] cell states (training), else empty
};

struct BackwardResult {
  at::Tensor grad_input;      // [N, I]
  at::Tensor grad_hx;         // [B, P]
  at::Tensor grad_cx;         // [B, H]
  at::Tensor grad_weight_ih;  // [4H, I]
  at::Tensor grad_weight_hh;  // [4H, P]
  at::Tensor grad_bias;       // [4H], the gradient of each of the two biases
  at::Tensor grad_weight_hr;  // [P, H], or empty without a projection
};

template <typename Backend, typename T>
ForwardResult lstm_forward_recurrence(
    const SequenceLayout& l, const LstmSizes& s,
    const at::Tensor& x,          // [N, I] contiguous
    const at::Tensor& hx,         // [B, P]
    const at::Tensor& cx,         // [B, H]
    const at::Tensor& weight_ih,  // [4H, I]
    const at::Tensor& weight_hh,  // [4H, P] contiguous
    const at::Tensor& bias,       // [4H] b_ih + b_hh, or undefined
    const at::Tensor& weight_hr,  // [P, H] contiguous, or undefined
    bool training) {
  const int64_t H = s.hidden, P = s.output, G = 4 * s.hidden;
  const auto opts = x.options();
  ForwardResult r;
  // Input projection for every step at once: gates = x W_ih^T + b.
  at::Tensor gates = empty_activation({l.rows, G}, opts);
  if (bias.defined()) {
    at::addmm_out(gates, bias, x, weight_ih.t());
  } else {
    at::mm_out(gates, x, weight_ih.t());
  }
  r.output = at::empty({l.rows, P}, opts);
  at::Tensor h_state = hx.contiguous().clone();
  at::Tensor c_state = cx.contiguous().clone();
  if (training) r.cells = empty_activation({l.rows, H}, opts);
  at::Tensor r_buf;
  if (s.has_projection()) r_buf = at::empty({l.batch, H}, opts);

  T* g = gates.data_ptr<T>();
  T* out = r.output.data_ptr<T>();
  T* hs = h_state.data_ptr<T>();
  T* cs = c_state.data_ptr<T>();
  T* cells = training ? r.cells.data_ptr<T>() : nullptr;
  using Weight = typename Backend::template StepWeight<T>;
  // gates += h W_hh^T; h = r W_hr^T
  const Weight whh(true, l.batch, G, P, weight_hh.data_ptr<T>(), P);
  std::unique_ptr<Weight> whr;
  if (s.has_projection()) {
    whr = std::make_unique<Weight>(true, l.batch, P, H,
                                   weight_hr.data_ptr<T>(), H);
  }

  for (int64_t step = 0; step < l.steps; ++step) {
    const int64_t t = l.step_at(step);
    const int64_t rows = l.batch_sizes[t];
    const int64_t off = l.offsets[t];
    // gates[t] += h_{t-1} W_hh^T
    whh.multiply(rows, hs, P, T(1), g + off * G, G);
    ForwardStepParams<T> p;
    p.rows = rows;
    p.hidden = H;
    p.gates = g + off * G;
    p.cell_state = cs;
    p.cell_save = cells ? cells + off * H : nullptr;
    if (s.has_projection()) {
      p.r_out = r_buf.data_ptr<T>();
      Backend::forward_step(p);
      // h_t = r_t W_hr^T
      whr->multiply(rows, p.r_out, H, T(0), out + off * P, P);
      Backend::copy(hs, out + off * P, rows * P);
    } else {
      p.r_out = out + off * P;
      p.r_out2 = hs;
      Backend::forward_step(p);
    }
  }
  r.hy = h_state;
  r.cy = c_state;
  if (training) r.gates = gates;
  return r;
}

// Rows of h_{t-1} for the rows of steps [t_first, t_last] (packed rows
// [offsets[t_first], offsets[t_last + 1])), into dst [those rows, P]: the
// previous step's output where the sequence continues, the initial state
// where it starts.
template <typename Backend, typename T>
void gather_previous_hidden(const SequenceLayout& l,
                            const at::Tensor& output,  // [N, P]
                            const at::Tensor& hx,      // [B, P]
                            int64_t t_first, int64_t t_last, T* dst) {
  const int64_t P = output.size(1);
  const T* out = output.data_ptr<T>();
  const T* h0 = hx.data_ptr<T>();
  for (int64_t t = t_first; t <= t_last; ++t) {
    const int64_t rows = l.batch_sizes[t];
    const int64_t from_prev = l.rows_from_previous(t);
    T* d = dst + (l.offsets[t] - l.offsets[t_first]) * P;
    if (from_prev > 0) {
      Backend::copy(d, out + l.offsets[l.previous(t)] * P, from_prev * P);
    }
    if (rows > from_prev) {
      Backend::copy(d + from_prev * P, h0 + from_prev * P,
                    (rows - from_prev) * P);
    }
  }
}

// The same for every step, [N, P].
template <typename Backend, typename T>
at::Tensor gather_previous_hidden(const SequenceLayout& l,
                                  const at::Tensor& output,  // [N, P]
                                  const at::Tensor& hx) {    // [B, P]
  at::Tensor prev = empty_activation(output.sizes(), output.options());
  gather_previous_hidden<Backend, T>(l, output, hx, 0, l.steps - 1,
                                     prev.data_ptr<T>());
  return prev;
}

template <typename Backend, typename T>
BackwardResult lstm_backward_recurrence(
    const SequenceLayout& l, const LstmSizes& s,
    const at::Tensor& grad_output,  // [N, P] contiguous
    const at::Tensor& grad_hy,      // [B, P] contiguous
    const at::Tensor& grad_cy,      // [B, H] contiguous
    const at::Tensor& x,            // [N, I] contiguous
    const at::Tensor& hx,           // [B, P] contiguous
    const at::Tensor& cx,           // [B, H] contiguous
    const at::Tensor& weight_ih,    // [4H, I]
    const at::Tensor& weight_hh,    // [4H, P] contiguous
    const at::Tensor& weight_hr,    // [P, H] contiguous, or undefined
    const at::Tensor& output,       // [N, P] contiguous
    const at::Tensor& gates,        // [N, 4H] activated gates
    const at::Tensor& cells) {      // [N, H]
  const int64_t H = s.hidden, P = s.output, G = 4 * s.hidden;
  const auto opts = x.options();
  BackwardResult r;
  at::Tensor dgates = empty_activation({l.rows, G}, opts);
  at::Tensor dh_state = grad_hy.clone();  // dL/dh of the rows' current step
  at::Tensor dc_state = grad_cy.clone();
  at::Tensor dh_total, dr_buf;  // only with a projection
  if (s.has_projection()) {
    dh_total = empty_activation({l.rows, P}, opts);
    dr_buf = at::empty({l.batch, H}, opts);
  }

  const T* dy = grad_output.data_ptr<T>();
  const T* g = gates.data_ptr<T>();
  const T* c = cells.data_ptr<T>();
  const T* c0 = cx.data_ptr<T>();
  using Weight = typename Backend::template StepWeight<T>;
  // dh = dgates W_hh; dr = dh W_hr
  const Weight whh(false, l.batch, P, G, weight_hh.data_ptr<T>(), P);
  std::unique_ptr<Weight> whr;
  if (s.has_projection()) {
    whr = std::make_unique<Weight>(false, l.batch, H, P,
                                   weight_hr.data_ptr<T>(), H);
  }
  T* dg = dgates.data_ptr<T>();
  T* dhs = dh_state.data_ptr<T>();
  T* dcs = dc_state.data_ptr<T>();

  for (int64_t step = l.steps - 1; step >= 0; --step) {
    const int64_t t = l.step_at(step);
    const int64_t rows = l.batch_sizes[t];
    const int64_t off = l.offsets[t];
    const int64_t prev = l.previous(t);
    BackwardStepParams<T> p;
    p.rows = rows;
    p.hidden = H;
    p.rows_from_previous = l.rows_from_previous(t);
    p.gates = g + off * G;
    p.cell = c + off * H;
    p.cell_prev = prev >= 0 ? c + l.offsets[prev] * H : nullptr;
    p.cell_init = c0;
    p.dcell_state = dcs;
    p.dgates = dg + off * G;
    if (s.has_projection()) {
      T* dht = dh_total.data_ptr<T>() + off * P;
      Backend::add(dht, dhs, dy + off * P, rows * P);
      // dr = dh W_hr
      whr->multiply(rows, dht, P, T(0), dr_buf.data_ptr<T>(), H);
      p.dr = dr_buf.data_ptr<T>();
    } else {
      p.dr = dhs;
      p.dr2 = dy + off * P;
    }
    Backend::backward_step(p);
    // dh_{t-1} = dgates W_hh
    whh.multiply(rows, dg + off * G, G, T(0), dhs, P);
  }
  r.grad_hx = dh_state;
  r.grad_cx = dc_state;
  r.grad_input = at::mm(dgates, weight_ih);
  r.grad_weight_ih = at::mm(dgates.t(), x);
  r.grad_weight_hh =
      at::mm(dgates.t(), gather_previous_hidden<Backend, T>(l, output, hx));
  r.grad_bias = dgates.sum(0);
  if (s.has_projection()) {
    const at::Tensor rr = gates.narrow(1, 3 * H, H) * cells.tanh();
    r.grad_weight_hr = at::mm(dh_total.t(), rr);
  }
  return r;
}

}  // namespace rnnfast
