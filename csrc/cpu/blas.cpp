#include "blas.h"
#include "amx.h"
#include "bf16_gemm.h"
#include "step_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/record_function.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <mutex>
#include <string>
#include <vector>
#include <limits>
#include <memory>
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
// MKL's bfloat16 GEMM with float accumulation and output (CBLAS enums as
// above; MKL_BF16 is the bits of a bfloat16).
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n,
                            int k, float alpha, const uint16_t* a, int lda,
                            const uint16_t* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
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

// An LSTM step splits its rows over the threads from this many rows per
// thread on (cpu_backend.cpp).
constexpr int64_t kRowSplitRows = 16;

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

namespace {

// RNNFAST_CPU_STEP_GEMM: 0 (unset or "auto") measure, 1 "blas", 2 "rnnfast".
int forced_step_gemm(const char* path) {
  const char* e = path != nullptr ? path : std::getenv("RNNFAST_CPU_STEP_GEMM");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return 0;
  if (std::strcmp(e, "blas") == 0) return 1;
  if (std::strcmp(e, "rnnfast") == 0) return 2;
  TORCH_CHECK(false, "RNNFAST_CPU_STEP_GEMM must be 'auto', 'blas' or "
              "'rnnfast', got '", e, "'");
}

// rnnfast's AMX-BF16 product of many rows through a packed weight of at
// most 512 KiB splits over the threads by passes of 32 rows (two row tiles,
// what one pass of the kernel computes), each thread all the columns of its
// rows (amx_multiply_rows), where there are enough passes for that
// (amx_by_rows). Every element is the same sum however the rows are split.
// Split by columns instead, each thread streamed all of A and wrote every
// row's C. On the Xeon, 2 threads, [6400, k] x [k, n]: k=128 n=512 0.98 ->
// 0.58 ms (0.85 ms on one thread by columns), k=256 n=1024 1.91 -> 1.68
// ms; but k=512 n=2048 (a 2 MiB weight, each thread reading all of it per
// pass) 3.07 -> 5.53 ms, hence the bound.
constexpr int64_t kPassRows = 32;
// The fewest rows for which gemm packs its weight for the AMX product.
constexpr int64_t kBulkAmxMinRows = 256;
bool amx_by_rows(int64_t m, int64_t n, int64_t k) {
  constexpr int64_t kMaxWeightBytes = int64_t{512} << 10;
  const int64_t passes = (m + kPassRows - 1) / kPassRows;
  return passes >= 4 * static_cast<int64_t>(at::get_num_threads()) &&
         bf16::packed_elements(n, k) * int64_t(sizeof(uint16_t)) <=
             kMaxWeightBytes;
}
void amx_multiply_rows(int64_t m, int64_t n, int64_t k, const uint16_t* a,
                       int64_t lda, const uint16_t* packed, float beta,
                       float* c, int64_t ldc) {
  const int64_t blocks = bf16::column_blocks(n);
  const int64_t passes = (m + kPassRows - 1) / kPassRows;
  at::parallel_for(0, passes, 1, [&](int64_t begin, int64_t end) {
    const int64_t row = begin * kPassRows;
    const int64_t rows = std::min(end * kPassRows, m) - row;
    bf16::multiply_blocks(rows, k, a + row * lda, lda, packed, 0, blocks, beta,
                          c + row * ldc, ldc);
  });
}

// The measured choices, per shape, for the whole process.
std::mutex choices_mutex;
std::vector<rnnfast::StepGemmChoice>& choices() {
  static std::vector<rnnfast::StepGemmChoice> c;
  return c;
}
// The choice made for a shape, or null; called with choices_mutex held.
const rnnfast::StepGemmChoice* find_choice(int64_t m, int64_t n, int64_t k,
                                           bool threaded) {
  for (const rnnfast::StepGemmChoice& c : choices()) {
    if (c.m == m && c.n == n && c.k == k && c.threaded == threaded) return &c;
  }
  return nullptr;
}

const char* own_kernel_name() {
  static const std::string name =
      std::string("rnnfast-") + (step_gemm::kernels_in_use() != nullptr
                                     ? step_gemm::kernels_in_use()
                                     : "none");
  return name.c_str();
}

float* alloc_panels(int64_t n, int64_t k) {
  const size_t bytes =
      (step_gemm::packed_floats(n, k) * sizeof(float) + 63) / 64 * 64;
  auto* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p != nullptr, "rnnfast: out of memory packing a weight");
  return p;
}

// op(B) [k, n] packed for the AMX-BF16 product (bf16_gemm.h), in a new
// 64-byte aligned block the caller frees with std::free.
uint16_t* amx_pack(bool trans_b, int64_t n, int64_t k, const c10::BFloat16* b,
                   int64_t ldb) {
  const size_t bytes =
      (bf16::packed_elements(n, k) * sizeof(uint16_t) + 63) / 64 * 64;
  auto* p = static_cast<uint16_t*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p != nullptr, "rnnfast: out of memory packing a weight");
  bf16::pack(trans_b, n, k, reinterpret_cast<const uint16_t*>(b), ldb, p);
  return p;
}

}  // namespace

