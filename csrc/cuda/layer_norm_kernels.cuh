// The LayerNorm-LSTM kernels of CudaBackend, the CUDA counterparts of
// layer_norm_forward_step_impl and layer_norm_backward_step_impl in
// cpu/step_kernels.h (whose backward also adds up the LayerNorm parameter
// gradients that layer_norm_param_grads sums here), with the same
// semantics (two-pass mean and biased variance, the same buffers read and
// written, the same in-place updates). The element math is layer_norm.h's,
// layer_norm_lstm_cell.h's and lstm_cell.h's; only the row sums are written
// here, as warp, block and cluster reductions. Included by the .cu files that instantiate them.
//
// Step kernels (launch.cuh's row_groups): a group of blockDim.x threads
// (whole warps) in each of the `blocks` blocks of a thread-block cluster
// owns one row (blocks is 1 without clusters: before Hopper, or with rows
// enough to fill the GPU), and each thread of it owns the same hidden units
// j = rank * blockDim.x + threadIdx.x + m * blockDim.x * blocks in every
// pass, with their four gates at k * H + j (k = 0..3). A thread therefore
// only reads back what it wrote itself (xhat over ih and hh, sigmoid(o)
// parked in h_out, c_t, dgates), so the in-place updates need no
// synchronisation; threads meet only in row_sum.
// A cluster loops over its rows from a first row that is uniform in the
// cluster, so all its threads run the same iterations and the same row_sum
// calls; threads whose row is past the end (active == false) join the sums
// with zeros and touch no memory. A warp never spans two rows (blockDim.x is
// whole warps), so `active` is uniform in a warp.
// Every reduction has a fixed shape for given sizes, so the results are
// bitwise reproducible run to run (not equal to the CPU's, whose sums run in
// another order).
#pragma once

#include <ATen/OpMathType.h>
#ifndef RNNFAST_SIMT_EMULATION
#include <cooperative_groups.h>
#endif

#include <type_traits>

#include "../layer_norm.h"
#include "../layer_norm_lstm_cell.h"
#include "../lstm_cell.h"
#include "launch.cuh"
#include "step_kernels.h"

// The cluster reductions exist in code compiled for Hopper (sm_90) or newer,
// and in the CPU emulation, which runs them as a Hopper would.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || \
    defined(RNNFAST_SIMT_EMULATION)
#define RNNFAST_CLUSTER_REDUCTIONS 1
#else
#define RNNFAST_CLUSTER_REDUCTIONS 0
#endif

namespace rnnfast::cuda {

constexpr int kMaxBlockWarps = kMaxRowThreads / kWarpSize;

// Shared scratch of row_sum: one slot per warp of the block and per value,
// and one per row of the block for the sums across a cluster.
template <typename T, int N>
struct RowSumScratch {
  T slot[kMaxBlockWarps][N];
  T block[kMaxBlockWarps][N];
};

// Where a thread of a step kernel works: its cluster's rows and its hidden
// units (see the top of this file).
struct RowPlace {
  unsigned rank = 0, blocks = 1;  // in the cluster
  int64_t first_row = 0, row_stride = 0;
  int64_t unit_stride = 0;        // between a thread's hidden units
  __device__ int64_t first_unit() const {
    return rank * int64_t(blockDim.x) + threadIdx.x;
  }
};

__device__ __forceinline__ RowPlace row_place() {
  RowPlace r;
#if RNNFAST_CLUSTER_REDUCTIONS
  const cooperative_groups::cluster_group cluster =
      cooperative_groups::this_cluster();
  r.rank = cluster.block_rank();
  r.blocks = cluster.num_blocks();
#endif
  r.first_row = int64_t(blockIdx.x / r.blocks) * blockDim.y;
  r.row_stride = int64_t(gridDim.x / r.blocks) * blockDim.y;
  r.unit_stride = int64_t(blockDim.x) * r.blocks;
  return r;
}

// Replaces v[n] in every thread of a row group by the sum of v[n] over the
// group's blockDim.x threads; every thread of the group gets the same bits.
// Within a warp a butterfly (each lane adds the same two partial sums, in
// either order, at every level); across the warps of a row each thread adds
// the warps' sums in warp order. Every thread of the block must call it, the
// same number of times (it synchronises the block when a row spans more than
// one warp); blockDim.x must be a multiple of kWarpSize and the block at most
// kMaxRowThreads threads.
template <int N, typename T>
__device__ __forceinline__ void row_sum(T (&v)[N], RowSumScratch<T, N>& s,
                                        const RowPlace& place) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) {
      v[n] += __shfl_xor_sync(0xffffffffu, v[n], lane_mask);
    }
  }
  const int warps = blockDim.x / kWarpSize;  // per row, uniform in the block
  if (warps > 1) {
    const int first_warp = threadIdx.y * warps;  // this row's first warp
    if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
      for (int n = 0; n < N; ++n) {
        s.slot[first_warp + threadIdx.x / kWarpSize][n] = v[n];
      }
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < N; ++n) {
      T sum = s.slot[first_warp][n];
      for (int w = 1; w < warps; ++w) sum += s.slot[first_warp + w][n];
      v[n] = sum;
    }
    __syncthreads();  // the slots are free for the next call
  }
