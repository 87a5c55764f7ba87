// Row-major GEMM on raw CPU pointers for the per-step products of the time
// loop, where a dispatcher round trip per call would cost as much as the
// product itself at small batch sizes.
//
// It calls the Fortran BLAS (sgemm_/dgemm_) that libtorch_cpu exports (MKL
// in the x86 wheels, OpenBLAS elsewhere); measured on the 2-core Xeon of our
// CI machine, MKL's sgemm reaches the same throughput as oneDNN there (see
// README). Where torch exports no BLAS, it falls back to ATen's mm.
#pragma once

#include <cstdint>

namespace rnnfast::cpu {

// C[m, n] = alpha * op(A) * op(B) + beta * C, all row-major.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          double alpha, const double* a, int64_t lda, const double* b,
          int64_t ldb, double beta, double* c, int64_t ldc);

// The right-hand operand of a product repeated at every step of a time loop
// (a recurrent weight), packed once into the BLAS's internal layout where it
// offers one (MKL's cblas_sgemm_pack), so per-step products skip repacking:
// at batch 4 that repacking is most of a step's cost. It is packed when it
// is used a second time, not before: packing costs several plain products,
// which a one-step call (streaming decode) would never earn back.
//   multiply(m, a, lda, beta, c, ldc): C[m, n] = A[m, k] op(B) + beta C
template <typename T>
class StepWeight {
 public:
  StepWeight(bool trans_b, int64_t max_m, int64_t n, int64_t k, const T* b,
             int64_t ldb);
  ~StepWeight();
  StepWeight(const StepWeight&) = delete;
  StepWeight& operator=(const StepWeight&) = delete;
  // Logically const, but it may pack on use: one time loop (one thread at a
  // time) uses a StepWeight.
  void multiply(int64_t m, const T* a, int64_t lda, T beta, T* c,
                int64_t ldc) const;

 private:
  void pack() const;

  bool trans_b_;
  int64_t max_m_, n_, k_, ldb_;
  const T* b_;
  bool serial_;             // small products run on the calling thread only
  bool packable_ = false;   // the BLAS can pack this operand
  mutable int64_t uses_ = 0;        // products computed so far
  mutable void* packed_ = nullptr;  // owned, in the BLAS's own layout
};

// Which implementation gemm uses ("mkl-packed", "blas" or "aten").
const char* gemm_backend();

}  // namespace rnnfast::cpu
