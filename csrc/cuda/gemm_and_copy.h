// The GEMMs and data movement of the CUDA backend (cuda_backend.h): row-major
// GEMMs through cuBLAS (and StepWeight over them), row copies and an
// elementwise add, on raw device pointers. No ATen here, as nvcc compiles
// elementwise.cu with it.
//
// Every call works on the current device and its current stream (the one
// torch's cuBLAS handle is bound to), allocates nothing and never waits for
// the device, so a training step through these ops can be captured in a CUDA
// graph. OnDeviceOfFirst (op_guard.h) makes the input's device current
// before an op runs.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <limits>

#include "../lstm_params.h"

struct cublasContext;  // cublasHandle_t is cublasContext*

namespace rnnfast::cuda {

using BlasHandle = cublasContext*;

// torch's cuBLAS handle for the current device, bound to the current stream
// and torch's workspace, with torch's float32 math mode (TF32 when
// torch.backends.cuda.matmul.allow_tf32 is set, as torch.mm). An op takes it
// once (StepWeight) rather than at every step's GEMM.
BlasHandle current_blas_handle();

// C[m, n] = op(A) op(B) + beta C, all row-major; A and B hold S, C holds S
// or, for half types, float; beta is 0 or 1. float and double run cuBLAS's
// Sgemm / Dgemm; half and bfloat16 run cublasGemmEx on tensor cores with
// float accumulation. Instantiated for (S, C) = (float, float),
// (double, double), (Half, Half), (Half, float), (BFloat16, BFloat16),
// (BFloat16, float).
template <typename S, typename C>
void gemm(BlasHandle handle, bool trans_a, bool trans_b, int64_t m, int64_t n,
          int64_t k, const S* a, int64_t lda, const S* b, int64_t ldb,
          C beta, C* c, int64_t ldc);

// dst[0, bytes) = src[0, bytes), both device memory (cudaMemcpyAsync).
void copy_bytes(void* dst, const void* src, size_t bytes);

// The runs of rows of Backend::copy_rows, a kernel launch per
// kMaxRowCopies runs (the list travels in the kernel's parameters).
constexpr int kMaxRowCopies = 120;
template <typename S>
void copy_rows(const RowCopy* copies, int64_t count, int64_t width, S* dst,
               const S* first, const S* second);

// dst[i] = a[i] + b[i] for i < count, summed in T (one kernel launch).
// Instantiated for (T, S) = (float, float), (double, double), (float, Half),
// (float, BFloat16).
template <typename T, typename S>
void add(S* dst, const T* a, const S* b, int64_t count);

// lstm_driver.h's StepWeight: the right-hand operand of a product repeated
// at every step of a time loop. cuBLAS reads it as it is (nothing to pack);
// the handle is taken once, here.
template <typename S>
class StepWeight {
 public:
  StepWeight(bool trans_b, int64_t /*max_m*/, int64_t n, int64_t k,
             const S* b, int64_t ldb)
      : handle_(current_blas_handle()),
        trans_b_(trans_b), n_(n), k_(k), ldb_(ldb), b_(b) {}
  // C[m, n] = A[m, k] op(B) + beta C
  template <typename C>
  void multiply(int64_t m, const S* a, int64_t lda, C beta, C* c,
                int64_t ldc) const {
    gemm(handle_, false, trans_b_, m, n_, k_, a, lda, b_, ldb_, beta, c, ldc);
  }
  // B itself, for kernels that read it directly: [n, k] with leading
  // dimension ld() when transposed(), else [k, n].
  const S* data() const { return b_; }
  int64_t ld() const { return ldb_; }
  bool transposed() const { return trans_b_; }
  int64_t k() const { return k_; }

 private:
  BlasHandle handle_;
  bool trans_b_;
  int64_t n_, k_, ldb_;
  const S* b_;
};

// Zoneout on the hidden state of a step and its backward (lstm_params.h),
// one launch each, computed in T. Instantiated for (T, S) as add, and C = S
// (or float for a half-type S).
template <typename T, typename S>
void zoneout_hidden(const HiddenZoneoutParams<T, S>& p);
template <typename T, typename S, typename C>
void zoneout_hidden_backward(const HiddenZoneoutBackwardParams<T, S, C>& p);

}  // namespace rnnfast::cuda