#if RNNFAST_CLUSTER_REDUCTIONS
  // Across the blocks of a cluster: each block's sum through distributed
  // shared memory, added in rank order by every thread.
  if (place.blocks > 1) {
    const cooperative_groups::cluster_group cluster =
        cooperative_groups::this_cluster();
    if (threadIdx.x == 0) {
#pragma unroll
      for (int n = 0; n < N; ++n) s.block[threadIdx.y][n] = v[n];
    }
    cluster.sync();
#pragma unroll
    for (int n = 0; n < N; ++n) {
      T sum = *cluster.map_shared_rank(&s.block[threadIdx.y][n], 0);
      for (unsigned r = 1; r < place.blocks; ++r) {
        sum += *cluster.map_shared_rank(&s.block[threadIdx.y][n], r);
      }
      v[n] = sum;
    }
    cluster.sync();  // every block has read the others' sums
  }
#endif
}

// ---- One step of the recurrence ---------------------------------------------

template <bool Training, bool ZoneoutCell, typename T, typename S>
__global__ void __launch_bounds__(kMaxRowThreads)
    layer_norm_forward_step_kernel(const LayerNormStepParams<T, S> p) {
  using acc_t = at::opmath_type<T>;
  // sigmoid(o) waits in h_out for LN_cell's statistics when h_out holds T;
  // a half-type h_out would round it, so then it is recomputed.
  constexpr bool kParkO = std::is_same_v<T, S>;
  RowSumScratch<acc_t, 2>& scratch = block_shared<RowSumScratch<acc_t, 2>>();
  const RowPlace place = row_place();
  const int64_t H = p.hidden, G = 4 * p.hidden;
  const int64_t step = place.unit_stride;
  const acc_t eps = static_cast<acc_t>(p.eps);
  for (int64_t first = place.first_row; first < p.rows;
       first += place.row_stride) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < p.rows;  // else this thread touches no memory
    const int64_t begin = active ? place.first_unit() : H;  // hidden units
    T* ih = p.ih + (active ? row * G : 0);
    T* hh = p.hh + (active ? row * G : 0);
    T* c_state = p.cell_state + (active ? row * H : 0);
    S* h_out = p.h_out + (active ? row * H : 0);
    // c~_t, from which h is computed: the new c_t itself without zoneout
    const T* c_cand = ZoneoutCell ? p.cell_save + (active ? row * H : 0)
                                  : c_state;

    // Statistics of W_ih x_t and W_hh h_{t-1} over their 4H values,
    // two-pass, both rows in the same sums.
    acc_t s[2] = {acc_t(0), acc_t(0)};
    for (int64_t j = begin; j < H; j += step) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        s[0] += static_cast<acc_t>(ih[k * H + j]);
        s[1] += static_cast<acc_t>(hh[k * H + j]);
      }
    }
    row_sum(s, scratch, place);
    const acc_t mean_ih = s[0] / static_cast<acc_t>(G);
    const acc_t mean_hh = s[1] / static_cast<acc_t>(G);
    s[0] = s[1] = acc_t(0);
    for (int64_t j = begin; j < H; j += step) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const acc_t di = static_cast<acc_t>(ih[k * H + j]) - mean_ih;
        const acc_t dh = static_cast<acc_t>(hh[k * H + j]) - mean_hh;
        s[0] += di * di;
        s[1] += dh * dh;
      }
    }
    row_sum(s, scratch, place);
    const acc_t rstd_ih = layer_norm_rstd(s[0] / static_cast<acc_t>(G), eps);
    const acc_t rstd_hh = layer_norm_rstd(s[1] / static_cast<acc_t>(G), eps);

    // Gates and the cell state; both products normalised in place (when
    // training or when o is not parked), and sigmoid(o) parked in h_out
    // until LN_cell's statistics are known.
    s[0] = acc_t(0);  // sum of c_t
    for (int64_t j = begin; j < H; j += step) {
      acc_t pre[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t o = k * H + j;
        const acc_t xi =
            layer_norm_normalize(static_cast<acc_t>(ih[o]), mean_ih, rstd_ih);
        const acc_t xh =
            layer_norm_normalize(static_cast<acc_t>(hh[o]), mean_hh, rstd_hh);
        // saved for the backward, and read again below for o where it is
        // not parked
        if constexpr (Training || !kParkO) {
          ih[o] = static_cast<T>(xi);
          hh[o] = static_cast<T>(xh);
        }
        pre[k] = layer_norm_gate(xi, static_cast<acc_t>(p.gamma_ih[o]), xh,
                                 static_cast<acc_t>(p.gamma_hh[o]),
                                 static_cast<acc_t>(p.bias[o]));
      }
      const acc_t c_prev = static_cast<acc_t>(c_state[j]);
      const auto cell =
          lstm_cell_state<acc_t>(pre[0], pre[1], pre[2], pre[3], c_prev);
      if constexpr (kParkO) h_out[j] = static_cast<T>(cell.o);
      const T c = static_cast<T>(cell.c);
      if constexpr (ZoneoutCell) {
        p.cell_save[row * H + j] = c;
        const acc_t a = zoneout_coefficient_at<acc_t>(
            p.zoneout.mask, row * H + j, p.zoneout.rate);
        const T carried =
            static_cast<T>(zoneout(a, c_prev, static_cast<acc_t>(c)));
        c_state[j] = carried;
        if constexpr (Training) p.cell_state_save[row * H + j] = carried;
      } else {
        c_state[j] = c;
        if constexpr (Training) p.cell_save[row * H + j] = c;
      }
      s[0] += static_cast<acc_t>(c);
    }

    // h = o tanh(LN_cell(c_t)); the statistics of c_t, two-pass, from the
    // values this thread stored.
    s[1] = acc_t(0);
    row_sum(s, scratch, place);
    const acc_t mean_c = s[0] / static_cast<acc_t>(H);
    s[0] = acc_t(0);
    for (int64_t j = begin; j < H; j += step) {
      const acc_t d = static_cast<acc_t>(c_cand[j]) - mean_c;
      s[0] += d * d;
    }
    row_sum(s, scratch, place);
    if (!active) continue;  // no row_sum follows in this iteration
    const acc_t rstd_c = layer_norm_rstd(s[0] / static_cast<acc_t>(H), eps);
    if (Training && place.rank == 0 && threadIdx.x == 0) {
      T* st = p.stats + row * kStatsWidth;
      st[kRstdIh] = static_cast<T>(rstd_ih);
      st[kRstdHh] = static_cast<T>(rstd_hh);
      st[kMeanCell] = static_cast<T>(mean_c);
      st[kRstdCell] = static_cast<T>(rstd_c);
    }
    for (int64_t j = begin; j < H; j += step) {
      const acc_t cn = layer_norm_affine(
          layer_norm_normalize(static_cast<acc_t>(c_cand[j]), mean_c, rstd_c),
          static_cast<acc_t>(p.gamma_cell[j]),
          static_cast<acc_t>(p.beta_cell[j]));
      acc_t o;
      if constexpr (kParkO) {
        o = static_cast<acc_t>(h_out[j]);
      } else {  // as computed above, from the normalised products
        const int64_t k = 3 * H + j;
        o = rnnfast::sigmoid(layer_norm_gate(
            static_cast<acc_t>(ih[k]), static_cast<acc_t>(p.gamma_ih[k]),
            static_cast<acc_t>(hh[k]), static_cast<acc_t>(p.gamma_hh[k]),
            static_cast<acc_t>(p.bias[k])));
      }
      h_out[j] = static_cast<S>(o * rnnfast::tanh(cn));
    }
  }
}