namespace {

// Whether the products of up to max_m rows by an [n, k] weight of
// `element_bytes` elements run on the calling thread only
// (kSerialGemmMacs, kSerialWeightBytes).
bool serial_product(int64_t max_m, int64_t n, int64_t k, int64_t element_bytes) {
  return max_m * n * k < kSerialGemmMacs &&
         n * k * element_bytes < kSerialWeightBytes;
}

// RNNFAST_CPU_ROW_SPLIT, or kRowSplitRows.
int64_t row_split_setting() {
  const char* split = std::getenv("RNNFAST_CPU_ROW_SPLIT");
  return split != nullptr && *split != '\0'
             ? std::max<int64_t>(0, std::atoll(split))
             : kRowSplitRows;
}

std::atomic<int64_t> stored_products{0};  // one_use_products_run()

// The bfloat16 gemm's products other than the one-use product's (below).
void gemm_bf16_blas(bool trans_a, bool trans_b, int64_t m, int64_t n,
                    int64_t k, const c10::BFloat16* a, int64_t lda,
                    const c10::BFloat16* b, int64_t ldb, float beta, float* c,
                    int64_t ldc);

void multiply_stored(bool serial, int64_t m, int64_t n, int64_t k,
                     const float* a, int64_t lda, const float* b, int64_t ldb,
                     const float* bias, float beta, float* c, int64_t ldc) {
  step_gemm::multiply_stored(serial, m, n, k, a, lda, b, ldb, bias, beta, c,
                             ldc);
  stored_products.fetch_add(1, std::memory_order_relaxed);
}

// dst [rows, cols] (dense) = src [rows, cols] (row stride ld), each
// bfloat16 widened exactly (to float, then T).
template <typename T>
void widen_bf16_rows(int64_t rows, int64_t cols, const c10::BFloat16* src,
                     int64_t ld, T* dst) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        dst[i * cols + j] = static_cast<T>(static_cast<float>(src[i * ld + j]));
      }
    }
  });
}

// The same of a bfloat16 weight, read in place.
void multiply_stored(bool serial, int64_t m, int64_t n, int64_t k,
                     const float* a, int64_t lda, const c10::BFloat16* b,
                     int64_t ldb, const float* bias, float beta, float* c,
                     int64_t ldc) {
  step_gemm::multiply_stored_bf16_weight(
      serial, m, n, k, a, lda, reinterpret_cast<const uint16_t*>(b), ldb,
      bias, beta, c, ldc);
  stored_products.fetch_add(1, std::memory_order_relaxed);
}

// Whether rnnfast's one-use product takes m rows on this CPU (whatever
// RNNFAST_CPU_STEP_GEMM says).
bool stored_product_takes(int64_t m) {
  return m >= 1 && m <= step_gemm::kMaxStoredRows &&
         step_gemm::kernels_in_use() != nullptr;
}
}  // namespace

int64_t one_use_products_run() {
  return stored_products.load(std::memory_order_relaxed);
}

bool stored_product_runs(int64_t m, const char* path) {
  return stored_product_takes(m) && forced_step_gemm(path) != 1;
}

