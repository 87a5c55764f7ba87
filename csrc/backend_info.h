// What the Python module init (rnnfast.cpp) reports about the backends and
// controls of them, without including any backend's headers. Defined by the
// CPU backend (cpu/cpu_backend.cpp).
#pragma once

#include <cstdint>

namespace rnnfast {

// The CPU pointwise kernels in use ("AVX512", "AVX2" or "DEFAULT").
const char* cpu_kernels_in_use();
// The CPU GEMM in use ("mkl-packed", "blas" or "aten").
const char* cpu_gemm_in_use();
// The CPU int8 kernels in use ("AMX-INT8+AVX512-VNNI", "AVX512-VNNI",
// "AVX2" or "portable").
const char* cpu_int8_kernels_in_use();
// Frees the CPU buffer cache's free blocks; returns their bytes.
int64_t release_cpu_buffer_cache();
// Bytes of free blocks the CPU buffer cache holds.
int64_t cpu_buffer_cache_bytes();

}  // namespace rnnfast
