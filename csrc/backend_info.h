// What the Python module init (rnnfast.cpp) reports about the backends and
// controls of them, without including any backend's headers. Defined by the
// CPU backend (cpu/cpu_backend.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace rnnfast {

// The CPU pointwise kernels in use ("AVX512", "AVX2" or "DEFAULT").
const char* cpu_kernels_in_use();
// The CPU GEMM in use ("mkl-packed", "blas" or "aten").
const char* cpu_gemm_in_use();
// Whether a bfloat16 op on the CPU keeps its GEMM operands in bfloat16
// (cpu/blas.h, native_bfloat16), else computes in float.
bool cpu_native_bfloat16();
// What runs the per-step products of a native-bfloat16 op whose shape
// rnnfast's AMX product takes (cpu/bf16_gemm.h): "rnnfast-AMX-BF16" where
// the CPU has AMX-BF16, Linux grants the tiles and ATEN_CPU_CAPABILITY caps
// nothing (unless RNNFAST_CPU_STEP_GEMM=blas), else "mkl-bf16", or "none"
// without MKL's bfloat16 GEMM.
const char* cpu_bf16_step_gemm();
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
// The choice between the BLAS and oneDNN for the float32 products over
// many rows (cpu/blas.h, bulk_product): chosen is "onednn",
// cpu_gemm_in_use(), or null before the first such product in this
// process; the best time of each on the measured product, in microseconds
// (0 where not timed: forced by RNNFAST_CPU_BULK_GEMM, or oneDNN cannot
// run, which why says).
struct BulkGemmChoice {
  const char* chosen;
  double blas_us, onednn_us;
  const char* why;
};
BulkGemmChoice cpu_bulk_gemm_choice();
// The kernels of rnnfast's own step product on this CPU ("AVX512", "AVX2"
// or "none": then it never runs).
const char* cpu_step_gemm_kernels();
// How many CPU time loops (runs of steps) so far in this process held a
// team of threads (cpu/step_team.h), by the team's size: element i counts
// teams of i threads.
std::vector<int64_t> cpu_step_team_runs();
// How many CPU time loops so far in this process ran their batch's rows in
// groups, one time loop per group on its own thread (cpu_backend.cpp), by
// the number of groups: element i counts loops of i groups.
std::vector<int64_t> cpu_row_group_runs();

namespace cpu {
template <typename T>
class StepWeight;
}  // namespace cpu

// The per-step product of a CPU time loop on one weight of T (float or
// c10::BFloat16), as the loop runs it past its first step (cpu/blas.h's
// StepWeight<T>, packed): for tests, and for float the benchmark harness's
// gemm floor, which times it beside torch's products. Row-major, raw
// addresses: A and B of T, C float32; the caller keeps the weight alive.
//   path: "auto" (what a time loop chooses), "blas", or for float
//   "rnnfast"; throws when that path cannot run here, or not max_rows rows.
//   path(): what runs. float: "rnnfast-AVX512", "rnnfast-AVX2",
//   "mkl-packed" or "unpacked" (the BLAS's plain product); bfloat16:
//   "rnnfast-AMX-BF16", "mkl-bf16" or "unpacked" (before the second use).
template <typename T>
class CpuStepProduct {
 public:
  // op(B) [k, n]: B is [n, k] (trans_b) or [k, n], with row stride ldb.
  CpuStepProduct(const std::string& path, int64_t max_rows, int64_t n,
                 int64_t k, intptr_t b, int64_t ldb, bool trans_b);
  ~CpuStepProduct();
  // C[m, n] = A[m, k] op(B) + beta C for m <= max_rows, beta 0 or 1 (0:
  // C is not read).
  void multiply(int64_t m, intptr_t a, int64_t lda, float beta, intptr_t c,
                int64_t ldc) const;
  std::string path() const;
  // Whether it runs on all threads (else on the caller's).
  bool threaded() const;

 private:
  std::unique_ptr<cpu::StepWeight<T>> weight_;
};
// How many products whose weight is used once (a one-step call's, a time
// loop's first step, an input projection of at most 16 rows) rnnfast's
// one-use product (cpu/step_gemm.h, multiply_stored) has run so far in
// this process.
int64_t cpu_one_use_products();
// A float product whose weight is used once (cpu/blas.h, multiply_once):
// C[m, n] = A[m, k] B^T (+ bias) + beta C, B [n, k] row-major, bias 0 (none)
// or the address of n floats, beta 0 or 1; raw addresses, row strides.
// For tests and the benchmark harness's gemm floor. path: "auto" (what an
// op runs), "blas" or "rnnfast" (throws where rnnfast's product cannot run
// m rows). Returns what ran.
std::string cpu_multiply_once(const std::string& path, int64_t m, int64_t n,
                              int64_t k, intptr_t a, int64_t lda, intptr_t b,
                              int64_t ldb, intptr_t bias, float beta,
                              intptr_t c, int64_t ldc);
// The same for bfloat16 A and B (bits, as uint16_t) and C in float, no
// bias (cpu/blas.h): path "auto", "blas" or "rnnfast" (throws where
// rnnfast's bfloat16 product cannot run m rows: it needs AVX512-BF16).
std::string cpu_multiply_once_bf16(const std::string& path, int64_t m,
                                   int64_t n, int64_t k, intptr_t a,
                                   int64_t lda, intptr_t b, int64_t ldb,
                                   float beta, intptr_t c, int64_t ldc);
// The conversion an op applies to a CPU tensor it reads in another dtype
// (op_impls.h, as_compute), for tests that compare it with ATen's: n
// contiguous elements at src of dtype `from` converted to `to` into dst
// (dtypes "float32", "bfloat16" or "float16"; raw addresses). Returns
// whether the op's own loop ran (small_cpu_conversion), else ATen's `to`.
bool cpu_op_conversion(intptr_t src, const std::string& from, intptr_t dst,
                       const std::string& to, int64_t n);
// Frees the CPU buffer cache's free blocks; returns their bytes.
int64_t release_cpu_buffer_cache();
// Bytes of free blocks the CPU buffer cache holds.
int64_t cpu_buffer_cache_bytes();

}  // namespace rnnfast