const char* multiply_once(const char* path, int64_t m, int64_t n, int64_t k,
                          const float* a, int64_t lda, const float* b,
                          int64_t ldb, const float* bias, float beta, float* c,
                          int64_t ldc) {
  if (m <= 0 || n <= 0) return gemm_backend();
  const bool serial = serial_product(m, n, k, sizeof(float));
  if (k > 0 && stored_product_runs(m, path)) {
    multiply_stored(serial, m, n, k, a, lda, b, ldb, bias, beta, c, ldc);
    return own_kernel_name();
  }
  if (bias != nullptr) {  // C = bias + beta C, then C += A B^T
    for (int64_t i = 0; i < m; ++i) {
      float* row = c + i * ldc;
      for (int64_t j = 0; j < n; ++j) {
        row[j] = beta != 0.0f ? row[j] + bias[j] : bias[j];
      }
    }
    beta = 1.0f;
  }
  const SerialMkl serial_mkl(serial);
  gemm(false, true, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  return gemm_backend();
}

const char* multiply_once(const char* path, int64_t m, int64_t n, int64_t k,
                          const float* a, int64_t lda, const c10::BFloat16* b,
                          int64_t ldb, const float* bias, float beta, float* c,
                          int64_t ldc) {
  if (m <= 0 || n <= 0) return gemm_backend();
  if (k > 0 && stored_product_runs(m, path)) {
    multiply_stored(serial_product(m, n, k, sizeof(float)), m, n, k, a, lda,
                    b, ldb, bias, beta, c, ldc);
    return own_kernel_name();
  }
  std::vector<float> weight(static_cast<size_t>(n * k));
  widen_bf16_rows(n, k, b, ldb, weight.data());
  return multiply_once(path, m, n, k, a, lda, weight.data(), k, bias, beta, c,
                       ldc);
}

bool stored_bf16_product_runs(int64_t m, const char* path) {
  return m >= 1 && m <= step_gemm::kMaxStoredBf16Rows &&
         step_gemm::bf16_stored_supported() && forced_step_gemm(path) != 1;
}

const char* multiply_once(const char* path, int64_t m, int64_t n, int64_t k,
                          const c10::BFloat16* a, int64_t lda,
                          const c10::BFloat16* b, int64_t ldb, float beta,
                          float* c, int64_t ldc) {
  if (m > 0 && n > 0 && k > 0 && stored_bf16_product_runs(m, path)) {
    const bool serial = serial_product(m, n, k, sizeof(c10::BFloat16));
    step_gemm::multiply_stored_bf16(serial, m, n, k,
                                    reinterpret_cast<const uint16_t*>(a), lda,
                                    reinterpret_cast<const uint16_t*>(b), ldb,
                                    nullptr, beta, c, ldc);
    stored_products.fetch_add(1, std::memory_order_relaxed);
    return "rnnfast-AVX512-BF16";
  }
  gemm_bf16_blas(false, true, m, n, k, a, lda, b, ldb, beta, c, ldc);
  return cblas_gemm_bf16bf16f32 != nullptr ? "mkl-bf16" : "aten";
}

template <typename T>
StepWeight<T>::StepWeight(bool trans_b, int64_t max_m, int64_t n, int64_t k,
                          const T* b, int64_t ldb, const char* path)
    : trans_b_(trans_b), max_m_(max_m), n_(n), k_(k), ldb_(ldb), b_(b),
      serial_(serial_product(max_m, n, k, sizeof(T))),
      row_split_rows_(row_split_setting()) {
  if constexpr (std::is_same_v<T, float>) {
    packable_ = have_mkl_pack() && max_m > 0 && fits_int(max_m) &&
                fits_int(n) && fits_int(k) && fits_int(ldb) && n > 0 && k > 0;
    forced_ = forced_step_gemm(path);
    set_choice_shape(max_m, !serial_);
  }
}

template <typename T>
StepWeight<T>::StepWeight(bool trans_b, int64_t max_m, int64_t n, int64_t k,
                          const c10::BFloat16* b, int64_t ldb, const char* path)
    : StepWeight(trans_b, max_m, n, k, static_cast<const T*>(nullptr), ldb,
                 path) {
  b16_ = b;
}

template <typename T>
bool StepWeight<T>::unpacked_stored(int64_t m) const {
  return trans_b_ && forced_ != 1 && stored_product_takes(m);
}

template <typename T>
void StepWeight<T>::convert_weight() const {
  if (b16_ == nullptr || b_ != nullptr) return;
  const int64_t rows = trans_b_ ? n_ : k_, cols = trans_b_ ? k_ : n_;
  float_copy_.reset(new T[static_cast<size_t>(rows * cols)]);
  widen_bf16_rows(rows, cols, b16_, ldb_, float_copy_.get());
  b_ = float_copy_.get();
  ldb_ = cols;
}

template <typename T>
void StepWeight<T>::set_choice_shape(int64_t rows, bool threaded) const {
  if constexpr (std::is_same_v<T, float>) {
    choice_rows_ = rows;
    choice_threaded_ = threaded;
    own_candidate_ = step_gemm::kernels_in_use() != nullptr && rows > 0 &&
                     rows <= step_gemm::kMaxRows && n_ > 0 && k_ > 0 &&
                     forced_ != 1;
    if (forced_ == 2 && own_candidate_) packable_ = false;
  }
}

template <typename T>
void StepWeight<T>::split_products(int64_t rows) const {
  // Decided at the packing, which a split loop's products follow.
  if (packed_ != nullptr || own_packed_ != nullptr) return;
  set_choice_shape(std::min(rows, max_m_), false);
}

template <typename T>
StepWeight<T>::~StepWeight() {
  std::free(packed_);
  std::free(own_packed_);
}

template <typename T>
void StepWeight<T>::pack() const {
  convert_weight();
  if constexpr (std::is_same_v<T, float>) {
    if (packable_) {
      const size_t bytes = cblas_sgemm_pack_get_size(
          kBMatrix, static_cast<int>(max_m_), static_cast<int>(n_),
          static_cast<int>(k_));
      packed_ = std::malloc(bytes);
      TORCH_CHECK(packed_ != nullptr,
                  "rnnfast: out of memory packing a weight");
      cblas_sgemm_pack(kRowMajor, kBMatrix, trans_b_ ? kTrans : kNoTrans,
                       static_cast<int>(max_m_), static_cast<int>(n_),
                       static_cast<int>(k_), 1.0f, b_, static_cast<int>(ldb_),
                       static_cast<float*>(packed_));
    }
    if (!own_candidate_) return;
    own_packed_ = alloc_panels(n_, k_);
    step_gemm::pack(trans_b_, n_, k_, b_, ldb_, own_packed_);
    if (forced_ == 2) return;
    // Measured (once per shape) or already known: keep one of the two.
    if (choose_own()) {
      std::free(packed_);
      packed_ = nullptr;
    } else {
      std::free(own_packed_);
      own_packed_ = nullptr;
    }
  }
}

template <typename T>
bool StepWeight<T>::choose_own() const {
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    // A choice by timing may differ from one process to the next, and the
    // two products round differently: under
    // torch.use_deterministic_algorithms(True) the BLAS's product runs,
    // unmeasured, so that a run's results do not depend on the timing.
    if (at::globalContext().deterministicAlgorithms()) return false;
    const bool threaded = choice_threaded_, serial = !threaded;
    const int64_t m = choice_rows_;
    std::lock_guard<std::mutex> lock(choices_mutex);
    if (const auto* made = find_choice(m, n_, k_, threaded)) {
      return made->chosen[0] == 'r';
    }
    // Time both products on this weight: m rows of a fixed input (the
    // shape the products will have), each run alternately after a
    // warm-up, the best of kRuns.
    constexpr int kRuns = 9;
    std::vector<float> a(m * k_), c(m * n_);
    for (size_t i = 0; i < a.size(); ++i) a[i] = 0.01f * float(i % 13) - 0.06f;
    double best[2] = {1e30, 1e30};
    for (int run = -1; run < kRuns; ++run) {
      for (int own = 0; own < 2; ++own) {
        const auto start = std::chrono::steady_clock::now();
        if (own) {
          step_gemm::multiply(serial, m, n_, k_, a.data(), k_, own_packed_,
                              0.0f, c.data(), n_);
        } else if (packed_ != nullptr) {
          compute(serial, m, a.data(), k_, 0.0f, c.data(), n_);
        } else {
          // No packed form of the BLAS's (torch's BLAS is not MKL): its
          // plain product, which compute() would not run while the own
          // panels exist (it would time the own product twice).
          const SerialMkl serial_mkl(serial);
          gemm(false, trans_b_, m, n_, k_, T(1), a.data(), k_, b_, ldb_,
               0.0f, c.data(), n_);
        }
        const std::chrono::duration<double, std::micro> us =
            std::chrono::steady_clock::now() - start;
        if (run >= 0) best[own] = std::min(best[own], us.count());
      }
    }
    const bool own = best[1] < best[0];
    choices().push_back({m, n_, k_, threaded,
                         own ? own_kernel_name() : gemm_backend(), best[0],
                         best[1]});
    return own;
  }
}

