// StepTeam (step_team.h).
#include "step_team.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <thread>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace rnnfast::cpu {

namespace {

thread_local StepTeam* current_team = nullptr;

std::atomic<int64_t> team_runs[StepTeam::kMaxSize + 1];

// A wait in a spin: pause, and after ~100 us of it yield the core at each
// turn, so that a team whose threads outnumber the free cores (other
// processes, a region nested in a busy pool) still makes progress at the
// scheduler's pace instead of spinning away the partner's time slices.
class Spin {
 public:
  void wait() {
    if (turns_ < kPauses) {
      ++turns_;
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#elif defined(__aarch64__)
      __asm__ __volatile__("yield");
#endif
    } else {
      std::this_thread::yield();
    }
  }
  void reset() { turns_ = 0; }

 private:
  static constexpr int kPauses = 2000;
  int turns_ = 0;
};

}  // namespace

StepTeam::StepTeam(int size)
    : size_(size), slots_(new Slot[size - 1]), misses_(new int[size - 1]()) {}

StepTeam* StepTeam::current() { return current_team; }

std::vector<int64_t> StepTeam::runs_by_size() {
  std::vector<int64_t> runs(kMaxSize + 1);
  for (int i = 0; i <= kMaxSize; ++i) runs[i] = team_runs[i].load();
  return runs;
}

void StepTeam::run(int size, const std::function<void()>& body) {
  TORCH_INTERNAL_ASSERT(size >= 2 && size <= kMaxSize);
  StepTeam team(size);
  team_runs[size].fetch_add(1, std::memory_order_relaxed);
  // One task per thread. A region given fewer threads hands one thread
  // several tasks: it leads or serves the first of them, and the lead runs
  // the parts of the helpers that never come.
  at::parallel_for(0, size, 1, [&](int64_t begin, int64_t /*end*/) {
    if (begin != 0) {
      team.serve(static_cast<int>(begin));
      return;
    }
    // The helpers are released however body() ends.
    struct Release {
      StepTeam& team;
      ~Release() {
        current_team = nullptr;
        team.finish();
      }
    } release{team};
    current_team = &team;
    body();
  });
}

void StepTeam::finish() {
  for (int i = 0; i + 1 < size_; ++i) {
    slots_[i].state.store(kFinished, std::memory_order_release);
  }
}

void StepTeam::serve(int helper) {
  Slot& slot = slots_[helper - 1];
  Spin spin;
  for (;;) {
    uint64_t s = slot.state.load(std::memory_order_acquire);
    if (s == kFinished) return;
    if ((s & 3) != kPosted) {
      spin.wait();
      continue;
    }
    spin.reset();
    const uint64_t seq = s >> 2;
    if (!slot.state.compare_exchange_strong(s, seq << 2 | kTaken,
                                            std::memory_order_acquire)) {
      continue;  // taken back by the lead
    }
    try {
      fn_(ctx_, helper);
    } catch (...) {
      // Kept by the first helper that fails; the lead rethrows it.
      if (!failed_.exchange(true)) error_ = std::current_exception();
    }
    slot.state.store(seq << 2 | kDone, std::memory_order_release);
  }
}

void StepTeam::run_parts(int parts, void (*fn)(void*, int), void* ctx) {
  TORCH_INTERNAL_ASSERT(parts <= size_);
  const uint64_t seq = ++sequence_;
  const uint64_t posted = seq << 2 | kPosted, done = seq << 2 | kDone;
  fn_ = fn;
  ctx_ = ctx;
  for (int i = 1; i < parts; ++i) {
    if (!(retired_ & (uint32_t{1} << i))) {
      slots_[i - 1].state.store(posted, std::memory_order_release);
    }
  }
  // Part 0, then each part no helper has taken yet, on this thread. An
  // exception waits until the helpers' parts are done: they read the
  // caller's frame.
  std::exception_ptr error;
  try {
    fn(ctx, 0);
  } catch (...) {
    error = std::current_exception();
  }
  for (int i = 1; i < parts; ++i) {
    const uint32_t bit = uint32_t{1} << i;
    bool mine = (retired_ & bit) != 0;
    if (!mine) {
      std::atomic<uint64_t>& state = slots_[i - 1].state;
      uint64_t s = state.load(std::memory_order_acquire);
      mine = s == posted &&
             state.compare_exchange_strong(s, done, std::memory_order_acquire);
      misses_[i - 1] = mine ? misses_[i - 1] + 1 : 0;
      if (misses_[i - 1] >= kRetireAfter) {  // let it go
        state.store(kFinished, std::memory_order_release);
        retired_ |= bit;
      }
    }
    if (mine && !error) {
      try {
        fn(ctx, i);
      } catch (...) {
        error = std::current_exception();
      }
    }
  }
  for (int i = 1; i < parts; ++i) {
    if (retired_ & (uint32_t{1} << i)) continue;
    Spin spin;
    while (slots_[i - 1].state.load(std::memory_order_acquire) != done) {
      spin.wait();
    }
  }
  if (failed_.load(std::memory_order_acquire)) {
    failed_.store(false);
    if (!error) error = std::exchange(error_, nullptr);
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace rnnfast::cpu
