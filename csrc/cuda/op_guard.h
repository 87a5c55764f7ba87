// Registration helper for rnnfast's CUDA op kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

namespace rnnfast::cuda {

// An op's host function run with the device of its first tensor argument
// current. The dispatcher gives custom-op kernels no device guard (ATen's
// generated CUDA kernels have one), so without this an op on cuda:1 would
// launch on cuda:0's stream. Register &OnDeviceOfFirst<&op>::call.
template <auto Op>
struct OnDeviceOfFirst;

template <typename R, typename... Args, R (*Op)(const at::Tensor&, Args...)>
struct OnDeviceOfFirst<Op> {
  static R call(const at::Tensor& first, Args... args) {
    // A CPU first argument only reaches here with some other tensor on CUDA;
    // leave the device alone and let the op's checks report the mismatch.
    c10::cuda::OptionalCUDAGuard guard;
    if (first.is_cuda()) guard.set_device(first.device());
    return Op(first, args...);
  }
};

}  // namespace rnnfast::cuda
