// A CPU emulation of the part of CUDA that rnnfast's kernels use, so that
// the CUDA backend (its kernels, launch shapes, cuBLAS calls and the shared
// drivers over it) runs and is tested on a machine without a GPU. Only the
// tests build it (tests/simt/, RNNFAST_SIMT_EMULATION defined); the wheel
// never includes this file.
//
// What it emulates, and how strictly:
// - Kernel launches: every block of the grid, and every thread of a block,
//   runs the kernel body as a fiber on the calling thread; a
//   thread-block cluster runs its blocks together. A fiber runs until it
//   waits at one of the synchronisation points below or ends; then the
//   lowest-numbered thread that may run goes on (the highest with
//   Config::reverse_order). So the first warps run as far ahead of the
//   others as the barriers let them: a kernel that reads shared memory
//   another thread has not written yet, or writes it before the others
//   have read it, gets wrong values in one order or the other, and the
//   results of the two orders differ.
// - __syncthreads, warp shuffles (__shfl_xor_sync, full mask only) and
//   cluster.sync(): a barrier that every thread of the block / warp /
//   cluster must reach. A thread that exits, or waits at another barrier,
//   while others wait is reported as an error (what compute-sanitizer's
//   synccheck reports on a GPU as a divergent barrier), never a hang.
// - Shared memory (block_shared<T>()): one object per type and block, filled
//   with 0xff bytes (NaN) before the block starts, so a read of a slot no
//   thread wrote shows up in the results; map_shared_rank reaches another
//   block's object in the cluster, as distributed shared memory does.
// - The launch limits of the hardware that the kernels rely on: at most
//   1024 threads a block, grid sizes within CUDA's limits, the grid a whole
//   number of clusters, at most 8 blocks a cluster.
// - cuBLAS's column-major Sgemm / Dgemm / GemmEx with its argument checks
//   (CUBLAS_STATUS_INVALID_VALUE for a leading dimension too small), and
//   the runtime's memcpy and memset, as plain host code on host memory.
// Out-of-bounds accesses are left to AddressSanitizer (the tests build this
// emulation with -fsanitize=address too): each shared object is a heap
// allocation of its exact size, so it sees those as it sees tensors'.
// What it cannot show: data races between threads that run truly in
// parallel on a GPU, the device's own math (lstm_cell.h's __expf path),
// the memory model, speed. compute-sanitizer on a GPU (scripts/gpu_check.sh)
// still has the last word.
#pragma once

#ifndef RNNFAST_SIMT_EMULATION
#error "simt_emulation.h is only for the CPU emulation of the CUDA kernels (tests/simt)"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeindex>
#include <utility>
#include <vector>

// ---- CUDA's names ------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

namespace rnnfast::simt {

// The emulated machine, set by the tests (tests/simt/module.cpp).
struct Config {
  int sms = 132;         // SMs, as an H100 / H200
  int max_cluster = 4;   // launch.cuh's max_cluster_for on such a GPU
  int64_t max_blocks = 65535;  // launch.cuh's kMaxBlocks; tests lower it
                               // to make the kernels loop over the grid
  bool reverse_order = false;  // run each pass's threads last to first
};
inline Config& config() {
  static Config c;
  return c;
}

// Counters the tests read: launches, cluster launches, the largest cluster
// used, cuBLAS products.
struct Counters {
  int64_t launches = 0, cluster_launches = 0, gemms = 0;
  unsigned largest_cluster = 1;
};
inline Counters& counters() {
  static Counters c;
  return c;
}

struct Barrier {
  int expected = 0;
  int arrived = 0;
  const char* what = "";
  std::vector<size_t> waiters;  // threads of the launch
};

// A fiber's saved context, and the switch between two. On x86-64 a few
// instructions that keep the callee-saved registers, the SSE and x87
// control words and the stack pointer (rnnfast_simt_switch, defined by the
// one unit that defines RNNFAST_SIMT_DEFINE_SWITCH); elsewhere, and under
// AddressSanitizer (which follows swapcontext but not a hand-made switch),
// ucontext, whose swapcontext also saves the signal mask with a system call
// at every switch (about three times slower).
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define RNNFAST_SIMT_FAST_SWITCH 1
extern "C" void rnnfast_simt_switch(void** save_sp, void* load_sp);
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) {
  rnnfast_simt_switch(&from.sp, to.sp);
}
// `c` starts `entry` on [stack, stack + size) at its first switch.
inline void start_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  // The return address rnnfast_simt_switch's `ret` takes, 16-aligned so
  // that entry starts as if called; below it the six registers it pops and
  // the control words it loads (the current ones).
  auto* ret = reinterpret_cast<uintptr_t*>(top - 16);
  ret[0] = reinterpret_cast<uintptr_t>(entry);
  ret[1] = 0;
  uintptr_t* sp = ret - 7;
  for (int i = 0; i < 7; ++i) sp[i] = 0;
  uint32_t mxcsr = 0;
  uint16_t fpu = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu));
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpu, 2);
  c.sp = sp;
}
#else
#define RNNFAST_SIMT_FAST_SWITCH 0
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) {
  swapcontext(&from.uc, &to.uc);
}
inline void start_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;  // entry never returns
  makecontext(&c.uc, entry, 0);
}
#endif

