"""The int8 custom ops (``torch.ops.rnnfast.quantized_*``): typed wrappers
and fake kernels, beside :mod:`rnnfast.ops` (the float ops and their
autograd), so the two can change apart. Together they are the only modules
that touch ``torch.ops.rnnfast``.

The ops are declared and implemented in C++ (csrc/cpu/quantized_lstm.cpp),
for the CPU only and without autograd: they are inference kernels, and the
modules of :mod:`rnnfast.quantized` refuse training before calling them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library and registers the ops)

__all__ = ["quantized_pack_weight", "quantized_linear", "quantized_lstm_forward",
           "quantized_layer_norm_lstm_forward", "quantized_lstm_stack",
           "quantized_layer_norm_lstm_stack", "packed_bytes"]

# The packed layout's blocks (csrc/cpu/int8_gemm.h): outputs in blocks of
# 16, inputs padded to whole 64-byte rows (an AMX tile's), then one int32
# column sum per padded output.
_BLOCK_COLS = 16
_DEPTH_ALIGN = 64


def packed_bytes(n: int, k: int) -> int:
    """Bytes of the packed form of an int8 weight of ``n`` outputs and
    ``k`` inputs (the size :func:`quantized_pack_weight` returns)."""
    cols = -(-n // _BLOCK_COLS) * _BLOCK_COLS
    depth = -(-k // _DEPTH_ALIGN) * _DEPTH_ALIGN
    return cols * depth + cols * 4 + 8  # the blocks, the column sums, k


def quantized_pack_weight(weight: Tensor) -> Tensor:
    """The packed form of an int8 weight ``[n, k]`` (rows are outputs) that
    the quantized forward ops read: a 1-D int8 tensor of
    :func:`packed_bytes` bytes, of a layout private to the kernels."""
    return torch.ops.rnnfast.quantized_pack_weight.default(weight)


def quantized_linear(input: Tensor, packed: Tensor, scale: Tensor,
                     bias: Optional[Tensor] = None, kernels: str = "auto") -> Tensor:
    """The int8 product alone (for tests and measurements): float32
    ``input`` ``[M, k]`` quantized per row (as the layers quantize their
    activations), times the packed int8 weight (:func:`quantized_pack_weight`)
    with its per-row ``scale`` ``[n]``, dequantized, plus ``bias`` ``[n]``:
    returns ``[M, n]`` float32.

    ``kernels``: ``"auto"`` (what the layers pick for ``M`` rows) or one
    family by its ``build_info()["cpu_int8_kernels"]`` name (``"AMX-INT8"``,
    ``"AVX512-VNNI"``, ``"AVX2"``, ``"portable"``); a family this CPU does not
    run is refused. All give the same integer products.
    """
    return torch.ops.rnnfast.quantized_linear.default(input, packed, scale, bias, kernels)


def quantized_lstm_forward(
    input: Tensor, hx: Tensor, cx: Tensor,
    packed_ih: Tensor, scale_ih: Tensor, packed_hh: Tensor, scale_hh: Tensor,
    bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
    packed_hr: Optional[Tensor], scale_hr: Optional[Tensor],
    batch_sizes: Optional[Tensor], reverse: bool,
    zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One int8 LSTM layer in one direction over a whole time-major sequence
    (inference only, CPU).

    Args:
        input: float32 ``[T, B, I]``, or packed rows ``[N, I]`` with
            ``batch_sizes`` (int64 CPU ``[T]``, non-increasing).
        hx, cx: float32 ``[B, P]``, ``[B, H]``.
        packed_ih, packed_hh, packed_hr: :func:`quantized_pack_weight` of the
            int8 ``weight_ih`` ``[4H, I]``, ``weight_hh`` ``[4H, P]`` and
            ``weight_hr`` ``[P, H]`` (or None: no projection).
        scale_ih, scale_hh, scale_hr: their float32 per-row scales ``[4H]``,
            ``[4H]``, ``[P]``: row j of a weight is ``scale[j] * int8 row``.
        bias_ih, bias_hh: float32 ``[4H]`` or None.
        reverse: run from the last step to the first.
        zoneout_hidden, zoneout_cell: the zoneout rates of a module trained
            with zoneout, applied as its evaluation formula
            ``s_t = z s_{t-1} + (1 - z) s~_t`` (0: none).

    Returns ``(output, hy, cy)``: ``[T, B, P]`` (or ``[N, P]``), ``[B, P]``,
    ``[B, H]``.
    """
    return torch.ops.rnnfast.quantized_lstm_forward.default(
        input, hx, cx, packed_ih, scale_ih, packed_hh, scale_hh, bias_ih, bias_hh,
        packed_hr, scale_hr, batch_sizes, reverse, zoneout_hidden, zoneout_cell)


