// CUDA kernels of the rnnfast ops: the host code shared with the CPU
// (op_impls.h, lstm_driver.h, layer_norm_lstm_driver.h) over CudaBackend.
// Host code only, so the host compiler builds it and nvcc never parses ATen;
// the kernels are in the .cu files.
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../op_impls.h"
#include "cuda_backend.h"
#include "launch_counts.h"
#include "op_guard.h"

TORCH_LIBRARY_IMPL(rnnfast, CUDA, m) {
  using rnnfast::cuda::CudaBackend;
  using rnnfast::cuda::OnDeviceOfFirst;
  m.impl("lstm_forward",
         &OnDeviceOfFirst<&rnnfast::lstm_forward_op<CudaBackend>>::call);
  m.impl("lstm_backward",
         &OnDeviceOfFirst<&rnnfast::lstm_backward_op<CudaBackend>>::call);
  m.impl("layer_norm_lstm_forward",
         &OnDeviceOfFirst<
             &rnnfast::layer_norm_lstm_forward_op<CudaBackend>>::call);
  m.impl("layer_norm_lstm_backward",
         &OnDeviceOfFirst<
             &rnnfast::layer_norm_lstm_backward_op<CudaBackend>>::call);
}

namespace rnnfast::cuda {
namespace {
// Up to 16 blocks per cluster (Hopper's non-portable maximum); row_groups
// asks for at most 4.
constexpr unsigned kMaxCountedCluster = 16;
std::atomic<int64_t> row_groups_counts[kMaxCountedCluster + 1];
}  // namespace

void count_row_groups_launch(unsigned cluster) {
  row_groups_counts[std::min(cluster, kMaxCountedCluster)].fetch_add(
      1, std::memory_order_relaxed);
}

std::vector<int64_t> row_groups_launches() {
  std::vector<int64_t> counts(kMaxCountedCluster + 1);
  for (unsigned i = 0; i <= kMaxCountedCluster; ++i) {
    counts[i] = row_groups_counts[i].load(std::memory_order_relaxed);
  }
  return counts;
}
}  // namespace rnnfast::cuda