struct Block;
struct Thread {
  Context context;
  uint3 thread_idx, block_idx;
  Block* block = nullptr;
  int warp = 0, lane = 0;
  size_t index = 0;  // in Launch::threads
  uint64_t shuffles = 0;  // warp shuffles this thread has done
  bool done = false;
  Barrier* waiting_on = nullptr;
};

struct Block {
  uint3 idx;
  unsigned rank = 0;  // in its cluster
  Barrier barrier;    // __syncthreads
  std::vector<Barrier> warps;
  // Shuffle exchange, two slots per lane used in turn: a lane can be at most
  // one shuffle ahead of its warp's slowest reader (each shuffle waits for
  // the whole warp), so it never overwrites a value still to be read.
  std::vector<std::array<std::array<uint64_t, 32>, 2>> lanes;
  // block_shared<T>(): one object per type
  struct Allocation {
    std::unique_ptr<unsigned char[]> bytes;
    size_t size = 0;
  };
  std::map<std::type_index, Allocation> shared;
};

struct Launch {
  dim3 grid, block;
  unsigned cluster = 1;
  std::vector<Block> blocks;  // the cluster running now
  Barrier cluster_barrier;
  std::vector<Thread> threads;
  std::set<size_t> ready;  // threads that may run
  Context scheduler;
  Thread* current = nullptr;
  std::function<void()> body;
  std::string error;
};

inline Launch*& active_launch() {
  static thread_local Launch* l = nullptr;
  return l;
}
inline Launch& current_launch() {
  Launch* l = active_launch();
  TORCH_CHECK(l != nullptr, "simt: a kernel built-in used outside a launch");
  return *l;
}
inline Thread& current_thread() { return *current_launch().current; }

// Back to the scheduler; it resumes this thread when it may go on.
inline void yield() {
  Launch& l = current_launch();
  Thread* self = l.current;
  switch_context(self->context, l.scheduler);
}

// Stops the calling thread with an error that the launch then reports (an
// exception must not unwind across the fiber's stack).
[[noreturn]] inline void fail(const std::string& message) {
  Launch& l = current_launch();
  if (l.error.empty()) l.error = message;
  l.current->done = true;
  switch_context(l.current->context, l.scheduler);  // never resumed
  __builtin_unreachable();
}

// The last thread to arrive opens the barrier and goes on; the others wait.
inline void wait(Barrier& b) {
  Launch& l = current_launch();
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    for (size_t w : b.waiters) {
      l.threads[w].waiting_on = nullptr;
      l.ready.insert(w);
    }
    b.waiters.clear();
    return;
  }
  Thread& t = current_thread();
  t.waiting_on = &b;
  b.waiters.push_back(t.index);
  yield();
}

inline void syncthreads() { wait(current_thread().block->barrier); }

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "simt: shuffle of a large type");
  Thread& t = current_thread();
  Block& b = *t.block;
  if (mask != 0xffffffffu || width != 32) {
    fail("simt: only full-warp shuffles (mask 0xffffffff, width 32) are emulated");
  }
  if (b.warps[t.warp].expected != 32) {
    fail("simt: a full-mask shuffle in a warp of fewer than 32 threads");
  }
  const size_t turn = t.shuffles % 2;
  ++t.shuffles;
  std::memcpy(&b.lanes[t.warp][turn][t.lane], &value, sizeof(T));
  wait(b.warps[t.warp]);
  T other;
  std::memcpy(&other, &b.lanes[t.warp][turn][t.lane ^ (lane_mask & 31)], sizeof(T));
  return other;
}

// The shared object `type` (of `size` bytes) of `block`, created (0xff
// bytes) on first use.
inline Block::Allocation& shared_allocation(Block& block, std::type_index type,
                                            size_t size) {
  Block::Allocation& a = block.shared[type];
  if (!a.bytes) {
    a.bytes.reset(new unsigned char[size]);
    a.size = size;
    std::memset(a.bytes.get(), 0xff, size);
  }
  return a;
}

