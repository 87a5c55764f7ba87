// Vectorised CPU loops around the shared cell math of lstm_cell.h. Included
// by one translation unit per CPU capability, after that unit has defined
// CPU_CAPABILITY (and CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512), so that
// at::vec::Vectorized is the SIMD type of that capability.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../layer_norm.h"
#include "../layer_norm_lstm_cell.h"
#include "../lstm_cell.h"
#include "kernel_table.h"

namespace rnnfast {

// Activations of SIMD vectors. Double keeps Sleef's 1-ulp functions. Float
// uses faster forms whose absolute error stays within a few float ulps of 1
// (Sleef's vector tanh alone cost more than the rest of the cell):
//   sigmoid(x) = 1 / (1 + exp(-x))             with the 2-ulp exp
//   tanh(x)    = x (1 + x^2 P(x^2))           for |x| < 0.3 (Taylor to x^9,
//                                              truncation < 2e-8 relative)
//              = sign(x) (1 - 2 / (1 + exp(2|x|)))  elsewhere
// Both give NaN for NaN and the limits at +-inf, as the scalar forms.
template <typename S>
struct MathOps<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static inline V sigmoid(const V& x) { return V(S(1)) / (V(S(1)) + x.neg().exp()); }
  static inline V tanh(const V& x) { return x.tanh(); }
  static inline V fmadd(const V& a, const V& b, const V& c) {
    return at::vec::fmadd(a, b, c);
  }
};

template <>
struct MathOps<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static inline V fmadd(const V& a, const V& b, const V& c) {
    return at::vec::fmadd(a, b, c);
  }
  // The lanes of x that are NaN in place of result's: exp_u20 clamps its
  // argument, which would turn NaN into a number. On AVX-512 the selections
  // use mask registers directly (V::blendv would widen each comparison into
  // a vector and compare it again: two more instructions per selection).
  static inline V keep_nan(const V& result, const V& x) {
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), result, x);
#else
    return V::blendv(result, x, x != x);
#endif
  }
  // a < b ? when_less : otherwise, per lane.
  static inline V select_less(const V& a, const V& b, const V& when_less,
                              const V& otherwise) {
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), otherwise, when_less);
#else
    return V::blendv(otherwise, when_less, a < b);
#endif
  }
  static inline V sigmoid(const V& x) {
    return keep_nan(V(1.0f) / (V(1.0f) + x.neg().exp_u20()), x);
  }
  static inline V tanh(const V& x) {
    const V ax = x.abs();
    const V x2 = x * x;
    // Taylor series of tanh(x)/x - 1 in x^2: -1/3, 2/15, -17/315, 62/2835.
    V p = V(62.0f / 2835.0f);
    p = at::vec::fmadd(p, x2, V(-17.0f / 315.0f));
    p = at::vec::fmadd(p, x2, V(2.0f / 15.0f));
    p = at::vec::fmadd(p, x2, V(-1.0f / 3.0f));
    const V small = at::vec::fmadd(x * x2, p, x);
    const V big_abs = V(1.0f) - V(2.0f) / (V(1.0f) + (ax + ax).exp_u20());
    const V big = big_abs | (x & V(-0.0f));  // big_abs >= 0 given x's sign
    return keep_nan(select_less(ax, V(0.3f), small, big), x);
  }
};

// Two SIMD vectors as one value, for the cell math of lstm_cell.h: each
// operation on a pair is the same operation on each vector, so the LSTM's
// step kernels instantiated with it compute two vectors of hidden units at
// once, lane by lane as with one. Why: the activations are long chains of
// dependent instructions (an exponential, a division) per vector, and the
// core's out-of-order window overlapped consecutive vectors' chains too
// little. With two chains interleaved in one body, measured on the Xeon
// against the one-vector build (builds alternating, 10th percentiles of 40
// calls, 5-7 rounds each): bfloat16 inference at T=100 B=64 H=128 (AMX
// products, where the cell had been 40% of the time) 0.86-0.92x the time;
// float32 at T=200 B=4 H=128, inference 0.91-0.95x and training
// 0.93-0.97x; with AVX2 forced 0.96-0.97x; T=100 B=64 float32 inference
// (GEMM-bound) 0.98-0.99x. Every output and gradient is the same, bit for
// bit. The LayerNorm-LSTM's kernels, tried alike, gained nothing measurable
// (0.98-1.04x; their time goes to the row statistics and memory) and keep
// one vector.
template <typename V>
struct VecPair {
  using value_type = typename V::value_type;
  V lo, hi;
  VecPair() = default;
  VecPair(const V& l, const V& h) : lo(l), hi(h) {}
  explicit VecPair(value_type s) : lo(s), hi(s) {}
};
template <typename V>
inline VecPair<V> operator+(const VecPair<V>& a, const VecPair<V>& b) {
  return {a.lo + b.lo, a.hi + b.hi};
}
template <typename V>
inline VecPair<V> operator-(const VecPair<V>& a, const VecPair<V>& b) {
  return {a.lo - b.lo, a.hi - b.hi};
}
template <typename V>
inline VecPair<V> operator*(const VecPair<V>& a, const VecPair<V>& b) {
  return {a.lo * b.lo, a.hi * b.hi};
}
template <typename V>
struct MathOps<VecPair<V>> {
  using P = VecPair<V>;
  static inline P sigmoid(const P& x) {
    return {MathOps<V>::sigmoid(x.lo), MathOps<V>::sigmoid(x.hi)};
  }
  static inline P tanh(const P& x) {
    return {MathOps<V>::tanh(x.lo), MathOps<V>::tanh(x.hi)};
  }
};

