// Autocast (automatic mixed precision) kernels of the forward ops.
//
// Inside torch.autocast(device_type, dtype), the forward ops run in the
// region's lower-precision dtype: every floating-point tensor argument
// (input, states, weights, biases, LayerNorm parameters) is cast to it and
// all outputs come back in it. This is what torch.nn.LSTM gets from cuDNN's
// and oneDNN's autocast kernels (all arguments cast, output, h_n and c_n in
// the low dtype), except that the dtype follows the region's, where cuDNN
// always uses float16. Float64 tensors and tensors on another device are
// left alone (at::autocast::cached_cast's rule), so a float64 model is not
// touched. The recurrence itself keeps its state and sums in float
// (op_impls.h), so only the storage of the arguments and results is reduced.
//
// The backward ops need no autocast kernel: autograd runs them with the
// dtypes the forward saw, and the casts above are recorded by autograd, so
// the gradients of float32 parameters come back in float32.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

#include "op_signatures.h"

namespace rnnfast {
namespace {

// Casts the floating-point arguments to the autocast dtype of `device`,
// with the autocast key excluded, and calls `op` again: the call then goes
// to the op's next kernel (autograd, then the device's).
template <c10::DeviceType device, typename Ret, typename... OpArgs,
          typename... Args>
Ret cast_and_redispatch(const c10::TypedOperatorHandle<Ret(OpArgs...)>& op,
                        const Args&... args) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype =
      at::autocast::get_lower_precision_fp_from_device_type(device);
  return op.call(at::autocast::cached_cast(dtype, args, device)...);
}

using Tensor = at::Tensor;
using OptionalTensor = c10::optional<at::Tensor>;

template <c10::DeviceType device>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
lstm_forward_autocast(
    const Tensor& input, const Tensor& hx, const Tensor& cx,
    const Tensor& weight_ih, const Tensor& weight_hh,
    const OptionalTensor& bias_ih, const OptionalTensor& bias_hh,
    const OptionalTensor& weight_hr, const OptionalTensor& batch_sizes,
    bool reverse, bool training, const OptionalTensor& zoneout_hidden_mask,
    const OptionalTensor& zoneout_cell_mask, double zoneout_hidden,
    double zoneout_cell) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnnfast::lstm_forward", "")
                             .typed<LstmForwardSignature>();
  // batch_sizes (int64) and the zoneout masks (bool) are left as they are
  // by cached_cast, which casts floating-point tensors only.
  return cast_and_redispatch<device>(
      op, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
      batch_sizes, reverse, training, zoneout_hidden_mask, zoneout_cell_mask,
      zoneout_hidden, zoneout_cell);
}

template <c10::DeviceType device>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
layer_norm_lstm_forward_autocast(
    const Tensor& input, const Tensor& hx, const Tensor& cx,
    const Tensor& weight_ih, const Tensor& weight_hh,
    const OptionalTensor& bias_ih, const OptionalTensor& bias_hh,
    const Tensor& ln_ih_weight, const Tensor& ln_ih_bias,
    const Tensor& ln_hh_weight, const Tensor& ln_hh_bias,
    const Tensor& ln_cell_weight, const Tensor& ln_cell_bias,
    const OptionalTensor& batch_sizes, bool reverse, bool training,
    double eps, const OptionalTensor& zoneout_hidden_mask,
    const OptionalTensor& zoneout_cell_mask, double zoneout_hidden,
    double zoneout_cell) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnnfast::layer_norm_lstm_forward", "")
          .typed<LayerNormLstmForwardSignature>();
  return cast_and_redispatch<device>(
      op, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, ln_ih_weight,
      ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias,
      batch_sizes, reverse, training, eps, zoneout_hidden_mask,
      zoneout_cell_mask, zoneout_hidden, zoneout_cell);
}

}  // namespace
}  // namespace rnnfast

TORCH_LIBRARY_IMPL(rnnfast, AutocastCPU, m) {
  m.impl("lstm_forward", &rnnfast::lstm_forward_autocast<c10::DeviceType::CPU>);
  m.impl("layer_norm_lstm_forward",
         &rnnfast::layer_norm_lstm_forward_autocast<c10::DeviceType::CPU>);
}

// Registered in every build: the key exists in CPU-only torch too, and a
// CUDA tensor can only reach it when torch and rnnfast have CUDA.
TORCH_LIBRARY_IMPL(rnnfast, AutocastCUDA, m) {
  m.impl("lstm_forward",
         &rnnfast::lstm_forward_autocast<c10::DeviceType::CUDA>);
  m.impl("layer_norm_lstm_forward",
         &rnnfast::layer_norm_lstm_forward_autocast<c10::DeviceType::CUDA>);
}
