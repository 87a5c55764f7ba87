// The LayerNorm-LSTM kernels of CudaBackend, the CUDA counterparts of
// layer_norm_rows_impl, layer_norm_rows_backward_impl,
// layer_norm_forward_step_impl, layer_norm_backward_step_impl and
// column_sums_impl in cpu/pointwise_impl.h, with the same semantics (two-pass
// mean and biased variance, the same buffers read and written, the same
// in-place aliasing). The element math is layer_norm.h's and lstm_cell.h's;
// only the row sums are written here, as warp and block reductions. Included
// by the .cu files that instantiate them.
//
// Row kernels (launch.cuh's row_groups): a group of blockDim.x threads (whole
// warps) owns one row, and each thread of it owns the same elements of that
// row in every pass: elements o = threadIdx.x + m * blockDim.x of a row of
// width W in the row kernels; hidden units j = threadIdx.x + m * blockDim.x,
// with their four gates at k * H + j (k = 0..3), in the step kernels. A thread therefore
// only reads back what it wrote itself (xhat over hh, c_t, dgates), so the
// in-place updates need no synchronisation; threads meet only in row_sum.
// A block loops over its rows from a first row that is uniform in the block,
// so all its threads run the same iterations and the same row_sum calls;
// threads whose row is past the end (active == false) join the sums with
// zeros and touch no memory. A warp never spans two rows (blockDim.x is whole
// warps), so `active` is uniform in a warp.
// Every reduction has a fixed shape for given sizes, so the results are
// bitwise reproducible run to run (not equal to the CPU's, whose sums run in
// another order).
#pragma once

#include <ATen/OpMathType.h>

#include "../layer_norm.h"
#include "../lstm_cell.h"
#include "launch.cuh"
#include "lstm_cuda.h"

namespace rnnfast::cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxBlockWarps = kMaxRowThreads / kWarpSize;

// Shared scratch of row_sum: one slot per warp of the block and per value.
template <typename T, int N>
struct RowSumScratch {
  T slot[kMaxBlockWarps][N];
};

// Replaces v[n] in every thread of a row group by the sum of v[n] over the
// group's blockDim.x threads; every thread of the group gets the same bits.
// Within a warp a butterfly (each lane adds the same two partial sums, in
// either order, at every level); across the warps of a row each thread adds
// the warps' sums in warp order. Every thread of the block must call it, the
// same number of times (it synchronises the block when a row spans more than
// one warp); blockDim.x must be a multiple of kWarpSize and the block at most
// kMaxRowThreads threads.
template <int N, typename T>
__device__ __forceinline__ void row_sum(T (&v)[N], RowSumScratch<T, N>& s) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) {
      v[n] += __shfl_xor_sync(0xffffffffu, v[n], lane_mask);
    }
  }
  const int warps = blockDim.x / kWarpSize;  // per row, uniform in the block
  if (warps == 1) return;
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

// ---- LayerNorm over rows (the input projection of every step) -------------

