// The elementwise kernels of CudaBackendBase (add).
#include "cuda_backend.h"
#include "launch.cuh"

namespace rnnfast::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    add_kernel(T* dst, const T* a, const T* b, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    dst[i] = a[i] + b[i];
  }
}

template <typename T>
void add_impl(T* dst, const T* a, const T* b, int64_t count) {
  if (count <= 0) return;
  const LaunchShape s = flat(count);
  add_kernel<T><<<s.grid, s.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      dst, a, b, count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void add(float* dst, const float* a, const float* b, int64_t count) {
  add_impl(dst, a, b, count);
}

void add(double* dst, const double* a, const double* b, int64_t count) {
  add_impl(dst, a, b, count);
}

}  // namespace rnnfast::cuda
