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

// The cell math needs exp and tanh of the vector type.
template <typename S>
struct MathOps<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static inline V exp(const V& x) { return x.exp(); }
  static inline V tanh(const V& x) { return x.tanh(); }
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
