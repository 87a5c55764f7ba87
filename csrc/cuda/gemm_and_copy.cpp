// cuBLAS GEMMs and device copies of CudaBackend (gemm_and_copy.h) (host code only, so it
// is compiled by the host compiler; the kernels are in elementwise.cu).
#include "gemm_and_copy.h"

#ifdef RNNFAST_SIMT_EMULATION
// The tests' CPU stand-ins for the cuBLAS and runtime calls below.
#include "simt_emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#endif
#include <c10/util/Exception.h>

#include <limits>
#include <type_traits>

namespace rnnfast::cuda {
namespace {

int as_int(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(),
              "rnnfast: GEMM ", name, " = ", v,
              " is outside the int range of cuBLAS");
  return static_cast<int>(v);
}

cublasOperation_t op(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

template <typename S>
constexpr cudaDataType_t data_type() {
  if constexpr (std::is_same_v<S, float>) return CUDA_R_32F;
  if constexpr (std::is_same_v<S, double>) return CUDA_R_64F;
  if constexpr (std::is_same_v<S, c10::Half>) return CUDA_R_16F;
  if constexpr (std::is_same_v<S, c10::BFloat16>) return CUDA_R_16BF;
}

}  // namespace

BlasHandle current_blas_handle() { return at::cuda::getCurrentCUDABlasHandle(); }

template <typename S, typename C>
void gemm(BlasHandle handle, bool trans_a, bool trans_b, int64_t m, int64_t n,
          int64_t k, const S* a, int64_t lda, const S* b, int64_t ldb,
          C beta, C* c, int64_t ldc) {
  const float beta_f = static_cast<float>(beta);
  TORCH_CHECK(beta_f == 0.0f || beta_f == 1.0f,
              "rnnfast: internal error: GEMM beta must be 0 or 1");
  if (m == 0 || n == 0) return;
  // Row-major C[m, n] is column-major C^T[n, m] with the same leading
  // dimension, and C^T = op(B)^T op(A)^T: swap the operands (and m with n),
  // keep the transpose flags.
  const int mi = as_int(m, "m"), ni = as_int(n, "n"), ki = as_int(k, "k");
  const int lda_i = as_int(lda, "lda"), ldb_i = as_int(ldb, "ldb"),
            ldc_i = as_int(ldc, "ldc");
  if (k == 0) {  // C = beta C; with beta == 0, C need not hold numbers
    if (beta_f == 0.0f) {
      C10_CUDA_CHECK(cudaMemset2DAsync(c, sizeof(C) * ldc, 0, sizeof(C) * n,
                                       m, at::cuda::getCurrentCUDAStream()));
    }
    return;
  }
  if constexpr (std::is_same_v<S, float> && std::is_same_v<C, float>) {
    const float alpha = 1.0f;
    TORCH_CUDABLAS_CHECK(cublasSgemm(handle, op(trans_b), op(trans_a), ni, mi,
                                     ki, &alpha, b, ldb_i, a, lda_i, &beta_f,
                                     c, ldc_i));
  } else if constexpr (std::is_same_v<S, double> &&
                       std::is_same_v<C, double>) {
    const double alpha = 1.0, beta_d = beta;
    TORCH_CUDABLAS_CHECK(cublasDgemm(handle, op(trans_b), op(trans_a), ni, mi,
                                     ki, &alpha, b, ldb_i, a, lda_i, &beta_d,
                                     c, ldc_i));
  } else {
    // Half types: inputs in S, float accumulation and scalars, C in S or
    // float.
    static_assert(std::is_same_v<S, c10::Half> ||
                  std::is_same_v<S, c10::BFloat16>);
    static_assert(std::is_same_v<C, S> || std::is_same_v<C, float>);
    const float alpha = 1.0f;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(
        handle, op(trans_b), op(trans_a), ni, mi, ki, &alpha, b,
        data_type<S>(), ldb_i, a, data_type<S>(), lda_i, &beta_f, c,
        data_type<C>(), ldc_i, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

#define RNNFAST_GEMM(S, C)                                                   \
  template void gemm<S, C>(BlasHandle, bool, bool, int64_t, int64_t,        \
                           int64_t, const S*, int64_t, const S*, int64_t, C, \
                           C*, int64_t);
RNNFAST_GEMM(float, float)
RNNFAST_GEMM(double, double)
RNNFAST_GEMM(c10::Half, c10::Half)
RNNFAST_GEMM(c10::Half, float)
RNNFAST_GEMM(c10::BFloat16, c10::BFloat16)
RNNFAST_GEMM(c10::BFloat16, float)
#undef RNNFAST_GEMM

void copy_bytes(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice,
                                 at::cuda::getCurrentCUDAStream()));
}

}  // namespace rnnfast::cuda