namespace cpu {
inline namespace CPU_CAPABILITY {

// Rows per parallel task: enough elements that a task outweighs the cost of
// handing it to a thread (about 4K cell elements, a few microseconds).
inline int64_t row_grain(int64_t hidden) {
  const int64_t g = (int64_t{1} << 12) / (hidden > 0 ? hidden : 1);
  return g > 0 ? g : 1;
}

// The zoneout coefficients of elements [offset, offset + n) of a step: the
// mask's bytes as 0 / 1, or the rate in every lane without a mask.
template <typename T>
inline at::vec::Vectorized<T> zoneout_coefficient(const CellZoneout<T>& z,
                                                  int64_t offset, int64_t n) {
  using V = at::vec::Vectorized<T>;
  if (z.mask == nullptr) return V(z.rate);
  T a[V::size()];
  const bool* m = z.mask + offset;
  if (n == V::size()) {  // a whole vector: a fixed trip count, vectorised
    for (int64_t k = 0; k < V::size(); ++k) a[k] = static_cast<T>(m[k]);
    return V::loadu(a);
  }
  for (int64_t k = 0; k < n; ++k) a[k] = static_cast<T>(m[k]);
  return V::loadu(a, n);
}

// A float rounded to bfloat16 bits, to nearest even, NaN made the quiet
// NaN 0x7fc0: what c10::BFloat16(float) (and so Tensor.to) gives, without
// its branch, so that a loop of them vectorises.
inline uint16_t bfloat16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t{0x7fc0}
                                          : static_cast<uint16_t>(rounded);
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// bfloat16_bits of every lane at once: the same integer rounding, the NaN
// lanes replaced by 0x7fc0 (bitwise what the scalar form gives), as 32-bit
// lanes. A scalar loop of bfloat16_bits stays scalar (GCC does not vectorise
// its narrowing), and its 2-byte stores read back as one vector stall on
// store forwarding: that cost a bfloat16 inference 25% of its time.
#if defined(CPU_CAPABILITY_AVX512)
inline __m512i bfloat16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7fc0));
}
#else
inline __m256i bfloat16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}
#endif
#endif

// n (<= a vector's lanes) values of S as a vector of T, and back: S is T,
// or bfloat16 for T = float (a bfloat16 op's hidden states and gradients
// w.r.t. the products, cpu/blas.h). With AVX2 or AVX-512, a whole vector
// converts in registers (a partial one through a buffer on AVX2); otherwise
// through a buffer of lanes, in loops of fixed length.
template <typename T, typename S>
inline at::vec::Vectorized<T> load_as(const S* p, int64_t n) {
  using V = at::vec::Vectorized<T>;
  if constexpr (std::is_same_v<S, T>) {
    return V::loadu(p, n);
  } else {
    static_assert(std::is_same_v<T, float> && std::is_same_v<S, c10::BFloat16>);
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i bits =
        n == V::size() ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                       : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
    return V(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
#elif defined(CPU_CAPABILITY_AVX2)
    __m128i bits;
    if (n == V::size()) {
      bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      uint16_t buffer[V::size()] = {};
      std::memcpy(buffer, p, sizeof(uint16_t) * n);
      bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buffer));
    }
    return V(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)));
#else
    uint32_t lanes[V::size()];
    if (n == V::size()) {
      for (int64_t k = 0; k < V::size(); ++k) lanes[k] = uint32_t{p[k].x} << 16;
      return V::loadu(lanes);
    }
    for (int64_t k = 0; k < n; ++k) lanes[k] = uint32_t{p[k].x} << 16;
    return V::loadu(lanes, n);
#endif
  }
}

