// CPU implementation of the rnnfast ops: the shared recurrence of
// lstm_driver.h over BLAS GEMMs and the vectorised pointwise kernels.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>

#include "../backend_info.h"
#include "../lstm_cell.h"
#include "../op_impls.h"
#include "activation_cache.h"
#include "blas.h"
#include "kernel_table.h"
#include "step_gemm.h"
#include "step_team.h"

namespace rnnfast::cpu {

const KernelTable& kernel_table() {
  static const KernelTable& table = []() -> const KernelTable& {
    // at::get_cpu_capability() honours ATEN_CPU_CAPABILITY and the CPU.
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return kernel_table_avx512();
    if (cap == "AVX2") return kernel_table_avx2();
    return kernel_table_default();
  }();
  return table;
}

struct CpuBackend {
  template <typename S>
  using StepWeight = cpu::StepWeight<S>;
  // The CPU's blocks of the LayerNorm-LSTM backward
  // (layer_norm_lstm_driver.h). Its gradients w.r.t. W_ih x_t and
  // W_hh h_{t-1} are kept for blocks of consecutive steps, which go through
  // the input and weight gradient GEMMs while they are still in cache (and
  // no [N, 4H] gradient buffer is allocated: fresh memory costs page faults
  // on every call). A block holds about 8 MiB of those two gradients
  // (row_bytes each row), within 1024-4096 rows: 1024 rows of float32 at
  // H=256 (where larger blocks gained nothing), 4096 of bfloat16 at H=128,
  // whose 1024-row blocks (2 MiB) paid the BLAS's per-call overhead and
  // packing seven times per T=100 B=64 call. Measured on the Xeon against
  // 1024-row blocks, training, p10 of 40 calls, 3-4 rounds alternating:
  // bfloat16 H=128 (4096 rows) 0.92x the time; float32 H=128 (2048 rows)
  // 0.95x-1.0x; bfloat16 H=256 (2048 rows) level (0.95x-1.05x over two
  // sets, a busy VM). RNNFAST_CPU_GRAD_BLOCK_ROWS=<rows> sets the rows
  // instead (read per call; for tests and comparisons).
  static constexpr int64_t kGradBlockBytes = int64_t{8} << 20;
  static constexpr int64_t kGradBlockMinRows = 1024;
  static constexpr int64_t kGradBlockMaxRows = 4096;
  static int64_t grad_block_rows(int64_t row_bytes) {
    const char* e = std::getenv("RNNFAST_CPU_GRAD_BLOCK_ROWS");
    if (e != nullptr && *e != '\0') {
      const long long rows = std::atoll(e);
      TORCH_CHECK(rows > 0, "RNNFAST_CPU_GRAD_BLOCK_ROWS must be a positive "
                  "number of rows, got '", e, "'");
      return rows;
    }
    return std::clamp(kGradBlockBytes / std::max<int64_t>(1, row_bytes),
                      kGradBlockMinRows, kGradBlockMaxRows);
  }
  // Each backward step adds its rows' share of the LayerNorm parameter
  // gradients (LayerNormParamGradSum) while it holds their gradients and
  // normalised products in registers, instead of a reduction over groups of
  // steps that read them again, in a parallel region of its own. Interleaved
  // on the 2-core Xeon, T=100 B=64 I=H=128, 400 backward calls: 6% fewer
  // CPU samples in all (the step itself +13%, the reduction's -100%, the
  // threads' waits -14%). The LSTM's backward steps add its bias gradient
  // alike: the reduction of the [N, 4H] gate gradients afterwards had cost a
  // bfloat16 op most (ATen first converted them all to a fresh float copy,
  // 6% of its samples in page faults and the copy, then summed them: 5%).
  // Builds alternating on the Xeon (p10 of 40 calls, 3-4 rounds), training:
  // bfloat16 T=100 B=64 0.89x the time at H=128 and 0.86-0.88x at H=256,
  // T=100 B=32 H=256 two bidirectional layers 0.90-0.96x; float32 and
  // small batches level (0.97-1.0x).
  static constexpr bool kParamGradsInStep = true;
  // The storage dtype of the GEMMs of a half-type op (op_impls.h): a
  // bfloat16 op of either cell keeps its GEMM operands, hidden states and
  // gradients w.r.t. the products in bfloat16 where the CPU has bfloat16
  // instructions (blas.h, native_bfloat16: bfloat16 GEMMs, float
  // accumulation; gates, cell states, statistics and saved activations stay
  // float). float16 upcasts to float (torch exports no fast float16 GEMM
  // for most CPUs).
  template <typename S>
  static constexpr bool kNativeStorage = std::is_same_v<S, c10::BFloat16>;
  static bool native_storage(at::ScalarType dtype) {
    return dtype == at::kBFloat16 && native_bfloat16();
  }
  // The LSTM's step kernel adds the bias to the pre-activations it loads:
  // the input projection as addmm first copied it into every row of the
  // [N, 4H] gates (a pass over memory as large as the product's output)
  // and made the GEMM read them back.
  static constexpr bool kBiasInStep = true;

