// Launch shapes shared by rnnfast's CUDA kernels. Kernels index with int64_t
// and loop over rows, so any size fits the grid limits.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace rnnfast::cuda {

constexpr int kBlockThreads = 256;
// Enough blocks to fill every SM of the largest GPUs many times over; the
// kernels loop over what a grid this size does not cover.
constexpr int64_t kMaxBlocks = 65535;

struct LaunchShape {
  dim3 grid;
  dim3 block;
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
  const int64_t gy = std::min<int64_t>((rows + by - 1) / by, kMaxBlocks);
  TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max(),
              "rnnfast: ", cols, " columns exceed the CUDA grid");
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
          dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by))};
}

// Rows that are each reduced as a whole (LayerNorm statistics): a group of
// blockDim.x threads, a whole number of warps and at most kMaxRowThreads,
// strides over the n elements of one row; blockDim.y rows share a block so
// that short rows still fill kBlockThreads. Blocks along x loop over the rows
// with a stride of gridDim.x * blockDim.y. A block never holds more than
// kMaxRowThreads threads, so at most kMaxRowThreads / 32 warps.
constexpr int kMaxRowThreads = 512;

inline LaunchShape row_groups(int64_t rows, int64_t n) {
  const int64_t bx = std::min<int64_t>(
      kMaxRowThreads, std::max<int64_t>(32, (n + 31) / 32 * 32));
  const int64_t by = std::max<int64_t>(1, kBlockThreads / bx);
  const int64_t gx = std::min<int64_t>((rows + by - 1) / by, kMaxBlocks);
  return {dim3(static_cast<unsigned>(gx)),
          dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by))};
}

// A flat range of n elements for a grid-stride loop.
inline LaunchShape flat(int64_t n) {
  const int64_t blocks =
      std::min<int64_t>((n + kBlockThreads - 1) / kBlockThreads, kMaxBlocks);
  return {dim3(static_cast<unsigned>(blocks)), dim3(kBlockThreads)};
}

}  // namespace rnnfast::cuda
