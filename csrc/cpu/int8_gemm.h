// Int8 products of the quantized (inference-only) LSTM and LayerNorm-LSTM:
// dynamic per-row quantization of float activations and the product of the
// quantized rows with a prepacked int8 weight, dequantized to float.
//
// Quantization (symmetric; both as rnnfast.quantized and the test reference,
// tests/test_quantized.py, do it):
//   weight row j (an output row, one of the 4H gate rows):
//     w_scale[j] = max_k |W[j, k]| / 127, W_q[j, k] = round(W[j, k] / w_scale[j])
//   activation row b (a row of x_t, h_{t-1} or r_t, at each use):
//     a_scale[b] = max_k |a[b, k]| / 127 (float32),
//     a_q[b, k] = round_half_even(a[b, k] * (127 / max_k |a[b, k]|))
//   C[b, j] = float(sum_k a_q[b, k] W_q[j, k]) * (a_scale[b] * w_scale[j])
// with the sum exact in int32 (see kMaxDepth).
//
// A row of zeros has scale 0 (its products are 0); a row holding an infinity
// or NaN has scale NaN, so its products are NaN as in float arithmetic.
//
// The activations are stored as unsigned bytes a_q + 128, the form the x86
// instruction vpdpbusd (u8 x s8 -> s32, AVX-512 VNNI) multiplies; the
// offset's share, 128 * sum_k W_q[j, k], is subtracted with the column sums
// stored in the packed weight (the AVX2 kernel takes them back to signed
// bytes instead). Every path computes the same integers.
//
// Kernels, fastest first: AMX-INT8 (tdpbusd on 16-row tiles, for products
// of kAmxMinRows = 4 rows or more: the hoisted input product, the recurrent
// one of a batch of 4 or more), AVX-512 VNNI (register tiles; every
// product on CPUs without AMX, and those of fewer rows on CPUs with it),
// AVX2, portable C++.
//
// Packed weight layout, for W_q [n, k] (row-major, n output rows): the n
// outputs in blocks of kBlockCols = 16 (one 512-bit vector of int32 lanes),
// k in groups of kGroupDepth = 4 (the 4 bytes one int32 lane of vpdpbusd
// sums), zero padded to whole blocks and to a depth Kp of whole 64-byte
// rows (kDepthAlign):
//   byte (block b, group g, column c, depth d) at
//     b * 16 * Kp + g * 64 + c * 4 + d          (Kp = k rounded up to 64)
// followed by the int32 column sums sum_k W_q[j, k] of the padded columns
// and then by k itself (int64, read with packed_depth), which the
// ops check against their input's width (the padded size alone would let
// any width up to Kp through).
// 16 groups of one block are thus an AMX B tile as it is loaded (16 rows of
// 64 bytes, stride 64), and a quantized activation row padded to Kp (bytes
// 128, whose products with the zero padding vanish) is 16-row A tiles' row.
// The register-tile kernels multiply only the groups that hold k.
#pragma once

#include <cstdint>
#include <cstring>

