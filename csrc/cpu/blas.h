// Row-major GEMM on raw CPU pointers for the per-step products of the time
// loop, where a dispatcher round trip per call would cost as much as the
// product itself at small batch sizes.
//
// It calls the Fortran BLAS (sgemm_/dgemm_) that libtorch_cpu exports (MKL
// in the x86 wheels, OpenBLAS elsewhere); measured on the 2-core Xeon of our
// CI machine, MKL's sgemm reaches the same throughput as oneDNN there (see
// README). Where torch exports no BLAS, it falls back to ATen's mm.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <memory>
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

// C[m, n] = op(A) op(B) + beta C with A and B in bfloat16 and C in float
// (float products and sums): MKL's cblas_gemm_bf16bf16f32, which runs on
// AMX-BF16 or AVX512-BF16 where the CPU has them; without it, through
// ATen in float.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
          int64_t ldb, float beta, float* c, int64_t ldc);

// Whether bfloat16 products run on the CPU's own bfloat16 instructions:
// torch's MKL exports cblas_gemm_bf16bf16f32 and the CPU has AVX512-BF16
// and AMX-BF16 that Linux grants (rnnfast's AMX product runs the per-step
// products; without AMX, MKL's bfloat16 GEMM ran no faster than its float
// one on an AMD EPYC Zen 5, half the float path's speed there), at ATen's
// AVX512 capability (ATEN_CPU_CAPABILITY=avx2 turns it off, as it caps
// the other kernels).
// There a bfloat16 op keeps its GEMM operands in bfloat16 (cpu_backend.cpp);
// elsewhere MKL would convert them to float, slower than a float product.
// RNNFAST_CPU_NATIVE_BF16=0 or =1 forces it off or on (=1 needs the MKL
// symbol; for tests and comparisons), read at every op call as the other
// RNNFAST_CPU_* variables are.
bool native_bfloat16();

