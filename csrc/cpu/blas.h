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
#include <vector>

#include "../backend_info.h"

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
//
// A float weight of at most step_gemm::kMaxRows rows per product is instead
// packed for rnnfast's own small-batch product (step_gemm.h) where that is
// faster: at the first packing of each shape (rows, n, k, threaded or not)
// in the process both are timed on it and the faster one is kept for that
// shape from then on (step_gemm_choices() lists them). The environment
// variable RNNFAST_CPU_STEP_GEMM=blas or =rnnfast forces one (read when a
// StepWeight is made; for tests and comparisons), as RNNFAST_CPU_ROW_SPLIT=
// <rows> sets row_split_rows (0 turns the split off).
//   multiply(m, a, lda, beta, c, ldc): C[m, n] = A[m, k] op(B) + beta C
template <typename T>
class StepWeight {
 public:
  // path: "blas" or "rnnfast" forces one (tests); null reads the
  // environment.
  StepWeight(bool trans_b, int64_t max_m, int64_t n, int64_t k, const T* b,
             int64_t ldb, const char* path = nullptr);
  ~StepWeight();
  StepWeight(const StepWeight&) = delete;
  StepWeight& operator=(const StepWeight&) = delete;
  // Logically const, but it may pack on use: one time loop (one thread at a
  // time) uses a StepWeight.
  void multiply(int64_t m, const T* a, int64_t lda, T beta, T* c,
                int64_t ldc) const;

  // For a product split by rows over the threads of a parallel region:
  // prepare_use() on the calling thread before the region (it counts the
  // use and packs the weight when due, as multiply does), then
  // multiply_on_this_thread for each part, which only reads the weight and
  // runs on its caller's thread (safe to call concurrently).
  void prepare_use() const;
  void multiply_on_this_thread(int64_t m, const T* a, int64_t lda, T beta,
                               T* c, int64_t ldc) const;
  // What the packed products run: "rnnfast-<ISA>", "mkl-packed", or
  // "unpacked" before the packing.
  const char* packed_path() const;
  // Whether the products run on all threads (else on the caller's).
  bool threaded() const { return !serial_; }
  // The most rows a product may have.
  int64_t max_rows() const { return max_m_; }
  // The fewest rows per thread for which an LSTM step is split by batch
  // rows over the threads (cpu_backend.cpp); 0: never.
  int64_t row_split_rows() const { return row_split_rows_; }
  // Bytes of the weight (n x k).
  int64_t weight_bytes() const {
    return n_ * k_ * static_cast<int64_t>(sizeof(T));
  }

 private:
  void pack() const;
  bool choose_own() const;
  void compute(bool serial, int64_t m, const T* a, int64_t lda, T beta, T* c,
               int64_t ldc) const;

  bool trans_b_;
  int64_t max_m_, n_, k_, ldb_;
  const T* b_;
  bool serial_;             // small products run on the calling thread only
  bool packable_ = false;   // the BLAS can pack this operand
  bool own_candidate_ = false;  // rnnfast's product may run it
  int forced_ = 0;  // RNNFAST_CPU_STEP_GEMM: 0 measure, 1 BLAS, 2 own
  int64_t row_split_rows_ = 0;  // RNNFAST_CPU_ROW_SPLIT or kRowSplitRows
  mutable int64_t uses_ = 0;        // products computed so far
  mutable void* packed_ = nullptr;  // owned, in the BLAS's own layout
  mutable float* own_packed_ = nullptr;  // owned, step_gemm.h's layout
};

// The measured choices so far in this process, in the order made
// (backend_info.h).
std::vector<rnnfast::StepGemmChoice> step_gemm_choices();

// Which implementation gemm uses ("mkl-packed", "blas" or "aten").
const char* gemm_backend();

}  // namespace rnnfast::cpu