template <typename T, typename S>
inline void store_as(const at::vec::Vectorized<T>& v, S* p, int64_t n) {
  using V = at::vec::Vectorized<T>;
  if constexpr (std::is_same_v<S, T>) {
    v.store(p, n);
  } else {
    static_assert(std::is_same_v<T, float> && std::is_same_v<S, c10::BFloat16>);
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i bits = _mm512_cvtepi32_epi16(bfloat16_bits(__m512(v)));
    if (n == V::size()) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
    } else {
      _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), bits);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    // The values fit 16 bits, so unsigned saturation packs them exactly;
    // the pack works per 128-bit half, the permute puts the halves in order.
    const __m256i lanes = bfloat16_bits(__m256(v));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lanes, lanes), 0x08);
    const __m128i bits = _mm256_castsi256_si128(packed);
    if (n == V::size()) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits);
    } else {
      uint16_t buffer[V::size()];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(buffer), bits);
      std::memcpy(p, buffer, sizeof(uint16_t) * n);
    }
#else
    T lanes[V::size()];
    uint16_t bits[V::size()];
    v.store(lanes);
    if (n == V::size()) {
      for (int64_t k = 0; k < V::size(); ++k) bits[k] = bfloat16_bits(lanes[k]);
      std::memcpy(p, bits, sizeof bits);
      return;
    }
    for (int64_t k = 0; k < n; ++k) bits[k] = bfloat16_bits(lanes[k]);
    std::memcpy(p, bits, sizeof(uint16_t) * n);
#endif
  }
}

// ---- One vector or a pair of vectors (VecPair) ----------------------------
//
// The LSTM's step kernels run the body of their loop over hidden units with
// W, the type of its values: VecPair<V> while two whole vectors of units
// remain, then V (the last vector maybe partial, n lanes). The helpers below
// load and store either; a pair is always whole. over_units is flattened
// (the body and everything it calls inlined): without that GCC kept the
// bodies and the activations as calls, and the kernels lost most of what
// the pairs gain.
#if defined(__GNUC__)
#define RNNFAST_FLATTEN __attribute__((flatten))
#else
#define RNNFAST_FLATTEN
#endif
template <typename W>
struct Width {
  using type = W;
};

// body(Width<W>{}, j, n) over the hidden units [begin, end).
template <typename V, typename F>
RNNFAST_FLATTEN inline void over_units(int64_t begin, int64_t end, const F& body) {
  int64_t j = begin;
  for (; j + 2 * V::size() <= end; j += 2 * V::size()) {
    body(Width<VecPair<V>>{}, j, 2 * V::size());
  }
  for (; j < end; j += V::size()) {
    body(Width<V>{}, j, std::min<int64_t>(V::size(), end - j));
  }
}

template <typename T>
inline at::vec::Vectorized<T> load(Width<at::vec::Vectorized<T>>, const T* p,
                                   int64_t n) {
  return at::vec::Vectorized<T>::loadu(p, n);
}
template <typename V, typename T>
inline VecPair<V> load(Width<VecPair<V>>, const T* p, int64_t) {
  return {V::loadu(p), V::loadu(p + V::size())};
}
template <typename T>
inline void store(const at::vec::Vectorized<T>& v, T* p, int64_t n) {
  v.store(p, n);
}
template <typename V, typename T>
inline void store(const VecPair<V>& v, T* p, int64_t) {
  v.lo.store(p);
  v.hi.store(p + V::size());
}
template <typename T, typename S>
inline at::vec::Vectorized<T> load_as(Width<at::vec::Vectorized<T>>, const S* p,
                                      int64_t n) {
  return load_as<T>(p, n);
}
template <typename V, typename S>
inline VecPair<V> load_as(Width<VecPair<V>>, const S* p, int64_t) {
  using T = typename V::value_type;
  return {load_as<T>(p, V::size()), load_as<T>(p + V::size(), V::size())};
}
template <typename V, typename S>
inline void store_as(const VecPair<V>& v, S* p, int64_t) {
  store_as(v.lo, p, V::size());
  store_as(v.hi, p + V::size(), V::size());
}
template <typename T>
inline at::vec::Vectorized<T> zoneout_coefficient(
    Width<at::vec::Vectorized<T>>, const CellZoneout<T>& z, int64_t offset,
    int64_t n) {
  return zoneout_coefficient(z, offset, n);
}
template <typename V, typename T>
inline VecPair<V> zoneout_coefficient(Width<VecPair<V>>, const CellZoneout<T>& z,
                                      int64_t offset, int64_t) {
  return {zoneout_coefficient(z, offset, V::size()),
          zoneout_coefficient(z, offset + V::size(), V::size())};
}

