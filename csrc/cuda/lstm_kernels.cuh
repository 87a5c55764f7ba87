// The LSTM step kernels: one thread per (row, hidden unit) element, calling
// the shared cell math of lstm_cell.h in T (float or double), reading and
// writing the GEMM operands in S (T, or half / bfloat16). Included by the
// .cu files that instantiate them.
//
// Layout (lstm_params.h): gates rows are [i | f | g | o], each H wide, so the
// four gates of element (row, j) are at row * 4H + k * H + j, k = 0..3; the
// [rows, H] buffers hold element (row, j) at row * H + j.
#pragma once

#include <ATen/OpMathType.h>

#include "../lstm_cell.h"
#include "launch.cuh"
#include "step_kernels.h"

namespace rnnfast::cuda {

// The cell of element (row, j) of a forward step: the pre-activations in
// p.gates (plus `product`, the recurrent product, when AddProduct) in, the
// activated gates, the cell state and r out.
template <bool Training, bool ZoneoutCell, bool AddProduct, typename T,
          typename S, typename acc_t = at::opmath_type<T>>
__device__ __forceinline__ void forward_element(
    const ForwardStepParams<T, S>& p, int64_t row, int64_t j,
    const acc_t (&product)[4]) {
  const int64_t H = p.hidden;
  const int64_t e = row * H + j;
  T* gates = p.gates + row * 4 * H + j;
  acc_t pre[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    pre[k] = static_cast<acc_t>(gates[k * H]);
    if constexpr (AddProduct) pre[k] += product[k];
  }
  const acc_t c_prev = static_cast<acc_t>(p.cell_state[e]);
  const auto out = lstm_cell_forward<acc_t>(pre[0], pre[1], pre[2], pre[3], c_prev);
  if constexpr (Training) {  // the backward's saved activations
    gates[0] = static_cast<T>(out.i);
    gates[H] = static_cast<T>(out.f);
    gates[2 * H] = static_cast<T>(out.g);
    gates[3 * H] = static_cast<T>(out.o);
  }
  if constexpr (ZoneoutCell) {
    const acc_t a =
        zoneout_coefficient_at<acc_t>(p.zoneout.mask, e, p.zoneout.rate);
    const T c = static_cast<T>(zoneout(a, c_prev, out.c));
    p.cell_state[e] = c;
    if constexpr (Training) p.cell_state_save[e] = c;
  } else {
    p.cell_state[e] = static_cast<T>(out.c);
  }
  if constexpr (Training) p.cell_save[e] = static_cast<T>(out.c);
  p.hidden_out[e] = static_cast<S>(out.r);
}

template <bool Training, bool ZoneoutCell, typename T, typename S>
__global__ void __launch_bounds__(kBlockThreads)
    lstm_forward_step_kernel(const ForwardStepParams<T, S> p) {
  using acc_t = at::opmath_type<T>;
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= p.hidden) return;
  const int64_t row_stride = int64_t(gridDim.y) * blockDim.y;
  const acc_t none[4] = {};
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
       row < p.rows; row += row_stride) {
    forward_element<Training, ZoneoutCell, false>(p, row, j, none);
  }
}

// lstm_fused_forward_step: a warp per hidden unit j (looping over the units
// with the grid's warps). Its lanes stride over the P columns of h_{t-1},
// each adding, for every row, the products with the four gate rows k H + j
// of W_hh; a butterfly then gives every lane the warp's sums, and lane r
// runs the cell of row r. W_hh is read once, coalesced, and the gates stay
// in registers between the product and the cell: a step of a few rows is
// bound by reading W_hh, and this is one launch instead of a GEMM and a
// step kernel.
template <bool Training, bool ZoneoutCell, typename T, typename S>
__global__ void __launch_bounds__(kBlockThreads)
    lstm_fused_forward_step_kernel(const FusedForwardStepParams<T, S> q) {
  using acc_t = at::opmath_type<T>;
  constexpr int R = static_cast<int>(kFusedStepRows);
  const ForwardStepParams<T, S>& p = q.step;
  const int64_t H = p.hidden;
  const int rows = static_cast<int>(p.rows);  // <= R, uniform in the grid
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / kWarpSize;
  for (int64_t j = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
       j < H; j += warps) {  // uniform in a warp: whole warps loop
    acc_t sum[R][4] = {};
    for (int64_t c = lane; c < q.width; c += kWarpSize) {
      acc_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        w[k] = static_cast<acc_t>(q.weight[(k * H + j) * q.weight_ld + c]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rows) {
          const acc_t x = static_cast<acc_t>(q.previous.row(r)[c]);
#pragma unroll
          for (int k = 0; k < 4; ++k) sum[r][k] += x * w[k];
        }
      }
    }
    acc_t mine[4] = {};
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rows) {  // uniform: every lane takes part in the shuffles
#pragma unroll
        for (int k = 0; k < 4; ++k) {
#pragma unroll
          for (int m = kWarpSize / 2; m > 0; m /= 2) {
            sum[r][k] += __shfl_xor_sync(0xffffffffu, sum[r][k], m);
          }
          if (r == lane) mine[k] = sum[r][k];
        }
      }
    }
    if (lane < rows) forward_element<Training, ZoneoutCell, true>(p, lane, j, mine);
  }
}

