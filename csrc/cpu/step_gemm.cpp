// Packing, the choice of ISA and the threading of step_gemm.h.
#include "step_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace rnnfast::cpu::step_gemm {

const char* kernels_in_use() {
  // ATEN_CPU_CAPABILITY (default, avx2) caps the level, as it does for
  // ATen's and rnnfast's pointwise kernels.
  static const char* const chosen = []() -> const char* {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512" && avx512_supported()) return "AVX512";
    if ((cap == "AVX512" || cap == "AVX2") && avx2_supported()) return "AVX2";
    return nullptr;
  }();
  return chosen;
}

void pack(bool trans_b, int64_t n, int64_t k, const float* b, int64_t ldb,
          float* packed) {
  const int64_t np = panels(n);
  at::parallel_for(0, np, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* dst = packed + p * kPanelCols * k;
      const int64_t col0 = p * kPanelCols;
      const int64_t cols = std::min(kPanelCols, n - col0);
      for (int64_t kk = 0; kk < k; ++kk) {
        float* row = dst + kk * kPanelCols;
        for (int64_t j = 0; j < cols; ++j) {
          row[j] = trans_b ? b[(col0 + j) * ldb + kk] : b[kk * ldb + col0 + j];
        }
        std::fill(row + cols, row + kPanelCols, 0.0f);
      }
    }
  });
}

namespace {
// Whether the kernels in use are the AVX-512 ones (else AVX2, or none).
bool avx512_kernels() {
  static const bool avx512 = kernels_in_use() != nullptr &&
                             std::strcmp(kernels_in_use(), "AVX512") == 0;
  return avx512;
}
}  // namespace

void multiply_panel_range(int64_t m, int64_t n, int64_t k, const float* a,
                          int64_t lda, const float* packed,
                          int64_t panel_begin, int64_t panel_end, float beta,
                          float* c, int64_t ldc) {
  if (avx512_kernels()) {
    multiply_panels_avx512(m, n, k, a, lda, packed, panel_begin, panel_end,
                           beta, c, ldc);
  } else {
    multiply_panels_avx2(m, n, k, a, lda, packed, panel_begin, panel_end,
                         beta, c, ldc);
  }
}

void multiply(bool serial, int64_t m, int64_t n, int64_t k, const float* a,
              int64_t lda, const float* packed, float beta, float* c,
              int64_t ldc) {
  const auto run = [&](int64_t begin, int64_t end) {
    multiply_panel_range(m, n, k, a, lda, packed, begin, end, beta, c, ldc);
  };
  const int64_t np = panels(n);
  if (serial) {
    run(0, np);
    return;
  }
  // Panels split evenly over the threads (a thread's last tile may be
  // narrower).
  at::parallel_for(0, np, 4, run);
}

namespace {
// run(begin, end) over the columns [0, n): on the calling thread when
// serial, else split evenly over the threads in blocks of 16 (whole cache
// lines of C's rows), each thread streaming its rows of B.
template <typename F>
void over_columns(bool serial, int64_t n, const F& run) {
  if (serial) {
    run(0, n);
    return;
  }
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    run(begin * kBlock, std::min(end * kBlock, n));
  });
}
}  // namespace

namespace {
// The ISA kernels of a one-use product whose weight holds W, over the
// columns as over_columns splits them.
template <typename W>
using StoredColumns = void (*)(int64_t, int64_t, int64_t, const float*,
                               int64_t, const W*, int64_t, int64_t, int64_t,
                               const float*, bool, float*, int64_t);
template <typename W>
void stored_product(StoredColumns<W> avx512, StoredColumns<W> avx2,
                    bool serial, int64_t m, int64_t n, int64_t k,
                    const float* a, int64_t lda, const W* b, int64_t ldb,
                    const float* bias, float beta, float* c, int64_t ldc) {
  const bool add = beta != 0.0f;
  const StoredColumns<W> columns = avx512_kernels() ? avx512 : avx2;
  over_columns(serial, n, [&](int64_t begin, int64_t end) {
    columns(m, n, k, a, lda, b, ldb, begin, end, bias, add, c, ldc);
  });
}
}  // namespace

void multiply_stored(bool serial, int64_t m, int64_t n, int64_t k,
                     const float* a, int64_t lda, const float* b, int64_t ldb,
                     const float* bias, float beta, float* c, int64_t ldc) {
  stored_product<float>(multiply_stored_columns_avx512,
                        multiply_stored_columns_avx2, serial, m, n, k, a, lda,
                        b, ldb, bias, beta, c, ldc);
}

void multiply_stored_bf16_weight(bool serial, int64_t m, int64_t n, int64_t k,
                                 const float* a, int64_t lda,
                                 const uint16_t* b, int64_t ldb,
                                 const float* bias, float beta, float* c,
                                 int64_t ldc) {
  stored_product<uint16_t>(multiply_stored_columns_avx512_bf16_weight,
                           multiply_stored_columns_avx2_bf16_weight, serial, m,
                           n, k, a, lda, b, ldb, bias, beta, c, ldc);
}

bool bf16_stored_supported() {
  static const bool supported = avx512_kernels() && avx512bf16_supported();
  return supported;
}

void multiply_stored_bf16(bool serial, int64_t m, int64_t n, int64_t k,
                          const uint16_t* a, int64_t lda, const uint16_t* b,
                          int64_t ldb, const float* bias, float beta,
                          float* c, int64_t ldc) {
  const bool add = beta != 0.0f;
  over_columns(serial, n, [&](int64_t begin, int64_t end) {
    multiply_stored_columns_avx512bf16(m, n, k, a, lda, b, ldb, begin, end,
                                       bias, add, c, ldc);
  });
}

}  // namespace rnnfast::cpu::step_gemm
