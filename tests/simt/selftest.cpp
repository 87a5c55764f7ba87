// Kernels that check the emulation itself (tests/test_simt.py): that its
// barriers, shuffles, shared memory and clusters behave as a GPU's, and
// that it reports the misuse a GPU would punish.
#include "../../csrc/cuda/launch.cuh"

#include <vector>

namespace rnnfast::simt_selftest {
namespace {
using cuda::block_shared;
using cuda::LaunchShape;

// out[t] = the sum over the warp of t's lane values, by a butterfly.
__global__ void warp_sum_kernel(const float* in, float* out) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  float v = in[t];
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  out[t] = v;
}

// Thread t writes slot t, then (after __syncthreads when `sync`) reads the
// slot of the thread before it in the block.
__global__ void neighbour_kernel(float* out, bool sync) {
  float(&slots)[256] = block_shared<float[256]>();
  slots[threadIdx.x] = static_cast<float>(blockIdx.x * 1000 + threadIdx.x);
  if (sync) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] =
      slots[(threadIdx.x + blockDim.x - 1) % blockDim.x];
}

// Half the block waits at a barrier the other half never reaches.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Each block of a cluster puts its rank in shared memory; every thread
// sums them over the cluster through map_shared_rank.
__global__ void cluster_sum_kernel(float* out) {
  const cooperative_groups::cluster_group cluster =
      cooperative_groups::this_cluster();
  float& mine = block_shared<float>();
  if (threadIdx.x == 0) mine = static_cast<float>(cluster.block_rank() + 1);
  cluster.sync();
  float sum = 0;
  for (unsigned r = 0; r < cluster.num_blocks(); ++r) {
    sum += *cluster.map_shared_rank(&mine, r);
  }
  cluster.sync();
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}
}  // namespace

std::vector<float> warp_sums(const std::vector<float>& in) {
  std::vector<float> out(in.size());
  cuda::launch(&warp_sum_kernel,
               LaunchShape{dim3(static_cast<unsigned>(in.size() / 64)), dim3(64)},
               in.data(), out.data());
  return out;
}

std::vector<float> neighbours(unsigned blocks, bool sync) {
  std::vector<float> out(blocks * 256);
  cuda::launch(&neighbour_kernel, LaunchShape{dim3(blocks), dim3(256)},
               out.data(), sync);
  return out;
}

void divergent_barrier() {
  std::vector<float> out(32);
  cuda::launch(&divergent_barrier_kernel, LaunchShape{dim3(1), dim3(32)},
               out.data());
}

std::vector<float> cluster_sums(unsigned blocks, unsigned cluster) {
  std::vector<float> out(blocks * 64);
  cuda::launch(&cluster_sum_kernel,
               LaunchShape{dim3(blocks), dim3(64), cluster}, out.data());
  return out;
}

}  // namespace rnnfast::simt_selftest