// The right-hand operand of a product repeated at every step of a time loop
// (a recurrent weight), packed once into the BLAS's internal layout where it
// offers one (MKL's cblas_sgemm_pack), so per-step products skip repacking:
// at batch 4 that repacking is most of a step's cost. It is packed when it
// is used a second time, not before: packing costs several plain products,
// which a one-step call (streaming decode) would never earn back. Its first
// product (a one-step call's only one) reads a float [n, k] weight where it
// lies, on rnnfast's one-use product where stored_product_runs (below).
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
  // A float StepWeight of a bfloat16 weight (made for T = float): that of a
  // bfloat16 op computing in float (native_bfloat16 false) in a one-step
  // call. Its first product reads the bfloat16 weight where it lies, on
  // rnnfast's one-use product (multiply_stored_bf16_weight) where that
  // takes max_m rows (trans_b, stored_product_runs); otherwise, and before
  // any second use, it is converted once to a float copy that the
  // StepWeight owns and used as a float weight from then on. Every product
  // is the one the float weight's StepWeight would compute, bit for bit.
  StepWeight(bool trans_b, int64_t max_m, int64_t n, int64_t k,
             const c10::BFloat16* b, int64_t ldb, const char* path = nullptr);
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
  // Before the products of a loop split by rows (row groups or the row
  // split, cpu_backend.cpp): each will have at most `rows` rows and run on
  // its caller's thread. Until the weight is packed, rnnfast's own product
  // is then a candidate by those rows (at most step_gemm::kMaxRows), and
  // the one-time measurement between it and the BLAS's times that shape,
  // instead of the whole batch's product.
  void split_products(int64_t rows) const;
  // For products split by columns over a StepTeam (cpu_backend.cpp): says
  // whether its products may be split, and if so packs the weight for
  // rnnfast's own product now. They may where the own product takes the
  // weight (float, AVX2 or AVX-512, at most step_gemm::kMaxRows rows) and
  // is forced (RNNFAST_CPU_STEP_GEMM=rnnfast) or measured (as multiply
  // measures it) at most 1.25x the BLAS's time: never under deterministic
  // algorithms (where the BLAS runs unmeasured), never for double weights.
  bool prepare_column_split() const;
  // Column panels of the split (step_gemm::kPanelCols columns each), and
  // the product of the columns of panels [panel_begin, panel_end) only, on
  // the calling thread, after prepare_column_split() returned true.
  int64_t column_panels() const;
  void multiply_panels(int64_t m, const T* a, int64_t lda, T beta, T* c,
                       int64_t ldc, int64_t panel_begin,
                       int64_t panel_end) const;
  // What the packed products run: "rnnfast-<ISA>", "mkl-packed", or
  // "unpacked" before the packing.
  const char* packed_path() const;
  // Whether the products run on all threads (else on the caller's).
  bool threaded() const { return !serial_; }
  // The product's n x k (the weight's output columns and inner size).
  int64_t columns() const { return n_; }
  int64_t depth() const { return k_; }
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
  void set_choice_shape(int64_t rows, bool threaded) const;
  bool choose_own() const;
  // Whether the own product's measured time on this shape (choose_own, at
  // pack()) is at most slack times the BLAS's; false if never measured.
  bool own_close_to_blas(double slack) const;
  void compute(bool serial, int64_t m, const T* a, int64_t lda, T beta, T* c,
               int64_t ldc) const;
  // Whether an unpacked product of m rows runs on rnnfast's one-use
  // product (a weight as stored, [n, k], and the BLAS not forced).
  bool unpacked_stored(int64_t m) const;
  // A bfloat16 weight's float copy (b16_ converted into float_copy_, b_
  // and ldb_ then pointing at it), where not yet made.
  void convert_weight() const;

  bool trans_b_;
  int64_t max_m_, n_, k_;
  mutable int64_t ldb_;
  mutable const T* b_;  // null while a bfloat16 weight is read in place
  const c10::BFloat16* b16_ = nullptr;  // a bfloat16 weight, or null
  mutable std::unique_ptr<T[]> float_copy_;
  bool serial_;             // small products run on the calling thread only
  mutable bool packable_ = false;       // the BLAS can pack this operand
  mutable bool own_candidate_ = false;  // rnnfast's product may run it
  // The product shape the choice between the two is made for: rows, and
  // whether it runs threaded (the whole batch's, or split_products').
  mutable int64_t choice_rows_ = 0;
  mutable bool choice_threaded_ = false;
  int forced_ = 0;  // RNNFAST_CPU_STEP_GEMM: 0 measure, 1 BLAS, 2 own
  int64_t row_split_rows_ = 0;  // RNNFAST_CPU_ROW_SPLIT or kRowSplitRows
  mutable int64_t uses_ = 0;        // products computed so far
  mutable void* packed_ = nullptr;  // owned, in the BLAS's own layout
  mutable float* own_packed_ = nullptr;  // owned, step_gemm.h's layout
};

// The bfloat16 recurrent weight of a native-bfloat16 op (native_bfloat16),
// C in float (C = float) or rounded to bfloat16 (C = c10::BFloat16, the
// projection's output, beta 0 only). On CPUs with AMX-BF16 (where Linux
// grants the tiles and ATEN_CPU_CAPABILITY caps nothing), for shapes it
// runs (bf16_gemm.h: k a multiple of 32, n of 16), the weight is packed
// into AMX tiles at its second use (as a float weight is packed: a one-step
// call never repays it) and multiplied by rnnfast's AMX product; otherwise,
// or with RNNFAST_CPU_STEP_GEMM=blas (or path "blas"), by MKL's bfloat16
// GEMM, which repacks it at every product. Same interface as
// StepWeight<float>; beta is 0 or 1.
template <>
class StepWeight<c10::BFloat16> {
 public:
  StepWeight(bool trans_b, int64_t max_m, int64_t n, int64_t k,
             const c10::BFloat16* b, int64_t ldb, const char* path = nullptr);
  ~StepWeight();
  StepWeight(const StepWeight&) = delete;
  StepWeight& operator=(const StepWeight&) = delete;
  template <typename C>
  void multiply(int64_t m, const c10::BFloat16* a, int64_t lda, C beta, C* c,
                int64_t ldc) const {
    prepare_use();
    compute(serial_, m, a, lda, static_cast<float>(beta), c, ldc);
  }
  void prepare_use() const;
  template <typename C>
  void multiply_on_this_thread(int64_t m, const c10::BFloat16* a,
                               int64_t lda, C beta, C* c, int64_t ldc) const {
    compute(true, m, a, lda, static_cast<float>(beta), c, ldc);
  }
  // The AMX product takes a shape whatever its rows (StepWeight<T>).
  void split_products(int64_t) const {}
  // Not split by columns over a StepTeam (StepWeight<T>): the AMX
  // product's own column blocks are not offered to it.
  bool prepare_column_split() const { return false; }
  int64_t column_panels() const { return 0; }
  template <typename C>
  void multiply_panels(int64_t, const c10::BFloat16*, int64_t, C, C*, int64_t,
                       int64_t, int64_t) const {}
  // "rnnfast-AMX-BF16", "mkl-bf16", or "unpacked" before the packing.
  const char* packed_path() const;
  bool threaded() const { return !serial_; }
  int64_t columns() const { return n_; }
  int64_t depth() const { return k_; }
  int64_t max_rows() const { return max_m_; }
  int64_t row_split_rows() const { return row_split_rows_; }
  int64_t weight_bytes() const {
    return n_ * k_ * static_cast<int64_t>(sizeof(c10::BFloat16));
  }

