"""Functional LSTM and LayerNorm-LSTM: layers, directions and dropout
composed from the fused one-layer ops of :mod:`rnnfast.ops`.

:func:`lstm` takes the arguments of ``torch._VF.lstm`` (the function behind
``torch.nn.LSTM``) in a documented, keyword-friendly form, so a module or a
user can call it with an ``nn.LSTM``'s ``_flat_weights``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _export, ops  # noqa: F401  (ops: what this module composes, via _export)

__all__ = ["lstm", "layer_norm_lstm", "split_weights"]


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
    layers = split_weights(weights, num_layers, bidirectional, bias)
    save = _needs_grad(input, hx, weights)

    def run(layer_input, idx, reverse, h0, c0):
        w_ih, w_hh, b_ih, b_hh, w_hr = layers[idx]
        return _export.lstm_forward(
            layer_input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
            reverse, save)

    return _stack(run, input, hx, num_layers=num_layers, dropout=dropout,
                  training=training, bidirectional=bidirectional,
                  batch_first=batch_first, packed=batch_sizes is not None)


def _stack(run, input: Tensor, hx: tuple[Tensor, Tensor], *, num_layers: int,
           dropout: float, training: bool, bidirectional: bool, batch_first: bool,
           packed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Composes one-layer, one-direction runs into a stacked, optionally
    bidirectional network with dropout between layers.
    ``run(layer_input, index, reverse, h0, c0) -> (output, h_n, c_n)``."""
    h0, c0 = hx
    directions = 2 if bidirectional else 1
    if batch_first and not packed:
        input = input.transpose(0, 1)
    layer_input = input
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            idx = layer * directions + direction
            out, hy, cy = run(layer_input, idx, direction == 1, h0[idx], c0[idx])
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


_LN_NAMES = ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias",
             "ln_cell_weight", "ln_cell_bias")


def layer_norm_lstm(
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
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """A multi-layer LayerNorm-LSTM (Ba, Kiros & Hinton 2016, section 3.1)::

        gates = LN_ih(W_ih x_t) + LN_hh(W_hh h_{t-1}) + b_ih + b_hh   # LN over 4H
        i, f, g, o = gates.chunk(4)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(LN_cell(c_t))                         # LN over H

    Arguments as :func:`lstm` (no projection; ``h_0`` and ``c_0`` are both
    ``[num_layers * D, B, H]``), except ``weights``, which holds for each
    layer, then each direction: ``weight_ih`` ``[4H, in]``, ``weight_hh``
    ``[4H, H]``, ``bias_ih``, ``bias_hh`` ``[4H]`` when ``bias``, then
    ``ln_ih_weight``, ``ln_ih_bias``, ``ln_hh_weight``, ``ln_hh_bias``
    ``[4H]`` and ``ln_cell_weight``, ``ln_cell_bias`` ``[H]``; and ``eps``,
    the LayerNorm epsilon (biased variance, as ``F.layer_norm``).
    """
    directions = 2 if bidirectional else 1
    groups = num_layers * directions
    per = (4 if bias else 2) + len(_LN_NAMES)
    if len(weights) != groups * per:
        raise ValueError(
            f"rnnfast.functional.layer_norm_lstm: expected {groups * per} weights "
            f"({per} per layer and direction, bias={bias}), got {len(weights)}")
    save = _needs_grad(input, hx, weights)

    def run(layer_input, idx, reverse, h0, c0):
        w = list(weights[idx * per:(idx + 1) * per])
        b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
        ln = w[-len(_LN_NAMES):]
        return _export.layer_norm_lstm_forward(
            layer_input, h0, c0, w[0], w[1], b_ih, b_hh, *ln, batch_sizes, reverse,
            save, eps)

    return _stack(run, input, hx, num_layers=num_layers, dropout=dropout,
                  training=training, bidirectional=bidirectional,
                  batch_first=batch_first, packed=batch_sizes is not None)