  // An evaluating LSTM projects its input a block of about 1 MiB of gates
  // at a time, just before those steps, where its input weight is small
  // enough (<= 256 KiB) to be read again for every block: the block's
  // gates are then still in cache when the steps read them, instead of
  // coming back from memory. Measured on the 2-core Xeon (interleaved,
  // medians of 45): T=100 B=64 I=H=128 7.70 -> 6.80 ms; with H=256 (a
  // 1 MiB weight) blocks were slower (23.0 -> 23.9 ms).
  static constexpr int64_t kInputBlockBytes = int64_t{1} << 20;
  static constexpr int64_t kInputBlockMaxWeightBytes = int64_t{256} << 10;
  static int64_t input_block_rows(int64_t row_bytes, int64_t weight_bytes) {
    if (weight_bytes > kInputBlockMaxWeightBytes) return 0;
    return kInputBlockBytes / row_bytes;
  }
  // The input projection of a few rows (a one-step call's, at most
  // step_gemm::kMaxStoredRows): a float weight used once, read where it
  // lies by rnnfast's one-use product (blas.h, multiply_once) instead of
  // MKL's plain product through ATen.
  //
  // A one-step evaluating call of a bfloat16 op that computes in float (a
  // streaming decode's step on a CPU without bfloat16 instructions) keeps
  // its input and recurrent weights in bfloat16 (op_impls.h), read in place
  // by the one-use products: here (multiply_once of a bfloat16 weight) and
  // by StepWeight<float>'s bfloat16 form (kBf16WeightInPlace), instead of
  // both converted to float at every call. On the AMD EPYC that conversion
  // was 39 us for each [1024, 256] weight, four of them in a two-layer
  // H=256 decode step of 0.39 ms. Only for steps of rows the one-use
  // product takes (stored_product_runs); the results are the same, bit
  // for bit (step_gemm.h, multiply_stored_bf16_weight).
  static constexpr bool kBf16WeightInPlace = true;
  static at::ScalarType one_step_weight_dtype(at::ScalarType dtype,
                                              at::ScalarType sdt,
                                              int64_t rows) {
    return dtype == at::kBFloat16 && sdt == at::kFloat &&
                   stored_product_runs(rows)
               ? at::kBFloat16
               : sdt;
  }
  // The products over many rows (matmul_into, input_projection, W_ih's
  // blocks) on oneDNN where it was measured faster than the BLAS here
  // (blas.h, bulk_product).
  static bool bulk_product(const at::Tensor& c, const at::Tensor& a,
                           const at::Tensor& b, bool accumulate,
                           bool steady) {
    return cpu::bulk_product(c, a, b, accumulate, steady);
  }
  template <typename S>
  static bool bulk_product_runs() {
    return std::is_same_v<S, float> && cpu::bulk_product_runs();
  }
  static bool small_input_projection(at::Tensor& out, const at::Tensor& x,
                                     const at::Tensor& weight,
                                     const at::Tensor& bias) {
    const int64_t m = x.size(0), k = x.size(1);
    if (weight.scalar_type() == at::kBFloat16 &&
        x.scalar_type() == at::kFloat) {  // one_step_weight_dtype's
      TORCH_INTERNAL_ASSERT(x.stride(1) == 1 && weight.is_contiguous() &&
                            out.is_contiguous() &&
                            out.scalar_type() == at::kFloat &&
                            (!bias.defined() ||
                             (bias.scalar_type() == at::kFloat &&
                              bias.is_contiguous())));
      multiply_once(nullptr, m, weight.size(0), k, x.data_ptr<float>(),
                    x.stride(0), weight.data_ptr<c10::BFloat16>(),
                    weight.size(1),
                    bias.defined() ? bias.data_ptr<float>() : nullptr, 0.0f,
                    out.data_ptr<float>(), out.size(1));
      return true;
    }
    if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat ||
        out.scalar_type() != at::kFloat || k == 0 ||
        !stored_product_runs(m) || x.stride(1) != 1 ||
        (m > 1 && x.stride(0) < k) || weight.stride(1) != 1 ||
        (weight.size(0) > 1 && weight.stride(0) < k) || !out.is_contiguous()) {
      return false;
    }
    if (bias.defined() &&
        (bias.scalar_type() != at::kFloat || !bias.is_contiguous())) {
      return false;
    }
    multiply_once(nullptr, m, weight.size(0), k, x.data_ptr<float>(),
                  x.stride(0), weight.data_ptr<float>(), weight.stride(0),
                  bias.defined() ? bias.data_ptr<float>() : nullptr, 0.0f,
                  out.data_ptr<float>(), out.size(1));
    return true;
  }
  // Workspaces and saved activations come from the CPU buffer cache.
  static at::Tensor empty_activation(at::IntArrayRef sizes,
                                     const at::TensorOptions& options) {
    return cpu::empty_activation(sizes, options);
  }