template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    layer_norm_rows_kernel(const LayerNormRowsParams<T> p) {
  using acc_t = at::opmath_type<T>;
  __shared__ RowSumScratch<acc_t, 1> scratch;
  const int64_t W = p.width;
  for (int64_t first = int64_t(blockIdx.x) * blockDim.y; first < p.rows;
       first += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < p.rows;  // else this thread touches no memory
    const int64_t begin = active ? int64_t(threadIdx.x) : W;  // none if idle
    const T* x = p.input + (active ? row * W : 0);
    acc_t s[1] = {acc_t(0)};
    for (int64_t o = begin; o < W; o += blockDim.x) s[0] += static_cast<acc_t>(x[o]);
    row_sum(s, scratch);
    const acc_t mean = s[0] / static_cast<acc_t>(W);
    s[0] = acc_t(0);
    for (int64_t o = begin; o < W; o += blockDim.x) {
      const acc_t d = static_cast<acc_t>(x[o]) - mean;
      s[0] += d * d;
    }
    row_sum(s, scratch);
    const acc_t rstd = layer_norm_rstd(s[0] / static_cast<acc_t>(W),
                                       static_cast<acc_t>(p.eps));
    if (active && threadIdx.x == 0 && p.rstd != nullptr) {
      p.rstd[row * p.rstd_stride] = static_cast<T>(rstd);
    }
    for (int64_t o = begin; o < W; o += blockDim.x) {
      const int64_t e = row * W + o;
      // Read before the write below: normalized may alias input.
      const acc_t xhat = (static_cast<acc_t>(x[o]) - mean) * rstd;
      if (p.normalized != nullptr) p.normalized[e] = static_cast<T>(xhat);
      acc_t y = xhat * static_cast<acc_t>(p.gamma[o]) + static_cast<acc_t>(p.beta[o]);
      if (p.bias != nullptr) y += static_cast<acc_t>(p.bias[o]);
      p.output[e] = static_cast<T>(y);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    layer_norm_rows_backward_kernel(const LayerNormRowsBackwardParams<T> p) {
  using acc_t = at::opmath_type<T>;
  __shared__ RowSumScratch<acc_t, 2> scratch;
  const int64_t W = p.width;
  for (int64_t first = int64_t(blockIdx.x) * blockDim.y; first < p.rows;
       first += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < p.rows;  // else this thread touches no memory
    const int64_t begin = active ? int64_t(threadIdx.x) : W;
    const int64_t base = active ? row * W : 0;
    const T* dy = p.grad_output + base;
    const T* xhat = p.normalized + base;
    acc_t s[2] = {acc_t(0), acc_t(0)};  // sums of dxhat and dxhat * xhat
    for (int64_t o = begin; o < W; o += blockDim.x) {
      const acc_t dxhat = static_cast<acc_t>(dy[o]) * static_cast<acc_t>(p.gamma[o]);
      s[0] += dxhat;
      s[1] += dxhat * static_cast<acc_t>(xhat[o]);
    }
    row_sum(s, scratch);
    if (!active) continue;  // no row_sum follows in this iteration
    const acc_t mean_dxhat = s[0] / static_cast<acc_t>(W);
    const acc_t mean_dxhat_xhat = s[1] / static_cast<acc_t>(W);
    const acc_t rstd = static_cast<acc_t>(p.rstd[row * p.rstd_stride]);
    for (int64_t o = begin; o < W; o += blockDim.x) {
      const acc_t dxhat = static_cast<acc_t>(dy[o]) * static_cast<acc_t>(p.gamma[o]);
      p.grad_input[base + o] = static_cast<T>(layer_norm_input_grad(
          dxhat, static_cast<acc_t>(xhat[o]), rstd, mean_dxhat, mean_dxhat_xhat));
    }
  }
}

// ---- One step of the recurrence ---------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    layer_norm_forward_step_kernel(const LayerNormStepParams<T> p) {
  using acc_t = at::opmath_type<T>;
  __shared__ RowSumScratch<acc_t, 1> scratch;
  const int64_t H = p.hidden, G = 4 * p.hidden;
  const acc_t eps = static_cast<acc_t>(p.eps);
  for (int64_t first = int64_t(blockIdx.x) * blockDim.y; first < p.rows;
       first += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < p.rows;  // else this thread touches no memory
    const int64_t begin = active ? int64_t(threadIdx.x) : H;  // hidden units
    T* gates = p.gates + (active ? row * G : 0);
    T* hh = p.hh + (active ? row * G : 0);
    T* c_state = p.cell_state + (active ? row * H : 0);

    // LN_hh statistics over the 4H values of W_hh h_{t-1}, two-pass.
    acc_t s[1] = {acc_t(0)};
    for (int64_t j = begin; j < H; j += blockDim.x) {
#pragma unroll
      for (int k = 0; k < 4; ++k) s[0] += static_cast<acc_t>(hh[k * H + j]);
    }
    row_sum(s, scratch);
    const acc_t mean_hh = s[0] / static_cast<acc_t>(G);
    s[0] = acc_t(0);
    for (int64_t j = begin; j < H; j += blockDim.x) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const acc_t d = static_cast<acc_t>(hh[k * H + j]) - mean_hh;
        s[0] += d * d;
      }
    }
    row_sum(s, scratch);
    const acc_t rstd_hh = layer_norm_rstd(s[0] / static_cast<acc_t>(G), eps);

    // Gates and the cell state; xhat_hh over hh when saved.
    s[0] = acc_t(0);  // sum of c_t
    for (int64_t j = begin; j < H; j += blockDim.x) {
      acc_t pre[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t o = k * H + j;
        const acc_t xhat = (static_cast<acc_t>(hh[o]) - mean_hh) * rstd_hh;
        if (p.save_normalized_hh) hh[o] = static_cast<T>(xhat);
        pre[k] = static_cast<acc_t>(gates[o]) +
                 (xhat * static_cast<acc_t>(p.gamma_hh[o]) +
                  static_cast<acc_t>(p.beta_hh[o]));
      }
      const auto cell = lstm_cell_state<acc_t>(pre[0], pre[1], pre[2], pre[3],
                                               static_cast<acc_t>(c_state[j]));
      gates[j] = static_cast<T>(cell.i);
      gates[H + j] = static_cast<T>(cell.f);
      gates[2 * H + j] = static_cast<T>(cell.g);
      gates[3 * H + j] = static_cast<T>(cell.o);
      const T c = static_cast<T>(cell.c);
      c_state[j] = c;
      if (p.cell_save != nullptr) p.cell_save[row * H + j] = c;
      s[0] += static_cast<acc_t>(c);
    }

    // h = o tanh(LN_cell(c_t)); the statistics of c_t, two-pass, from the
    // values this thread stored.
    row_sum(s, scratch);
    const acc_t mean_c = s[0] / static_cast<acc_t>(H);
    s[0] = acc_t(0);
    for (int64_t j = begin; j < H; j += blockDim.x) {
      const acc_t d = static_cast<acc_t>(c_state[j]) - mean_c;
      s[0] += d * d;
    }
    row_sum(s, scratch);
    if (!active) continue;  // no row_sum follows in this iteration
    const acc_t rstd_c = layer_norm_rstd(s[0] / static_cast<acc_t>(H), eps);
    if (threadIdx.x == 0 && p.stats != nullptr) {
      T* st = p.stats + row * kStatsWidth;
      st[kRstdHh] = static_cast<T>(rstd_hh);
      st[kMeanCell] = static_cast<T>(mean_c);
      st[kRstdCell] = static_cast<T>(rstd_c);
    }
    for (int64_t j = begin; j < H; j += blockDim.x) {
      const acc_t cn =
          ((static_cast<acc_t>(c_state[j]) - mean_c) * rstd_c) *
              static_cast<acc_t>(p.gamma_cell[j]) +
          static_cast<acc_t>(p.beta_cell[j]);
      const T h = static_cast<T>(static_cast<acc_t>(gates[3 * H + j]) *
                                 rnnfast::tanh(cn));
      p.h_out[row * H + j] = h;
      if (p.h_out2 != nullptr) p.h_out2[row * H + j] = h;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    layer_norm_backward_step_kernel(const LayerNormBackwardStepParams<T> p) {
  using acc_t = at::opmath_type<T>;
  __shared__ RowSumScratch<acc_t, 2> scratch;
  const int64_t H = p.hidden, G = 4 * p.hidden;
  for (int64_t first = int64_t(blockIdx.x) * blockDim.y; first < p.rows;
       first += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < p.rows;  // else this thread touches no memory
    const int64_t begin = active ? int64_t(threadIdx.x) : H;  // hidden units
    const int64_t rh = active ? row * H : 0, rg = active ? row * G : 0;
    const T* gates = p.gates + rg;
    const T* cell = p.cell + rh;
    // Rows that continue from the previous step read its cell state; the
    // others start this step from the initial state of the same row.
    const T* cell_prev = (active && row < p.rows_from_previous ? p.cell_prev
                                                               : p.cell_init) + rh;
    const T* nhh = p.normalized_hh + rg;
    T* dgates = p.dgates + rg;
    T* dcn = p.dcell_norm + rh;
    T* dc_state = p.dcell_state + rh;
    acc_t mean_c = acc_t(0), rstd_c = acc_t(0), rstd_hh = acc_t(0);
    if (active) {
      const T* st = p.stats + row * kStatsWidth;
      mean_c = static_cast<acc_t>(st[kMeanCell]);
      rstd_c = static_cast<acc_t>(st[kRstdCell]);
      rstd_hh = static_cast<acc_t>(st[kRstdHh]);
    }

    // Output half: gradients w.r.t. o and w.r.t. LN_cell(c_t), and the sums
    // of the LN_cell backward.
    acc_t s[2] = {acc_t(0), acc_t(0)};  // sums of dxhat and dxhat * xhat
    for (int64_t j = begin; j < H; j += blockDim.x) {
      const acc_t xhat = (static_cast<acc_t>(cell[j]) - mean_c) * rstd_c;
      const acc_t cn = xhat * static_cast<acc_t>(p.gamma_cell[j]) +
                       static_cast<acc_t>(p.beta_cell[j]);
      acc_t dh = static_cast<acc_t>(p.dh[rh + j]);
      if (p.dh2 != nullptr) dh += static_cast<acc_t>(p.dh2[rh + j]);
      const auto out = lstm_output_backward<acc_t>(
          dh, static_cast<acc_t>(gates[3 * H + j]), rnnfast::tanh(cn));
      dgates[3 * H + j] = static_cast<T>(out.do_);
      const T dy = static_cast<T>(out.dy);
      dcn[j] = dy;
      const acc_t dxhat = static_cast<acc_t>(dy) * static_cast<acc_t>(p.gamma_cell[j]);
      s[0] += dxhat;
      s[1] += dxhat * xhat;
    }
    row_sum(s, scratch);
    const acc_t mean_dxhat = s[0] / static_cast<acc_t>(H);
    const acc_t mean_dxhat_xhat = s[1] / static_cast<acc_t>(H);

    // LN_cell backward, then the state half; the sums of the LN_hh backward
    // over the row's 4H gate gradients.
    s[0] = s[1] = acc_t(0);
    for (int64_t j = begin; j < H; j += blockDim.x) {
      const acc_t xhat = (static_cast<acc_t>(cell[j]) - mean_c) * rstd_c;
      const acc_t dxhat =
          static_cast<acc_t>(dcn[j]) * static_cast<acc_t>(p.gamma_cell[j]);
      const acc_t dc = static_cast<acc_t>(dc_state[j]) +
                       layer_norm_input_grad(dxhat, xhat, rstd_c, mean_dxhat,
                                             mean_dxhat_xhat);
      const auto state = lstm_state_backward<acc_t>(
          dc, static_cast<acc_t>(gates[j]), static_cast<acc_t>(gates[H + j]),
          static_cast<acc_t>(gates[2 * H + j]), static_cast<acc_t>(cell_prev[j]));
      dgates[j] = static_cast<T>(state.di);
      dgates[H + j] = static_cast<T>(state.df);
      dgates[2 * H + j] = static_cast<T>(state.dg);
      dc_state[j] = static_cast<T>(state.dc_prev);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t o = k * H + j;
        const acc_t dxhat_hh =
            static_cast<acc_t>(dgates[o]) * static_cast<acc_t>(p.gamma_hh[o]);
        s[0] += dxhat_hh;
        s[1] += dxhat_hh * static_cast<acc_t>(nhh[o]);
      }
    }
    row_sum(s, scratch);
    if (!active) continue;  // no row_sum follows in this iteration
    const acc_t mean_dxhat_hh = s[0] / static_cast<acc_t>(G);
    const acc_t mean_dxhat_xhat_hh = s[1] / static_cast<acc_t>(G);

    // LN_hh backward: gradient w.r.t. W_hh h_{t-1}.
    for (int64_t j = begin; j < H; j += blockDim.x) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t o = k * H + j;
        const acc_t dxhat =
            static_cast<acc_t>(dgates[o]) * static_cast<acc_t>(p.gamma_hh[o]);
        p.dhh[rg + o] = static_cast<T>(layer_norm_input_grad(
            dxhat, static_cast<acc_t>(nhh[o]), rstd_hh, mean_dxhat_hh,
            mean_dxhat_xhat_hh));
      }
    }
  }
}

