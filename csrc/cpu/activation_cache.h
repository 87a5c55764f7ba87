// CPU memory for the large buffers a training step allocates again and
// again: the activations a forward op saves for its backward and the
// backward's block workspaces.
//
// A fresh multi-megabyte allocation from the C library is fresh pages from
// the kernel, and touching them costs a page fault each (tens of
// milliseconds per training step at T=100, B=64, H=256 on the CI machine).
// glibc hands such blocks back to the kernel as soon as the top of its heap
// is free, so whether a step pays that depends on what else was allocated
// before. Blocks of at least kMinCachedBytes freed by these tensors are
// instead kept here and handed out again to a request of up to their size
// (and more than half of it), so consecutive steps of the same shapes reuse
// the same memory, as CUDA's caching allocator does on the GPU.
//
// At most RNNFAST_CPU_CACHE_MB megabytes (default 1024; 0 turns the cache
// off) of free blocks are kept; rnnfast.empty_cache() releases them.
// Thread-safe. Part of the CPU backend (CpuBackend::empty_activation); other
// backends have their own allocators.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rnnfast::cpu {

constexpr int64_t kMinCachedBytes = int64_t{1} << 20;

// at::empty(sizes, options) for CPU options, from the cache when large.
at::Tensor empty_activation(at::IntArrayRef sizes,
                            const at::TensorOptions& options);

// Frees every cached block; returns the bytes released.
int64_t empty_activation_cache();

// Bytes of free blocks held.
int64_t activation_cache_bytes();

}  // namespace rnnfast::cpu
