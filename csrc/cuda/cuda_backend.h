// The CUDA backend of the LSTM and LayerNorm-LSTM ops, whole: the Backend
// of lstm_driver.h and layer_norm_lstm_driver.h over the GEMMs and copies of
// gemm_and_copy.h and the step kernels of step_kernels.h. Host code only
// (cuda_ops.cpp registers the ops with it).
//
// Every call works on the current device and its current stream (the one
// torch's cuBLAS handle is bound to), allocates nothing but through torch's
// caching allocator and never waits for the device, so a training step
// through these ops can be captured in a CUDA graph. OnDeviceOfFirst
// (op_guard.h) makes the input's device current before an op runs.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>

#include "../lstm_params.h"
#include "gemm_and_copy.h"
#include "step_kernels.h"

namespace rnnfast::cuda {

// Forward steps of at most this many rows run the product and the cell in
// one launch (lstm_fused_forward_step); kFusedStepRows unless
// RNNFAST_CUDA_FUSED_STEP_ROWS (0 to kFusedStepRows; 0 turns it off, to
// compare the two) says otherwise when the process first asks.
inline std::atomic<int64_t>& fused_step_rows() {
  static std::atomic<int64_t> rows{[] {
    const char* v = std::getenv("RNNFAST_CUDA_FUSED_STEP_ROWS");
    if (v == nullptr || *v == '\0') return kFusedStepRows;
    return std::clamp<int64_t>(std::atoll(v), 0, kFusedStepRows);
  }()};
  return rows;
}

struct CudaBackend {
  template <typename S>
  using StepWeight = cuda::StepWeight<S>;
  // One block for the whole sequence in the LayerNorm-LSTM backward
  // (layer_norm_lstm_driver.h): its input and weight gradients are whole
  // GEMMs, and its LayerNorm parameter gradients one launch after the steps.
  // (The CPU's cache-sized blocks would mean ~100 small launches at B = 64;
  // sums added by each step would need one partial sum per block of every
  // step's grid.)
  static int64_t grad_block_rows(int64_t /*row_bytes*/) {
    return std::numeric_limits<int64_t>::max() / 4;
  }
  static constexpr bool kParamGradsInStep = false;
  // Half-type ops keep their GEMM operands in half / bfloat16
  // (op_impls.h).
  template <typename S>
  static constexpr bool kNativeStorage = true;
  static bool native_storage(at::ScalarType /*dtype*/) { return true; }
  // Weights in the storage dtype always (the CPU backend's one-step calls
  // of a bfloat16 op computing in float read bfloat16 weights in place).
  static constexpr bool kBf16WeightInPlace = false;
  static at::ScalarType one_step_weight_dtype(at::ScalarType /*dtype*/,
                                              at::ScalarType sdt,
                                              int64_t /*rows*/) {
    return sdt;
  }
  // The input projection adds the bias (addmm; ATen can fuse it into the
  // cuBLASLt GEMM as an epilogue).
  static constexpr bool kBiasInStep = false;

  // Workspaces come from torch's caching allocator.
  static at::Tensor empty_activation(at::IntArrayRef sizes,
                                     const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }

  template <typename S, typename C>
  static void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n,
                   int64_t k, const S* a, int64_t lda, const S* b,
                   int64_t ldb, C beta, C* c, int64_t ldc) {
    cuda::gemm(current_blas_handle(), trans_a, trans_b, m, n, k, a, lda, b,
               ldb, beta, c, ldc);
  }
  template <typename S>
  static void copy(S* dst, const S* src, int64_t count) {
    copy_bytes(dst, src, sizeof(S) * static_cast<size_t>(count));
  }
  template <typename S>
  static void copy_rows(const RowCopy* copies, int64_t count, int64_t width,
                        S* dst, const S* first, const S* second) {
    cuda::copy_rows(copies, count, width, dst, first, second);
  }
  template <typename T, typename S>
  static void add(S* dst, const T* a, const S* b, int64_t count) {
    cuda::add(dst, a, b, count);
  }

  template <typename T, typename S>
  static void zoneout_hidden(const HiddenZoneoutParams<T, S>& p) {
    cuda::zoneout_hidden(p);
  }
  template <typename T, typename S, typename C>
  static void zoneout_hidden_backward(
      const HiddenZoneoutBackwardParams<T, S, C>& p) {
    cuda::zoneout_hidden_backward(p);
  }

