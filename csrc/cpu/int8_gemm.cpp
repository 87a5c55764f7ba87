// Packing, the portable kernels and the threading of int8_gemm.h. The
// portable kernels are plain C++ (any CPU); they compute the same integer
// products as the vector ones and round them alike (explicit fused
// multiply-adds), so every family gives the same floats.
#include "int8_gemm.h"
#include "amx.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace rnnfast::cpu::int8 {
namespace {

Kernels choose_kernels() {
  // ATEN_CPU_CAPABILITY (default, avx2, avx512) caps the level, as it does
  // for ATen's and rnnfast's float kernels; ATen's AVX512 level has no AMX,
  // so naming it keeps the VNNI kernels (amx::allowed).
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512" && avx512_vnni_supported()) {
    // amx::allowed asks Linux for the tile state: only asked here.
    return amx::allowed(amx::Feature::kInt8) ? Kernels::kAmxInt8
                                             : Kernels::kAvx512Vnni;
  }
  if ((cap == "AVX512" || cap == "AVX2") && avx2_supported()) return Kernels::kAvx2;
  return Kernels::kPortable;
}

void gemm_tile_portable(int64_t m, int64_t n, int64_t k, int64_t block0,
                        int64_t blocks, const uint8_t* q, int64_t ldq,
                        const float* a_scale, const int8_t* packed,
                        const float* w_scale, const float* bias, float beta,
                        float* c, int64_t ldc) {
  const int64_t kp = padded_depth(k);
  const int32_t* sums = column_sums(packed, n, k);
  int32_t acc[kBlockCols];
  for (int64_t b = block0; b < block0 + blocks; ++b) {
    const int8_t* w = packed + b * kBlockCols * kp;
    const int64_t cols = std::min<int64_t>(kBlockCols, n - b * kBlockCols);
    for (int64_t r = 0; r < m; ++r) {
      const uint8_t* a = q + r * ldq;
      std::fill(acc, acc + kBlockCols, 0);
      for (int64_t g = 0; g < depth_groups(k); ++g) {
        const int8_t* wg = w + g * kBlockCols * kGroupDepth;
        const uint8_t* ag = a + g * kGroupDepth;
        for (int64_t col = 0; col < kBlockCols; ++col) {
          int32_t s = 0;
          for (int64_t d = 0; d < kGroupDepth; ++d) {
            s += int32_t(ag[d]) * int32_t(wg[col * kGroupDepth + d]);
          }
          acc[col] += s;
        }
      }
      for (int64_t col = 0; col < cols; ++col) {
        const int64_t j = b * kBlockCols + col;
        const float s = a_scale[r] * w_scale[j];
        const float x = float(acc[col] - kActivationOffset * sums[j]);
        float* out = c + r * ldc + j;
        // The roundings of the vector kernels (int8_gemm_avx512.cpp's
        // dequantized()): fma(x, s, bias) + C, or fma(x, s, C).
        float v;
        if (bias) {
          v = std::fma(x, s, bias[j]);
          if (beta != 0.0f) v = *out + v;
        } else {
          v = beta != 0.0f ? std::fma(x, s, *out) : x * s;
        }
        *out = v;
      }
    }
  }
}

void quantize_rows_portable(int64_t m, int64_t k, const float* a, int64_t lda,
                            uint8_t* q, int64_t ldq, float* scale) {
  const int64_t kp = padded_depth(k);
  for (int64_t r = 0; r < m; ++r) {
    const float* x = a + r * lda;
    uint8_t* out = q + r * ldq;
    float absmax = 0.0f;
    bool finite = true;
    for (int64_t j = 0; j < k; ++j) {
      finite = finite && std::isfinite(x[j]);
      absmax = std::max(absmax, std::fabs(x[j]));
    }
    if (!finite) {
      scale[r] = std::numeric_limits<float>::quiet_NaN();
      std::memset(out, kActivationOffset, kp);
      continue;
    }
    scale[r] = absmax / 127.0f;
    const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      // Round half to even, as the vector conversion in the default mode.
      const long v = std::lrint(x[j] * inv);
      out[j] = static_cast<uint8_t>(std::clamp<long>(v, -127, 127) + kActivationOffset);
    }
    for (int64_t j = k; j < kp; ++j) out[j] = kActivationOffset;
  }
}

}  // namespace

Kernels best_kernels() {
  static const Kernels chosen = choose_kernels();
  return chosen;
}

bool kernels_available(Kernels which) { return which <= best_kernels(); }

const char* kernels_name(Kernels which) {
  switch (which) {
    case Kernels::kAmxInt8: return "AMX-INT8";
    case Kernels::kAvx512Vnni: return "AVX512-VNNI";
    case Kernels::kAvx2: return "AVX2";
    default: return "portable";
  }
}

const char* kernels_in_use() {
  return best_kernels() == Kernels::kAmxInt8 ? "AMX-INT8+AVX512-VNNI"
                                              : kernels_name(best_kernels());
}

