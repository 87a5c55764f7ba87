// Vectorised CPU loops around the shared cell math of lstm_cell.h. Included
// by one translation unit per CPU capability, after that unit has defined
// CPU_CAPABILITY (and CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512), so that
// at::vec::Vectorized is the SIMD type of that capability.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "../lstm_cell.h"
#include "pointwise_kernels.h"

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
};

template <>
struct MathOps<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  // exp_u20 clamps its argument, which would turn NaN into a number.
  static inline V keep_nan(const V& result, const V& x) {
    return V::blendv(result, x, x != x);
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
    const V big = V::blendv(big_abs, big_abs.neg(), x < V(0.0f));
    return keep_nan(V::blendv(big, small, ax < V(0.3f)), x);
  }
};

namespace cpu {
inline namespace CPU_CAPABILITY {

// Rows per parallel task: enough elements that a task outweighs the cost of
// handing it to a thread (about 16K cell elements).
inline int64_t row_grain(int64_t hidden) {
  const int64_t g = (int64_t{1} << 14) / (hidden > 0 ? hidden : 1);
  return g > 0 ? g : 1;
}

template <typename T>
void forward_step_impl(const ForwardStepParams<T>& p) {
  using V = at::vec::Vectorized<T>;
  const int64_t H = p.hidden;
  at::parallel_for(0, p.rows, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* gates = p.gates + row * 4 * H;
      T* c_state = p.cell_state + row * H;
      for (int64_t j = 0; j < H; j += V::size()) {
        const int64_t n = std::min<int64_t>(V::size(), H - j);
        const auto out = lstm_cell_forward<V>(
            V::loadu(gates + j, n), V::loadu(gates + H + j, n),
            V::loadu(gates + 2 * H + j, n), V::loadu(gates + 3 * H + j, n),
            V::loadu(c_state + j, n));
        out.i.store(gates + j, n);
        out.f.store(gates + H + j, n);
        out.g.store(gates + 2 * H + j, n);
        out.o.store(gates + 3 * H + j, n);
        out.c.store(c_state + j, n);
        if (p.cell_save) out.c.store(p.cell_save + row * H + j, n);
        out.r.store(p.r_out + row * H + j, n);
        if (p.r_out2) out.r.store(p.r_out2 + row * H + j, n);
      }
    }
  });
}

template <typename T>
void backward_step_impl(const BackwardStepParams<T>& p) {
  using V = at::vec::Vectorized<T>;
  const int64_t H = p.hidden;
  at::parallel_for(0, p.rows, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* gates = p.gates + row * 4 * H;
      const T* cell = p.cell + row * H;
      const T* cell_prev = row < p.rows_from_previous
                               ? p.cell_prev + row * H
                               : p.cell_init + row * H;
      const T* dr = p.dr + row * H;
      const T* dr2 = p.dr2 ? p.dr2 + row * H : nullptr;
      T* dc_state = p.dcell_state + row * H;
      T* dgates = p.dgates + row * 4 * H;
      for (int64_t j = 0; j < H; j += V::size()) {
        const int64_t n = std::min<int64_t>(V::size(), H - j);
        V dr_v = V::loadu(dr + j, n);
        if (dr2) dr_v = dr_v + V::loadu(dr2 + j, n);
        const auto out = lstm_cell_backward<V>(
            V::loadu(gates + j, n), V::loadu(gates + H + j, n),
            V::loadu(gates + 2 * H + j, n), V::loadu(gates + 3 * H + j, n),
            V::loadu(cell + j, n), V::loadu(cell_prev + j, n), dr_v,
            V::loadu(dc_state + j, n));
        out.di.store(dgates + j, n);
        out.df.store(dgates + H + j, n);
        out.dg.store(dgates + 2 * H + j, n);
        out.do_.store(dgates + 3 * H + j, n);
        out.dc_prev.store(dc_state + j, n);
      }
    }
  });
}

inline const KernelTable& make_kernel_table(const char* name) {
  static const KernelTable table{
      &forward_step_impl<float>, &forward_step_impl<double>,
      &backward_step_impl<float>, &backward_step_impl<double>, name};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