  template <bool Training, bool ZoneoutCell, typename T, typename S>
  static void forward_step(const ForwardStepParams<T, S>& p) {
    kernels<T, S>().forward_step[Training][ZoneoutCell](p);
  }
  // The recurrent steps of both cells. With enough rows for every thread,
  // one parallel region split by batch rows: each thread multiplies its
  // rows of h_{t-1} by the whole (packed) W_hh on its own and runs the cell
  // on those rows while their gates are in its cache: one fork/join per
  // step instead of two (the multithreaded GEMM's and the pointwise
  // pass's), and no gate read back by the other core. Otherwise the product
  // (multithreaded when large), then the row-parallel pointwise pass. (In
  // a loop run in row groups, below, each thread runs its group's rows of
  // every step this way, on its own.)
  //
  // Rows per thread of a step of `rows` rows split so, or 0: run it whole.
  template <typename S>
  static int64_t row_split_grain(const StepWeight<S>& whh, int64_t rows) {
    const int64_t grain = whh.row_split_rows();
    if (grain <= 0 || rows < 2 * grain || at::get_num_threads() < 2 ||
        at::in_parallel_region()) {
      return 0;
    }
    return grain;
  }
  // The most rows a thread gets from at::parallel_for(0, rows, grain).
  static int64_t rows_per_thread(int64_t rows, int64_t grain) {
    const int64_t parts = std::min<int64_t>(at::get_num_threads(),
                                            (rows + grain - 1) / grain);
    return (rows + parts - 1) / parts;
  }
  // ---- Small batches: a team of threads for a run of steps ----------------
  //
  // Below the row split's batch the steps used to run on one thread (a
  // region's fork and join per step cost more than half a small step
  // saved). There, a StepTeam (step_team.h) is held for the whole run of
  // steps instead, and each step hands parts to it: the LSTM's forward
  // splits by hidden units (each part its units' columns of the four gates,
  // then the cell on them: one hand-off, and the gates stay in their
  // core's cache); the LayerNorm-LSTM's forward, whose normalisations need
  // whole rows, splits the product by columns and then the cell by rows;
  // both backwards split the pointwise step by rows and then the product
  // dh_{t-1} = d W_hh by columns. Used where the product has at least
  // kTeamMacsPerThread multiply-adds per thread at the run's largest step,
  // on float weights for which rnnfast's own product is the measured (or
  // forced) choice (its packed panels split by columns; the BLAS's packed
  // form cannot be split).
  // Every value is computed as on one thread (a column of the product is
  // the same sum wherever it runs, a row or unit the same kernel), except
  // that the own product stands in for a BLAS product a measurement may
  // have chosen (blas.h), and the LayerNorm-LSTM's parameter-gradient sums
  // are kept per part (as per thread with the row split). Measured on the
  // 2-core Xeon, one process alternating RNNFAST_CPU_STEP_TEAM=0 and on
  // (medians of 7 rounds), float32: T=200 B=4 H=128 inference 0.86x the
  // time (LSTM), 0.91x (LayerNorm-LSTM); T=100 B=16 H=128 inference 0.82x;
  // training 0.95-0.99x at B=4 H=128, 0.87x at B=16 H=128, 0.90-0.93x at
  // B=4 H=256. A hand-off costs ~0.5 us there (the lead's wait after its
  // own part); at B=2 H=128 (half the multiply-adds of B=4) teams of two
  // were no faster, hence the threshold.
  static constexpr int64_t kTeamMacsPerThread = int64_t{1} << 17;
  // Threads of a team for steps of at most `rows` rows through whh, or 0:
  // none. Not under torch.use_deterministic_algorithms(True), whose steps
  // run the BLAS's product unmeasured (prepare_column_split).
  template <typename S>
  static int team_size(const StepWeight<S>& whh, int64_t rows, int64_t steps) {
    if constexpr (!std::is_same_v<S, float>) {
      return 0;
    } else {
      const int threads = at::get_num_threads();
      if (steps < 2 || threads < 2 || at::in_parallel_region() ||
          team_disabled()) {
        return 0;
      }
      const int64_t grain = whh.row_split_rows();
      if (grain > 0 && rows >= 2 * grain) return 0;  // split by rows instead
      const int64_t macs = rows * whh.columns() * whh.depth();
      // No more threads than the finest split has parts: the H / 16 units
      // or column panels of H (the forward's weight is [4H, H], the
      // backward's [H, 4H]), so that no helper waits out the run unused.
      const int64_t parts =
          std::min(whh.columns(), whh.depth()) / step_gemm::kPanelCols;
      const int64_t size = std::min<int64_t>(
          {threads, macs / kTeamMacsPerThread, parts, StepTeam::kMaxSize});
      if (size < 2 || !whh.prepare_column_split()) return 0;
      return static_cast<int>(size);
    }
  }
  // RNNFAST_CPU_STEP_TEAM=0 turns teams off (read per call, for tests and
  // comparisons).
  static bool team_disabled() {
    const char* e = std::getenv("RNNFAST_CPU_STEP_TEAM");
    return e != nullptr && e[0] == '0';
  }
  // step(i) for i in [0, steps), the steps of a time loop whose recurrent
  // weight is whh and whose steps have at most `rows` rows and call what
  // `loop` says: unless kMixed, in row groups (group_count) or on a team
  // (team_size) where one pays, else in order on this thread.
  template <typename S, typename F>
  static void run_steps(const StepWeight<S>& whh, int64_t rows,
                        int64_t steps, StepLoop loop, const F& step) {
    const auto run = [&] {
      for (int64_t i = 0; i < steps; ++i) step(i);
    };
    if (loop == StepLoop::kMixed) {
      run();
      return;
    }
    const int groups = group_count(whh, rows, steps);
    int size = 0;
    if (groups < 2 || (loop == StepLoop::kLstmForward && rows / groups < 4)) {
      size = team_size(whh, rows, steps);
    }
    if (size >= 2) {
      StepTeam::run(size, run);
    } else if (groups >= 2) {
      // Packed now, on this thread (a second use packs), for products of a
      // group's rows on its thread, so that the groups only read it.
      whh.split_products((rows + groups - 1) / groups);
      whh.prepare_use();
      whh.prepare_use();
      at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
        for (int64_t g = first; g < last; ++g) {
          const RowGroup group{rows * g / groups, rows * (g + 1) / groups,
                               static_cast<int>(g)};
          const GroupScope scope(group);
          run();
        }
      });
      count_group_run(groups);
    } else {
      run();
    }
  }
  // ---- Small batches: the rows in groups, one time loop each -------------
  //
  // The rows of a batch are independent through the whole recurrence: row
  // r of h_t needs row r of h_{t-1} only, and row r of dh_{t-1} row r of
  // the step's gradients. So instead of a team's hand-offs at every step,
  // or the row split's parallel region per step, the rows are cut into
  // groups, one per thread, and each thread runs the whole time loop over
  // its group's rows with no exchange between threads until the loop ends
  // (one region per loop): its rows' product through the whole (packed)
  // W_hh on its own, then their cell. The driver's step runs on every
  // thread; the recurrent steps and the zoneout passes see this thread's
  // group (current_group) and keep to its rows of each step (a packed step
  // may have none of them). Every row is computed as the row split
  // computes it (its product on its thread through the same packed
  // weight); the backward's parameter-gradient sums (the LSTM's bias, the
  // LayerNorm parameters) are kept per group. No thread waits for another
  // within the loop, so more threads than free cores (other processes)
  // only share the cores.
  struct RowGroup {
    int64_t begin, end;  // rows [begin, end) of every step
    int task;            // the group's index: its rows of parameter sums
  };
  static const RowGroup*& current_group() {
    thread_local const RowGroup* group = nullptr;
    return group;
  }
  class GroupScope {
   public:
    explicit GroupScope(const RowGroup& group) { current_group() = &group; }
    ~GroupScope() { current_group() = nullptr; }
    GroupScope(const GroupScope&) = delete;
    GroupScope& operator=(const GroupScope&) = delete;
  };
  // This thread's group's rows of a step of `rows` rows, as [begin, end)
  // (begin == end: none of them).
  static std::pair<int64_t, int64_t> group_rows(const RowGroup& g,
                                                int64_t rows) {
    return {std::min(g.begin, rows), std::min(g.end, rows)};
  }
  // Groups for a loop's steps of at most `rows` rows, or 0: none. Each
  // group's thread reads all of W_hh at every step (a team's part reads
  // its share), so groups are used where that read stays in the core's
  // cache and is repaid by the group's rows: a weight of at most half the
  // L2 cache (1 MiB on the Xeon) and at most kGroupWeightBytesPerRow per
  // row of the smallest group, or where the row split reads it so anyway
  // (below). Measured on the 2-core Xeon, float32, one
  // process per setting alternating with RNNFAST_CPU_ROW_GROUPS=0 (p10 of
  // 40 calls, 3-4 rounds), the time with groups over that without:
  //   H=128 (256 KiB): B=2 0.94x (inference), 0.95x (training); B=8
  //     0.87x, 0.87x, LayerNorm-LSTM training 0.82x; B=16 0.86x, 0.84x,
  //     0.88x; B=32 ~0.9x; B=64 ~0.96x, 0.9x, 0.9x (the row split's
  //     region per step);
  //   H=256 (1 MiB): B=8 0.95x, 0.96x, 0.93x; B=16 0.84x, 0.92x; B=64
  //     0.91x (inference), 1.0x (training, whose backward was not split);
  //   but B=2 and B=4 at H=256 (512 KiB a row and more) 1.07-1.2x, and
  //     B=8 at H=512 (a 4 MiB weight) 1.33x, where a team's column split
  //     reads half the weight each.
  // The LSTM's forward keeps its team below 4 rows a group: its team
  // splits a step by hidden units with one hand-off (the others need two),
  // and at B=4 H=128 the groups took 1.1x its time (the LayerNorm-LSTM
  // 0.87x in training, 0.90x evaluating).
  // Where the row split would run the loop's largest steps (at least
  // twice its rows per thread), groups run whatever the weight's size: each
  // of the split's threads reads the whole weight at every step too, so the
  // cache bound above only spared it the groups' gain. On the AMD EPYC
  // (Zen 3, 512 KiB of L2 a core, so a 1 MiB weight had been refused; one
  // process alternating RNNFAST_CPU_ROW_GROUPS=0 and on, medians of 18-30
  // calls) the time with groups over that with the split: T=100 B=64 H=256
  // LayerNorm-LSTM training 0.91x, inference 0.97x; LSTM T=50 B=64 H=512
  // 0.96x, 0.97x; T=100 B=32 H=256 0.98x, 0.99x; two bidirectional layers
  // at B=32 H=256 0.95x, 0.94x; LSTM T=100 B=64 H=256 0.98-1.02x.
  static constexpr int64_t kGroupWeightBytesPerRow = int64_t{256} << 10;
  static int64_t group_max_weight_bytes() {
    static const int64_t bytes = [] {
      const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
      return l2 > 0 ? int64_t{l2} / 2 : int64_t{1} << 20;
    }();
    return bytes;
  }
  template <typename S>
  static int group_count(const StepWeight<S>& whh, int64_t rows,
                         int64_t steps) {
    const int threads = at::get_num_threads();
    if (steps < 2 || threads < 2 || at::in_parallel_region() ||
        groups_disabled()) {
      return 0;
    }
    const int64_t groups = std::min<int64_t>(threads, rows);
    if (groups < 2) return 0;
    // Where the row split would run the loop's largest steps, each of its
    // threads reads the whole weight at every step too: groups read it
    // alike, without the split's parallel region per step, whatever its
    // size.
    const int64_t grain = whh.row_split_rows();
    if (grain > 0 && rows >= 2 * grain) return static_cast<int>(groups);
    const int64_t w = whh.weight_bytes();
    if (w > group_max_weight_bytes() ||
        w > kGroupWeightBytesPerRow * (rows / groups)) {
      return 0;
    }
    return static_cast<int>(groups);
  }
  // RNNFAST_CPU_ROW_GROUPS=0 turns groups off (read per call, for tests
  // and comparisons).
  static bool groups_disabled() {
    const char* e = std::getenv("RNNFAST_CPU_ROW_GROUPS");
    return e != nullptr && e[0] == '0';
  }
  static void count_group_run(int groups);

  // f(begin, end, part) over [0, n) split into near-equal parts, one per
  // thread of the team (fewer when n is smaller): the rows, hidden units
  // or column panels of a step.
  template <typename F>
  static void team_split(StepTeam& team, int64_t n, const F& f) {
    const int parts = static_cast<int>(std::min<int64_t>(team.size(), n));
    team.parallel(parts, [&](int part) {
      f(n * part / parts, n * (part + 1) / parts, part);
    });
  }
  // StepWeight::multiply_panels as multiply_hidden_rows calls it.
  template <typename S>
  struct PanelRange {
    const StepWeight<S>& w;
    int64_t begin, end;
    template <typename C>
    void multiply(int64_t m, const S* a, int64_t lda, C beta, C* c,
                  int64_t ldc) const {
      w.multiply_panels(m, a, lda, beta, c, ldc, begin, end);
    }
  };
  // On a team: c[rows, ldc] = h_{t-1} W^T + beta c split by column panels,
  // then step_rows(begin, end, part) split by rows.
  template <typename S, typename C, typename F>
  static void team_multiply_then_step(StepTeam& team,
                                      const StepWeight<S>& whh,
                                      const PreviousHidden<S>& h, C beta,
                                      C* c, int64_t ldc, const F& step_rows) {
    team_split(team, whh.column_panels(), [&](int64_t begin, int64_t end, int) {
      multiply_hidden_rows(h, 0, h.rows(), PanelRange<S>{whh, begin, end},
                           beta, c, ldc);
    });
    team_split(team, h.rows(), step_rows);
  }

  // c[rows, ldc] = h_{t-1} W^T + beta c, then step_rows(begin, end, task):
  // on a team, split as above; else split by rows as above (step_rows on
  // the thread that computed rows [begin, end)) or, without enough rows,
  // the whole product and then step_rows(0, rows). task is the part of a
  // team's split, else -1 (the running thread's).
  template <typename S, typename C, typename F>
  static void multiply_then_step(const StepWeight<S>& whh,
                                 const PreviousHidden<S>& h, C beta, C* c,
                                 int64_t ldc, const F& step_rows) {
    // rows [begin, end) on the calling thread, in a group or a region
    const auto rows_here = [&](int64_t begin, int64_t end, int task) {
      multiply_hidden_rows(h, begin, end, OnThisThread<S>{whh}, beta,
                           c + begin * ldc, ldc);
      step_rows(begin, end, task);
    };
    if (const RowGroup* g = current_group()) {
      const auto [begin, end] = group_rows(*g, h.rows());
      if (begin < end) rows_here(begin, end, g->task);
      return;
    }
    if (StepTeam* team = StepTeam::current()) {
      team_multiply_then_step(*team, whh, h, beta, c, ldc, step_rows);
      return;
    }
    const int64_t grain = row_split_grain(whh, h.rows());
    if (grain == 0) {
      multiply_hidden_rows(h, 0, h.rows(), whh, beta, c, ldc);
      step_rows(0, h.rows(), -1);
      return;
    }
    whh.split_products(rows_per_thread(h.rows(), grain));
    whh.prepare_use();
    at::parallel_for(0, h.rows(), grain, [&](int64_t begin, int64_t end) {
      rows_here(begin, end, -1);  // a parallel_for inside a region runs inline
    });
  }
  // The rows [begin, end) of a forward step's parameters (either cell's:
  // the fields they share).
  template <typename P>
  static void offset_forward_rows(P& q, int64_t begin, int64_t end) {
    const int64_t H = q.hidden;
    q.rows = end - begin;
    q.cell_state += begin * H;
    if (q.cell_save) q.cell_save += begin * H;
    if (q.cell_state_save) q.cell_state_save += begin * H;
    if (q.zoneout.mask) q.zoneout.mask += begin * H;
  }
  // The LSTM's step: p.gates += h_{t-1} W_hh^T, then the cell.
  template <bool Training, bool ZoneoutCell, typename T, typename S>
  static void recurrent_forward_step(const StepWeight<S>& whh,
                                     const PreviousHidden<S>& h,
                                     const ForwardStepParams<T, S>& p) {
    const int64_t H = p.hidden, G = 4 * p.hidden;
    const auto step = kernels<T, S>().forward_step[Training][ZoneoutCell];
    StepTeam* team = StepTeam::current();
    if (team != nullptr && H % step_gemm::kPanelCols == 0) {
      // On a team, split by hidden units: each part computes its units'
      // columns of the four gates and runs the cell on them, so its gates
      // never leave its core and a step is one hand-off. (The
      // LayerNorm-LSTM's cell needs whole rows.)
      const int64_t unit_panels = H / step_gemm::kPanelCols;
      team_split(*team, unit_panels, [&](int64_t first, int64_t last, int) {
        for (int64_t k = 0; k < 4; ++k) {
          multiply_hidden_rows(
              h, 0, h.rows(),
              PanelRange<S>{whh, k * unit_panels + first,
                            k * unit_panels + last},
              T(1), p.gates, G);
        }
        ForwardStepParams<T, S> q = p;
        q.unit_begin = first * step_gemm::kPanelCols;
        q.unit_end = last * step_gemm::kPanelCols;
        step(q);
      });
      return;
    }
    multiply_then_step(whh, h, T(1), p.gates, G,
                       [&](int64_t begin, int64_t end, int) {
                         ForwardStepParams<T, S> q = p;
                         offset_forward_rows(q, begin, end);
                         q.gates += begin * G;
                         q.hidden_out += begin * H;
                         step(q);
                       });
  }
  // The LayerNorm-LSTM's step: p.hh = h_{t-1} W_hh^T, then the cell.
  template <bool Training, bool ZoneoutCell, typename T, typename S>
  static void recurrent_layer_norm_forward_step(
      const StepWeight<S>& whh, const PreviousHidden<S>& h,
      const LayerNormStepParams<T, S>& p) {
    const int64_t H = p.hidden, G = 4 * p.hidden;
    const auto step =
        kernels<T, S>().layer_norm_forward_step[Training][ZoneoutCell];
    multiply_then_step(whh, h, T(0), p.hh, G,
                       [&](int64_t begin, int64_t end, int) {
                         LayerNormStepParams<T, S> q = p;
                         offset_forward_rows(q, begin, end);
                         q.ih += begin * G;
                         q.hh += begin * G;
                         if (q.stats) q.stats += begin * kStatsWidth;
                         q.h_out += begin * H;
                         step(q);
                       });
  }
  // StepWeight::multiply_on_this_thread as multiply_hidden_rows calls it.
  template <typename S>
  struct OnThisThread {
    const StepWeight<S>& w;
    template <typename C>
    void multiply(int64_t m, const S* a, int64_t lda, C beta, C* c,
                  int64_t ldc) const {
      w.multiply_on_this_thread(m, a, lda, beta, c, ldc);
    }
  };
  template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
  static void backward_step(const BackwardStepParams<T, S>& p) {
    kernels<T, S>().backward_step[AddOutputGrad][ZoneoutCell](p);
  }
  // The backward steps of both cells, mirroring the forward: the step's
  // pointwise backward, then dh_{t-1} = d W_hh + beta dh_{t-1} (d: the
  // gradient w.r.t. the recurrent product). Both are row by row, so with
  // enough rows each thread runs its rows' pointwise backward and then
  // their product with the whole packed W_hh, in one parallel region.
  // step_rows(begin, end) runs the pointwise backward of rows [begin, end).
  // Only for a W_hh of at most 512 KiB: interleaved on the 2-core Xeon
  // (medians of 6 rounds), T=100 B=64 training with the split went 22.4 ->
  // 21.0 ms (LSTM) and 27.6 -> 26.1 ms (LayerNorm-LSTM) at H=128 (a 256 KiB
  // W_hh), but 69.7 -> 70.6 ms at H=256 (1 MiB), where each thread's
  // product reads all of W_hh instead of half.
  // (A bfloat16 W_hh of H=256 is 512 KiB too; not measured apart.)
  static constexpr int64_t kBackwardSplitMaxWeightBytes = int64_t{512} << 10;
  template <typename S, typename T, typename F>
  static void backward_then_multiply(const StepWeight<S>& whh, int64_t rows,
                                     const S* d, int64_t ldd, T beta,
                                     T* grad_prev, int64_t ld,
                                     const F& step_rows) {
    // rows [begin, end) on the calling thread, in a group or a region
    const auto rows_here = [&](int64_t begin, int64_t end, int task) {
      step_rows(begin, end, task);
      whh.multiply_on_this_thread(end - begin, d + begin * ldd, ldd, beta,
                                  grad_prev + begin * ld, ld);
    };
    if (const RowGroup* g = current_group()) {
      const auto [begin, end] = group_rows(*g, rows);
      if (begin < end) rows_here(begin, end, g->task);
      return;
    }
    if (StepTeam* team = StepTeam::current()) {
      // On a team: the rows split, then the product split by columns.
      team_split(*team, rows, step_rows);
      team_split(*team, whh.column_panels(), [&](int64_t begin, int64_t end, int) {
        whh.multiply_panels(rows, d, ldd, beta, grad_prev, ld, begin, end);
      });
      return;
    }
    const int64_t grain =
        whh.weight_bytes() <= kBackwardSplitMaxWeightBytes
            ? row_split_grain(whh, rows)
            : 0;
    if (grain == 0) {
      step_rows(0, rows, -1);
      whh.multiply(rows, d, ldd, beta, grad_prev, ld);
      return;
    }
    whh.split_products(rows_per_thread(rows, grain));
    whh.prepare_use();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      rows_here(begin, end, -1);  // a parallel_for inside a region runs inline
    });
  }
  // The rows [begin, end) of a backward step's parameters (either cell's:
  // the fields they share).
  template <typename P>
  static void offset_backward_rows(P& q, int64_t begin, int64_t end) {
    const int64_t H = q.hidden, G = 4 * q.hidden;
    q.rows = end - begin;
    q.rows_from_previous =
        std::clamp<int64_t>(q.rows_from_previous - begin, 0, q.rows);
    if (q.cell_prev) q.cell_prev += begin * H;
    q.cell += begin * H;
    q.cell_init += begin * H;
    q.grad_hidden += begin * H;
    if (q.grad_output) q.grad_output += begin * H;
    q.dcell_state += begin * H;
    q.dgates += begin * G;
    if (q.zoneout.mask) q.zoneout.mask += begin * H;
  }
  template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
  static void recurrent_backward_step(const StepWeight<S>& whh,
                                      const BackwardStepParams<T, S>& p,
                                      T beta, T* grad_prev, int64_t ld) {
    const auto step = kernels<T, S>().backward_step[AddOutputGrad][ZoneoutCell];
    backward_then_multiply(whh, p.rows, p.dgates, 4 * p.hidden, beta,
                           grad_prev, ld,
                           [&](int64_t begin, int64_t end, int task) {
                             BackwardStepParams<T, S> q = p;
                             q.bias_grad_task = task;
                             offset_backward_rows(q, begin, end);
                             q.gates += begin * 4 * p.hidden;
                             step(q);
                           });
  }
  template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
  static void recurrent_layer_norm_backward_step(
      const StepWeight<S>& whh, const LayerNormBackwardStepParams<T, S>& p,
      T beta, T* grad_prev, int64_t ld) {
    const auto step =
        kernels<T, S>().layer_norm_backward_step[AddOutputGrad][ZoneoutCell];
    const int64_t H = p.hidden, G = 4 * p.hidden;
    backward_then_multiply(whh, p.rows, p.dhh, G, beta, grad_prev, ld,
                           [&](int64_t begin, int64_t end, int task) {
                             LayerNormBackwardStepParams<T, S> q = p;
                             q.param_grad_task = task;
                             offset_backward_rows(q, begin, end);
                             q.normalized_ih += begin * G;
                             q.normalized_hh += begin * G;
                             q.stats += begin * kStatsWidth;
                             q.dcell_norm += begin * H;
                             q.dih += begin * G;
                             q.dhh += begin * G;
                             step(q);
                           });
  }
  template <bool Training, bool ZoneoutCell, typename T, typename S>
  static void layer_norm_forward_step(const LayerNormStepParams<T, S>& p) {
    kernels<T, S>().layer_norm_forward_step[Training][ZoneoutCell](p);
  }
  template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
  static void layer_norm_backward_step(
      const LayerNormBackwardStepParams<T, S>& p) {
    kernels<T, S>().layer_norm_backward_step[AddOutputGrad][ZoneoutCell](p);
  }
  // Zoneout on the hidden state (lstm_params.h): one pass over a step's
  // rows, which are in cache (B x P values), with the math of lstm_cell.h;
  // rows split between the threads as the step kernels split them.
  static int64_t zoneout_grain(int64_t width) {
    return std::max<int64_t>(1, (int64_t{1} << 12) / std::max<int64_t>(1, width));
  }
  // (In T; h is stored in S.)
  template <typename T, typename S>
  static void zoneout_hidden(const HiddenZoneoutParams<T, S>& params) {
    const int64_t P = params.width;
    HiddenZoneoutParams<T, S> p = params;
    if (const RowGroup* g = current_group()) {  // this group's rows only
      const auto [begin, end] = group_rows(*g, p.rows);
      p.rows = end - begin;
      p.rows_from_previous =
          std::clamp<int64_t>(p.rows_from_previous - begin, 0, p.rows);
      p.hidden += begin * P;
      if (p.hidden_prev) p.hidden_prev += begin * P;
      p.hidden_init += begin * P;
      if (p.mask) p.mask += begin * P;
    }
    at::parallel_for(0, p.rows, zoneout_grain(P), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const S* prev = row < p.rows_from_previous ? p.hidden_prev + row * P
                                                   : p.hidden_init + row * P;
        S* h = p.hidden + row * P;
        const bool* m = p.mask != nullptr ? p.mask + row * P : nullptr;
        for (int64_t j = 0; j < P; ++j) {
          const T a = m != nullptr ? static_cast<T>(m[j]) : p.rate;
          h[j] = static_cast<S>(zoneout(a, static_cast<T>(prev[j]),
                                        static_cast<T>(h[j])));
        }
      }
    });
  }
  template <typename T, typename S, typename C>
  static void zoneout_hidden_backward(
      const HiddenZoneoutBackwardParams<T, S, C>& params) {
    const int64_t P = params.width;
    HiddenZoneoutBackwardParams<T, S, C> p = params;
    if (const RowGroup* g = current_group()) {  // this group's rows only
      const auto [begin, end] = group_rows(*g, p.rows);
      p.rows = end - begin;
      p.grad_hidden += begin * P;
      p.grad_output += begin * P;
      p.grad_candidate += begin * P;
      if (p.mask) p.mask += begin * P;
    }
    at::parallel_for(0, p.rows, zoneout_grain(P), [&](int64_t begin, int64_t end) {
      for (int64_t e = begin * P; e < end * P; ++e) {
        const T a = p.mask ? static_cast<T>(p.mask[e]) : p.rate;
        const auto z = zoneout_backward(
            a, p.grad_hidden[e] + static_cast<T>(p.grad_output[e]));
        p.grad_candidate[e] = static_cast<C>(z.dcand);
        p.grad_hidden[e] = z.dprev;
      }
    });
  }
  // C[m, n] (+)= op(A) op(B), row-major; beta is 0 or 1. A and B in S, C
  // in S or (a bfloat16 op's float products) float.
  template <typename S, typename C>
  static void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n,
                   int64_t k, const S* a, int64_t lda, const S* b,
                   int64_t ldb, C beta, C* c, int64_t ldc) {
    if constexpr (std::is_same_v<S, C>) {
      cpu::gemm(trans_a, trans_b, m, n, k, C(1), a, lda, b, ldb, beta, c,
                ldc);
    } else {
      static_assert(std::is_same_v<S, c10::BFloat16> &&
                    std::is_same_v<C, float>);
      cpu::gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
    }
  }
  template <typename T>
  static void copy(T* dst, const T* src, int64_t count) {
    std::memcpy(dst, src, sizeof(T) * count);
  }
  template <typename T>
  static void copy_rows(const RowCopy* copies, int64_t count, int64_t width,
                        T* dst, const T* src_a, const T* src_b) {
    for (int64_t i = 0; i < count; ++i) {
      const RowCopy& c = copies[i];
      std::memcpy(dst + c.dst_row * width,
                  (c.from_second ? src_b : src_a) + c.src_row * width,
                  sizeof(T) * c.rows * width);
    }
  }
  template <typename T, typename S>
  static void add(S* dst, const T* a, const S* b, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
      dst[i] = static_cast<S>(a[i] + static_cast<T>(b[i]));
    }
  }
};

