// The elementwise kernels of CudaBackend (gemm_and_copy.h): add, copy_rows
// and zoneout on the hidden state.
#include "../lstm_cell.h"
#include "gemm_and_copy.h"
#include "launch.cuh"

namespace rnnfast::cuda {
namespace {

template <typename T, typename S>
__global__ void __launch_bounds__(kBlockThreads)
    add_kernel(S* dst, const T* a, const S* b, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    dst[i] = static_cast<S>(a[i] + static_cast<T>(b[i]));
  }
}

// Up to kMaxRowCopies runs, passed by value in the kernel's parameters
// (under the 4 KiB limit of every architecture).
struct RowCopyList {
  RowCopy runs[kMaxRowCopies];
};
static_assert(sizeof(RowCopyList) <= 4000, "kernel parameters over 4 KiB");

// blockIdx.y picks the run; the blocks along x and their threads stride
// over its rows * width elements.
template <typename S>
__global__ void __launch_bounds__(kBlockThreads)
    copy_rows_kernel(const __grid_constant__ RowCopyList list, int64_t width,
                     S* dst, const S* first, const S* second) {
  const RowCopy& run = list.runs[blockIdx.y];
  const int64_t n = run.rows * width;
  const S* src = (run.from_second ? second : first) + run.src_row * width;
  S* d = dst + run.dst_row * width;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    d[i] = src[i];
  }
}

// One thread per element of the step's [rows, P] rows; h_{t-1} of element
// e lies at e of the previous step's rows or of h_0 (same row layout).
template <typename T, typename S>
__global__ void __launch_bounds__(kBlockThreads)
    zoneout_hidden_kernel(const HiddenZoneoutParams<T, S> p) {
  const int64_t n = p.rows * p.width;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int64_t row = e / p.width;
    const S prev = row < p.rows_from_previous ? p.hidden_prev[e]
                                              : p.hidden_init[e];
    const T a = zoneout_coefficient_at<T>(p.mask, e, p.rate);
    p.hidden[e] = static_cast<S>(
        zoneout(a, static_cast<T>(prev), static_cast<T>(p.hidden[e])));
  }
}

template <typename T, typename S, typename C>
__global__ void __launch_bounds__(kBlockThreads)
    zoneout_hidden_backward_kernel(const HiddenZoneoutBackwardParams<T, S, C> p) {
  const int64_t n = p.rows * p.width;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const T a = zoneout_coefficient_at<T>(p.mask, e, p.rate);
    const auto z = zoneout_backward(
        a, p.grad_hidden[e] + static_cast<T>(p.grad_output[e]));
    p.grad_candidate[e] = static_cast<C>(z.dcand);
    p.grad_hidden[e] = z.dprev;
  }
}

}  // namespace

template <typename T, typename S>
void zoneout_hidden(const HiddenZoneoutParams<T, S>& p) {
  const int64_t count = p.rows * p.width;
  if (count <= 0) return;
  launch(&zoneout_hidden_kernel<T, S>, flat(count), p);
}

template <typename T, typename S, typename C>
void zoneout_hidden_backward(const HiddenZoneoutBackwardParams<T, S, C>& p) {
  const int64_t count = p.rows * p.width;
  if (count <= 0) return;
  launch(&zoneout_hidden_backward_kernel<T, S, C>, flat(count), p);
}

#define RNNFAST_ZONEOUT_HIDDEN(T, S)                                        \
  template void zoneout_hidden<T, S>(const HiddenZoneoutParams<T, S>&);    \
  template void zoneout_hidden_backward<T, S, S>(                          \
      const HiddenZoneoutBackwardParams<T, S, S>&);
RNNFAST_ZONEOUT_HIDDEN(float, float)
RNNFAST_ZONEOUT_HIDDEN(double, double)
RNNFAST_ZONEOUT_HIDDEN(float, c10::Half)
RNNFAST_ZONEOUT_HIDDEN(float, c10::BFloat16)
#undef RNNFAST_ZONEOUT_HIDDEN
template void zoneout_hidden_backward<float, c10::Half, float>(
    const HiddenZoneoutBackwardParams<float, c10::Half, float>&);
template void zoneout_hidden_backward<float, c10::BFloat16, float>(
    const HiddenZoneoutBackwardParams<float, c10::BFloat16, float>&);

template <typename T, typename S>
void add(S* dst, const T* a, const S* b, int64_t count) {
  if (count <= 0) return;
  launch(&add_kernel<T, S>, flat(count), dst, a, b, count);
}

template <typename S>
void copy_rows(const RowCopy* copies, int64_t count, int64_t width, S* dst,
               const S* first, const S* second) {
  for (int64_t begin = 0; begin < count; begin += kMaxRowCopies) {
    const int64_t runs = std::min<int64_t>(kMaxRowCopies, count - begin);
    RowCopyList list;
    int64_t most = 0;
    for (int64_t i = 0; i < runs; ++i) {
      list.runs[i] = copies[begin + i];
      most = std::max(most, copies[begin + i].rows * width);
    }
    if (most == 0) continue;
    const int64_t bx = std::min<int64_t>(
        (most + kBlockThreads - 1) / kBlockThreads, 64);
    launch(&copy_rows_kernel<S>,
           LaunchShape{dim3(static_cast<unsigned>(bx),
                            static_cast<unsigned>(runs)),
                       dim3(kBlockThreads)},
           list, width, dst, first, second);
  }
}

template void add<float, float>(float*, const float*, const float*, int64_t);
template void add<double, double>(double*, const double*, const double*,
                                  int64_t);
template void add<float, c10::Half>(c10::Half*, const float*,
                                    const c10::Half*, int64_t);
template void add<float, c10::BFloat16>(c10::BFloat16*, const float*,
                                        const c10::BFloat16*, int64_t);
template void copy_rows<float>(const RowCopy*, int64_t, int64_t, float*,
                               const float*, const float*);
template void copy_rows<double>(const RowCopy*, int64_t, int64_t, double*,
                                const double*, const double*);
template void copy_rows<c10::Half>(const RowCopy*, int64_t, int64_t,
                                   c10::Half*, const c10::Half*,
                                   const c10::Half*);
template void copy_rows<c10::BFloat16>(const RowCopy*, int64_t, int64_t,
                                       c10::BFloat16*, const c10::BFloat16*,
                                       const c10::BFloat16*);

}  // namespace rnnfast::cuda