template <typename T>
void StepWeight<T>::prepare_use() const {
  // A bfloat16 weight is read in place by a first product only where the
  // one-use product takes every product this weight may have (compute);
  // otherwise, and for a second, it is converted here, on the calling
  // thread, before the products of a split loop read it.
  if (b16_ != nullptr && b_ == nullptr &&
      (uses_ > 0 || !std::is_same_v<T, float> || !unpacked_stored(max_m_))) {
    convert_weight();
  }
  // The first product runs unpacked; a second one means a time loop of
  // several steps, which repays the packing.
  if ((packable_ || own_candidate_) && packed_ == nullptr &&
      own_packed_ == nullptr && uses_ > 0) {
    pack();
  }
  ++uses_;
}

template <typename T>
void StepWeight<T>::multiply(int64_t m, const T* a, int64_t lda, T beta, T* c,
                             int64_t ldc) const {
  prepare_use();
  compute(serial_, m, a, lda, beta, c, ldc);
}

template <typename T>
void StepWeight<T>::multiply_on_this_thread(int64_t m, const T* a,
                                            int64_t lda, T beta, T* c,
                                            int64_t ldc) const {
  compute(true, m, a, lda, beta, c, ldc);
}

template <typename T>
bool StepWeight<T>::prepare_column_split() const {
  if constexpr (std::is_same_v<T, float>) {
    if (!own_candidate_) return false;
    // Only where the own product is forced or, measured on one thread, at
    // most 1.25x the BLAS's time (the two are close at m=4 H=128 on the
    // Xeon's AVX-512, where a team took 15% off an evaluating loop); split
    // in halves, an AVX2 kernel 1.4x slower than MKL's product gained
    // nothing (AVX2 forced on the Xeon: T=200 B=4 H=128 1.00-1.03x the
    // time with a team). Never under deterministic algorithms, whose steps
    // run the BLAS's product unmeasured.
    if (forced_ != 2) {
      if (at::globalContext().deterministicAlgorithms()) return false;
      // both packed forms and the measurement, as at a second use
      if (packed_ == nullptr && own_packed_ == nullptr) pack();
      if (!own_close_to_blas(1.25)) return false;
    }
    if (own_packed_ == nullptr) {
      convert_weight();
      own_packed_ = alloc_panels(n_, k_);
      step_gemm::pack(trans_b_, n_, k_, b_, ldb_, own_packed_);
    }
    std::free(packed_);  // the own product from now on
    packed_ = nullptr;
    return true;
  } else {
    return false;
  }
}

template <typename T>
bool StepWeight<T>::own_close_to_blas(double slack) const {
  // The shape's measurement (pack() made it, or an earlier weight did).
  std::lock_guard<std::mutex> lock(choices_mutex);
  const auto* made = find_choice(choice_rows_, n_, k_, choice_threaded_);
  return made != nullptr && made->rnnfast_us <= slack * made->blas_us;
}