void pack_weight(const int8_t* w, int64_t n, int64_t k, int8_t* packed) {
  const int64_t kp = padded_depth(k);
  const int64_t bytes = packed_bytes(n, k);
  std::memset(packed, 0, bytes);
  std::memcpy(packed + bytes - int64_t(sizeof(int64_t)), &k, sizeof(k));
  int32_t* sums = column_sums(packed, n, k);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t b = j / kBlockCols, col = j % kBlockCols;
    int32_t sum = 0;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t g = i / kGroupDepth, d = i % kGroupDepth;
      packed[b * kBlockCols * kp + g * kBlockCols * kGroupDepth + col * kGroupDepth + d] =
          w[j * k + i];
      sum += w[j * k + i];
    }
    sums[j] = sum;
  }
}

void quantize_rows_with(Kernels which, int64_t m, int64_t k, const float* a,
                        int64_t lda, uint8_t* q, int64_t ldq, float* scale) {
  if (which >= Kernels::kAvx512Vnni) {
    quantize_rows_avx512(m, k, a, lda, q, ldq, scale);
  } else {
    quantize_rows_portable(m, k, a, lda, q, ldq, scale);
  }
}

void quantize_rows(int64_t m, int64_t k, const float* a, int64_t lda,
                   uint8_t* q, int64_t ldq, float* scale) {
  quantize_rows_with(best_kernels(), m, k, a, lda, q, ldq, scale);
}

void quantize_rows_parallel(int64_t m, int64_t k, const float* a, int64_t lda,
                            uint8_t* q, int64_t ldq, float* scale) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, k));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    quantize_rows(end - begin, k, a + begin * lda, lda, q + begin * ldq, ldq, scale + begin);
  });
}

void gemm_with(Kernels which, int64_t m, int64_t n, int64_t k, const uint8_t* q,
               int64_t ldq, const float* a_scale, const int8_t* packed,
               const float* w_scale, const float* bias, float beta, float* c,
               int64_t ldc, const SecondTerm* second) {
  TORCH_CHECK(kernels_available(which), "rnnfast: the int8 kernels ",
              kernels_name(which), " do not run on this CPU (the best here: ",
              kernels_name(best_kernels()), ")");
  if (m == 0 || n == 0) return;
  const bool amx = which == Kernels::kAmxInt8;
  const auto tile = amx                              ? &gemm_tile_amx_int8
                    : which == Kernels::kAvx512Vnni ? &gemm_tile_avx512_vnni
                    : which == Kernels::kAvx2       ? &gemm_tile_avx2
                                                    : &gemm_tile_portable;
  // Tasks: chunks of up to kChunkRows rows x groups of 4 column blocks (64
  // columns), columns fastest, so a small batch (a time step) still splits
  // over its columns. A task of a few hundred thousand multiplies outweighs
  // handing it to a thread.
  constexpr int64_t kChunkRows = 96, kGroupBlocks = 4;
  const int64_t blocks = column_blocks(n);
  const int64_t col_groups = (blocks + kGroupBlocks - 1) / kGroupBlocks;
  const int64_t row_chunks = (m + kChunkRows - 1) / kChunkRows;
  const int64_t task_macs = std::min(m, kChunkRows) * kGroupBlocks * kBlockCols * k;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, task_macs));
  at::parallel_for(0, row_chunks * col_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t rc = i / col_groups, cg = i % col_groups;
      const int64_t r0 = rc * kChunkRows, rows = std::min(kChunkRows, m - r0);
      const int64_t b0 = cg * kGroupBlocks, nb = std::min(kGroupBlocks, blocks - b0);
      tile(rows, n, k, b0, nb, q + r0 * ldq, ldq, a_scale + r0, packed, w_scale,
           bias, beta, c + r0 * ldc, ldc);
      // The second term added to the task's C block while it is in cache.
      if (second) {
        tile(rows, n, second->k, b0, nb, second->q + r0 * second->ldq, second->ldq,
             second->a_scale + r0, second->packed, second->w_scale, nullptr, 1.0f,
             c + r0 * ldc, ldc);
      }
    }
    // The tiles stay configured over a thread's tasks, handed back here.
    if (amx) amx_release();
  });
}

void gemm(int64_t m, int64_t n, int64_t k, const uint8_t* q, int64_t ldq,
          const float* a_scale, const int8_t* packed, const float* w_scale,
          const float* bias, float beta, float* c, int64_t ldc, const SecondTerm* second) {
  Kernels which = best_kernels();
  if (which == Kernels::kAmxInt8 && m < kAmxMinRows) which = Kernels::kAvx512Vnni;
  gemm_with(which, m, n, k, q, ldq, a_scale, packed, w_scale, bias, beta, c, ldc, second);
}

}  // namespace rnnfast::cpu::int8