template <typename T, typename S, bool Training, bool ZoneoutCell>
void forward_step_impl(const ForwardStepParams<T, S>& p) {
  using V = at::vec::Vectorized<T>;
  const int64_t H = p.hidden;
  const int64_t unit_end = p.unit_end < 0 ? H : p.unit_end;
  at::parallel_for(0, p.rows, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* gates = p.gates + row * 4 * H;
      T* c_state = p.cell_state + row * H;
      over_units<V>(p.unit_begin, unit_end, [&](auto w, int64_t j, int64_t n) {
        using W = typename decltype(w)::type;
        // Pre-activation of gate k (plus the bias where the step adds it).
        const auto pre = [&](int64_t k) {
          const W v = load(w, gates + k * H + j, n);
          return p.bias != nullptr ? v + load(w, p.bias + k * H + j, n) : v;
        };
        const W c_prev = load(w, c_state + j, n);
        const auto out = lstm_cell_forward<W>(pre(0), pre(1), pre(2), pre(3), c_prev);
        if constexpr (Training) {  // the backward's saved activations
          store(out.i, gates + j, n);
          store(out.f, gates + H + j, n);
          store(out.g, gates + 2 * H + j, n);
          store(out.o, gates + 3 * H + j, n);
        }
        if constexpr (ZoneoutCell) {
          const W c = zoneout<W>(
              zoneout_coefficient(w, p.zoneout, row * H + j, n), c_prev, out.c);
          store(c, c_state + j, n);
          if constexpr (Training) store(c, p.cell_state_save + row * H + j, n);
        } else {
          store(out.c, c_state + j, n);
        }
        if constexpr (Training) store(out.c, p.cell_save + row * H + j, n);
        store_as(out.r, p.hidden_out + row * H + j, n);
      });
    }
  });
}

// Per-task parameter-gradient sums (Backend::kParamGradsInStep): the
// backward step kernels add each row to the sums of the task running it,
// task `first` plus their parallel_for's own. first_task(given): the
// caller's task where it names one (a row group, a team's part), else the
// running thread's (a region's thread, where the parallel_for inside runs
// inline as its task 0).
inline int64_t first_task(int64_t given) {
  return given >= 0 ? given : at::get_thread_num();
}
// The running task's row of `width` sums in sums [tasks, width], or null
// without sums; inside the kernel's parallel_for.
template <typename T>
inline T* task_sums(T* sums, int64_t tasks, int64_t first, int64_t width) {
  if (sums == nullptr) return nullptr;
  const int64_t task = first + at::get_thread_num();
  TORCH_INTERNAL_ASSERT(task < tasks);
  return sums + task * width;
}

template <typename T, typename S, bool AddOutputGrad, bool ZoneoutCell>
void backward_step_impl(const BackwardStepParams<T, S>& p) {
  using V = at::vec::Vectorized<T>;
  const int64_t H = p.hidden;
  const int64_t first = first_task(p.bias_grad_task);
  at::parallel_for(0, p.rows, row_grain(H), [&](int64_t begin, int64_t end) {
    // this task's bias gradient sums, or null
    T* sums = task_sums(p.bias_grad_sums, p.bias_grad_tasks, first, 4 * H);
    for (int64_t row = begin; row < end; ++row) {
      const T* gates = p.gates + row * 4 * H;
      const T* cell = p.cell + row * H;
      const T* cell_prev = row < p.rows_from_previous
                               ? p.cell_prev + row * H
                               : p.cell_init + row * H;
      const T* dr = p.grad_hidden + row * H;
      const S* dy = AddOutputGrad ? p.grad_output + row * H : nullptr;
      T* dc_state = p.dcell_state + row * H;
      S* dgates = p.dgates + row * 4 * H;
      over_units<V>(0, H, [&](auto w, int64_t j, int64_t n) {
        using W = typename decltype(w)::type;
        W dr_v = load(w, dr + j, n);
        if constexpr (AddOutputGrad) dr_v = dr_v + load_as(w, dy + j, n);
        LstmCellBackward<W> out;
        if constexpr (ZoneoutCell) {
          out = lstm_cell_backward_zoneout<W>(
              load(w, gates + j, n), load(w, gates + H + j, n),
              load(w, gates + 2 * H + j, n), load(w, gates + 3 * H + j, n),
              load(w, cell + j, n), load(w, cell_prev + j, n), dr_v,
              load(w, dc_state + j, n),
              zoneout_coefficient(w, p.zoneout, row * H + j, n));
        } else {
          out = lstm_cell_backward<W>(
              load(w, gates + j, n), load(w, gates + H + j, n),
              load(w, gates + 2 * H + j, n), load(w, gates + 3 * H + j, n),
              load(w, cell + j, n), load(w, cell_prev + j, n), dr_v,
              load(w, dc_state + j, n));
        }
        store_as(out.di, dgates + j, n);
        store_as(out.df, dgates + H + j, n);
        store_as(out.dg, dgates + 2 * H + j, n);
        store_as(out.do_, dgates + 3 * H + j, n);
        store(out.dc_prev, dc_state + j, n);
        if (sums != nullptr) {  // the bias gradient, in T
          const W d[4] = {out.di, out.df, out.dg, out.do_};
          for (int64_t k = 0; k < 4; ++k) {
            T* sum = sums + k * H + j;
            store(load(w, sum, n) + d[k], sum, n);
          }
        }
      });
    }
  });
}