// The pre-activation of gate element o of a row from the saved normalised
// products.
template <typename T, typename S, typename acc_t = at::opmath_type<T>>
__device__ __forceinline__ acc_t saved_pre_activation(
    const LayerNormBackwardStepParams<T, S>& p, const T* xi, const T* xh,
    int64_t o) {
  return layer_norm_gate(static_cast<acc_t>(xi[o]),
                         static_cast<acc_t>(p.gamma_ih[o]),
                         static_cast<acc_t>(xh[o]),
                         static_cast<acc_t>(p.gamma_hh[o]),
                         static_cast<acc_t>(p.bias[o]));
}

template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
__global__ void __launch_bounds__(kMaxRowThreads)
    layer_norm_backward_step_kernel(const LayerNormBackwardStepParams<T, S> p) {
  using acc_t = at::opmath_type<T>;
  RowSumScratch<acc_t, 4>& scratch = block_shared<RowSumScratch<acc_t, 4>>();
  const RowPlace place = row_place();
  const int64_t H = p.hidden, G = 4 * p.hidden;
  const int64_t step = place.unit_stride;
  for (int64_t first = place.first_row; first < p.rows;
       first += place.row_stride) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < p.rows;  // else this thread touches no memory
    const int64_t begin = active ? place.first_unit() : H;  // hidden units
    const int64_t rh = active ? row * H : 0, rg = active ? row * G : 0;
    const T* xi = p.normalized_ih + rg;
    const T* xh = p.normalized_hh + rg;
    const T* cell = p.cell + rh;
    // Rows that continue from the previous step read its cell state; the
    // others start this step from the initial state of the same row.
    const T* cell_prev = (active && row < p.rows_from_previous ? p.cell_prev
                                                               : p.cell_init) + rh;
    T* dgates = p.dgates + rg;
    T* dcn = p.dcell_norm + rh;
    T* dc_state = p.dcell_state + rh;
    acc_t mean_c = acc_t(0), rstd_c = acc_t(0), rstd_hh = acc_t(0),
          rstd_ih = acc_t(0);
    if (active) {
      const T* st = p.stats + row * kStatsWidth;
      mean_c = static_cast<acc_t>(st[kMeanCell]);
      rstd_c = static_cast<acc_t>(st[kRstdCell]);
      rstd_hh = static_cast<acc_t>(st[kRstdHh]);
      rstd_ih = static_cast<acc_t>(st[kRstdIh]);
    }

    // Output half: gradients w.r.t. o and w.r.t. LN_cell(c_t), and the sums
    // of the LN_cell backward.
    acc_t s[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t j = begin; j < H; j += step) {
      const acc_t o = rnnfast::sigmoid(saved_pre_activation(p, xi, xh, 3 * H + j));
      const acc_t xhat =
          layer_norm_normalize(static_cast<acc_t>(cell[j]), mean_c, rstd_c);
      const acc_t cn = layer_norm_affine(xhat,
                                         static_cast<acc_t>(p.gamma_cell[j]),
                                         static_cast<acc_t>(p.beta_cell[j]));
      acc_t dh = static_cast<acc_t>(p.grad_hidden[rh + j]);
      if constexpr (AddOutputGrad) dh += static_cast<acc_t>(p.grad_output[rh + j]);
      const auto out = lstm_output_backward<acc_t>(dh, o, rnnfast::tanh(cn));
      dgates[3 * H + j] = static_cast<T>(out.do_);
      const T dy = static_cast<T>(out.dy);
      dcn[j] = dy;
      const acc_t dxhat = static_cast<acc_t>(dy) * static_cast<acc_t>(p.gamma_cell[j]);
      s[0] += dxhat;
      s[1] += dxhat * xhat;
    }
    row_sum(s, scratch, place);
    const acc_t mean_dxhat = s[0] / static_cast<acc_t>(H);
    const acc_t mean_dxhat_xhat = s[1] / static_cast<acc_t>(H);

    // LN_cell backward, then the state half; the sums of the LayerNorm
    // backward of both products over the row's 4H gate gradients.
    s[0] = s[1] = s[2] = s[3] = acc_t(0);
    for (int64_t j = begin; j < H; j += step) {
      const acc_t xhat =
          layer_norm_normalize(static_cast<acc_t>(cell[j]), mean_c, rstd_c);
      const acc_t dxhat =
          static_cast<acc_t>(dcn[j]) * static_cast<acc_t>(p.gamma_cell[j]);
      // dL/dc~_t: from the output, and from the carried c_t (all of it
      // without zoneout, its share (1 - a) with).
      acc_t dc_carried = static_cast<acc_t>(dc_state[j]);
      acc_t dc_prev_share = acc_t(0);
      if constexpr (ZoneoutCell) {
        const acc_t a =
            zoneout_coefficient_at<acc_t>(p.zoneout.mask, rh + j, p.zoneout.rate);
        const auto z = zoneout_backward(a, dc_carried);
        dc_carried = z.dcand;
        dc_prev_share = z.dprev;
      }
      const acc_t dc = dc_carried +
                       layer_norm_input_grad(dxhat, xhat, rstd_c, mean_dxhat,
                                             mean_dxhat_xhat);
      const auto state = lstm_state_backward<acc_t>(
          dc, rnnfast::sigmoid(saved_pre_activation(p, xi, xh, j)),
          rnnfast::sigmoid(saved_pre_activation(p, xi, xh, H + j)),
          rnnfast::tanh(saved_pre_activation(p, xi, xh, 2 * H + j)),
          static_cast<acc_t>(cell_prev[j]));
      dgates[j] = static_cast<T>(state.di);
      dgates[H + j] = static_cast<T>(state.df);
      dgates[2 * H + j] = static_cast<T>(state.dg);
      if constexpr (ZoneoutCell) {
        dc_state[j] = static_cast<T>(state.dc_prev + dc_prev_share);
      } else {
        dc_state[j] = static_cast<T>(state.dc_prev);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t o = k * H + j;
        const acc_t dg = static_cast<acc_t>(dgates[o]);
        const acc_t dxhat_hh = dg * static_cast<acc_t>(p.gamma_hh[o]);
        const acc_t dxhat_ih = dg * static_cast<acc_t>(p.gamma_ih[o]);
        s[0] += dxhat_hh;
        s[1] += dxhat_hh * static_cast<acc_t>(xh[o]);
        s[2] += dxhat_ih;
        s[3] += dxhat_ih * static_cast<acc_t>(xi[o]);
      }
    }
    row_sum(s, scratch, place);
    if (!active) continue;  // no row_sum follows in this iteration
    const acc_t width = static_cast<acc_t>(G);

    // The LayerNorm backward of both products: gradients w.r.t. W_hh h_{t-1}
    // and W_ih x_t.
    for (int64_t j = begin; j < H; j += step) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t o = k * H + j;
        const acc_t dg = static_cast<acc_t>(dgates[o]);
        p.dhh[rg + o] = static_cast<S>(layer_norm_input_grad(
            dg * static_cast<acc_t>(p.gamma_hh[o]), static_cast<acc_t>(xh[o]),
            rstd_hh, s[0] / width, s[1] / width));
        p.dih[rg + o] = static_cast<S>(layer_norm_input_grad(
            dg * static_cast<acc_t>(p.gamma_ih[o]), static_cast<acc_t>(xi[o]),
            rstd_ih, s[2] / width, s[3] / width));
      }
    }
  }
}