template <typename T>
int64_t StepWeight<T>::column_panels() const {
  return step_gemm::panels(n_);
}

template <typename T>
void StepWeight<T>::multiply_panels(int64_t m, const T* a, int64_t lda,
                                    T beta, T* c, int64_t ldc,
                                    int64_t panel_begin,
                                    int64_t panel_end) const {
  if constexpr (std::is_same_v<T, float>) {
    TORCH_INTERNAL_ASSERT(own_packed_ != nullptr && packed_ == nullptr);
    // A's rows were mostly written by the other threads of the team (the
    // last step's h, or d): ask for all of their lines at once, before the
    // tiles read them one element per row at a time.
    if (k_ > 0) step_gemm::prefetch_rows(m, a, lda, 0, k_);
    step_gemm::multiply_panel_range(m, n_, k_, a, lda, own_packed_,
                                    panel_begin, panel_end, beta, c, ldc);
  } else {
    TORCH_INTERNAL_ASSERT(false, "rnnfast: a ", sizeof(T),
                          "-byte weight is not split by columns");
  }
}

// With both packed forms present (while measuring), the BLAS's.
template <typename T>
void StepWeight<T>::compute(bool serial, int64_t m, const T* a, int64_t lda,
                            T beta, T* c, int64_t ldc) const {
  if constexpr (std::is_same_v<T, float>) {
    if (packed_ != nullptr && m > 0 && fits_int(lda) && fits_int(ldc)) {
      const SerialMkl serial_mkl(serial);
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m),
                          static_cast<int>(n_), static_cast<int>(k_), a,
                          static_cast<int>(lda),
                          static_cast<const float*>(packed_),
                          static_cast<int>(ldb_), beta, c,
                          static_cast<int>(ldc));
      return;
    }
    if (own_packed_ != nullptr && m > 0) {
      step_gemm::multiply(serial, m, n_, k_, a, lda, own_packed_, beta, c,
                          ldc);
      return;
    }
    // Unpacked (the first use: a one-step call's only one): the weight
    // read once where it lies; a bfloat16 one is left unconverted only
    // where this product takes it (prepare_use).
    if (b_ == nullptr) {
      TORCH_INTERNAL_ASSERT(b16_ != nullptr && (m == 0 || unpacked_stored(m)),
                            "rnnfast: a bfloat16 weight read in place by a "
                            "product that cannot take it");
      if (m > 0) {
        multiply_stored(serial, m, n_, k_, a, lda, b16_, ldb_, nullptr, beta,
                        c, ldc);
      }
      return;
    }
    if (unpacked_stored(m)) {
      multiply_stored(serial, m, n_, k_, a, lda, b_, ldb_, nullptr, beta, c,
                      ldc);
      return;
    }
  }
  const SerialMkl serial_mkl(serial);
  gemm(false, trans_b_, m, n_, k_, T(1), a, lda, b_, ldb_, beta, c, ldc);
}