  template <bool Training, bool ZoneoutCell, typename T, typename S>
  static void forward_step(const ForwardStepParams<T, S>& p) {
    lstm_forward_step<Training, ZoneoutCell>(p);
  }
  // The steps of a time loop, in order on the host thread (each enqueues
  // its kernels on the current stream).
  template <typename S, typename F>
  static void run_steps(const StepWeight<S>& /*whh*/, int64_t /*rows*/,
                        int64_t steps, StepLoop /*loop*/, const F& step) {
    for (int64_t i = 0; i < steps; ++i) step(i);
  }
  // The input projection of every step at once (one large GEMM).
  static int64_t input_block_rows(int64_t /*row_bytes*/,
                                  int64_t /*weight_bytes*/) {
    return 0;
  }
  // Every product over many rows is ATen's (cuBLAS).
  static bool bulk_product(const at::Tensor& /*c*/, const at::Tensor& /*a*/,
                           const at::Tensor& /*b*/, bool /*accumulate*/,
                           bool /*steady*/) {
    return false;
  }
  template <typename S>
  static bool bulk_product_runs() {
    return false;
  }
  // Every input projection is cuBLAS's GEMM.
  static bool small_input_projection(at::Tensor& /*out*/,
                                     const at::Tensor& /*x*/,
                                     const at::Tensor& /*weight*/,
                                     const at::Tensor& /*bias*/) {
    return false;
  }
  // The product, then the step kernel; for a few rows both in one launch.
  template <bool Training, bool ZoneoutCell, typename T, typename S>
  static void recurrent_forward_step(const StepWeight<S>& whh,
                                     const PreviousHidden<S>& h,
                                     const ForwardStepParams<T, S>& p) {
    if (h.rows() <= fused_step_rows().load(std::memory_order_relaxed) &&
        whh.transposed()) {
      lstm_fused_forward_step<Training, ZoneoutCell>(
          FusedForwardStepParams<T, S>{p, h, whh.data(), whh.ld(), whh.k()});
      return;
    }
    multiply_hidden_rows(h, 0, h.rows(), whh, T(1), p.gates, 4 * p.hidden);
    forward_step<Training, ZoneoutCell>(p);
  }
  template <bool Training, bool ZoneoutCell, typename T, typename S>
  static void recurrent_layer_norm_forward_step(
      const StepWeight<S>& whh, const PreviousHidden<S>& h,
      const LayerNormStepParams<T, S>& p) {
    multiply_hidden_rows(h, 0, h.rows(), whh, T(0), p.hh, 4 * p.hidden);
    layer_norm_forward_step<Training, ZoneoutCell>(p);
  }
  template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
  static void backward_step(const BackwardStepParams<T, S>& p) {
    lstm_backward_step<AddOutputGrad, ZoneoutCell>(p);
  }
  // The step kernel, then dh_{t-1} = dgates W_hh + beta dh_{t-1}.
  template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
  static void recurrent_backward_step(const StepWeight<S>& whh,
                                      const BackwardStepParams<T, S>& p,
                                      T beta, T* grad_prev, int64_t ld) {
    backward_step<AddOutputGrad, ZoneoutCell>(p);
    whh.multiply(p.rows, p.dgates, 4 * p.hidden, beta, grad_prev, ld);
  }
  // The step kernel, then dh_{t-1} = dhh W_hh + beta dh_{t-1}.
  template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
  static void recurrent_layer_norm_backward_step(
      const StepWeight<S>& whh, const LayerNormBackwardStepParams<T, S>& p,
      T beta, T* grad_prev, int64_t ld) {
    layer_norm_backward_step<AddOutputGrad, ZoneoutCell>(p);
    whh.multiply(p.rows, p.dhh, 4 * p.hidden, beta, grad_prev, ld);
  }
  template <bool Training, bool ZoneoutCell, typename T, typename S>
  static void layer_norm_forward_step(const LayerNormStepParams<T, S>& p) {
    cuda::layer_norm_forward_step<Training, ZoneoutCell>(p);
  }
  template <bool AddOutputGrad, bool ZoneoutCell, typename T, typename S>
  static void layer_norm_backward_step(
      const LayerNormBackwardStepParams<T, S>& p) {
    cuda::layer_norm_backward_step<AddOutputGrad, ZoneoutCell>(p);
  }
  template <typename T>
  static void layer_norm_param_grads(const LayerNormParamGradsParams<T>& p) {
    cuda::layer_norm_param_grads(p);
  }
};

}  // namespace rnnfast::cuda
