// The CUDA backend of rnnfast's ops (csrc/cuda/cuda_backend.h over the
// shared drivers and op_impls.h), with its kernels and cuBLAS calls run by
// the CPU emulation (csrc/cuda/simt_emulation.h), registered for CPU
// tensors as torch.ops.rnnfast_simt.* (tests/test_simt.py defines their
// schemas from rnnfast's own), and the emulation's settings and self-tests.
#include <torch/extension.h>

#include "../../csrc/arg_checks.cpp"
#include "../../csrc/cuda/cuda_backend.h"
#include "../../csrc/op_impls.h"
// Last: it defines CUDA's names (threadIdx, __global__, ...) as macros.
// This unit also defines the emulation's fiber switch.
#define RNNFAST_SIMT_DEFINE_SWITCH
#include "../../csrc/cuda/launch.cuh"

namespace rnnfast::simt_selftest {
std::vector<float> warp_sums(const std::vector<float>& in);
std::vector<float> neighbours(unsigned blocks, bool sync);
void divergent_barrier();
std::vector<float> cluster_sums(unsigned blocks, unsigned cluster);
}  // namespace rnnfast::simt_selftest

TORCH_LIBRARY_IMPL(rnnfast_simt, CPU, m) {
  using rnnfast::cuda::CudaBackend;
  m.impl("lstm_forward", &rnnfast::lstm_forward_op<CudaBackend>);
  m.impl("lstm_backward", &rnnfast::lstm_backward_op<CudaBackend>);
  m.impl("layer_norm_lstm_forward",
         &rnnfast::layer_norm_lstm_forward_op<CudaBackend>);
  m.impl("layer_norm_lstm_backward",
         &rnnfast::layer_norm_lstm_backward_op<CudaBackend>);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace simt = rnnfast::simt;
  m.def(
      "configure",
      [](int sms, int max_cluster, int64_t max_blocks, bool reverse_order,
         int64_t fused_step_rows) {
        simt::Config& c = simt::config();
        c.sms = sms;
        c.max_cluster = max_cluster;
        c.max_blocks = max_blocks;
        c.reverse_order = reverse_order;
        rnnfast::cuda::fused_step_rows() = fused_step_rows;
      },
      pybind11::arg("sms") = 132, pybind11::arg("max_cluster") = 4,
      pybind11::arg("max_blocks") = rnnfast::cuda::kMaxBlocks,
      pybind11::arg("reverse_order") = false,
      pybind11::arg("fused_step_rows") = rnnfast::cuda::kFusedStepRows,
      "Sets the emulated machine: its SM count, the largest thread-block "
      "cluster, the grid bound (launch.cuh's kMaxBlocks), the order in "
      "which the threads run, and the most rows a fused forward step takes "
      "(cuda_backend.h's fused_step_rows; 0: none).");
  m.def("counters", [] {
    const simt::Counters& c = simt::counters();
    pybind11::dict d;
    d["launches"] = c.launches;
    d["cluster_launches"] = c.cluster_launches;
    d["largest_cluster"] = c.largest_cluster;
    d["gemms"] = c.gemms;
    return d;
  });
  m.def("reset_counters", [] { simt::counters() = simt::Counters{}; });
  m.def("warp_sums", &rnnfast::simt_selftest::warp_sums);
  m.def("neighbours", &rnnfast::simt_selftest::neighbours);
  m.def("divergent_barrier", &rnnfast::simt_selftest::divergent_barrier);
  m.def("cluster_sums", &rnnfast::simt_selftest::cluster_sums);
}