// ---- The LayerNorm parameter gradients of a group of steps ----------------

// A block owns kWarpSize adjacent columns of the 4H gate columns followed by
// the H cell columns (a warp reads 32 adjacent values of a row) and
// kColumnSlices row slices: thread (x, y) sums the rows y, y + kColumnSlices,
// ... of its column in order, then thread (x, 0) adds the slices' sums in
// slice order to the gradients. No atomics: the result depends only on the
// sizes, bitwise.
constexpr int kColumnSlices = 16;

template <typename T>
__global__ void __launch_bounds__(kWarpSize * kColumnSlices)
    layer_norm_param_grads_kernel(const LayerNormParamGradsParams<T> p) {
  using acc_t = at::opmath_type<T>;
  using Slices = acc_t[3][kColumnSlices][kWarpSize];
  Slices& slices = block_shared<Slices>();
  const int64_t H = p.hidden, G = 4 * p.hidden, W = G + H;
  for (int64_t c0 = int64_t(blockIdx.x) * kWarpSize; c0 < W;
       c0 += int64_t(gridDim.x) * kWarpSize) {
    const int64_t col = c0 + threadIdx.x;
    acc_t sum[3] = {acc_t(0), acc_t(0), acc_t(0)};
    if (col < G) {
      for (int64_t r = threadIdx.y; r < p.rows; r += kColumnSlices) {
        const acc_t d = static_cast<acc_t>(p.dgates[r * G + col]);
        sum[0] += d;
        sum[1] += d * static_cast<acc_t>(p.normalized_ih[r * G + col]);
        sum[2] += d * static_cast<acc_t>(p.normalized_hh[r * G + col]);
      }
    } else if (col < W) {
      const int64_t k = col - G;
      for (int64_t r = threadIdx.y; r < p.rows; r += kColumnSlices) {
        const T* st = p.stats + r * kStatsWidth;
        const acc_t d = static_cast<acc_t>(p.dcell_norm[r * H + k]);
        const acc_t xhat = layer_norm_normalize(
            static_cast<acc_t>(p.cell[r * H + k]),
            static_cast<acc_t>(st[kMeanCell]), static_cast<acc_t>(st[kRstdCell]));
        sum[0] += d;
        sum[1] += d * xhat;
      }
    }
#pragma unroll
    for (int n = 0; n < 3; ++n) slices[n][threadIdx.y][threadIdx.x] = sum[n];
    __syncthreads();
    if (threadIdx.y == 0 && col < W) {
#pragma unroll
      for (int n = 0; n < 3; ++n) {
        sum[n] = slices[n][0][threadIdx.x];
        for (int y = 1; y < kColumnSlices; ++y) sum[n] += slices[n][y][threadIdx.x];
      }
      if (col < G) {
        p.grad_bias[col] = static_cast<T>(static_cast<acc_t>(p.grad_bias[col]) + sum[0]);
        p.grad_gamma_ih[col] =
            static_cast<T>(static_cast<acc_t>(p.grad_gamma_ih[col]) + sum[1]);
        p.grad_gamma_hh[col] =
            static_cast<T>(static_cast<acc_t>(p.grad_gamma_hh[col]) + sum[2]);
      } else {
        const int64_t k = col - G;
        p.grad_beta_cell[k] =
            static_cast<T>(static_cast<acc_t>(p.grad_beta_cell[k]) + sum[0]);
        p.grad_gamma_cell[k] =
            static_cast<T>(static_cast<acc_t>(p.grad_gamma_cell[k]) + sum[1]);
      }
    }
    __syncthreads();  // the slices are free for the next columns
  }
}