 private:
  void compute(bool serial, int64_t m, const c10::BFloat16* a, int64_t lda,
               float beta, float* c, int64_t ldc) const;
  void compute(bool serial, int64_t m, const c10::BFloat16* a, int64_t lda,
               float beta, c10::BFloat16* c, int64_t ldc) const;

  bool trans_b_;
  int64_t max_m_, n_, k_, ldb_;
  const c10::BFloat16* b_;
  bool serial_;
  bool amx_candidate_ = false;  // rnnfast's AMX product may run it
  int64_t row_split_rows_ = 0;
  mutable int64_t uses_ = 0;
  mutable uint16_t* amx_packed_ = nullptr;  // owned, bf16_gemm.h's layout
};

// A float product whose weight is used once, in its stored layout:
// C[m, n] = A[m, k] B^T (+ bias) + beta C with B [n, k] row-major, bias
// null or n values added to every row, beta 0 or 1. On rnnfast's
// one-use product (step_gemm.h, multiply_stored) where
// stored_product_runs(m, path), else the BLAS's; on all threads where the
// product is large (as a StepWeight decides), else on the caller's.
// Returns what ran: "rnnfast-AVX512", "rnnfast-AVX2" or gemm_backend().
//   path: as StepWeight's ("blas" or "rnnfast" forces one; null reads
//   RNNFAST_CPU_STEP_GEMM).
const char* multiply_once(const char* path, int64_t m, int64_t n, int64_t k,
                          const float* a, int64_t lda, const float* b,
                          int64_t ldb, const float* bias, float beta, float* c,
                          int64_t ldc);
// The same with a bfloat16 weight (a bfloat16 op computing in float, in a
// one-step call): read in place by rnnfast's one-use product
// (multiply_stored_bf16_weight) where stored_product_runs(m, path), else
// converted to float for this product; the same result, bit for bit, as
// the float product of the weight converted to float.
const char* multiply_once(const char* path, int64_t m, int64_t n, int64_t k,
                          const float* a, int64_t lda, const c10::BFloat16* b,
                          int64_t ldb, const float* bias, float beta, float* c,
                          int64_t ldc);
