// Launch shapes shared by rnnfast's CUDA kernels, and the few calls through
// which they reach the runtime (launch, machine_for, block_shared), so that
// the tests can run the same kernels on the CPU (simt_emulation.h, with
// RNNFAST_SIMT_EMULATION defined). Kernels index with int64_t and loop over
// rows, so any size fits the grid limits.
#pragma once

#ifdef RNNFAST_SIMT_EMULATION
#include "simt_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "launch_counts.h"
#endif
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

namespace rnnfast::cuda {

constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
// Enough blocks to fill every SM of the largest GPUs many times over; the
// kernels loop over what a grid this size does not cover.
constexpr int64_t kMaxBlocks = 65535;

// The grid bound the shapes below use: kMaxBlocks, or in the emulation the
// tests' own (smaller, to make the kernels loop over the grid).
inline int64_t max_blocks() {
#ifdef RNNFAST_SIMT_EMULATION
  return simt::config().max_blocks;
#else
  return kMaxBlocks;
#endif
}

// A launch: its grid, its block and the blocks of a thread-block cluster
// (along x; 1 for a plain launch).
struct LaunchShape {
  dim3 grid;
  dim3 block;
  unsigned cluster = 1;
};

// A [rows, cols] element grid: threads along x cover columns (coalesced
// within a row), threads along y and blocks along y cover rows, looping with
// a stride of gridDim.y * blockDim.y. The block is narrowed to the columns
// rounded up to a warp so that small hidden sizes still fill it with rows.
inline LaunchShape rows_by_cols(int64_t rows, int64_t cols) {
  const int64_t bx =
      std::min<int64_t>(kBlockThreads, (cols + 31) / 32 * 32);
  const int64_t by = kBlockThreads / bx;
  const int64_t gx = (cols + bx - 1) / bx;
  const int64_t gy = std::min<int64_t>((rows + by - 1) / by, max_blocks());
  TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max(),
              "rnnfast: ", cols, " columns exceed the CUDA grid");
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
          dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by))};
}

// Rows that are each reduced as a whole (LayerNorm statistics): a group of
// blockDim.x threads, a whole number of warps and at most kMaxRowThreads,
// in each of the `cluster` blocks of a thread-block cluster strides over the
// n elements of one row; blockDim.y rows share a block so that short rows
// still fill kBlockThreads. Clusters along x loop over the rows with a
// stride of (gridDim.x / cluster) * blockDim.y.
//
// Sized for the machine: one thread per element of the row (up to
// kMaxRowThreads per block), and with fewer rows than SMs (B = 64 on a
// 132-SM H100 / H200) a row spread over a cluster of up to `max_cluster`
// blocks (Hopper's distributed shared memory joins their sums; max_cluster
// is 1 before Hopper), doubling the cluster while rows x cluster is short of
// the SM count and each block keeps at least kMinClusterThreads threads.
constexpr int kMaxRowThreads = 512;
constexpr int64_t kMinClusterThreads = 128;

inline LaunchShape row_groups(int64_t rows, int64_t n, int sms,
                              int max_cluster) {
  const int64_t units = std::max<int64_t>(32, (n + 31) / 32 * 32);
  int64_t cluster = 1;
  while (2 * cluster <= max_cluster && rows * cluster < sms &&
         units / (2 * cluster) >= kMinClusterThreads) {
    cluster *= 2;
  }
  const int64_t per_block = ((units + cluster - 1) / cluster + 31) / 32 * 32;
  const int64_t bx = std::min<int64_t>(kMaxRowThreads, per_block);
  const int64_t by =
      cluster > 1 ? 1 : std::max<int64_t>(1, kBlockThreads / bx);
  const int64_t groups =
      std::min<int64_t>((rows + by - 1) / by,
                        std::max<int64_t>(1, max_blocks() / cluster));
  LaunchShape l;
  l.grid = dim3(static_cast<unsigned>(groups * cluster));
  l.block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  l.cluster = static_cast<unsigned>(cluster);
  return l;
}

// The largest cluster row_groups may use for a kernel: 4 where the device
// and the code the kernel was compiled to are Hopper or newer, else 1.
// `ptx_version` (cudaFuncAttributes::ptxVersion, e.g. 90) is the virtual
// architecture the kernel's code was compiled for, the __CUDA_ARCH__ it
// saw: only code compiled for 9.0 or newer holds the cluster reductions of
// layer_norm_kernels.cuh. `binary_version` alone is not enough: a build for
// 8.0+PTX runs on a Hopper as PTX compiled by the driver (binaryVersion 90,
// ptxVersion 80), whose blocks would each sum only their share of a row if
// launched as a cluster.
constexpr int max_cluster_for(int device_major, int binary_version,
                              int ptx_version) {
  return (device_major >= 9 && binary_version >= 90 && ptx_version >= 90) ? 4
                                                                          : 1;
}
static_assert(max_cluster_for(9, 90, 90) == 4, "sm_90 code on a Hopper");
static_assert(max_cluster_for(10, 100, 90) == 4, "sm_90 PTX on a newer GPU");
static_assert(max_cluster_for(9, 90, 80) == 1,
              "compute_80 PTX compiled by the driver for a Hopper");
