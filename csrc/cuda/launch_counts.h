// How many row_groups launches (launch.cuh) ran as thread-block clusters of
// each size, for build_info()["cuda_row_group_clusters"]: on Hopper the
// LayerNorm kernels spread a row over a cluster of up to 4 blocks when the
// rows are fewer than the SMs, and would fall back to single blocks,
// silently and correctly, if the device refused clusters. The count lets a
// test and the GPU check tell which ran. Plain C++, so that rnnfast.cpp
// (compiled without nvcc) can read it.
#pragma once

#include <cstdint>
#include <vector>

namespace rnnfast::cuda {

// Counts one launch of `cluster` blocks per cluster (1: no cluster).
void count_row_groups_launch(unsigned cluster);

// Launches so far by cluster size: element i is the count for clusters of i
// blocks (element 0 unused).
std::vector<int64_t> row_groups_launches();

}  // namespace rnnfast::cuda