// ---- Column sums (the LayerNorm gain and bias gradients) --------------------

// A block owns kWarpSize adjacent columns (a warp reads 32 adjacent values of
// a row) and kColumnSlices row slices: thread (x, y) sums the rows y,
// y + kColumnSlices, ... of column x in order, then thread (x, 0) adds the
// slices' sums in slice order. No atomics: the result depends only on the
// sizes, bitwise.
constexpr int kColumnSlices = 16;

template <typename T>
__global__ void __launch_bounds__(kWarpSize * kColumnSlices)
    column_sums_kernel(const ColumnSumsParams<T> p) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t slice_a[kColumnSlices][kWarpSize];
  __shared__ acc_t slice_ab[kColumnSlices][kWarpSize];
  const int64_t W = p.width;
  for (int64_t c0 = int64_t(blockIdx.x) * kWarpSize; c0 < W;
       c0 += int64_t(gridDim.x) * kWarpSize) {
    const int64_t col = c0 + threadIdx.x;
    acc_t sum_a = acc_t(0), sum_ab = acc_t(0);
    if (col < W) {
      for (int64_t r = threadIdx.y; r < p.rows; r += kColumnSlices) {
        const acc_t a = static_cast<acc_t>(p.a[r * W + col]);
        sum_a += a;
        if (p.b != nullptr) sum_ab += a * static_cast<acc_t>(p.b[r * W + col]);
      }
    }
    slice_a[threadIdx.y][threadIdx.x] = sum_a;
    slice_ab[threadIdx.y][threadIdx.x] = sum_ab;
    __syncthreads();
    if (threadIdx.y == 0 && col < W) {
      sum_a = slice_a[0][threadIdx.x];
      sum_ab = slice_ab[0][threadIdx.x];
      for (int y = 1; y < kColumnSlices; ++y) {
        sum_a += slice_a[y][threadIdx.x];
        sum_ab += slice_ab[y][threadIdx.x];
      }
      if (p.sum_a != nullptr) p.sum_a[col] = static_cast<T>(sum_a);
      if (p.sum_ab != nullptr) p.sum_ab[col] = static_cast<T>(sum_ab);
    }
    __syncthreads();  // the slices are free for the next columns
  }
}