// ---- LayerNorm-LSTM ------------------------------------------------------

// Sum of the lanes of v (fixed order: deterministic).
template <typename T>
inline T lane_sum(const at::vec::Vectorized<T>& v) {
  T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T s = T(0);
  for (int64_t k = 0; k < at::vec::Vectorized<T>::size(); ++k) s += lanes[k];
  return s;
}

// Sum over j < n of f(j), where f maps a vector offset and a lane count to a
// vector of terms (lanes past the count are excluded).
template <typename T, typename F>
inline T row_reduce(int64_t n, const F& f) {
  using V = at::vec::Vectorized<T>;
  V acc(T(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) acc = acc + f(j, V::size());
  T s = lane_sum(acc);
  if (j < n) {
    const V tail = V::set(V(T(0)), f(j, n - j), n - j);
    s += lane_sum(tail);
  }
  return s;
}

// v with the lanes from n on set to zero (the tail of a row).
template <typename T>
inline at::vec::Vectorized<T> first_lanes(const at::vec::Vectorized<T>& v,
                                          int64_t n) {
  using V = at::vec::Vectorized<T>;
  return n < V::size() ? V::set(V(T(0)), v, n) : v;
}

// row_moments of two rows of n values at once.
template <typename T>
inline std::array<std::pair<T, T>, 2> row_moments2(const T* a, const T* b,
                                                   int64_t n, T eps) {
  using V = at::vec::Vectorized<T>;
  V sa(T(0)), sb(T(0));
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), n - j);
    sa = sa + V::loadu(a + j, c);
    sb = sb + V::loadu(b + j, c);
  }
  const T mean_a = lane_sum(sa) / T(n), mean_b = lane_sum(sb) / T(n);
  V va(T(0)), vb(T(0));
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), n - j);
    const V da = first_lanes(V::loadu(a + j, c) - V(mean_a), c);
    const V db = first_lanes(V::loadu(b + j, c) - V(mean_b), c);
    va = at::vec::fmadd(da, da, va);
    vb = at::vec::fmadd(db, db, vb);
  }
  return {std::pair<T, T>{mean_a, layer_norm_rstd(lane_sum(va) / T(n), eps)},
          std::pair<T, T>{mean_b, layer_norm_rstd(lane_sum(vb) / T(n), eps)}};
}

// mean and 1/sqrt(var + eps) of x[0, n), two-pass.
template <typename T>
inline std::pair<T, T> row_moments(const T* x, int64_t n, T eps) {
  using V = at::vec::Vectorized<T>;
  const T mean =
      row_reduce<T>(n, [&](int64_t j, int64_t c) { return V::loadu(x + j, c); }) /
      T(n);
  const T var = row_reduce<T>(n, [&](int64_t j, int64_t c) {
                  const V d = V::loadu(x + j, c) - V(mean);
                  return d * d;
                }) /
                T(n);
  return {mean, layer_norm_rstd(var, eps)};
}

// Asks the cache for a row's four gate columns at hidden units [j, j + a
// vector): offsets j, H + j, 2H + j and 3H + j of the row. The
// LayerNorm-LSTM's step kernels call it for the next row of their range
// while computing this one, so that their loads of values long evicted
// overlap the arithmetic: the input products in the forward (the bulk
// projection of all steps, 13 MiB at T=100 B=64 H=128) and the saved
// normalised products in the backward (26 MiB). Asking for a whole row at
// once instead (before this row's work) filled the cache's miss buffers:
// perf then put 20% of the backward step's samples on those prefetches.
// Interleaved builds, T=100 B=64 float32 training: 3-5% less time at
// H=128 and 256, the forward's row statistics (the first read of a row)
// half the samples. The LSTM's backward step, tried alike on its saved
// gates, gained 4% at H=128 and lost at H=256: not used there. A vector
// is one cache line for float with AVX-512, half of one with AVX2.
template <typename T>
inline void prefetch_gate_columns(const T* row, int64_t H, int64_t j) {
  for (int k = 0; k < 4; ++k) __builtin_prefetch(row + k * H + j, 0, 3);
}

