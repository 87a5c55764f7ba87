// Plain-data descriptions of one LSTM layer in one direction over a whole
// sequence, shared by the host code of every backend. Kernels see these
// structs and raw pointers only, never at::Tensor.
//
// Layout. Sequences are time-major and stored as "packed rows": step t owns
// rows [offset[t], offset[t] + batch_size[t]) of every per-row buffer. A
// padded [T, B, *] input is the special case batch_size[t] == B. With a
// PackedSequence the batch sizes are non-increasing in t (sequences sorted
// by decreasing length), so the rows active at a step are a prefix of the
// batch; the same row index refers to the same sequence at every step.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <vector>

namespace rnnfast {

struct SequenceLayout {
  int64_t steps = 0;         // T
  int64_t batch = 0;         // B: rows of the initial / final states
  int64_t rows = 0;          // N: total rows, sum of batch_sizes
  bool reverse = false;      // process t = T-1 .. 0
  std::vector<int64_t> batch_sizes;  // [T]
  std::vector<int64_t> offsets;      // [T + 1], exclusive prefix sums

  // The time index processed at position s (0 <= s < T) of the recurrence.
  int64_t step_at(int64_t s) const { return reverse ? steps - 1 - s : s; }
  // The time index processed just before t, or -1 for the first one.
  int64_t previous(int64_t t) const {
    const int64_t p = reverse ? t + 1 : t - 1;
    return (p < 0 || p >= steps) ? -1 : p;
  }
  // Rows of step t whose previous state is the previous step's output (the
  // others start from the initial state): with decreasing batch sizes this
  // is a prefix of the rows of t.
  int64_t rows_from_previous(int64_t t) const {
    const int64_t p = previous(t);
    if (p < 0) return 0;
    return batch_sizes[t] < batch_sizes[p] ? batch_sizes[t] : batch_sizes[p];
  }
  // Whether every step has all B rows (a padded input, or a packed one of
  // equal lengths): step t's rows are then [t B, (t + 1) B).
  bool uniform() const { return rows == steps * batch; }
};

// A run of rows copied by Backend::copy_rows: rows [dst_row, dst_row + rows)
// of the destination from rows [src_row, src_row + rows) of the first source
// (from_second == 0) or of the second.
struct RowCopy {
  int64_t dst_row = 0;
  int64_t src_row = 0;
  int64_t rows = 0;
  int64_t from_second = 0;
};

struct LstmSizes {
  int64_t input = 0;   // I
  int64_t hidden = 0;  // H: cell size
  int64_t output = 0;  // P: hidden state size, proj_size or H
  bool has_projection() const { return output != hidden; }
};

// What the steps of a time loop call (Backend::run_steps): one kind of
// recurrent step of the Backend interface (lstm_driver.h) and the zoneout
// passes, nothing else; or kMixed: more than that (a projection's product
// of the whole step), so the steps must run in order, each over all its
// rows, on the calling thread.
enum class StepLoop {
  kMixed,
  kLstmForward,        // recurrent_forward_step
  kLstmBackward,       // recurrent_backward_step
  kLayerNormForward,   // recurrent_layer_norm_forward_step
  kLayerNormBackward,  // recurrent_layer_norm_backward_step
};

// Where the hidden states h_{t-1} of step t's rows lie (S, ld wide rows):
// the first continuing_rows in the previous step's output, the next
// starting_rows in the initial state (a reverse packed sequence gains rows
// as it goes), so that no step copies a hidden state.
template <typename S>
struct PreviousHidden {
  const S* continuing = nullptr;
  int64_t continuing_rows = 0;
  const S* starting = nullptr;
  int64_t starting_rows = 0;
  int64_t ld = 0;
  C10_HOST_DEVICE int64_t rows() const { return continuing_rows + starting_rows; }
  // h_{t-1} of the step's row `row` (< rows()).
  C10_HOST_DEVICE const S* row(int64_t row) const {
    return row < continuing_rows ? continuing + row * ld
                                 : starting + (row - continuing_rows) * ld;
  }
};

// C[rows [begin, end) of the step, n] = h_{t-1} op(W) + beta C (row 0 of c
// is the step's row begin), through a StepWeight's
// multiply(m, a, lda, beta, c, ldc) or any object with that member: at most
// two products, one per source of h_{t-1}.
template <typename Weight, typename S, typename C>
void multiply_hidden_rows(const PreviousHidden<S>& h, int64_t begin,
                          int64_t end, const Weight& w, C beta, C* c,
                          int64_t ldc) {
  const int64_t split = h.continuing_rows;
  if (begin < split) {
    const int64_t e = end < split ? end : split;
    w.multiply(e - begin, h.row(begin), h.ld, beta, c, ldc);
    c += (e - begin) * ldc;
    begin = e;
  }
  if (begin < end) w.multiply(end - begin, h.row(begin), h.ld, beta, c, ldc);
}

// Types. T is the compute type of a step kernel (float or double): the
// gates, the cell state and every saved activation are held in it. S is the
// storage type of the tensors the GEMMs read (input, weights, hidden states,
// output): T itself, or half / bfloat16 for a half-type op on a backend
// that runs its GEMMs in that type with float accumulation (CUDA; the CPU
// for bfloat16 where it has bfloat16 instructions).

// Zoneout on the cell state (the step kernels' compile-time flag
// ZoneoutCell): c_t = a c_{t-1} + (1 - a) c~_t, where c~_t = f c_{t-1} + i g
// is what the step's output is computed from and a is the unit's mask
// (training: 0 or 1) or, without a mask, the rate (evaluation).
template <typename T>
struct CellZoneout {
  const bool* mask = nullptr;  // [rows, H] of the step, or null: use rate
  T rate = T(0);
};

// Pointers for the pointwise part of one forward step over `rows` rows.
// The kernel's compile-time flag Training says whether it saves c_t, and
// ZoneoutCell whether c is zoned out (then cell_save holds c~_t and
// cell_state_save the carried c_t).
template <typename T, typename S = T>
struct ForwardStepParams {
  int64_t rows = 0;
  int64_t hidden = 0;        // H
  T* gates = nullptr;        // [rows, 4H] pre-activations in, activated gates out
  T* cell_state = nullptr;   // [rows, H] c_{t-1} in, c_t out
  T* cell_save = nullptr;    // [rows, H] c~_t (= c_t without zoneout), for
                             // the backward (Training only)
  T* cell_state_save = nullptr;  // [rows, H] carried c_t (Training and
                                 // ZoneoutCell only)
  S* hidden_out = nullptr;   // [rows, H] r = o * tanh(c~_t): the step's
                             // output, or the projection's input
  CellZoneout<T> zoneout;    // ZoneoutCell only
  const T* bias = nullptr;   // [4H] added to every row's pre-activations, or
                             // null (Backend::kBiasInStep, lstm_driver.h)
  // The hidden units [unit_begin, unit_end) of every row only, or all of
  // them when unit_end is -1 (the CPU's steps split by units over a team
  // of threads; the pointers still address whole rows).
  int64_t unit_begin = 0, unit_end = -1;
};

// Pointers for the pointwise part of one backward step over `rows` rows.
// The gradient w.r.t. r = o * tanh(c_t) is grad_hidden, plus grad_output
// when the kernel's compile-time flag AddOutputGrad is set (without a
// projection, where r is the step's output itself).
template <typename T, typename S = T>
struct BackwardStepParams {
  int64_t rows = 0;
  int64_t hidden = 0;             // H
  int64_t rows_from_previous = 0; // rows [0, this) read c_prev from cell_prev
  const T* gates = nullptr;       // [rows, 4H] activated gates of the step
  const T* cell = nullptr;        // [rows, H] c~_t (= c_t without zoneout)
  const T* cell_prev = nullptr;   // [rows_from_previous, H] carried c_{t-1}
  const T* cell_init = nullptr;   // [B, H] c_0, indexed by row
  const T* grad_hidden = nullptr; // [rows, H] from the later steps (or the
                                  // whole gradient w.r.t. r, see above)
  const S* grad_output = nullptr; // [rows, H] w.r.t. the step's output
                                  // (AddOutputGrad only)
  T* dcell_state = nullptr;       // [rows, H] dc_t in, dc_{t-1} out
  S* dgates = nullptr;            // [rows, 4H] gradient w.r.t. pre-activations
  CellZoneout<T> zoneout;         // ZoneoutCell only
  // Backend::kParamGradsInStep only, else null (CUDA's kernels never read
  // it): the step adds its rows' gradients w.r.t. the pre-activations (in
  // T, before any rounding to S) to the bias gradient sums of the parallel
  // task that runs them, as the LayerNorm-LSTM's steps add their parameter
  // sums (LayerNormParamGradSum).
  T* bias_grad_sums = nullptr;    // [bias_grad_tasks, 4H]
  int64_t bias_grad_tasks = 0;
  // The row of sums to add to: -1 for the running task's, else this one
  // (a row group's, or a part of a step split over a CPU StepTeam).
  int64_t bias_grad_task = -1;
};

// Zoneout on the hidden state, applied by the driver after the step's
// output is complete (after the projection, if any): over `rows` rows of
// `width` (P) units,
//   h_t = a h_{t-1} + (1 - a) h~_t,
// with h_{t-1} read where it lies, as multiply_previous_hidden reads it.
template <typename T, typename S = T>
struct HiddenZoneoutParams {
  int64_t rows = 0;
  int64_t width = 0;               // P
  int64_t rows_from_previous = 0;  // rows [0, this) read h_{t-1} from
                                   // hidden_prev, the others hidden_init
  S* hidden = nullptr;             // [rows, P] h~_t in, h_t out
  const S* hidden_prev = nullptr;  // [rows_from_previous, P] h_{t-1}
  const S* hidden_init = nullptr;  // [B, P] h_0, by row
  const bool* mask = nullptr;      // [rows, P] or null: use rate
  T rate = T(0);
};

// Its backward, before the step's pointwise backward: with d = dL/dh_t =
// grad_hidden + grad_output,
//   grad_candidate = (1 - a) d   (w.r.t. h~_t; C is S or T)
//   grad_hidden    = a d         (the share of dL/dh_{t-1}, to which the
//                                 step's recurrent product is then added)
template <typename T, typename S = T, typename C = T>
struct HiddenZoneoutBackwardParams {
  int64_t rows = 0;
  int64_t width = 0;
  T* grad_hidden = nullptr;        // [rows, P] in and out, see above
  const S* grad_output = nullptr;  // [rows, P]
  C* grad_candidate = nullptr;     // [rows, P]
  const bool* mask = nullptr;      // [rows, P] or null: use rate
  T rate = T(0);
};

// ---- LayerNorm-LSTM ------------------------------------------------------
// Row statistics saved for the backward, [N, kStatsWidth] per row.
enum LayerNormStat : int64_t {
  kRstdIh = 0,   // 1 / std of W_ih x
  kRstdHh = 1,   // 1 / std of W_hh h_{t-1}
  kMeanCell = 2, // mean of c_t
  kRstdCell = 3, // 1 / std of c_t
  kStatsWidth = 4,
};

// One forward step of the LayerNorm-LSTM over `rows` rows:
//   pre = LN_ih(ih) + LN_hh(hh) + bias, c = f c_prev + i g,
//   h = o tanh(LN_cell(c)),
// where bias is the sum of the four gate biases (b_ih, b_hh and the two LN
// biases, which enter alike). ih and hh are overwritten with their normalised
// values xhat (what the backward reads; it recomputes the gates from them).
// The kernel's compile-time flag Training says whether it saves c_t and the
// statistics.
template <typename T, typename S = T>
struct LayerNormStepParams {
  int64_t rows = 0;
  int64_t hidden = 0;             // H
  T eps = T(1e-5);
  T* ih = nullptr;                // [rows, 4H] W_ih x_t in, xhat_ih out
  T* hh = nullptr;                // [rows, 4H] W_hh h_{t-1} in, xhat_hh out
  const T* gamma_ih = nullptr;    // [4H]
  const T* gamma_hh = nullptr;    // [4H]
  const T* bias = nullptr;        // [4H] sum of the gate biases
  const T* gamma_cell = nullptr;  // [H]
  const T* beta_cell = nullptr;   // [H]
  T* cell_state = nullptr;  // [rows, H] c_{t-1} in, c_t out
  T* cell_save = nullptr;   // [rows, H] c~_t (= c_t without zoneout):
                            // Training, or ZoneoutCell (then also a
                            // workspace in evaluation)
  T* cell_state_save = nullptr;  // [rows, H] carried c_t (Training and
                                 // ZoneoutCell only)
  T* stats = nullptr;       // [rows, kStatsWidth] (Training only), of c~_t
  S* h_out = nullptr;       // [rows, H] h~_t = o tanh(LN_cell(c~_t))
  CellZoneout<T> zoneout;   // ZoneoutCell only
};

// One backward step of the LayerNorm-LSTM over `rows` rows, from what the
// forward saved (the gates are recomputed from xhat_ih and xhat_hh).
template <typename T, typename S = T>
struct LayerNormBackwardStepParams {
  int64_t rows = 0;
  int64_t hidden = 0;
  int64_t rows_from_previous = 0;   // rows [0, this) read c_prev from cell_prev
  const T* normalized_ih = nullptr; // [rows, 4H] xhat_ih
  const T* normalized_hh = nullptr; // [rows, 4H] xhat_hh
  const T* stats = nullptr;         // [rows, kStatsWidth]
  const T* gamma_ih = nullptr;      // [4H]
  const T* gamma_hh = nullptr;      // [4H]
  const T* bias = nullptr;          // [4H] sum of the gate biases
  const T* gamma_cell = nullptr;    // [H]
  const T* beta_cell = nullptr;     // [H]
  const T* cell = nullptr;          // [rows, H] c~_t (= c_t without zoneout)
  const T* cell_prev = nullptr;     // [rows_from_previous, H] carried c_{t-1}
  const T* cell_init = nullptr;     // [B, H] c_0
  const T* grad_hidden = nullptr;   // [rows, H] dL/dh_t from later steps ...
  const S* grad_output = nullptr;   // ... plus dL/dh_t of the step's output
                                    // (AddOutputGrad only)
  CellZoneout<T> zoneout;           // ZoneoutCell only
  T* dcell_state = nullptr;         // [rows, H] dc_t in, dc_{t-1} out
  T* dgates = nullptr;              // [rows, 4H] w.r.t. the pre-activations
  T* dcell_norm = nullptr;          // [rows, H] w.r.t. LN_cell(c_t)
  S* dih = nullptr;                 // [rows, 4H] w.r.t. W_ih x_t
  S* dhh = nullptr;                 // [rows, 4H] w.r.t. W_hh h_{t-1}
  // Backend::kParamGradsInStep only, else null: the step adds its rows'
  // share of the LayerNorm parameter gradients to the sums of the parallel
  // task that runs them (LayerNormParamGradSum).
  T* param_grad_sums = nullptr;     // [param_grad_tasks, kSumWidth * H]
  int64_t param_grad_tasks = 0;
  // The row of sums to add to: -1 for the running task's, else this one
  // (a part of a step split over a CPU StepTeam, whichever thread runs it).
  int64_t param_grad_task = -1;
};

// The LayerNorm parameter gradients as the steps of a backward add them up
// themselves (Backend::kParamGradsInStep): one row of sums per parallel task
// (at::get_thread_num() of the task running the rows), to which the task
// adds its rows in row order, step after step; the driver then adds the rows
// in task order. Given the number of threads, the rows each task runs and so
// the gradients are the same from call to call. Columns, in units of H:
enum LayerNormParamGradSum : int64_t {
  kSumBias = 0,        // [4H] sum of dgates
  kSumGammaIh = 4,     // [4H] sum of dgates * xhat_ih
  kSumGammaHh = 8,     // [4H] sum of dgates * xhat_hh
  kSumGammaCell = 12,  // [H] sum of dcell_norm * xhat_cell
  kSumBetaCell = 13,   // [H] sum of dcell_norm
  kSumWidth = 14,
};

// Adds the share of `rows` rows (every step's, after the backward steps, on
// a backend without kParamGradsInStep) to the LayerNorm parameter
// gradients, from the gradients the backward steps wrote:
//   grad_bias[j]       += sum_r dgates[r, j]
//   grad_gamma_ih[j]   += sum_r dgates[r, j] * xhat_ih[r, j]
//   grad_gamma_hh[j]   += sum_r dgates[r, j] * xhat_hh[r, j]
//   grad_beta_cell[k]  += sum_r dcell_norm[r, k]
//   grad_gamma_cell[k] += sum_r dcell_norm[r, k] * xhat_cell[r, k]
// (xhat_cell from c_t and its saved statistics), in the same order from call
// to call, so the gradients are bitwise reproducible.
template <typename T>
struct LayerNormParamGradsParams {
  int64_t rows = 0;
  int64_t hidden = 0;
  const T* dgates = nullptr;         // [rows, 4H]
  const T* normalized_ih = nullptr;  // [rows, 4H]
  const T* normalized_hh = nullptr;  // [rows, 4H]
  const T* dcell_norm = nullptr;     // [rows, H]
  const T* cell = nullptr;           // [rows, H] c_t
  const T* stats = nullptr;          // [rows, kStatsWidth]
  T* grad_bias = nullptr;            // [4H]
  T* grad_gamma_ih = nullptr;        // [4H]
  T* grad_gamma_hh = nullptr;        // [4H]
  T* grad_gamma_cell = nullptr;      // [H]
  T* grad_beta_cell = nullptr;       // [H]
};

}  // namespace rnnfast