template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
__global__ void __launch_bounds__(kBlockThreads)
    lstm_backward_step_kernel(const BackwardStepParams<T, S> p) {
  using acc_t = at::opmath_type<T>;
  const int64_t H = p.hidden;
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= H) return;
  const int64_t row_stride = int64_t(gridDim.y) * blockDim.y;
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
       row < p.rows; row += row_stride) {
    const int64_t e = row * H + j;
    const int64_t ge = row * 4 * H + j;
    const T* gates = p.gates + ge;
    // Rows that continue from the previous step read its cell state; the
    // others start this step from the initial state of the same row.
    const T c_prev = row < p.rows_from_previous ? p.cell_prev[e]
                                                : p.cell_init[e];
    acc_t dr = static_cast<acc_t>(p.grad_hidden[e]);
    if constexpr (AddOutputGrad) dr += static_cast<acc_t>(p.grad_output[e]);
    LstmCellBackward<acc_t> out;
    if constexpr (ZoneoutCell) {
      out = lstm_cell_backward_zoneout<acc_t>(
          static_cast<acc_t>(gates[0]), static_cast<acc_t>(gates[H]),
          static_cast<acc_t>(gates[2 * H]), static_cast<acc_t>(gates[3 * H]),
          static_cast<acc_t>(p.cell[e]), static_cast<acc_t>(c_prev), dr,
          static_cast<acc_t>(p.dcell_state[e]),
          zoneout_coefficient_at<acc_t>(p.zoneout.mask, e,
                                        p.zoneout.rate));
    } else {
      out = lstm_cell_backward<acc_t>(
          static_cast<acc_t>(gates[0]), static_cast<acc_t>(gates[H]),
          static_cast<acc_t>(gates[2 * H]), static_cast<acc_t>(gates[3 * H]),
          static_cast<acc_t>(p.cell[e]), static_cast<acc_t>(c_prev), dr,
          static_cast<acc_t>(p.dcell_state[e]));
    }
    S* dgates = p.dgates + ge;
    dgates[0] = static_cast<S>(out.di);
    dgates[H] = static_cast<S>(out.df);
    dgates[2 * H] = static_cast<S>(out.dg);
    dgates[3 * H] = static_cast<S>(out.do_);
    p.dcell_state[e] = static_cast<T>(out.dc_prev);
  }
}

template <bool Training, bool ZoneoutCell, typename T, typename S>
void lstm_forward_step(const ForwardStepParams<T, S>& p) {
  if (p.rows <= 0 || p.hidden <= 0) return;
  launch(&lstm_forward_step_kernel<Training, ZoneoutCell, T, S>,
         rows_by_cols(p.rows, p.hidden), p);
}

template <bool Training, bool ZoneoutCell, typename T, typename S>
void lstm_fused_forward_step(const FusedForwardStepParams<T, S>& p) {
  if (p.step.rows <= 0 || p.step.hidden <= 0) return;
  TORCH_CHECK(p.step.rows <= kFusedStepRows,
              "rnnfast: internal error: a fused step of ", p.step.rows, " rows");
  // a warp per hidden unit
  launch(&lstm_fused_forward_step_kernel<Training, ZoneoutCell, T, S>,
         flat(p.step.hidden * kWarpSize), p);
}

template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
void lstm_backward_step(const BackwardStepParams<T, S>& p) {
  if (p.rows <= 0 || p.hidden <= 0) return;
  launch(&lstm_backward_step_kernel<AddOutputGrad, ZoneoutCell, T, S>,
         rows_by_cols(p.rows, p.hidden), p);
}

}  // namespace rnnfast::cuda