template <typename T, typename S, bool Training, bool ZoneoutCell>
void layer_norm_forward_step_impl(const LayerNormStepParams<T, S>& p) {
  using V = at::vec::Vectorized<T>;
  const int64_t H = p.hidden, G = 4 * p.hidden;
  at::parallel_for(0, p.rows, row_grain(G), [&](int64_t begin, int64_t end) {
    // sigmoid(o) of a row, parked until LN_cell's statistics are known: in
    // the output row itself when it holds T, else here
    thread_local std::vector<T> o_park;
    if constexpr (!std::is_same_v<S, T>) o_park.resize(H);
    for (int64_t row = begin; row < end; ++row) {
      T* ih = p.ih + row * G;
      T* hh = p.hh + row * G;
      T* c_state = p.cell_state + row * H;
      S* h_out = p.h_out + row * H;
      T* o_parked;
      if constexpr (std::is_same_v<S, T>) {
        o_parked = h_out;
      } else {
        o_parked = o_park.data();
      }
      const auto moments = row_moments2<T>(ih, hh, G, p.eps);
      const auto [mean_ih, rstd_ih] = moments[0];
      const auto [mean_hh, rstd_hh] = moments[1];
      // Gates and the cell state; both products normalised in place when
      // training (saved for the backward).
      for (int64_t j = 0; j < H; j += V::size()) {
        const int64_t n = std::min<int64_t>(V::size(), H - j);
        if (row + 1 < end) prefetch_gate_columns(ih + G, H, j);
        V pre[4];
        for (int k = 0; k < 4; ++k) {
          const int64_t o = k * H + j;
          const V xi = layer_norm_normalize(V::loadu(ih + o, n), V(mean_ih),
                                            V(rstd_ih));
          const V xh = layer_norm_normalize(V::loadu(hh + o, n), V(mean_hh),
                                            V(rstd_hh));
          if constexpr (Training) {  // saved for the backward
            xi.store(ih + o, n);
            xh.store(hh + o, n);
          }
          pre[k] = layer_norm_gate(xi, V::loadu(p.gamma_ih + o, n), xh,
                                   V::loadu(p.gamma_hh + o, n),
                                   V::loadu(p.bias + o, n));
        }
        const V c_prev = V::loadu(c_state + j, n);
        const auto cell =
            lstm_cell_state<V>(pre[0], pre[1], pre[2], pre[3], c_prev);
        cell.o.store(o_parked + j, n);
        if constexpr (ZoneoutCell) {  // c~ kept in cell_save for the output
          cell.c.store(p.cell_save + row * H + j, n);
          const V c = zoneout<V>(
              zoneout_coefficient(p.zoneout, row * H + j, n), c_prev, cell.c);
          c.store(c_state + j, n);
          if constexpr (Training) c.store(p.cell_state_save + row * H + j, n);
        } else {
          cell.c.store(c_state + j, n);
          if constexpr (Training) cell.c.store(p.cell_save + row * H + j, n);
        }
      }
      // h = o tanh(LN_cell(c~)).
      const T* c_cand = ZoneoutCell ? p.cell_save + row * H : c_state;
      const auto [mean_c, rstd_c] = row_moments<T>(c_cand, H, p.eps);
      if constexpr (Training) {
        T* st = p.stats + row * kStatsWidth;
        st[kRstdIh] = rstd_ih;
        st[kRstdHh] = rstd_hh;
        st[kMeanCell] = mean_c;
        st[kRstdCell] = rstd_c;
      }
      for (int64_t j = 0; j < H; j += V::size()) {
        const int64_t n = std::min<int64_t>(V::size(), H - j);
        const V cn = layer_norm_affine(
            layer_norm_normalize(V::loadu(c_cand + j, n), V(mean_c),
                                 V(rstd_c)),
            V::loadu(p.gamma_cell + j, n), V::loadu(p.beta_cell + j, n));
        const V h = V::loadu(o_parked + j, n) * rnnfast::tanh<V>(cn);
        store_as(h, h_out + j, n);
      }
    }
  });
}

// The pre-activation of gate k at hidden units [j, j + n) of a row, from the
// normalised products the forward saved.
template <typename T, typename S>
inline at::vec::Vectorized<T> saved_pre_activation(
    const LayerNormBackwardStepParams<T, S>& p, const T* xi, const T* xh,
    int64_t o, int64_t n) {
  using V = at::vec::Vectorized<T>;
  return layer_norm_gate(V::loadu(xi + o, n), V::loadu(p.gamma_ih + o, n),
                         V::loadu(xh + o, n), V::loadu(p.gamma_hh + o, n),
                         V::loadu(p.bias + o, n));
}