namespace rnnfast::cpu::int8 {

constexpr int64_t kBlockCols = 16;
constexpr int64_t kGroupDepth = 4;
// The packed depth and the quantized rows' length are whole multiples of
// this: the bytes of one row of an AMX tile.
constexpr int64_t kDepthAlign = 64;
constexpr int32_t kActivationOffset = 128;
// The most inputs (k) whose int32 sum of (a_q + 128) * W_q cannot overflow.
constexpr int64_t kMaxDepth = 65536;

inline int64_t padded_depth(int64_t k) {
  return (k + kDepthAlign - 1) / kDepthAlign * kDepthAlign;
}
// The groups of 4 that hold the k inputs (the rest of Kp is zeros).
inline int64_t depth_groups(int64_t k) {
  return (k + kGroupDepth - 1) / kGroupDepth;
}
inline int64_t column_blocks(int64_t n) {
  return (n + kBlockCols - 1) / kBlockCols;
}
// Bytes of the packed form of an [n, k] weight, column sums and k
// included.
inline int64_t packed_bytes(int64_t n, int64_t k) {
  const int64_t cols = column_blocks(n) * kBlockCols;
  return cols * padded_depth(k) + cols * int64_t(sizeof(int32_t)) +
         int64_t(sizeof(int64_t));
}
// The k a packed weight of `bytes` bytes was packed for (its last 8 bytes).
inline int64_t packed_depth(const int8_t* packed, int64_t bytes) {
  int64_t k = 0;
  std::memcpy(&k, packed + bytes - int64_t(sizeof(int64_t)), sizeof(k));
  return k;
}
// The int32 column sums that follow the blocks of a packed [n, k] weight.
inline int32_t* column_sums(int8_t* packed, int64_t n, int64_t k) {
  return reinterpret_cast<int32_t*>(packed + column_blocks(n) * kBlockCols *
                                                 padded_depth(k));
}
inline const int32_t* column_sums(const int8_t* packed, int64_t n,
                                  int64_t k) {
  return column_sums(const_cast<int8_t*>(packed), n, k);
}

// packed [packed_bytes(n, k)] from w [n, k] row-major int8.
void pack_weight(const int8_t* w, int64_t n, int64_t k, int8_t* packed);

// Quantizes rows [0, m) of a [m, k] (row stride lda) into q [m, Kp] (row
// stride ldq >= Kp, bytes a_q + 128, padding 128) and scale [m]. Runs on
// the calling thread.
void quantize_rows(int64_t m, int64_t k, const float* a, int64_t lda,
                   uint8_t* q, int64_t ldq, float* scale);
// The same, the rows split over threads (for the hoisted input product).
void quantize_rows_parallel(int64_t m, int64_t k, const float* a, int64_t lda,
                            uint8_t* q, int64_t ldq, float* scale);

// The kernel families, slowest first.
enum class Kernels { kPortable, kAvx2, kAvx512Vnni, kAmxInt8 };

// The best kernels of this CPU (and ATEN_CPU_CAPABILITY, as for ATen's
// kernels: "default" gives portable, "avx2" at most AVX2, "avx512" at most
// AVX-512 VNNI, since ATen's AVX512 level has no AMX).
Kernels best_kernels();
// Whether `which` runs here (every family below best_kernels() does).
bool kernels_available(Kernels which);
// Its name in build_info: "AMX-INT8", "AVX512-VNNI", "AVX2", "portable".
const char* kernels_name(Kernels which);

// Products of at least this many rows run on AMX where best_kernels() is
// AMX; fewer on AVX-512 VNNI. Measured with quantized_linear (Xeon with
// AMX, 2 threads, best of interleaved rounds): AMX / VNNI time at n = 2048,
// k = 512 for 1, 2, 3, 4, 8, 16 rows 1.12, 0.94, 0.82, 0.71, 0.42, 0.31;
// at n = 1024, k = 256 1.19, 1.04, 0.98, 0.92, 0.69, 0.53. A row's
// product streams the whole weight either way; AMX pays off once a few
// rows share it.
constexpr int64_t kAmxMinRows = 4;

// Quantizes as quantize_rows with the quantizer of the family `which`
// (AVX-512 for AMX and VNNI, else portable; all give the same bytes).
void quantize_rows_with(Kernels which, int64_t m, int64_t k, const float* a,
                        int64_t lda, uint8_t* q, int64_t ldq, float* scale);

// C[m, n] = beta C + dequantized(A_q W_q^T) + bias, row-major, where A_q
// [m, k] is q (row stride ldq >= Kp, padded as quantize_rows pads) with
// scales a_scale [m], W_q is packed (see above) with scales w_scale [n],
// bias [n] or null, beta 0 or 1 (C is not read when 0). Threads over blocks
// of rows and columns. gemm picks the kernels (AMX from kAmxMinRows rows);
// gemm_with runs the family `which` (kernels_available) on any m. With a
// second term, its product is then added too, block by block while C's
// block is in cache: C += dequantized(A2_q W2_q^T) (no bias), its own rows
// (m of them), depth and weight, rounded as a second gemm with beta 1.
struct SecondTerm {
  const uint8_t* q;      // [m, Kp2], row stride ldq
  int64_t ldq;
  const float* a_scale;  // [m]
  int64_t k;             // depth
  const int8_t* packed;  // packed [n, k]
  const float* w_scale;  // [n]
};
void gemm(int64_t m, int64_t n, int64_t k, const uint8_t* q, int64_t ldq,
          const float* a_scale, const int8_t* packed, const float* w_scale,
          const float* bias, float beta, float* c, int64_t ldc,
          const SecondTerm* second = nullptr);
void gemm_with(Kernels which, int64_t m, int64_t n, int64_t k, const uint8_t* q,
               int64_t ldq, const float* a_scale, const int8_t* packed,
               const float* w_scale, const float* bias, float beta, float* c,
               int64_t ldc, const SecondTerm* second = nullptr);

// Which kernels gemm uses: "AMX-INT8+AVX512-VNNI" (AMX for products of
// kAmxMinRows rows or more, VNNI for fewer), "AVX512-VNNI", "AVX2" or
// "portable".
const char* kernels_in_use();

// ---- Per-ISA kernels (int8_gemm_avx512.cpp), called by int8_gemm.cpp ----
// Whether this CPU runs the AVX-512 VNNI kernels.
bool avx512_vnni_supported();
// The tile of C: rows [0, m) x column blocks [block0, block0 + blocks) of a
// product as gemm's (q, a_scale, c already offset to the tile's first row).
void gemm_tile_avx512_vnni(int64_t m, int64_t n, int64_t k, int64_t block0,
                           int64_t blocks, const uint8_t* q, int64_t ldq,
                           const float* a_scale, const int8_t* packed,
                           const float* w_scale, const float* bias,
                           float beta, float* c, int64_t ldc);
void quantize_rows_avx512(int64_t m, int64_t k, const float* a, int64_t lda,
                          uint8_t* q, int64_t ldq, float* scale);
// ---- AMX-INT8 (int8_gemm_amx.cpp; where amx::allowed(kInt8), amx.h) ----
// A tile of C as gemm_tile_avx512_vnni's, on AMX tiles (q's rows padded to
// Kp). Configures the calling thread's tiles as it needs; amx_release
// hands them back (call it before the thread leaves the product).
void gemm_tile_amx_int8(int64_t m, int64_t n, int64_t k, int64_t block0,
                        int64_t blocks, const uint8_t* q, int64_t ldq,
                        const float* a_scale, const int8_t* packed,
                        const float* w_scale, const float* bias, float beta,
                        float* c, int64_t ldc);
void amx_release();
// The same for AVX2 (int8_gemm_avx2.cpp); the rows are quantized by the
// portable code.
bool avx2_supported();
void gemm_tile_avx2(int64_t m, int64_t n, int64_t k, int64_t block0,
                    int64_t blocks, const uint8_t* q, int64_t ldq,
                    const float* a_scale, const int8_t* packed,
                    const float* w_scale, const float* bias, float beta,
                    float* c, int64_t ldc);

}  // namespace rnnfast::cpu::int8
