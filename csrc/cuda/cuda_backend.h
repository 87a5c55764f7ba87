// The cell-independent half of lstm_driver.h's Backend interface on CUDA:
// row-major GEMM through cuBLAS (and StepWeight over it), a device-to-device
// copy and an elementwise add, on raw device pointers. A cell's CUDA backend
// derives from CudaBackendBase and adds its own step kernels (lstm_cuda.h).
//
// Every call works on the current device and its current stream (the one
// torch's cuBLAS handle is bound to), allocates nothing and never waits for
// the device, so a training step through these ops can be captured in a CUDA
// graph. OnDeviceOfFirst (op_guard.h) makes the input's device current
// before an op runs.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rnnfast::cuda {

// C[m, n] = alpha * op(A) * op(B) + beta * C, all row-major, through cuBLAS
// with torch's handle: float follows torch's float32 matmul precision (TF32
// when torch.backends.cuda.matmul.allow_tf32 is set), as torch.mm does.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          double alpha, const double* a, int64_t lda, const double* b,
          int64_t ldb, double beta, double* c, int64_t ldc);

// dst[0, bytes) = src[0, bytes), both device memory (cudaMemcpyAsync).
void copy_bytes(void* dst, const void* src, size_t bytes);

// dst[i] = a[i] + b[i] for i < count (one kernel launch).
void add(float* dst, const float* a, const float* b, int64_t count);
void add(double* dst, const double* a, const double* b, int64_t count);

// lstm_driver.h's StepWeight: the right-hand operand of a product repeated
// at every step of a time loop. cuBLAS reads it as it is (nothing to pack),
// so this only remembers it.
template <typename T>
class StepWeight {
 public:
  StepWeight(bool trans_b, int64_t /*max_m*/, int64_t n, int64_t k,
             const T* b, int64_t ldb)
      : trans_b_(trans_b), n_(n), k_(k), ldb_(ldb), b_(b) {}
  // C[m, n] = A[m, k] op(B) + beta C
  void multiply(int64_t m, const T* a, int64_t lda, T beta, T* c,
                int64_t ldc) const {
    gemm(false, trans_b_, m, n_, k_, T(1), a, lda, b_, ldb_, beta, c, ldc);
  }

 private:
  bool trans_b_;
  int64_t n_, k_, ldb_;
  const T* b_;
};

struct CudaBackendBase {
  template <typename T>
  using StepWeight = cuda::StepWeight<T>;
  template <typename T>
  static void copy(T* dst, const T* src, int64_t count) {
    copy_bytes(dst, src, sizeof(T) * static_cast<size_t>(count));
  }
  template <typename T>
  static void add(T* dst, const T* a, const T* b, int64_t count) {
    cuda::add(dst, a, b, count);
  }
};

}  // namespace rnnfast::cuda