template <typename T, typename S, bool AddOutputGrad, bool ZoneoutCell>
void layer_norm_backward_step_impl(
    const LayerNormBackwardStepParams<T, S>& p) {
  using V = at::vec::Vectorized<T>;
  const int64_t H = p.hidden, G = 4 * p.hidden;
  const int64_t first = first_task(p.param_grad_task);
  at::parallel_for(0, p.rows, row_grain(G), [&](int64_t begin, int64_t end) {
    // this task's LayerNorm parameter gradient sums, or null
    T* sums = task_sums(p.param_grad_sums, p.param_grad_tasks, first,
                        kSumWidth * H);
    for (int64_t row = begin; row < end; ++row) {
      const T* xi = p.normalized_ih + row * G;
      const T* xh = p.normalized_hh + row * G;
      const bool prefetch = row + 1 < end;  // the next row's saved products
      const T* cell = p.cell + row * H;
      const T* cell_prev = row < p.rows_from_previous
                               ? p.cell_prev + row * H
                               : p.cell_init + row * H;
      const T* st = p.stats + row * kStatsWidth;
      const T mean_c = st[kMeanCell], rstd_c = st[kRstdCell];
      const T* dh = p.grad_hidden + row * H;
      const S* dy = AddOutputGrad ? p.grad_output + row * H : nullptr;
      T* dgates = p.dgates + row * G;
      T* dcn = p.dcell_norm + row * H;
      T* dc_state = p.dcell_state + row * H;
      // Output half: gradient w.r.t. o and w.r.t. LN_cell(c), and the sums
      // of the LN_cell backward.
      V sum_dxhat(T(0)), sum_dxhat_xhat(T(0));
      for (int64_t j = 0; j < H; j += V::size()) {
        const int64_t n = std::min<int64_t>(V::size(), H - j);
        if (prefetch) prefetch_gate_columns(xi + G, H, j);
        const V o = rnnfast::sigmoid<V>(
            saved_pre_activation(p, xi, xh, 3 * H + j, n));
        const V xhat =
            layer_norm_normalize(V::loadu(cell + j, n), V(mean_c), V(rstd_c));
        const V gamma = V::loadu(p.gamma_cell + j, n);
        const V cn = layer_norm_affine(xhat, gamma, V::loadu(p.beta_cell + j, n));
        V dh_v = V::loadu(dh + j, n);
        if constexpr (AddOutputGrad) dh_v = dh_v + load_as<T>(dy + j, n);
        const auto out = lstm_output_backward<V>(dh_v, o, rnnfast::tanh<V>(cn));
        out.do_.store(dgates + 3 * H + j, n);
        out.dy.store(dcn + j, n);
        const V dxhat = first_lanes(out.dy * gamma, n);
        if (sums != nullptr) {
          T* beta_sum = sums + kSumBetaCell * H + j;
          T* gamma_sum = sums + kSumGammaCell * H + j;
          (V::loadu(beta_sum, n) + out.dy).store(beta_sum, n);
          at::vec::fmadd(out.dy, xhat, V::loadu(gamma_sum, n)).store(gamma_sum, n);
        }
        sum_dxhat = sum_dxhat + dxhat;
        sum_dxhat_xhat = at::vec::fmadd(dxhat, xhat, sum_dxhat_xhat);
      }
      const V mean_dxhat(lane_sum(sum_dxhat) / T(H));
      const V mean_dxhat_xhat(lane_sum(sum_dxhat_xhat) / T(H));
      // LN_cell backward, then the state half, and the sums of the LayerNorm
      // backward of both products over the row's 4H gate gradients.
      V sum_hh(T(0)), sum_hh_x(T(0)), sum_ih(T(0)), sum_ih_x(T(0));
      for (int64_t j = 0; j < H; j += V::size()) {
        const int64_t n = std::min<int64_t>(V::size(), H - j);
        if (prefetch) prefetch_gate_columns(xh + G, H, j);
        const V xhat =
            layer_norm_normalize(V::loadu(cell + j, n), V(mean_c), V(rstd_c));
        const V dxhat = V::loadu(dcn + j, n) * V::loadu(p.gamma_cell + j, n);
        // dL/dc~_t: from the output, and from the carried c_t (all of it
        // without zoneout, its share (1 - a) with).
        V dc_carried = V::loadu(dc_state + j, n);
        V dc_prev_share(T(0));
        if constexpr (ZoneoutCell) {
          const auto z = zoneout_backward<V>(
              zoneout_coefficient(p.zoneout, row * H + j, n), dc_carried);
          dc_carried = z.dcand;
          dc_prev_share = z.dprev;
        }
        const V dc = dc_carried +
                     layer_norm_input_grad<V>(dxhat, xhat, V(rstd_c),
                                              mean_dxhat, mean_dxhat_xhat);
        const V i = rnnfast::sigmoid<V>(saved_pre_activation(p, xi, xh, j, n));
        const V f =
            rnnfast::sigmoid<V>(saved_pre_activation(p, xi, xh, H + j, n));
        const V g =
            rnnfast::tanh<V>(saved_pre_activation(p, xi, xh, 2 * H + j, n));
        const auto state =
            lstm_state_backward<V>(dc, i, f, g, V::loadu(cell_prev + j, n));
        state.di.store(dgates + j, n);
        state.df.store(dgates + H + j, n);
        state.dg.store(dgates + 2 * H + j, n);
        if constexpr (ZoneoutCell) {
          (state.dc_prev + dc_prev_share).store(dc_state + j, n);
        } else {
          state.dc_prev.store(dc_state + j, n);
        }
        const V dg[4] = {state.di, state.df, state.dg,
                         V::loadu(dgates + 3 * H + j, n)};
        for (int k = 0; k < 4; ++k) {
          const int64_t o = k * H + j;
          const V d = first_lanes(dg[k], n);
          const V dxh = d * V::loadu(p.gamma_hh + o, n);
          const V dxi = d * V::loadu(p.gamma_ih + o, n);
          sum_hh = sum_hh + dxh;
          sum_hh_x = at::vec::fmadd(dxh, V::loadu(xh + o, n), sum_hh_x);
          sum_ih = sum_ih + dxi;
          sum_ih_x = at::vec::fmadd(dxi, V::loadu(xi + o, n), sum_ih_x);
        }
      }
      // The LayerNorm backward of both products: gradients w.r.t.
      // W_hh h_{t-1} and W_ih x_t.
      const V mean_hh(lane_sum(sum_hh) / T(G)), mean_hh_x(lane_sum(sum_hh_x) / T(G));
      const V mean_ih(lane_sum(sum_ih) / T(G)), mean_ih_x(lane_sum(sum_ih_x) / T(G));
      const V rstd_hh(st[kRstdHh]), rstd_ih(st[kRstdIh]);
      S* dhh = p.dhh + row * G;
      S* dih = p.dih + row * G;
      for (int64_t o = 0; o < G; o += V::size()) {
        const int64_t n = std::min<int64_t>(V::size(), G - o);
        const V d = V::loadu(dgates + o, n);
        const V xh_v = V::loadu(xh + o, n), xi_v = V::loadu(xi + o, n);
        store_as(layer_norm_input_grad<V>(d * V::loadu(p.gamma_hh + o, n),
                                          xh_v, rstd_hh, mean_hh, mean_hh_x),
                 dhh + o, n);
        store_as(layer_norm_input_grad<V>(d * V::loadu(p.gamma_ih + o, n),
                                          xi_v, rstd_ih, mean_ih, mean_ih_x),
                 dih + o, n);
        if (sums != nullptr) {
          T* bias_sum = sums + kSumBias * H + o;
          T* ih_sum = sums + kSumGammaIh * H + o;
          T* hh_sum = sums + kSumGammaHh * H + o;
          (V::loadu(bias_sum, n) + d).store(bias_sum, n);
          at::vec::fmadd(d, xi_v, V::loadu(ih_sum, n)).store(ih_sum, n);
          at::vec::fmadd(d, xh_v, V::loadu(hh_sum, n)).store(hh_sum, n);
        }
      }
    }
  });
}

template <typename T, typename S = T>
constexpr TypedKernels<T, S> typed_kernels() {
  return {{{&forward_step_impl<T, S, false, false>,
            &forward_step_impl<T, S, false, true>},
           {&forward_step_impl<T, S, true, false>,
            &forward_step_impl<T, S, true, true>}},
          {{&backward_step_impl<T, S, false, false>,
            &backward_step_impl<T, S, false, true>},
           {&backward_step_impl<T, S, true, false>,
            &backward_step_impl<T, S, true, true>}},
          {{&layer_norm_forward_step_impl<T, S, false, false>,
            &layer_norm_forward_step_impl<T, S, false, true>},
           {&layer_norm_forward_step_impl<T, S, true, false>,
            &layer_norm_forward_step_impl<T, S, true, true>}},
          {{&layer_norm_backward_step_impl<T, S, false, false>,
            &layer_norm_backward_step_impl<T, S, false, true>},
           {&layer_norm_backward_step_impl<T, S, true, false>,
            &layer_norm_backward_step_impl<T, S, true, true>}}};
}

inline const KernelTable& make_kernel_table(const char* name) {
  static const KernelTable table{typed_kernels<float>(), typed_kernels<double>(),
                                 typed_kernels<float, c10::BFloat16>(), name};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