// ---- Launchers ----------------------------------------------------------------

template <typename T>
void layer_norm_rows(const LayerNormRowsParams<T>& p) {
  if (p.rows <= 0 || p.width <= 0) return;
  const LaunchShape s = row_groups(p.rows, p.width);
  layer_norm_rows_kernel<T>
      <<<s.grid, s.block, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void layer_norm_rows_backward(const LayerNormRowsBackwardParams<T>& p) {
  if (p.rows <= 0 || p.width <= 0) return;
  const LaunchShape s = row_groups(p.rows, p.width);
  layer_norm_rows_backward_kernel<T>
      <<<s.grid, s.block, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void layer_norm_forward_step(const LayerNormStepParams<T>& p) {
  if (p.rows <= 0 || p.hidden <= 0) return;
  const LaunchShape s = row_groups(p.rows, p.hidden);
  layer_norm_forward_step_kernel<T>
      <<<s.grid, s.block, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void layer_norm_backward_step(const LayerNormBackwardStepParams<T>& p) {
  if (p.rows <= 0 || p.hidden <= 0) return;
  const LaunchShape s = row_groups(p.rows, p.hidden);
  layer_norm_backward_step_kernel<T>
      <<<s.grid, s.block, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void column_sums(const ColumnSumsParams<T>& p) {
  // No rows still writes the (zero) sums, as the CPU kernel does.
  if (p.width <= 0) return;
  const int64_t blocks =
      std::min<int64_t>((p.width + kWarpSize - 1) / kWarpSize, kMaxBlocks);
  column_sums_kernel<T>
      <<<dim3(static_cast<unsigned>(blocks)), dim3(kWarpSize, kColumnSlices), 0,
         c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace rnnfast::cuda