template <typename T>
T& block_shared() {
  static_assert(std::is_trivially_destructible_v<T>);
  return *reinterpret_cast<T*>(
      shared_allocation(*current_thread().block, typeid(T), sizeof(T)).bytes.get());
}

template <typename T>
T* map_shared_rank(T* address, unsigned rank) {
  Launch& l = current_launch();
  Block& self = *current_thread().block;
  if (rank >= l.cluster) fail("simt: map_shared_rank past the cluster");
  const auto* p = reinterpret_cast<const unsigned char*>(address);
  for (auto& [type, a] : self.shared) {
    if (p >= a.bytes.get() && p + sizeof(T) <= a.bytes.get() + a.size) {
      Block::Allocation& b = shared_allocation(l.blocks[rank], type, a.size);
      return reinterpret_cast<T*>(b.bytes.get() + (p - a.bytes.get()));
    }
  }
  fail("simt: map_shared_rank of an address outside the block's shared memory");
}

// A fiber stack with a guard page below it.
class Stack {
 public:
  static constexpr size_t kBytes = 256 * 1024;
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    base_ = mmap(nullptr, kBytes + page, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(base_ != MAP_FAILED, "simt: cannot map a fiber stack");
    mprotect(base_, page, PROT_NONE);
    top_ = static_cast<char*>(base_) + page;
    page_ = page;
  }
  ~Stack() { munmap(base_, kBytes + page_); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* begin() const { return top_; }
  size_t size() const { return kBytes; }

 private:
  void* base_ = nullptr;
  char* top_ = nullptr;
  size_t page_ = 0;
};

inline std::vector<std::unique_ptr<Stack>>& stacks() {
  static thread_local std::vector<std::unique_ptr<Stack>> s;
  return s;
}

[[noreturn]] inline void thread_entry() {
  Launch& l = current_launch();
  l.body();
  l.current->done = true;
  switch_context(l.current->context, l.scheduler);  // never resumed
  __builtin_unreachable();
}

inline std::string describe(const Thread& t) {
  return "thread (" + std::to_string(t.thread_idx.x) + ", " +
         std::to_string(t.thread_idx.y) + ", " + std::to_string(t.thread_idx.z) +
         ") of block (" + std::to_string(t.block_idx.x) + ", " +
         std::to_string(t.block_idx.y) + ", " + std::to_string(t.block_idx.z) + ")";
}

// Runs the blocks of one cluster, whose first block is `first`, to the end.
inline void run_cluster(Launch& l, uint3 first) {
  const unsigned per_block = l.block.x * l.block.y * l.block.z;
  const unsigned warps = (per_block + 31) / 32;
  l.blocks.clear();
  l.blocks.resize(l.cluster);
  for (unsigned r = 0; r < l.cluster; ++r) {
    Block& b = l.blocks[r];
    b.idx = {first.x + r, first.y, first.z};
    b.rank = r;
    b.barrier = {static_cast<int>(per_block), 0, "__syncthreads", {}};
    b.warps.assign(warps, Barrier{32, 0, "a warp shuffle", {}});
    if (per_block % 32 != 0) {
      b.warps.back().expected = static_cast<int>(per_block % 32);
    }
    b.lanes.assign(warps, {});
  }
  l.cluster_barrier = {static_cast<int>(per_block * l.cluster), 0,
                       "cluster.sync()", {}};
  const size_t count = size_t(per_block) * l.cluster;
  auto& pool = stacks();
  while (pool.size() < count) pool.push_back(std::make_unique<Stack>());
  l.threads.assign(count, Thread{});
  l.ready.clear();
  for (size_t i = 0; i < count; ++i) {
    Thread& t = l.threads[i];
    const unsigned r = static_cast<unsigned>(i / per_block);
    const unsigned linear = static_cast<unsigned>(i % per_block);
    t.block = &l.blocks[r];
    t.block_idx = l.blocks[r].idx;
    t.thread_idx = {linear % l.block.x, (linear / l.block.x) % l.block.y,
                    linear / (l.block.x * l.block.y)};
    t.warp = static_cast<int>(linear / 32);
    t.lane = static_cast<int>(linear % 32);
    t.index = i;
    l.ready.insert(i);
    start_context(t.context, pool[i]->begin(), pool[i]->size(), &thread_entry);
  }
  size_t remaining = count;
  while (!l.ready.empty() && l.error.empty()) {
    const auto next =
        config().reverse_order ? std::prev(l.ready.end()) : l.ready.begin();
    Thread& t = l.threads[*next];
    l.ready.erase(next);
    l.current = &t;
    switch_context(l.scheduler, t.context);
    l.current = nullptr;
    if (t.done) --remaining;
  }
  if (remaining > 0 && l.error.empty()) {
    // Every live thread waits at a barrier that cannot open: some thread
    // of the same group ended or waits at another one.
    for (const Thread& t : l.threads) {
      if (!t.done && t.waiting_on != nullptr) {
        l.error = std::string("simt: ") + t.waiting_on->what +
                  " that not every thread reaches: " + describe(t) +
                  " waits at it for ever";
        break;
      }
    }
  }
}

// kernel<<<grid, block>>>(args...) as a cluster launch of `cluster` blocks
// along x; returns when every thread has finished.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, unsigned cluster,
            const Args&... args) {
  const uint64_t per_block = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(per_block >= 1 && per_block <= 1024 && block.z <= 64,
              "simt: invalid block (", block.x, ", ", block.y, ", ", block.z,
              "): CUDA allows 1 to 1024 threads, z at most 64");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 &&
                  grid.z <= 65535,
              "simt: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(cluster >= 1 && cluster <= 8 && grid.x % cluster == 0,
              "simt: a cluster of ", cluster, " blocks for a grid of ", grid.x,
              " along x (at most 8, and a divisor of the grid)");
  std::tuple<std::decay_t<Params>...> params(args...);  // copied, as CUDA does
  Launch l;
  l.grid = grid;
  l.block = block;
  l.cluster = cluster;
  l.body = [&] { std::apply(kernel, params); };
  Launch* outer = active_launch();
  TORCH_CHECK(outer == nullptr, "simt: a launch from inside a kernel");
  active_launch() = &l;
  for (unsigned z = 0; z < grid.z && l.error.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && l.error.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && l.error.empty(); x += cluster) {
        run_cluster(l, {x, y, z});
      }
    }
  }
  active_launch() = nullptr;
  ++counters().launches;
  if (cluster > 1) ++counters().cluster_launches;
  counters().largest_cluster = std::max(counters().largest_cluster, cluster);
  TORCH_CHECK(l.error.empty(), l.error);
}

}  // namespace rnnfast::simt

