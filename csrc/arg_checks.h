// Argument checks and sequence layout shared by every backend's host code.
#pragma once

#include <ATen/ATen.h>

#include "lstm_params.h"

namespace rnnfast {

// Validates the arguments of lstm_forward / lstm_backward (and the LSTM part
// of the layer_norm_lstm ops) and returns the sizes. `op` names the op in
// the messages ("rnnfast.lstm_forward"); each message names the argument.
// input is [T, B, I] (padded) or [N, I] with batch_sizes [T] (packed);
// hx [B, P]; cx [B, H]; weight_ih [4H, I]; weight_hh [4H, P];
// biases [4H]; weight_hr [P, H].
LstmSizes check_lstm_args(const char* op, const at::Tensor& input,
                          const at::Tensor& hx, const at::Tensor& cx,
                          const at::Tensor& weight_ih,
                          const at::Tensor& weight_hh,
                          const c10::optional<at::Tensor>& bias_ih,
                          const c10::optional<at::Tensor>& bias_hh,
                          const c10::optional<at::Tensor>& weight_hr,
                          const c10::optional<at::Tensor>& batch_sizes);

// Checks the LayerNorm parameters of the layer_norm_lstm op `op`:
// ln_gates = {ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias} [4H],
// ln_cell = {ln_cell_weight, ln_cell_bias} [H], on input's device and dtype.
void check_layer_norm_args(const char* op, const at::Tensor& input,
                           const LstmSizes& sizes, at::TensorList ln_gates,
                           at::TensorList ln_cell);

// Checks the zoneout arguments of op `op` for one state (`what` is
// "hidden" or "cell"): the rate in [0, 1) (a ValueError naming
// zoneout_<what>), and the mask, if given, a bool tensor of `mask_shape` on
// input's device, given with a zero rate (a mask is training's coefficient,
// the rate evaluation's).
void check_zoneout_args(const char* op, const at::Tensor& input,
                        const char* what,
                        const c10::optional<at::Tensor>& mask,
                        at::IntArrayRef mask_shape, double rate);

// Checks a tensor that a backward op `op` reads, a gradient or an
// activation its forward saved: floating point, on input's device and of
// size `expected` (the kernels index it by that size: a narrower one would
// be read and written past its end, a CPU one dereferenced by a GPU).
void check_backward_tensor(const char* op, const at::Tensor& input,
                           const at::Tensor& t, const char* name,
                           at::IntArrayRef expected);

// The packed-row layout of input (see lstm_params.h).
SequenceLayout make_layout(const at::Tensor& input,
                           const c10::optional<at::Tensor>& batch_sizes,
                           bool reverse);

// Shape of the output for this input: [T, B, P] or [N, P].
std::vector<int64_t> output_shape(const at::Tensor& input, int64_t output_size);

}  // namespace rnnfast
