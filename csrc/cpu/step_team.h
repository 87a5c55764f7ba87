// A team of threads held for a run of time steps, so that each step of a
// small batch can split its work over the cores without the fork and join
// of a parallel region per step.
//
// Why: below the batch at which an LSTM step splits its rows over the
// threads in one parallel region (cpu_backend.cpp), a step ran on one
// thread: forking a region for its recurrent product and again for its
// pointwise rows cost more than it saved (at batch 4 and H 128 a
// [4, 128] x [128, 512] product takes ~3.7 us on the 2-core Xeon; a bare
// OpenMP region's fork and join 0.8 us there, at::parallel_for's more;
// the LayerNorm-LSTM's cell split so was 10% slower), while the other core
// spun idle in OpenMP's wait. A team forks one region for the whole run of
// steps: the calling thread (the lead) runs the time loop, the others wait
// in a spin for work, and each split of a step costs one hand-off through
// a cache line per helper (the lead waits ~0.5 us after its own part
// there).
//
// Work is handed out in parts: parallel(parts, f) runs f(0) .. f(parts - 1)
// once each and returns when all have run. Part 0 runs on the lead; part i
// on helper i if that helper takes it before the lead is done with its own
// part, else on the lead, which takes back every part no helper has
// started. So what a part computes must not depend on the thread that runs
// it (the callers split products by columns and pointwise steps by rows or
// hidden units, each part's results computed alike wherever it runs; sums
// are kept per part, not per thread), and a helper that is late,
// descheduled before it takes its part (more threads than free cores:
// other processes) or never started (a region given fewer threads) slows
// a step but does not stall it. (One descheduled after taking a part does:
// the lead waits for that part, yielding its core.) A helper whose parts
// the lead had to take back kRetireAfter calls in a row is let go for the
// rest of the run (its core is better left to whatever keeps it busy): its
// parts then run on the lead without a hand-off.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <vector>

namespace rnnfast::cpu {

class StepTeam {
 public:
  // The most threads a team holds.
  static constexpr int kMaxSize = 16;

  // Runs body() on the calling thread with a team of `size` threads (the
  // caller and size - 1 helpers, from one ATen parallel region) available
  // through current() for the duration. size must be >= 2 and at most
  // at::get_num_threads(); not from inside a parallel region.
  static void run(int size, const std::function<void()>& body);

  // The team led by this thread, inside run()'s body; else null.
  static StepTeam* current();

  int size() const { return size_; }

  // How many runs of steps held a team of each size so far in this process
  // (runs[size], size 0 .. kMaxSize): rnnfast.build_info()'s
  // cpu_step_teams, so that tests and the benchmark can tell a team ran.
  static std::vector<int64_t> runs_by_size();

  // f(part) for every part in [0, parts), parts <= size(); see above.
  template <typename F>
  void parallel(int parts, const F& f) {
    if (parts <= 1) {
      if (parts == 1) f(0);
      return;
    }
    run_parts(parts, &invoke<F>, const_cast<void*>(static_cast<const void*>(&f)));
  }

  // Internal (step_team.cpp). Public for the helpers' entry point only.
  explicit StepTeam(int size);
  void serve(int helper);
  void finish();

 private:
  template <typename F>
  static void invoke(void* f, int part) {
    (*static_cast<const F*>(f))(part);
  }
  void run_parts(int parts, void (*fn)(void*, int), void* ctx);

  // Per helper, one cache line: the state of its part of the current
  // call, as the call's sequence number << 2 | phase, or kFinished.
  static constexpr uint64_t kPosted = 1, kTaken = 2, kDone = 3;
  static constexpr uint64_t kFinished = ~uint64_t{0};
  struct alignas(64) Slot {
    std::atomic<uint64_t> state{0};
  };
  static constexpr int kRetireAfter = 32;

  int size_;
  uint64_t sequence_ = 0;  // the lead's count of parallel() calls
  // The work of the current call, written by the lead before it posts.
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  std::unique_ptr<Slot[]> slots_;  // [size - 1], helper i at i - 1
  // The lead's record per helper: parts taken back in a row, and whether
  // it has been let go.
  std::unique_ptr<int[]> misses_;
  uint32_t retired_ = 0;  // bit i: helper i
  std::exception_ptr error_;       // a helper's part's exception
  std::atomic<bool> failed_{false};
};

}  // namespace rnnfast::cpu