#define threadIdx (::rnnfast::simt::current_thread().thread_idx)
#define blockIdx (::rnnfast::simt::current_thread().block_idx)
#define blockDim (::rnnfast::simt::current_launch().block)
#define gridDim (::rnnfast::simt::current_launch().grid)

inline void __syncthreads() { ::rnnfast::simt::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::rnnfast::simt::shfl_xor(mask, value, lane_mask, width);
}

namespace cooperative_groups {
struct cluster_group {
  unsigned block_rank() const {
    return ::rnnfast::simt::current_thread().block->rank;
  }
  unsigned num_blocks() const {
    return ::rnnfast::simt::current_launch().cluster;
  }
  void sync() const {
    ::rnnfast::simt::wait(::rnnfast::simt::current_launch().cluster_barrier);
  }
  template <typename T>
  T* map_shared_rank(T* address, unsigned rank) const {
    return ::rnnfast::simt::map_shared_rank(address, rank);
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

// ---- The runtime and cuBLAS calls of gemm_and_copy.cpp --------------------------

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice = 3 };

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes,
                                   cudaMemcpyKind, cudaStream_t) {
  if (bytes > 0) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemset2DAsync(void* ptr, size_t pitch, int value,
                                     size_t width, size_t height, cudaStream_t) {
  if (width > pitch) return cudaErrorInvalidValue;
  for (size_t r = 0; r < height; ++r) {
    std::memset(static_cast<char*>(ptr) + r * pitch, value, width);
  }
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                              \
  do {                                                                    \
    const cudaError_t simt_status = (expr);                               \
    TORCH_CHECK(simt_status == cudaSuccess, "simt: ", #expr, " failed"); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

struct cublasContext {
  bool valid = true;
};
typedef cublasContext* cublasHandle_t;
enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_NOT_SUPPORTED = 15
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cudaDataType_t { CUDA_R_16F = 2, CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16BF = 14 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };

#define TORCH_CUDABLAS_CHECK(expr)                                   \
  do {                                                               \
    const cublasStatus_t simt_status = (expr);                       \
    TORCH_CHECK(simt_status == CUBLAS_STATUS_SUCCESS, "simt: ", #expr, \
                " returned cuBLAS status ", int(simt_status));       \
  } while (0)

namespace rnnfast::simt {

inline double load(const void* p, cudaDataType_t type, int64_t i) {
  switch (type) {
    case CUDA_R_32F: return static_cast<const float*>(p)[i];
    case CUDA_R_64F: return static_cast<const double*>(p)[i];
    case CUDA_R_16F: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case CUDA_R_16BF:
      return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  }
  return 0;
}
inline void store(void* p, cudaDataType_t type, int64_t i, double v) {
  switch (type) {
    case CUDA_R_32F: static_cast<float*>(p)[i] = static_cast<float>(v); return;
    case CUDA_R_64F: static_cast<double*>(p)[i] = v; return;
    case CUDA_R_16F: static_cast<c10::Half*>(p)[i] = static_cast<float>(v); return;
    case CUDA_R_16BF: static_cast<c10::BFloat16*>(p)[i] = static_cast<float>(v); return;
  }
}

// cuBLAS's gemm contract, column-major: C[m, n] = alpha op(A) op(B) + beta C,
// op(A) [m, k], op(B) [k, n]; C is not read when beta is 0. The sums run in
// double, then round to C's type (cuBLAS's own order and rounding differ).
inline cublasStatus_t gemm(cublasHandle_t handle, cublasOperation_t ta,
                           cublasOperation_t tb, int m, int n, int k,
                           double alpha, const void* a, cudaDataType_t a_type,
                           int lda, const void* b, cudaDataType_t b_type,
                           int ldb, double beta, void* c, cudaDataType_t c_type,
                           int ldc) {
  if (handle == nullptr || !handle->valid) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k) ||
      ldb < std::max(1, tb == CUBLAS_OP_N ? k : n) || ldc < std::max(1, m)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  ++counters().gemms;
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      double sum = 0;
      for (int l = 0; l < k; ++l) {
        const double x = load(a, a_type, ta == CUBLAS_OP_N ? i + int64_t(l) * lda
                                                          : l + int64_t(i) * lda);
        const double y = load(b, b_type, tb == CUBLAS_OP_N ? l + int64_t(j) * ldb
                                                          : j + int64_t(l) * ldb);
        sum += x * y;
      }
      const int64_t e = i + int64_t(j) * ldc;
      const double old = beta == 0 ? 0.0 : beta * load(c, c_type, e);
      store(c, c_type, e, alpha * sum + old);
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasContext& blas_context() {
  static cublasContext context;
  return context;
}

}  // namespace rnnfast::simt

inline cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta,
                                  cublasOperation_t tb, int m, int n, int k,
                                  const float* alpha, const float* a, int lda,
                                  const float* b, int ldb, const float* beta,
                                  float* c, int ldc) {
  return rnnfast::simt::gemm(h, ta, tb, m, n, k, *alpha, a, CUDA_R_32F, lda, b,
                             CUDA_R_32F, ldb, *beta, c, CUDA_R_32F, ldc);
}
inline cublasStatus_t cublasDgemm(cublasHandle_t h, cublasOperation_t ta,
                                  cublasOperation_t tb, int m, int n, int k,
                                  const double* alpha, const double* a, int lda,
                                  const double* b, int ldb, const double* beta,
                                  double* c, int ldc) {
  return rnnfast::simt::gemm(h, ta, tb, m, n, k, *alpha, a, CUDA_R_64F, lda, b,
                             CUDA_R_64F, ldb, *beta, c, CUDA_R_64F, ldc);
}
// Half-type inputs with float scalars and accumulation (CUBLAS_COMPUTE_32F).
inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta,
                                   cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* a,
                                   cudaDataType_t a_type, int lda, const void* b,
                                   cudaDataType_t b_type, int ldb,
                                   const void* beta, void* c,
                                   cudaDataType_t c_type, int ldc,
                                   cublasComputeType_t compute,
                                   cublasGemmAlgo_t) {
  if (compute != CUBLAS_COMPUTE_32F || a_type != b_type) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  return rnnfast::simt::gemm(h, ta, tb, m, n, k,
                             *static_cast<const float*>(alpha), a, a_type, lda,
                             b, b_type, ldb, *static_cast<const float*>(beta),
                             c, c_type, ldc);
}

namespace at::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
inline cublasHandle_t getCurrentCUDABlasHandle() {
  return &::rnnfast::simt::blas_context();
}
}  // namespace at::cuda

#if RNNFAST_SIMT_FAST_SWITCH && defined(RNNFAST_SIMT_DEFINE_SWITCH)
// rnnfast_simt_switch(save_sp, load_sp): pushes the callee-saved registers
// and the control words, saves the stack pointer in *save_sp, then does the
// reverse from load_sp (System V x86-64).
asm(R"(
  .text
  .globl rnnfast_simt_switch
  .type rnnfast_simt_switch, @function
rnnfast_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rnnfast_simt_switch, .-rnnfast_simt_switch
)");
#endif
