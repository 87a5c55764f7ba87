// What the Python module init (rnnfast.cpp) reports about the backends and
// controls of them, without including any backend's headers. Defined by the
// CPU backend (cpu/cpu_backend.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rnnfast {

// The CPU pointwise kernels in use ("AVX512", "AVX2" or "DEFAULT").
const char* cpu_kernels_in_use();
// The CPU GEMM in use ("mkl-packed", "blas" or "aten").
const char* cpu_gemm_in_use();
// The CPU int8 kernels in use ("AMX-INT8+AVX512-VNNI", "AVX512-VNNI",
// "AVX2" or "portable").
const char* cpu_int8_kernels_in_use();
// One shape's choice between the BLAS and rnnfast's own product for the
// per-step recurrent GEMM of a CPU time loop (cpu/blas.h, StepWeight), with
// the best time of each measured on it, in microseconds.
struct StepGemmChoice {
  int64_t m, n, k;     // rows, columns, depth
  bool threaded;       // whether the product runs on all threads
  const char* chosen;  // "rnnfast-AVX512", "rnnfast-AVX2" or cpu_gemm_in_use()
  double blas_us, rnnfast_us;
};
// The choices made so far in this process, in the order made.
std::vector<StepGemmChoice> cpu_step_gemm_choices();
// The kernels of rnnfast's own step product on this CPU ("AVX512", "AVX2"
// or "none": then it never runs).
const char* cpu_step_gemm_kernels();
// For tests: C[m, n] = A[m, k] op(B) + beta C (row-major, raw addresses of
// float32 buffers) as a packed time loop's StepWeight computes it on
// `path` ("blas" or "rnnfast"); returns what ran ("rnnfast-AVX512",
// "rnnfast-AVX2", "mkl-packed", "blas" or "aten"), or throws when the path
// cannot run here.
std::string cpu_step_product_for_test(const std::string& path, bool threaded,
                                      int64_t m, int64_t n, int64_t k,
                                      intptr_t a, int64_t lda, intptr_t b,
                                      int64_t ldb, bool trans_b, float beta,
                                      intptr_t c, int64_t ldc);
// Frees the CPU buffer cache's free blocks; returns their bytes.
int64_t release_cpu_buffer_cache();
// Bytes of free blocks the CPU buffer cache holds.
int64_t cpu_buffer_cache_bytes();

}  // namespace rnnfast
