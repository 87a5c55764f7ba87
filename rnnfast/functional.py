"""Functional LSTM and LayerNorm-LSTM: layers, directions and dropout
composed from the fused one-layer ops of :mod:`rnnfast.ops`.

:func:`lstm` takes the arguments of ``torch._VF.lstm`` (the function behind
``torch.nn.LSTM``) in a documented, keyword-friendly form, so a module or a
user can call it with an ``nn.LSTM``'s ``_flat_weights``.
"""

from __future__ import annotations

import itertools
import math
import numbers
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


def _check_arguments(op: str, hx, num_layers, bidirectional) -> None:
    """What ``torch._VF.lstm`` (behind nn.LSTM) refuses before it computes,
    with its exception classes and words, naming ``op``: ``hx`` that is not
    a tuple (or list) of two tensors, a ``num_layers`` that is not an int, a
    ``bidirectional`` that is not a bool (``bidirectional=1`` included)."""
    def invalid(what: str) -> TypeError:
        return TypeError(f"{op}: lstm() received an invalid combination of arguments - {what}")

    if not isinstance(hx, (tuple, list)):
        raise invalid(f"expected hx to be a tuple of two Tensors (h_0, c_0), got "
                      f"{type(hx).__name__}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise invalid(f"expected num_layers to be an int, got {type(num_layers).__name__}")
    if not isinstance(bidirectional, bool):
        raise invalid(f"expected bidirectional to be a bool, got {type(bidirectional).__name__}")
    if len(hx) != 2:
        raise RuntimeError(f"{op}: lstm expects two hidden states (h_0, c_0), got {len(hx)}")


# ---- recurrent regularisers ---------------------------------------------------

def _check_rate(op: str, name: str, value) -> float:
    """A regularisation rate in [0, 1), else nn.LSTM's kind of ValueError
    naming the argument (1 is refused: nothing would be learned through
    it)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Number)
            or not 0 <= value < 1):
        raise ValueError(
            f"{op}: {name} should be a number in range [0, 1), got {value!r}")
    return float(value)


def _check_regularisers(op: str, zoneout_hidden, zoneout_cell, weight_dropout,
                        variational_dropout) -> tuple[float, float, float]:
    rates = tuple(_check_rate(op, name, value) for name, value in (
        ("zoneout_hidden", zoneout_hidden), ("zoneout_cell", zoneout_cell),
        ("weight_dropout", weight_dropout)))
    if not isinstance(variational_dropout, bool):
        raise TypeError(f"{op}: variational_dropout should be of type bool, got: "
                        f"{type(variational_dropout).__name__}")
    return rates


# Mask bits per element: each element compares 16 random bits with the rate,
# so a mask is Bernoulli(p rounded to a multiple of 2^-16) (torch's own
# bernoulli_ and rand() < p resolve 2^-24).
_MASK_LEVELS = 1 << 16


def _bernoulli_masks(shape: Sequence[int], rates: Sequence[float], device: torch.device,
                     kinds: Sequence[str]) -> list[Tensor]:
    """Bool masks of ``shape``, one per rate, True with that probability (to
    2^-16), from torch's default generator for ``device`` (so
    ``torch.manual_seed`` reproduces them): one byte per element. ``kinds``
    name what they are for ("zoneout_hidden", "zoneout_cell", "weight_hh",
    "dropout"): every regulariser draws its masks here, which lets a test see
    them.

    On the CPU one 64-bit seed comes from the generator and the op
    ``rnnfast::bernoulli_masks`` expands it with a counter-based hash on all
    threads (torch's CPU generator draws one number after another on one
    thread: 6 ns per 32 bits, which was most of zoneout's cost). Elsewhere,
    one bulk ``torch.randint`` of 16 bits per element and mask.

    While ``torch.jit.trace`` or an ONNX exporter records the call (a model
    traced or exported in training mode), ``torch.rand(shape) < p``: the
    TorchScript tracer cannot record the mask op (its ``SymInt[]`` shape
    fails an internal assert) and ONNX has no counterpart of it; this
    records as ``aten::rand`` and exports as ONNX's ``RandomUniform``."""
    device = torch.device(device)
    if _export.capture() != _export.EAGER:
        return [torch.rand(tuple(shape), device=device) < p for p in rates]
    if device.type == "cpu":
        seed = torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64)
        masks = ops.bernoulli_masks(seed, tuple(shape), [float(p) for p in rates])
        return list(masks.unbind(0))
    n, k = math.prod(shape), len(rates)
    # 32 random bits each (out of place: torch.compile traces randint)
    words = torch.randint(-(1 << 31), (1 << 31) - 1, ((n * k + 1) // 2,),
                          dtype=torch.int32, device=device)
    halves = words.view(torch.int16)[:n * k].view(n, k)  # an element's draws side by side
    masks = []
    for j, p in enumerate(rates):
        threshold = min(round(p * _MASK_LEVELS), _MASK_LEVELS - 1) - _MASK_LEVELS // 2
        masks.append((halves[:, j] < threshold).view(tuple(shape)))
    return masks


def _bernoulli_mask(shape: Sequence[int], p: float, device: torch.device,
                    kind: str) -> Tensor:
    """One mask of :func:`_bernoulli_masks`."""
    return _bernoulli_masks(shape, [p], device, [kind])[0]


def _zoneout_args(layer_input: Tensor, out_size: int, hidden: int, zoneout_hidden: float,
                  zoneout_cell: float, training: bool) -> tuple:
    """The zoneout arguments of one layer-direction op: in training fresh
    masks of the output's rows (``[T, B, P]`` / ``[N, P]`` for h, ``H``
    wide for c), in evaluation the rates."""
    if not training:
        return None, None, zoneout_hidden, zoneout_cell
    rows, device = layer_input.shape[:-1], layer_input.device
    if zoneout_hidden > 0 and zoneout_cell > 0 and out_size == hidden:
        # both from one draw of 32 bits per unit and step
        mask_h, mask_c = _bernoulli_masks((*rows, hidden), [zoneout_hidden, zoneout_cell],
                                          device, ["zoneout_hidden", "zoneout_cell"])
        return mask_h, mask_c, 0.0, 0.0
    mask_h = (_bernoulli_mask((*rows, out_size), zoneout_hidden, device, "zoneout_hidden")
              if zoneout_hidden > 0 else None)
    mask_c = (_bernoulli_mask((*rows, hidden), zoneout_cell, device, "zoneout_cell")
              if zoneout_cell > 0 else None)
    return mask_h, mask_c, 0.0, 0.0


def _drop_weight(weight_hh: Tensor, weight_dropout: float, training: bool) -> Tensor:
    """DropConnect on W_hh (Wan et al. 2013; AWD-LSTM's WeightDrop): in
    training one masked copy, kept entries scaled by 1 / (1 - p), for the
    whole forward call (every step and row); autograd takes its gradient
    back to the parameter, which is never modified."""
    if training and weight_dropout > 0:
        keep = _bernoulli_mask(weight_hh.shape, 1 - weight_dropout, weight_hh.device,
                               "weight_hh")
        # the mask in the weight's dtype, not promoted by the product:
        # torch 2.11's ONNX exporter (dynamo=True) failed in its type
        # promotion pass on the bool-times-float product
        return weight_hh * keep.to(weight_hh.dtype) / (1 - weight_dropout)
    return weight_hh


def _variational_dropout(layer_output: Tensor, p: float,
                         batch_sizes: Optional[Tensor]) -> Tensor:
    """Dropout with one mask per sequence and feature, shared by every step
    (Gal & Ghahramani 2016): ``[B, F]``, broadcast over time for a padded
    ``[T, B, F]`` output and gathered by each packed row's sequence (its
    index in its step) for a packed ``[N, F]`` one."""
    features = layer_output.shape[-1]
    if batch_sizes is None:
        batch = layer_output.shape[1]
    else:
        batch = int(batch_sizes[0])
    keep = _bernoulli_mask((batch, features), 1 - p, layer_output.device,
                           "dropout").to(layer_output.dtype) / (1 - p)
    if batch_sizes is None:
        return layer_output * keep
    # A packed step of b rows holds sequences 0..b-1: the mask is keep[:b]
    # per step, built from the runs of equal batch sizes (at most B pieces)
    # on the output's device, with no index copied from the host (which on
    # CUDA would be a copy per layer and call, and no CUDA graph could hold).
    pieces = []
    for b, run in itertools.groupby(batch_sizes.tolist()):
        pieces.append(keep[:b].repeat(sum(1 for _ in run), 1))
    return layer_output * torch.cat(pieces)


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
    zoneout_hidden: float = 0.0,
    zoneout_cell: float = 0.0,
    weight_dropout: float = 0.0,
    variational_dropout: bool = False,
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
        zoneout_hidden, zoneout_cell: zoneout rates in ``[0, 1)`` (Krueger
            et al. 2016), every layer and direction: with the candidate
            states ``c~_t = f c_{t-1} + i g`` and ``h~_t = o tanh(c~_t)``,
            ``c_t = m_c c_{t-1} + (1 - m_c) c~_t`` and
            ``h_t = m_h h_{t-1} + (1 - m_h) h~_t`` (h after the projection),
            with masks ``m ~ Bernoulli(rate)`` per unit, step and sequence
            when ``training``, the rate itself (the expectation) otherwise.
        weight_dropout: DropConnect rate on every ``weight_hh`` when
            ``training``: one mask per call, layer and direction, kept
            weights scaled by ``1 / (1 - p)``.
        variational_dropout: ``dropout`` uses one mask per sequence and
            feature, shared by all steps (Gal & Ghahramani 2016).

    Masks come from torch's default generator of the input's device.

    Returns:
        ``(output, h_n, c_n)``: output ``[T, B, D * P]`` (or ``[N, D * P]``
        packed), final states shaped like ``hx``.

    Raises:
        TypeError: ``hx`` is not a tuple or list, ``num_layers`` not an int
            or ``bidirectional`` not a bool (as ``torch._VF.lstm``).
        RuntimeError: ``hx`` does not hold two tensors (as ``torch._VF.lstm``).
        ValueError: a regularisation rate outside ``[0, 1)``.
    """
    op = "rnnfast.functional.lstm"
    _check_arguments(op, hx, num_layers, bidirectional)
    z_h, z_c, w_drop = _check_regularisers(op, zoneout_hidden, zoneout_cell,
                                           weight_dropout, variational_dropout)
    layers = split_weights(weights, num_layers, bidirectional, bias)
    save = _needs_grad(input, hx, weights)
    if _inference_route(save, training, num_layers, dropout, z_h, z_c, w_drop):
        return ops.stacked_inference(input, hx[0], hx[1], weights, num_layers, bidirectional,
                                     batch_first, batch_sizes, bias, False, 0.0, z_h, z_c)
    mode = _export.capture()  # asked once for all the layers

    def run(layer_input, idx, reverse, h0, c0):
        w_ih, w_hh, b_ih, b_hh, w_hr = layers[idx]
        hidden = w_hh.shape[0] // 4
        zoneout = _zoneout_args(layer_input, w_hh.shape[1], hidden, z_h, z_c, training)
        return _export.lstm_forward(
            layer_input, h0, c0, w_ih, _drop_weight(w_hh, w_drop, training), b_ih, b_hh,
            w_hr, batch_sizes, reverse, save, *zoneout, mode=mode)

    return _stack(run, input, hx, num_layers=num_layers, dropout=dropout,
                  training=training, bidirectional=bidirectional,
                  batch_first=batch_first, batch_sizes=batch_sizes,
                  variational_dropout=variational_dropout)


def _inference_route(save: bool, training: bool, num_layers: int, dropout: float,
                     z_h: float, z_c: float, w_drop: float) -> bool:
    """Whether a call may run as one :func:`ops.stacked_inference`: no
    gradient to keep, nothing recording the call (:func:`ops.direct_route`),
    no random mask to draw (zoneout and DropConnect in training, dropout
    between layers)."""
    return (not save
            and not (training and (z_h > 0 or z_c > 0 or w_drop > 0
                                   or (dropout > 0 and num_layers > 1)))
            and ops.direct_route())


def _stack(run, input: Tensor, hx: tuple[Tensor, Tensor], *, num_layers: int,
           dropout: float, training: bool, bidirectional: bool, batch_first: bool,
           batch_sizes: Optional[Tensor], variational_dropout: bool
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Composes one-layer, one-direction runs into a stacked, optionally
    bidirectional network with dropout (per element, or variational)
    between layers.
    ``run(layer_input, index, reverse, h0, c0) -> (output, h_n, c_n)``."""
    packed = batch_sizes is not None
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
            if variational_dropout:
                layer_output = _variational_dropout(layer_output, dropout, batch_sizes)
            else:
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
    zoneout_hidden: float = 0.0,
    zoneout_cell: float = 0.0,
    weight_dropout: float = 0.0,
    variational_dropout: bool = False,
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
    the LayerNorm epsilon (biased variance, as ``F.layer_norm``). The
    regularisers as :func:`lstm`'s, with ``h~_t = o tanh(LN_cell(c~_t))``.
    Raises as :func:`lstm` for a bad ``hx``, ``num_layers``,
    ``bidirectional`` or rate.
    """
    op = "rnnfast.functional.layer_norm_lstm"
    _check_arguments(op, hx, num_layers, bidirectional)
    z_h, z_c, w_drop = _check_regularisers(op, zoneout_hidden, zoneout_cell,
                                           weight_dropout, variational_dropout)
    directions = 2 if bidirectional else 1
    groups = num_layers * directions
    per = (4 if bias else 2) + len(_LN_NAMES)
    if len(weights) != groups * per:
        raise ValueError(
            f"rnnfast.functional.layer_norm_lstm: expected {groups * per} weights "
            f"({per} per layer and direction, bias={bias}), got {len(weights)}")
    save = _needs_grad(input, hx, weights)
    if _inference_route(save, training, num_layers, dropout, z_h, z_c, w_drop):
        return ops.stacked_inference(input, hx[0], hx[1], weights, num_layers, bidirectional,
                                     batch_first, batch_sizes, bias, True, eps, z_h, z_c)
    mode = _export.capture()  # asked once for all the layers

    def run(layer_input, idx, reverse, h0, c0):
        w = list(weights[idx * per:(idx + 1) * per])
        b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
        ln = w[-len(_LN_NAMES):]
        hidden = w[1].shape[1]
        zoneout = _zoneout_args(layer_input, hidden, hidden, z_h, z_c, training)
        return _export.layer_norm_lstm_forward(
            layer_input, h0, c0, w[0], _drop_weight(w[1], w_drop, training), b_ih, b_hh,
            *ln, batch_sizes, reverse, save, eps, *zoneout, mode=mode)

    return _stack(run, input, hx, num_layers=num_layers, dropout=dropout,
                  training=training, bidirectional=bidirectional,
                  batch_first=batch_first, batch_sizes=batch_sizes,
                  variational_dropout=variational_dropout)