template class StepWeight<float>;
template class StepWeight<double>;

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
          int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // Rows by a weight as stored (x W^T: among them a one-step call's
  // products and a time loop's first step): multiply_once runs the few-row
  // ones on rnnfast's one-use product where the CPU has AVX512-BF16, the
  // others as below.
  if (!trans_a && trans_b && (beta == 0.0f || beta == 1.0f)) {
    multiply_once(nullptr, m, n, k, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  gemm_bf16_blas(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

namespace {
void gemm_bf16_blas(bool trans_a, bool trans_b, int64_t m, int64_t n,
                    int64_t k, const c10::BFloat16* a, int64_t lda,
                    const c10::BFloat16* b, int64_t ldb, float beta, float* c,
                    int64_t ldc) {
  if (m == 0 || n == 0) return;
  // A bulk product of rows of A (an input projection, x W^T) on rnnfast's
  // AMX-BF16 kernel where it runs the shape, split by rows, its weight
  // packed here: on the Xeon's AMX it took 0.65-0.7x MKL's time for
  // [6400, 256] x [256, 1024] (1.68 against 2.4-2.6 ms on 2 threads, 2.65
  // against 4.9 ms on one), MKL's bfloat16 GEMM repacking B itself anyway.
  // Not for transposed A (the weight gradients) nor where
  // RNNFAST_CPU_STEP_GEMM=blas asks for MKL's products.
  if (!trans_a && m >= kBulkAmxMinRows && (beta == 0.0f || beta == 1.0f) &&
      bf16::supported(n, k) && amx_by_rows(m, n, k) &&
      forced_step_gemm(nullptr) != 1 && amx::allowed(amx::Feature::kBf16)) {
    const std::unique_ptr<uint16_t, decltype(&std::free)> packed(
        amx_pack(trans_b, n, k, b, ldb), &std::free);
    amx_multiply_rows(m, n, k, reinterpret_cast<const uint16_t*>(a), lda,
                      packed.get(), beta, c, ldc);
    return;
  }
  if (cblas_gemm_bf16bf16f32 != nullptr && k > 0 && fits_int(m) &&
      fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) &&
      fits_int(ldc)) {
    cblas_gemm_bf16bf16f32(
        kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans,
        static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f,
        reinterpret_cast<const uint16_t*>(a), static_cast<int>(lda),
        reinterpret_cast<const uint16_t*>(b), static_cast<int>(ldb), beta, c,
        static_cast<int>(ldc));
    return;
  }
  // In float through ATen (and C = beta C when k is 0).
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
  auto operand = [&](const c10::BFloat16* p, int64_t rows, int64_t cols,
                     int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<c10::BFloat16*>(p),
                                 {trans ? cols : rows, trans ? rows : cols},
                                 {ld, 1}, bf16);
    return (trans ? t.t() : t).to(at::kFloat);
  };
  at::Tensor ct = at::from_blob(c, {m, n}, {ldc, 1},
                                at::TensorOptions().dtype(at::kFloat));
  at::Tensor prod = k > 0 ? at::mm(operand(a, m, k, lda, trans_a),
                                   operand(b, k, n, ldb, trans_b))
                          : at::zeros({m, n}, ct.options());
  if (beta == 0.0f) {
    ct.copy_(prod);
  } else {
    ct.mul_(beta).add_(prod);
  }
}
}  // namespace

bool native_bfloat16() {
  const char* e = std::getenv("RNNFAST_CPU_NATIVE_BF16");
  if (e != nullptr && *e != '\0') {
    TORCH_CHECK(std::strcmp(e, "0") == 0 || std::strcmp(e, "1") == 0,
                "RNNFAST_CPU_NATIVE_BF16 must be 0 or 1, got '", e, "'");
    TORCH_CHECK(e[0] == '0' || cblas_gemm_bf16bf16f32 != nullptr,
                "RNNFAST_CPU_NATIVE_BF16=1: torch's BLAS has no bfloat16 "
                "GEMM (MKL's cblas_gemm_bf16bf16f32) here");
    return e[0] == '1';
  }
  // Only where rnnfast's AMX product runs the per-step products: without
  // AMX, MKL's bfloat16 GEMM runs them and the bulk ones, and on an AMD
  // EPYC Zen 5 (AVX512-BF16, no AMX) it ran at MKL's float rate (160-190
  // GFLOP/s on 2 threads, [64-6400, 256] x [256, 1024]), where the float
  // path's products (oneDNN, rnnfast's AVX-512 tiles) reach 310-445: a
  // bfloat16 LSTM took 2.0-2.4x the time of the same op computing in float
  // (T=100 B=64 H=256: inference 49.6 against 20.5 ms, training 141
  // against 70).
  static const bool fast_on_this_cpu = [] {
    if (cblas_gemm_bf16bf16f32 == nullptr) return false;
    if (at::get_cpu_capability() != "AVX512") return false;
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx512bf16") != 0 &&
           amx::allowed(amx::Feature::kBf16);
#else
    return false;
#endif
  }();
  return fast_on_this_cpu;
}

StepWeight<c10::BFloat16>::StepWeight(bool trans_b, int64_t max_m, int64_t n,
                                      int64_t k, const c10::BFloat16* b,
                                      int64_t ldb, const char* path)
    : trans_b_(trans_b), max_m_(max_m), n_(n), k_(k), ldb_(ldb), b_(b),
      // by the float weight's rule on the product's multiply-adds and the
      // bytes of weight it streams (so a bfloat16 weight of up to twice the
      // elements stays on one thread; not measured apart)
      serial_(serial_product(max_m, n, k, sizeof(c10::BFloat16))),
      row_split_rows_(row_split_setting()) {
  amx_candidate_ = max_m > 0 && bf16::supported(n, k) &&
                   forced_step_gemm(path) != 1 &&
                   amx::allowed(amx::Feature::kBf16);
}

StepWeight<c10::BFloat16>::~StepWeight() { std::free(amx_packed_); }

void StepWeight<c10::BFloat16>::prepare_use() const {
  // Packed at the second use, as a float weight (StepWeight<T>).
  if (amx_candidate_ && amx_packed_ == nullptr && uses_ > 0) {
    amx_packed_ = amx_pack(trans_b_, n_, k_, b_, ldb_);
  }
  ++uses_;
}

const char* StepWeight<c10::BFloat16>::packed_path() const {
  if (amx_packed_ != nullptr) return "rnnfast-AMX-BF16";
  return uses_ > 1 ? "mkl-bf16" : "unpacked";
}


const char* bf16_step_gemm() {
  if (forced_step_gemm(nullptr) != 1 && amx::allowed(amx::Feature::kBf16)) {
    return "rnnfast-AMX-BF16";
  }
  return cblas_gemm_bf16bf16f32 != nullptr ? "mkl-bf16" : "none";
}

void StepWeight<c10::BFloat16>::compute(bool serial, int64_t m,
                                        const c10::BFloat16* a, int64_t lda,
                                        float beta, float* c,
                                        int64_t ldc) const {
  TORCH_INTERNAL_ASSERT(beta == 0.0f || beta == 1.0f);
  if (amx_packed_ != nullptr && m > 0) {
    const auto* a_bits = reinterpret_cast<const uint16_t*>(a);
    const int64_t blocks = bf16::column_blocks(n_);
    if (serial || at::in_parallel_region() || at::get_num_threads() < 2) {
      bf16::multiply_blocks(m, k_, a_bits, lda, amx_packed_, 0, blocks, beta,
                            c, ldc);
      return;
    }
    // Many rows (an input projection): split by rows.
    if (amx_by_rows(m, n_, k_)) {
      amx_multiply_rows(m, n_, k_, a_bits, lda, amx_packed_, beta, c, ldc);
      return;
    }
    // Else pairs of column blocks (what one pass of the kernel computes)
    // over the threads.
    const int64_t pairs = (blocks + 1) / 2;
    at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
      const int64_t first = 2 * begin;
      const int64_t last = std::min(2 * end, blocks);
      bf16::multiply_blocks(m, k_, a_bits, lda, amx_packed_, first,
                            last - first, beta, c, ldc);
    });
    return;
  }
  const SerialMkl serial_mkl(serial);
  gemm(false, trans_b_, m, n_, k_, a, lda, b_, ldb_, beta, c, ldc);
}

