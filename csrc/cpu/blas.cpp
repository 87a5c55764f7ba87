#include "blas.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>
#include <type_traits>

extern "C" {
// Weak: resolved against libtorch_cpu's BLAS when it exports one.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const float* alpha, const float* a, const int* lda,
            const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const double* alpha, const double* a, const int* lda,
            const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's packed GEMM (CBLAS enums: RowMajor 101, NoTrans 111, Trans 112,
// Packed 151, BMatrix 162).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k)
    __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n,
                      int k, float alpha, const float* src, int ld,
                      float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n,
                         int k, const float* a, int lda, const float* b,
                         int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
// MKL's per-thread thread count (0: follow the global setting; the C entry
// point, mkl_set_num_threads_local is the Fortran one); returns the
// previous value.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace rnnfast::cpu {
namespace {

bool fits_int(int64_t v) { return v <= std::numeric_limits<int>::max(); }

// Fallback through ATen: views of the raw buffers.
template <typename T>
void gemm_aten(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
               T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
               T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>());
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld,
                  bool trans) {
    auto t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows,
                                               trans ? rows : cols},
                           {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  at::Tensor ct = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::Tensor prod = at::mm(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b));
  if (beta == T(0)) {
    ct.copy_(prod.mul_(alpha));
  } else {
    ct.mul_(beta).add_(prod, alpha);
  }
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the
// operands, keep the transpose flags.
template <typename T, typename Fn>
void gemm_blas(Fn fn, bool trans_a, bool trans_b, int64_t m, int64_t n,
               int64_t k, T alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N';
  const char tb = trans_b ? 'T' : 'N';
  const int mi = static_cast<int>(m), ni = static_cast<int>(n),
            ki = static_cast<int>(k), lda_i = static_cast<int>(lda),
            ldb_i = static_cast<int>(ldb), ldc_i = static_cast<int>(ldc);
  fn(&tb, &ta, &ni, &mi, &ki, &alpha, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
}

template <typename T, typename Fn>
void gemm_any(Fn fn, bool trans_a, bool trans_b, int64_t m, int64_t n,
              int64_t k, T alpha, const T* a, int64_t lda, const T* b,
              int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // C = beta C
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  if (fn != nullptr && fits_int(m) && fits_int(n) && fits_int(k) &&
      fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
    gemm_blas(fn, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
              ldc);
  } else {
    gemm_aten(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_any(sgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
           ldc);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          double alpha, const double* a, int64_t lda, const double* b,
          int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_any(dgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
           ldc);
}

namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151,
              kBMatrix = 162;

bool have_mkl_pack() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
         cblas_sgemm_compute != nullptr;
}
}  // namespace

// Small products run on one thread: the fork/join of a parallel region
// costs more than it saves (at batch 4 and H 128, a 256 KiB weight, it was
// most of a step). Small means few multiply-adds and a small weight: at a
// batch of 1-4 a step reads the whole weight for little arithmetic, and from
// 1 MiB (H 256) on, two cores streaming half of it each won (measured on the
// 2-core Xeon: a 2-layer H 256 decode step 0.34 -> 0.23 ms, T=100 B=2-4
// H=256 1.2-1.3x faster in inference and training).
constexpr int64_t kSerialGemmMacs = int64_t{1} << 21;
constexpr int64_t kSerialWeightBytes = int64_t{512} << 10;

// Runs MKL on the calling thread only while alive (a thread-local setting).
class SerialMkl {
 public:
  explicit SerialMkl(bool enable) {
    if (enable && MKL_Set_Num_Threads_Local != nullptr) {
      previous_ = MKL_Set_Num_Threads_Local(1);
      active_ = true;
    }
  }
  ~SerialMkl() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);
  }

 private:
  bool active_ = false;
  int previous_ = 0;
};

template <typename T>
StepWeight<T>::StepWeight(bool trans_b, int64_t max_m, int64_t n, int64_t k,
                          const T* b, int64_t ldb)
    : trans_b_(trans_b), max_m_(max_m), n_(n), k_(k), ldb_(ldb), b_(b),
      serial_(max_m * n * k < kSerialGemmMacs &&
              n * k * static_cast<int64_t>(sizeof(T)) < kSerialWeightBytes) {
  if constexpr (std::is_same_v<T, float>) {
    packable_ = have_mkl_pack() && max_m > 0 && fits_int(max_m) &&
                fits_int(n) && fits_int(k) && fits_int(ldb) && n > 0 && k > 0;
  }
}

template <typename T>
StepWeight<T>::~StepWeight() {
  std::free(packed_);
}

template <typename T>
void StepWeight<T>::pack() const {
  if constexpr (std::is_same_v<T, float>) {
    const size_t bytes = cblas_sgemm_pack_get_size(
        kBMatrix, static_cast<int>(max_m_), static_cast<int>(n_),
        static_cast<int>(k_));
    packed_ = std::malloc(bytes);
    TORCH_CHECK(packed_ != nullptr, "rnnfast: out of memory packing a weight");
    cblas_sgemm_pack(kRowMajor, kBMatrix, trans_b_ ? kTrans : kNoTrans,
                     static_cast<int>(max_m_), static_cast<int>(n_),
                     static_cast<int>(k_), 1.0f, b_, static_cast<int>(ldb_),
                     static_cast<float*>(packed_));
  }
}

template <typename T>
void StepWeight<T>::multiply(int64_t m, const T* a, int64_t lda, T beta, T* c,
                             int64_t ldc) const {
  const SerialMkl serial(serial_);
  // The first product runs unpacked; a second one means a time loop of
  // several steps, which repays the packing.
  if (packable_ && packed_ == nullptr && uses_ > 0) pack();
  ++uses_;
  if constexpr (std::is_same_v<T, float>) {
    if (packed_ != nullptr && m > 0 && fits_int(lda) && fits_int(ldc)) {
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m),
                          static_cast<int>(n_), static_cast<int>(k_), a,
                          static_cast<int>(lda),
                          static_cast<const float*>(packed_),
                          static_cast<int>(ldb_), beta, c,
                          static_cast<int>(ldc));
      return;
    }
  }
  gemm(false, trans_b_, m, n_, k_, T(1), a, lda, b_, ldb_, beta, c, ldc);
}

template class StepWeight<float>;
template class StepWeight<double>;

const char* gemm_backend() {
  if (have_mkl_pack()) return "mkl-packed";
  return sgemm_ != nullptr ? "blas" : "aten";
}

}  // namespace rnnfast::cpu