// ---- Launchers ----------------------------------------------------------------

template <bool Training, bool ZoneoutCell, typename T, typename S>
void layer_norm_forward_step(const LayerNormStepParams<T, S>& p) {
  if (p.rows <= 0 || p.hidden <= 0) return;
  launch_row_groups(&layer_norm_forward_step_kernel<Training, ZoneoutCell, T, S>,
                    p, p.rows, p.hidden);
}

template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
void layer_norm_backward_step(const LayerNormBackwardStepParams<T, S>& p) {
  if (p.rows <= 0 || p.hidden <= 0) return;
  launch_row_groups(
      &layer_norm_backward_step_kernel<AddOutputGrad, ZoneoutCell, T, S>, p,
      p.rows, p.hidden);
}

template <typename T>
void layer_norm_param_grads(const LayerNormParamGradsParams<T>& p) {
  if (p.rows <= 0 || p.hidden <= 0) return;  // adds nothing
  const int64_t columns = 5 * p.hidden;
  const int64_t blocks =
      std::min<int64_t>((columns + kWarpSize - 1) / kWarpSize, max_blocks());
  launch(&layer_norm_param_grads_kernel<T>,
         LaunchShape{dim3(static_cast<unsigned>(blocks)),
                     dim3(kWarpSize, kColumnSlices)},
         p);
}

}  // namespace rnnfast::cuda