void StepWeight<c10::BFloat16>::compute(bool serial, int64_t m,
                                        const c10::BFloat16* a, int64_t lda,
                                        float beta, c10::BFloat16* c,
                                        int64_t ldc) const {
  // In float, then rounded (the projection's output, beta 0).
  TORCH_INTERNAL_ASSERT(beta == 0.0f);
  thread_local std::vector<float> product;
  product.resize(static_cast<size_t>(m * n_));
  compute(serial, m, a, lda, 0.0f, product.data(), n_);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n_; ++j) {
      c[i * ldc + j] = c10::BFloat16(product[i * n_ + j]);
    }
  }
}

std::vector<rnnfast::StepGemmChoice> step_gemm_choices() {
  std::lock_guard<std::mutex> lock(choices_mutex);
  return choices();
}

template <typename T>
const char* StepWeight<T>::packed_path() const {
  if (own_packed_ != nullptr && packed_ == nullptr) return own_kernel_name();
  if (packed_ != nullptr) return "mkl-packed";
  return "unpacked";
}

const char* gemm_backend() {
  if (have_mkl_pack()) return "mkl-packed";
  return sgemm_ != nullptr ? "blas" : "aten";
}

namespace {

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha): result =
// alpha mat1 mat2 + beta result, in result's memory (ATen's oneDNN matmul,
// exported by libtorch_cpu without a header). Null where this torch has no
// such symbol.
using OnednnMatmul = void (*)(const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, float, float);

OnednnMatmul onednn_matmul() {
  static const OnednnMatmul f = []() -> OnednnMatmul {
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) return nullptr;
    void* sym = dlsym(lib, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff");
    dlclose(lib);  // still loaded: torch holds it
    return reinterpret_cast<OnednnMatmul>(sym);
  }();
  return f;
}

// 0: measure (the default), 1: the BLAS, 2: oneDNN.
int forced_bulk_gemm() {
  const char* e = std::getenv("RNNFAST_CPU_BULK_GEMM");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return 0;
  if (std::strcmp(e, "blas") == 0) return 1;
  if (std::strcmp(e, "onednn") == 0) return 2;
  TORCH_CHECK(false, "RNNFAST_CPU_BULK_GEMM must be auto, blas or onednn, not '",
              e, "'");
}

bool full_float32_precision() {
  return at::globalContext().float32MatmulPrecision() ==
         at::Float32MatmulPrecision::HIGHEST;
}

struct BulkMeasurement {
  bool onednn_faster = false;
  bool onednn_runs = false;
  double blas_us = 0, onednn_us = 0;
  const char* why = "";
};

// Times both on one product, taking turns, best of five each after a
// warm-up; oneDNN is kept if it is at least 10% faster.
BulkMeasurement measure_bulk() {
  BulkMeasurement r;
  if (onednn_matmul() == nullptr) {
    r.why = "this torch exports no at::native::mkldnn_matmul";
    return r;
  }
  const int64_t m = 512, k = 256, n = 1024;
  // constants, not random: drawing would move the caller's generator
  at::Tensor a = at::full({m, k}, 0.25f), w = at::full({n, k}, 0.5f),
             c = at::empty({m, n});
  const at::Tensor b = w.t();
  try {
    onednn_matmul()(a, b, c, 0.0f, 1.0f);
  } catch (const c10::Error&) {
    r.why = "ATen's oneDNN float32 matmul does not run on this CPU";
    return r;
  }
  r.onednn_runs = true;
  at::mm_out(c, a, b);
  using clock = std::chrono::steady_clock;
  double best_blas = 1e30, best_onednn = 1e30;
  for (int i = 0; i < 5; ++i) {
    auto t0 = clock::now();
    at::mm_out(c, a, b);
    auto t1 = clock::now();
    onednn_matmul()(a, b, c, 0.0f, 1.0f);
    auto t2 = clock::now();
    best_blas = std::min(best_blas, std::chrono::duration<double, std::micro>(t1 - t0).count());
    best_onednn = std::min(best_onednn, std::chrono::duration<double, std::micro>(t2 - t1).count());
  }
  r.blas_us = best_blas;
  r.onednn_us = best_onednn;
  r.onednn_faster = best_onednn < 0.9 * best_blas;
  r.why = r.onednn_faster ? "measured faster" : "not measured 10% faster";
  return r;
}

