// cuBLAS GEMM and device copy of CudaBackendBase (host code only, so it is
// compiled by the host compiler; the add kernel is in elementwise.cu).
#include "cuda_backend.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <limits>

namespace rnnfast::cuda {
namespace {

int as_int(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(),
              "rnnfast: GEMM ", name, " = ", v,
              " is outside the int range of cuBLAS");
  return static_cast<int>(v);
}

cublasOperation_t op(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

// cuBLAS's gemm and in-place geam for float and double.
cublasStatus_t xgemm(cublasHandle_t h, cublasOperation_t ta,
                     cublasOperation_t tb, int m, int n, int k,
                     const float* alpha, const float* a, int lda,
                     const float* b, int ldb, const float* beta, float* c,
                     int ldc) {
  return cublasSgemm(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
cublasStatus_t xgemm(cublasHandle_t h, cublasOperation_t ta,
                     cublasOperation_t tb, int m, int n, int k,
                     const double* alpha, const double* a, int lda,
                     const double* b, int ldb, const double* beta, double* c,
                     int ldc) {
  return cublasDgemm(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
cublasStatus_t xgeam(cublasHandle_t h, int m, int n, const float* alpha,
                     float* c, int ldc) {
  const float zero = 0;
  return cublasSgeam(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, alpha, c, ldc, &zero,
                     c, ldc, c, ldc);
}
cublasStatus_t xgeam(cublasHandle_t h, int m, int n, const double* alpha,
                     double* c, int ldc) {
  const double zero = 0;
  return cublasDgeam(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, alpha, c, ldc, &zero,
                     c, ldc, c, ldc);
}

template <typename T>
void gemm_impl(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
               T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
               T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // torch binds its handle to the current stream and workspace, and sets its
  // math mode from torch's float32 matmul precision (TF32 or not).
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  // Row-major C[m, n] is column-major C^T[n, m] with the same leading
  // dimension, and C^T = op(B)^T op(A)^T: swap the operands (and m with n),
  // keep the transpose flags.
  const int mi = as_int(m, "m"), ni = as_int(n, "n"), ki = as_int(k, "k");
  const int lda_i = as_int(lda, "lda"), ldb_i = as_int(ldb, "ldb"),
            ldc_i = as_int(ldc, "ldc");
  if (k == 0) {  // C = beta C; with beta == 0, C need not hold numbers
    if (beta == T(0)) {
      C10_CUDA_CHECK(cudaMemset2DAsync(
          c, sizeof(T) * ldc, 0, sizeof(T) * n, m,
          at::cuda::getCurrentCUDAStream()));
    } else {
      TORCH_CUDABLAS_CHECK(xgeam(handle, ni, mi, &beta, c, ldc_i));
    }
    return;
  }
  TORCH_CUDABLAS_CHECK(xgemm(handle, op(trans_b), op(trans_a), ni, mi, ki,
                             &alpha, b, ldb_i, a, lda_i, &beta, c, ldc_i));
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_impl(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          double alpha, const double* a, int64_t lda, const double* b,
          int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_impl(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void copy_bytes(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice,
                                 at::cuda::getCurrentCUDAStream()));
}

}  // namespace rnnfast::cuda