namespace {
// Time loops run in row groups so far, by the number of groups.
std::mutex group_runs_mutex;
std::vector<int64_t>& group_runs() {
  static std::vector<int64_t> runs;
  return runs;
}
}  // namespace

void CpuBackend::count_group_run(int groups) {
  std::lock_guard<std::mutex> lock(group_runs_mutex);
  std::vector<int64_t>& runs = group_runs();
  if (runs.size() <= static_cast<size_t>(groups)) runs.resize(groups + 1);
  ++runs[groups];
}

void zoneout_hidden_rows(const HiddenZoneoutParams<float>& p) {
  CpuBackend::zoneout_hidden(p);
}

}  // namespace rnnfast::cpu

namespace rnnfast {
const char* cpu_kernels_in_use() { return cpu::kernel_table().capability; }
const char* cpu_gemm_in_use() { return cpu::gemm_backend(); }
bool cpu_native_bfloat16() { return cpu::native_bfloat16(); }
const char* cpu_bf16_step_gemm() { return cpu::bf16_step_gemm(); }
std::vector<StepGemmChoice> cpu_step_gemm_choices() {
  return cpu::step_gemm_choices();
}
BulkGemmChoice cpu_bulk_gemm_choice() { return cpu::bulk_gemm_choice(); }
std::vector<int64_t> cpu_step_team_runs() {
  return cpu::StepTeam::runs_by_size();
}
std::vector<int64_t> cpu_row_group_runs() {
  std::lock_guard<std::mutex> lock(cpu::group_runs_mutex);
  return cpu::group_runs();
}
const char* cpu_step_gemm_kernels() {
  const char* k = cpu::step_gemm::kernels_in_use();
  return k != nullptr ? k : "none";
}
template <typename T>
CpuStepProduct<T>::CpuStepProduct(const std::string& path, int64_t max_rows,
                                  int64_t n, int64_t k, intptr_t b,
                                  int64_t ldb, bool trans_b) {
  if constexpr (std::is_same_v<T, float>) {
    TORCH_CHECK(path == "auto" || path == "blas" || path == "rnnfast",
                "path must be 'auto', 'blas' or 'rnnfast', got '", path, "'");
    TORCH_CHECK(path != "rnnfast" || cpu::step_gemm::kernels_in_use() != nullptr,
                "rnnfast's step product needs AVX2 or AVX-512");
    TORCH_CHECK(path != "rnnfast" || max_rows <= cpu::step_gemm::kMaxRows,
                "rnnfast's step product takes at most ",
                cpu::step_gemm::kMaxRows, " rows, got ", max_rows);
  } else {
    TORCH_CHECK(path == "auto" || path == "blas",
                "path must be 'auto' or 'blas', got '", path, "'");
  }
  TORCH_CHECK(max_rows >= 1 && n >= 1 && k >= 1,
              "a step product needs positive sizes, got ", max_rows, "x", n,
              "x", k);
  weight_ = std::make_unique<cpu::StepWeight<T>>(
      trans_b, max_rows, n, k, reinterpret_cast<const T*>(b), ldb,
      path == "auto" ? nullptr : path.c_str());
  weight_->prepare_use();  // a time loop's first step: the next use packs
}
template <typename T>
CpuStepProduct<T>::~CpuStepProduct() = default;
template <typename T>
void CpuStepProduct<T>::multiply(int64_t m, intptr_t a, int64_t lda,
                                 float beta, intptr_t c, int64_t ldc) const {
  const int64_t max_rows = weight_->max_rows();
  TORCH_CHECK(m >= 1 && m <= max_rows, "expected 1 to ", max_rows,
              " rows, got ", m);
  TORCH_CHECK(beta == 0.0f || beta == 1.0f, "beta must be 0 or 1, got ", beta);
  weight_->multiply(m, reinterpret_cast<const T*>(a), lda, beta,
                    reinterpret_cast<float*>(c), ldc);
}
template <typename T>
std::string CpuStepProduct<T>::path() const { return weight_->packed_path(); }
template <typename T>
bool CpuStepProduct<T>::threaded() const { return weight_->threaded(); }
template class CpuStepProduct<float>;
template class CpuStepProduct<c10::BFloat16>;

int64_t cpu_one_use_products() { return cpu::one_use_products_run(); }

namespace {
// The checks of both one-use product bindings: `runs` says whether
// rnnfast's product (of `what`, needing `needs`) runs m rows here, for
// path "rnnfast". Returns the path for cpu::multiply_once.
const char* one_use_path(const std::string& path, int64_t m, int64_t n,
                         int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                         float beta, bool (*runs)(int64_t, const char*),
                         const char* what, const char* needs,
                         int64_t max_rows) {
  TORCH_CHECK(path == "auto" || path == "blas" || path == "rnnfast",
              "path must be 'auto', 'blas' or 'rnnfast', got '", path, "'");
  TORCH_CHECK(m >= 1 && n >= 1 && k >= 1,
              "a one-use product needs positive sizes, got ", m, "x", n, "x",
              k);
  TORCH_CHECK(path != "rnnfast" || runs(m, "rnnfast"), "rnnfast's ", what,
              " needs ", needs, " and at most ", max_rows, " rows, got ", m);
  TORCH_CHECK(lda >= k && ldb >= k && ldc >= n, "strides below the sizes");
  TORCH_CHECK(beta == 0.0f || beta == 1.0f, "beta must be 0 or 1, got ", beta);
  return path == "auto" ? nullptr : path.c_str();
}
}  // namespace

std::string cpu_multiply_once(const std::string& path, int64_t m, int64_t n,
                              int64_t k, intptr_t a, int64_t lda, intptr_t b,
                              int64_t ldb, intptr_t bias, float beta,
                              intptr_t c, int64_t ldc) {
  const char* p = one_use_path(path, m, n, k, lda, ldb, ldc, beta,
                               &cpu::stored_product_runs, "one-use product",
                               "AVX2 or AVX-512",
                               cpu::step_gemm::kMaxStoredRows);
  return cpu::multiply_once(
      p, m, n, k, reinterpret_cast<const float*>(a), lda,
      reinterpret_cast<const float*>(b), ldb,
      reinterpret_cast<const float*>(bias), beta, reinterpret_cast<float*>(c),
      ldc);
}

std::string cpu_multiply_once_bf16(const std::string& path, int64_t m,
                                   int64_t n, int64_t k, intptr_t a,
                                   int64_t lda, intptr_t b, int64_t ldb,
                                   float beta, intptr_t c, int64_t ldc) {
  const char* p = one_use_path(path, m, n, k, lda, ldb, ldc, beta,
                               &cpu::stored_bf16_product_runs,
                               "bfloat16 one-use product", "AVX512-BF16",
                               cpu::step_gemm::kMaxStoredBf16Rows);
  return cpu::multiply_once(p, m, n, k,
                            reinterpret_cast<const c10::BFloat16*>(a), lda,
                            reinterpret_cast<const c10::BFloat16*>(b), ldb,
                            beta, reinterpret_cast<float*>(c), ldc);
}

bool cpu_op_conversion(intptr_t src, const std::string& from, intptr_t dst,
                       const std::string& to, int64_t n) {
  auto dtype = [](const std::string& name) {
    if (name == "float32") return at::kFloat;
    if (name == "bfloat16") return at::kBFloat16;
    TORCH_CHECK(name == "float16", "expected float32, bfloat16 or float16, got '",
                name, "'");
    return at::kHalf;
  };
  TORCH_CHECK(n >= 0, "expected a count of elements, got ", n);
  const at::ScalarType f = dtype(from), t = dtype(to);
  const at::Tensor in = at::from_blob(reinterpret_cast<void*>(src), {n},
                                      at::TensorOptions().dtype(f));
  const bool own = small_cpu_conversion(in, t);
  at::from_blob(reinterpret_cast<void*>(dst), {n}, at::TensorOptions().dtype(t))
      .copy_(as_compute(in, t));
  return own;
}

int64_t release_cpu_buffer_cache() { return cpu::empty_activation_cache(); }
int64_t cpu_buffer_cache_bytes() { return cpu::activation_cache_bytes(); }
}  // namespace rnnfast

TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("lstm_forward", &rnnfast::lstm_forward_op<rnnfast::cpu::CpuBackend>);
  m.impl("lstm_backward",
         &rnnfast::lstm_backward_op<rnnfast::cpu::CpuBackend>);
  m.impl("layer_norm_lstm_forward",
         &rnnfast::layer_norm_lstm_forward_op<rnnfast::cpu::CpuBackend>);
  m.impl("layer_norm_lstm_backward",
         &rnnfast::layer_norm_lstm_backward_op<rnnfast::cpu::CpuBackend>);
}