std::mutex bulk_mutex;
bool bulk_measured = false;
BulkMeasurement bulk_measurement;

const BulkMeasurement& bulk_measure_once() {
  std::lock_guard<std::mutex> lock(bulk_mutex);
  if (!bulk_measured) {
    bulk_measurement = measure_bulk();
    bulk_measured = true;
  }
  return bulk_measurement;
}

// oneDNN builds (JIT-compiles) a primitive for each new shape and layout
// of product, and keeps up to 1024 of them: 0.45-0.6 ms a shape on the AMD
// EPYC Zen 5, where a [200, 256] x [256, 1024] product takes 0.26 ms on
// oneDNN once built and 0.66 on MKL. Padded batches repeat their shapes;
// packed ones of varying lengths may bring a new one at every call. So
// of the products whose shape is not steady (bulk_product), only those of
// at least kOnednnMinFlops go to oneDNN (where MKL takes about 1.1 ms and
// oneDNN 0.5, or 1.0 with the building), the rest stay on the BLAS.
// Decided by the shape and the call alone, so that every product of a
// shape and call site runs on the same library and two identical calls
// give the same bits.
constexpr double kOnednnMinFlops = 2e8;

bool large_enough(const at::Tensor& a, const at::Tensor& b) {
  return 2.0 * double(a.size(0)) * double(a.size(1)) * double(b.size(1)) >=
         kOnednnMinFlops;
}

// A row-major matrix or the transpose of one, as oneDNN's matmul takes
// without a copy.
bool plain_or_transposed(const at::Tensor& t) {
  return (t.stride(1) == 1 && t.stride(0) >= t.size(1)) ||
         (t.stride(0) == 1 && t.stride(1) >= t.size(0));
}

}  // namespace

namespace {

// Why the BLAS runs whatever was measured (forced, precision, deterministic
// algorithms), or null where the measurement decides.
const char* blas_regardless(int forced) {
  if (forced == 1) return "RNNFAST_CPU_BULK_GEMM=blas";
  if (!full_float32_precision()) return "float32 matmul precision below highest";
  // a choice by timing could differ between runs: not under
  // torch.use_deterministic_algorithms(True), unless forced
  if (forced == 0 && at::globalContext().deterministicAlgorithms()) {
    return "deterministic algorithms";
  }
  return nullptr;
}

bool onednn_chosen(int forced, const BulkMeasurement& measured) {
  return forced == 2 ? measured.onednn_runs : measured.onednn_faster;
}

bool runs_on_onednn(int forced) {
  return blas_regardless(forced) == nullptr &&
         onednn_chosen(forced, bulk_measure_once());
}

}  // namespace

bool bulk_product_runs() { return runs_on_onednn(forced_bulk_gemm()); }

bool bulk_product(const at::Tensor& c, const at::Tensor& a,
                  const at::Tensor& b, bool accumulate, bool steady) {
  if (c.scalar_type() != at::kFloat || a.scalar_type() != at::kFloat ||
      b.scalar_type() != at::kFloat || c.dim() != 2 || a.dim() != 2 ||
      b.dim() != 2 || c.numel() == 0 || a.size(1) == 0 || !c.is_contiguous() ||
      !plain_or_transposed(a) || !plain_or_transposed(b)) {
    return false;
  }
  const int forced = forced_bulk_gemm();
  if (!runs_on_onednn(forced)) return false;
  if (forced == 0 && !steady && !large_enough(a, b)) return false;
  // visible to torch.profiler, as ATen's products are
  RECORD_FUNCTION("rnnfast::onednn_matmul", std::vector<c10::IValue>());
  onednn_matmul()(a, b, c, accumulate ? 1.0f : 0.0f, 1.0f);
  return true;
}

rnnfast::BulkGemmChoice bulk_gemm_choice() {
  const int forced = forced_bulk_gemm();
  if (const char* why = blas_regardless(forced)) {
    return {gemm_backend(), 0, 0, why};
  }
  std::lock_guard<std::mutex> lock(bulk_mutex);
  if (!bulk_measured) return {nullptr, 0, 0, ""};
  const bool onednn = onednn_chosen(forced, bulk_measurement);
  return {onednn ? "onednn" : gemm_backend(), bulk_measurement.blas_us,
          bulk_measurement.onednn_us,
          forced == 2 && onednn ? "RNNFAST_CPU_BULK_GEMM=onednn"
                                : bulk_measurement.why};
}

}  // namespace rnnfast::cpu