static_assert(max_cluster_for(9, 80, 80) == 1, "sm_80 code on a Hopper");
static_assert(max_cluster_for(8, 80, 80) == 1, "before Hopper");

#ifndef RNNFAST_SIMT_EMULATION
// A launch configuration of thread-block clusters of `cluster` blocks along
// x; `attr` (the caller's, alive while the configuration is used) holds
// the cluster dimension.
inline cudaLaunchConfig_t cluster_config(dim3 grid, dim3 block,
                                         unsigned cluster,
                                         cudaStream_t stream,
                                         cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = cluster;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

// The largest cluster, of at most `cluster` blocks of kMaxRowThreads threads
// (the largest a row_groups shape launches), that the device can schedule
// for `kernel`: cudaOccupancyMaxActiveClusters above 0. A whole Hopper fits
// 4; a GPU partitioned by MIG or MPS may fit fewer, where a cluster launch
// would fail instead of running slower. A refused query counts as "none"
// (its error is cleared, so that the next launch check does not report it).
template <typename Kernel>
inline int schedulable_cluster(Kernel kernel, int cluster) {
  for (; cluster > 1; cluster /= 2) {
    cudaLaunchAttribute attr;
    const unsigned size = static_cast<unsigned>(cluster);
    const cudaLaunchConfig_t config = cluster_config(
        dim3(size), dim3(kMaxRowThreads), size, nullptr, &attr);
    int active = 0;
    if (cudaOccupancyMaxActiveClusters(&active, kernel, &config) ==
            cudaSuccess &&
        active > 0) {
      return cluster;
    }
    (void)cudaGetLastError();
  }
  return 1;
}
#endif

// The current device's SM count and the largest cluster row_groups may use
// for `kernel` on it (max_cluster_for, then schedulable_cluster); looked up
// once per device and kernel type (the kernels of one build share their
// architectures).
template <typename Kernel>
inline void machine_for(Kernel kernel, int* sms, int* max_cluster) {
#ifdef RNNFAST_SIMT_EMULATION
  (void)kernel;
  *sms = simt::config().sms;
  *max_cluster = simt::config().max_cluster;
#else
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached_sms[kMaxDevices];
  static std::atomic<int> cached_cluster[kMaxDevices];
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kMaxDevices && cached_sms[device].load() > 0) {
    *sms = cached_sms[device].load();
    *max_cluster = cached_cluster[device].load();
    return;
  }
  int count = 0, major = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int cluster = schedulable_cluster(
      kernel, max_cluster_for(major, attr.binaryVersion, attr.ptxVersion));
  if (device < kMaxDevices) {
    cached_cluster[device].store(cluster);
    cached_sms[device].store(count);
  }
  *sms = count;
  *max_cluster = cluster;
#endif
}

// kernel<<<shape>>>(args...) on the current stream, as a cluster launch when
// the shape asks for one, checked. Every kernel of rnnfast is launched here.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), const LaunchShape& s,
                   const Args&... args) {
#ifdef RNNFAST_SIMT_EMULATION
  simt::launch(kernel, s.grid, s.block, s.cluster, args...);
#else
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (s.cluster == 1) {
    kernel<<<s.grid, s.block, 0, stream>>>(args...);
  } else {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t config =
        cluster_config(s.grid, s.block, s.cluster, stream, &attr);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Launches kernel(params) with a row_groups shape sized for the machine.
template <typename Params>
inline void launch_row_groups(void (*kernel)(Params), const Params& params,
                              int64_t rows, int64_t n) {
  int sms = 0, max_cluster = 1;
  machine_for(kernel, &sms, &max_cluster);
  const LaunchShape shape = row_groups(rows, n, sms, max_cluster);
  launch(kernel, shape, params);
#ifndef RNNFAST_SIMT_EMULATION  // (the emulation counts its own launches)
  count_row_groups_launch(shape.cluster);
#endif
}

// The block's shared object of type T: one per type and block, uninitialised
// (a __shared__ variable; in the emulation, per emulated block).
#ifdef RNNFAST_SIMT_EMULATION
using simt::block_shared;
#else
template <typename T>
__device__ __forceinline__ T& block_shared() {
  __shared__ T storage;
  return storage;
}
#endif

// A flat range of n elements for a grid-stride loop.
inline LaunchShape flat(int64_t n) {
  const int64_t blocks =
      std::min<int64_t>((n + kBlockThreads - 1) / kBlockThreads, max_blocks());
  return {dim3(static_cast<unsigned>(blocks)), dim3(kBlockThreads)};
}

}  // namespace rnnfast::cuda