// Whether a product of m rows by a weight used once runs on rnnfast's
// one-use product: this CPU runs its kernels (AVX2 or AVX-512), 1 <= m <=
// step_gemm::kMaxStoredRows, and path (as above) does not force the BLAS.
// Chosen by capability, not timed: it reads the weight once at the rate the
// memory gives, where MKL's plain product of so few rows does not (on the
// Xeon and, by issue 13's figures, far less so on AMD EPYC), so it needs no
// measurement that a one-step call would have to pay for.
bool stored_product_runs(int64_t m, const char* path = nullptr);
// The same for bfloat16 A and B (C in float, no bias): on rnnfast's
// one-use product of bfloat16 (step_gemm.h, multiply_stored_bf16) where
// stored_bf16_product_runs(m, path), else MKL's bfloat16 GEMM. Returns
// "rnnfast-AVX512-BF16", "mkl-bf16" or "aten". The bfloat16 gemm above runs
// its products of a few rows by a stored weight (not trans_a, trans_b, beta
// 0 or 1) so: a native-bfloat16 op's input projection of at most 4 rows
// and its weights' first products.
const char* multiply_once(const char* path, int64_t m, int64_t n, int64_t k,
                          const c10::BFloat16* a, int64_t lda,
                          const c10::BFloat16* b, int64_t ldb, float beta,
                          float* c, int64_t ldc);
// As stored_product_runs, for bfloat16: AVX512-BF16 at ATen's AVX512
// capability, 1 <= m <= step_gemm::kMaxStoredBf16Rows.
bool stored_bf16_product_runs(int64_t m, const char* path = nullptr);
// How many products rnnfast's one-use products (float and bfloat16) have
// run so far in this process.
int64_t one_use_products_run();

// What the products of a StepWeight<c10::BFloat16> of a shape the AMX
// product takes run (backend_info.h, cpu_bf16_step_gemm).
const char* bf16_step_gemm();

// The measured choices so far in this process, in the order made
// (backend_info.h).
std::vector<rnnfast::StepGemmChoice> step_gemm_choices();

// Which implementation gemm uses ("mkl-packed", "blas" or "aten").
const char* gemm_backend();

// The float32 products over many rows at once: the input projection of
// every step (or of a block of steps), the backward's input gradient and
// weight gradients (lstm_driver.h, input_projection and matmul_into).
// c = a b, or c += a b when accumulate; a and b 2-D, each row-major or the
// transpose of a row-major matrix (a .t() view), c row-major. Runs them on
// oneDNN's matmul where that was measured faster than the BLAS on this CPU
// and returns true; returns false, c untouched, where ATen's product (the
// BLAS) should run.
//
// oneDNN is reached through the function ATen runs its own oneDNN products
// with (at::native::mkldnn_matmul, which writes into c), looked up in
// libtorch_cpu at run time, so a torch without it (or with another
// signature) builds and loads as before and uses the BLAS. Which one runs
// is decided once per process, at the first such product, by timing both
// on a [512, 256] x [256, 1024] product on the threads of that moment:
// MKL runs its AVX2 kernels on AMD CPUs with AVX-512 (an AMD EPYC Zen 5: 90
// GFLOP/s a core, where oneDNN's AVX-512 kernels reach 190-225), and
// oneDNN's float32 matmul needs AVX-512 (ATen refuses it below), so
// neither a vendor nor an ISA decides it alone. Only at float32 matmul
// precision "highest" (torch.set_float32_matmul_precision): below it
// ATen's oneDNN products may round to bfloat16, which nn.LSTM's and
// ATen's float32 products do not. Not under
// torch.use_deterministic_algorithms(True) either, where a choice by
// timing could differ between runs. oneDNN builds a kernel for each new
// shape of product (about half a millisecond), which a small product of a
// shape that changes from call to call would pay every time: unforced,
// products under 2e8 FLOPs stay on the BLAS unless steady: of a shape
// that comes back call after call (a padded batch's, which depend on its
// steps and batch only, and an evaluating LSTM's blocks of input
// projection; a packed batch's depend on the sum of its lengths, new at
// almost every call), where building once pays. By the shape and the call
// alone, so that two identical calls give the same bits.
// RNNFAST_CPU_BULK_GEMM=blas or =onednn forces one for every product (read
// at every call, as the other RNNFAST_CPU_* variables; onednn where oneDNN
// cannot run is the BLAS).
bool bulk_product(const at::Tensor& c, const at::Tensor& a,
                  const at::Tensor& b, bool accumulate, bool steady = false);
// Whether bulk_product runs float32 products (measuring at the first call).
bool bulk_product_runs();
// The choice (backend_info.h, BulkGemmChoice).
rnnfast::BulkGemmChoice bulk_gemm_choice();

}  // namespace rnnfast::cpu