def quantized_layer_norm_lstm_forward(
    input: Tensor, hx: Tensor, cx: Tensor,
    packed_ih: Tensor, scale_ih: Tensor, packed_hh: Tensor, scale_hh: Tensor,
    bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
    ln_ih_weight: Tensor, ln_ih_bias: Tensor, ln_hh_weight: Tensor,
    ln_hh_bias: Tensor, ln_cell_weight: Tensor, ln_cell_bias: Tensor,
    batch_sizes: Optional[Tensor], reverse: bool, eps: float,
    zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One int8 LayerNorm-LSTM layer in one direction (inference only, CPU):
    the cell of :func:`rnnfast.ops.layer_norm_lstm_forward` with the weights
    of :func:`quantized_lstm_forward` (P = H) and float32 LayerNorm
    parameters (``[4H]`` for the gates, ``[H]`` for the cell); zoneout as
    :func:`quantized_lstm_forward`'s.

    Returns ``(output, hy, cy)``.
    """
    return torch.ops.rnnfast.quantized_layer_norm_lstm_forward.default(
        input, hx, cx, packed_ih, scale_ih, packed_hh, scale_hh, bias_ih, bias_hh,
        ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight,
        ln_cell_bias, batch_sizes, reverse, eps, zoneout_hidden, zoneout_cell)


def quantized_lstm_stack(
    input: Tensor, hx: Tensor, cx: Tensor, weights: list[Optional[Tensor]],
    num_layers: int, bidirectional: bool, batch_sizes: Optional[Tensor],
    zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``num_layers`` layers (each both ways when ``bidirectional``) of
    :func:`quantized_lstm_forward` in one call, composed as
    :mod:`rnnfast.functional` composes the float layers (a layer's input is
    the previous layer's output, directions concatenated). ``weights``: per
    layer, then direction, that op's 8 weight arguments in its order
    (``packed_ih`` ... ``scale_hr``). ``hx`` ``[L*D, B, P]``, ``cx``
    ``[L*D, B, H]``. Returns ``(output, h_n, c_n)``, ``h_n`` and ``c_n``
    stacked as ``hx`` and ``cx``."""
    return torch.ops.rnnfast.quantized_lstm_stack.default(
        input, hx, cx, weights, num_layers, bidirectional, batch_sizes, zoneout_hidden,
        zoneout_cell)


def quantized_layer_norm_lstm_stack(
    input: Tensor, hx: Tensor, cx: Tensor, weights: list[Optional[Tensor]],
    num_layers: int, bidirectional: bool, batch_sizes: Optional[Tensor], eps: float,
    zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`quantized_lstm_stack` for :func:`quantized_layer_norm_lstm_forward`
    (12 weight arguments per layer and direction, ``packed_ih`` ...
    ``ln_cell_bias``)."""
    return torch.ops.rnnfast.quantized_layer_norm_lstm_stack.default(
        input, hx, cx, weights, num_layers, bidirectional, batch_sizes, eps, zoneout_hidden,
        zoneout_cell)


@torch.library.register_fake("rnnfast::quantized_pack_weight")
def _quantized_pack_weight_fake(weight):
    torch._check(weight.dim() == 2 and weight.dtype == torch.int8,
                 lambda: "rnnfast.quantized_pack_weight: expected a 2-D int8 weight")
    return weight.new_empty((packed_bytes(weight.size(0), weight.size(1)),))


@torch.library.register_fake("rnnfast::quantized_linear")
def _quantized_linear_fake(input, packed, scale, bias=None, kernels="auto"):
    torch._check(input.dim() == 2 and input.dtype == torch.float32,
                 lambda: "rnnfast.quantized_linear: expected a 2-D float32 input")
    return input.new_empty((input.size(0), scale.size(0)))


def _fake_outputs(input: Tensor, hx: Tensor, cx: Tensor, out_size) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(input.dtype == torch.float32,
                 lambda: f"rnnfast: the int8 ops take float32 input, got {input.dtype}")
    return (input.new_empty((*input.shape[:-1], out_size)),
            hx.new_empty((hx.size(0), out_size)), cx.new_empty(cx.shape))


@torch.library.register_fake("rnnfast::quantized_lstm_forward")
def _quantized_lstm_forward_fake(input, hx, cx, packed_ih, scale_ih, packed_hh, scale_hh,
                                 bias_ih, bias_hh, packed_hr, scale_hr, batch_sizes,
                                 reverse, zoneout_hidden=0.0, zoneout_cell=0.0):
    hidden = scale_ih.size(0) // 4
    out_size = scale_hr.size(0) if scale_hr is not None else hidden
    return _fake_outputs(input, hx, cx, out_size)


@torch.library.register_fake("rnnfast::quantized_layer_norm_lstm_forward")
def _quantized_layer_norm_lstm_forward_fake(input, hx, cx, packed_ih, scale_ih, packed_hh,
                                            scale_hh, bias_ih, bias_hh, *rest):
    return _fake_outputs(input, hx, cx, scale_ih.size(0) // 4)


def _fake_stack(input, hx, cx, num_layers, bidirectional, out_size):
    directions = 2 if bidirectional else 1
    torch._check(hx.dim() == 3 and hx.size(0) == num_layers * directions,
                 lambda: "rnnfast: the stacked int8 ops take hx [num_layers * directions, B, P]")
    return (input.new_empty((*input.shape[:-1], directions * out_size)),
            hx.new_empty(hx.shape), cx.new_empty(cx.shape))


@torch.library.register_fake("rnnfast::quantized_lstm_stack")
def _quantized_lstm_stack_fake(input, hx, cx, weights, num_layers, bidirectional,
                               batch_sizes, zoneout_hidden=0.0, zoneout_cell=0.0):
    return _fake_stack(input, hx, cx, num_layers, bidirectional, hx.size(-1))


@torch.library.register_fake("rnnfast::quantized_layer_norm_lstm_stack")
def _quantized_layer_norm_lstm_stack_fake(input, hx, cx, weights, num_layers, bidirectional,
                                          batch_sizes, eps, zoneout_hidden=0.0,
                                          zoneout_cell=0.0):
    return _fake_stack(input, hx, cx, num_layers, bidirectional, hx.size(-1))
