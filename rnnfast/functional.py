"""Functional LSTM: layers, directions and dropout composed from the fused
one-layer op of :mod:`rnnfast.ops`.

:func:`lstm` takes the arguments of ``torch._VF.lstm`` (the function behind
``torch.nn.LSTM``) in a documented, keyword-friendly form, so a module or a
user can call it with an ``nn.LSTM``'s ``_flat_weights``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

__all__ = ["lstm", "split_weights"]


def split_weights(
    weights: Sequence[Tensor], num_layers: int, bidirectional: bool, bias: bool
) -> list[tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """Groups nn.LSTM's flat weight list per layer and direction.

    ``weights`` holds, for each layer and then each direction,
    ``weight_ih, weight_hh[, bias_ih, bias_hh][, weight_hr]``. Returns one
    ``(weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)`` tuple per layer
    and direction, with None for what is absent.
    """
    groups = num_layers * (2 if bidirectional else 1)
    if groups <= 0 or len(weights) % groups != 0:
        raise ValueError(
            f"rnnfast.functional.lstm: expected a multiple of {groups} weights for "
            f"{num_layers} layer(s) and {2 if bidirectional else 1} direction(s), "
            f"got {len(weights)}")
    per = len(weights) // groups
    expected = (4 if bias else 2)
    if per not in (expected, expected + 1):
        raise ValueError(
            f"rnnfast.functional.lstm: expected {expected} or {expected + 1} weights "
            f"per layer and direction (bias={bias}), got {per}")
    out = []
    for g in range(groups):
        w = list(weights[g * per:(g + 1) * per])
        w_ih, w_hh = w[0], w[1]
        b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
        w_hr = w[-1] if per == expected + 1 else None
        out.append((w_ih, w_hh, b_ih, b_hh, w_hr))
    return out


def _needs_grad(input: Tensor, hx: Sequence[Tensor], weights: Sequence[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return (input.requires_grad or any(h.requires_grad for h in hx)
            or any(w.requires_grad for w in weights))


def lstm(
    input: Tensor,
    hx: tuple[Tensor, Tensor],
    weights: Sequence[Tensor],
    *,
    bias: bool = True,
    num_layers: int = 1,
    dropout: float = 0.0,
    training: bool = False,
    bidirectional: bool = False,
    batch_first: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A multi-layer LSTM over a whole sequence, as ``torch._VF.lstm``.

    Args:
        input: ``[T, B, I]`` (``[B, T, I]`` with ``batch_first``), or the
            ``data`` of a PackedSequence, ``[N, I]``, with ``batch_sizes``.
        hx: ``(h_0, c_0)``, ``[num_layers * D, B, P]`` and
            ``[num_layers * D, B, H]`` (D = 2 if bidirectional else 1, P the
            projection size or H).
        weights: for each layer, then each direction, ``weight_ih``
            ``[4H, in]``, ``weight_hh`` ``[4H, P]``, then ``bias_ih``,
            ``bias_hh`` ``[4H]`` when ``bias``, then ``weight_hr`` ``[P, H]``
            when projecting: the order of ``nn.LSTM._flat_weights``.
        bias: whether ``weights`` holds biases.
        num_layers: number of stacked layers.
        dropout: dropout probability on the outputs of all but the last layer,
            applied when ``training``.
        training: apply dropout (gradients are kept whenever autograd needs
            them, independently of this flag).
        bidirectional: run a reverse direction too and concatenate.
        batch_first: ``input`` and output are ``[B, T, *]`` (ignored for
            packed input).
        batch_sizes: int64 CPU tensor ``[T]`` of a PackedSequence.

    Returns:
        ``(output, h_n, c_n)``: output ``[T, B, D * P]`` (or ``[N, D * P]``
        packed), final states shaped like ``hx``.
    """
    h0, c0 = hx
    layers = split_weights(weights, num_layers, bidirectional, bias)
    directions = 2 if bidirectional else 1
    packed = batch_sizes is not None
    if batch_first and not packed:
        input = input.transpose(0, 1)
    save = _needs_grad(input, hx, weights)
    layer_input = input
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            idx = layer * directions + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = layers[idx]
            out, hy, cy, _, _ = ops.lstm_forward(
                layer_input, h0[idx], c0[idx], w_ih, w_hh, b_ih, b_hh, w_hr,
                batch_sizes, direction == 1, save)
            outputs.append(out)
            h_n.append(hy)
            c_n.append(cy)
        layer_output = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_output = F.dropout(layer_output, p=dropout, training=True)
        layer_input = layer_output
    output = layer_input
    if batch_first and not packed:
        output = output.transpose(0, 1)
    return output, torch.stack(h_n), torch.stack(c_n)
