"""Plain-PyTorch reference LSTM and LayerNorm-LSTM.

Ground truth for the tests and the "what users write today" baseline of the
benchmark (:mod:`rnnfast.bench`). Library code never imports this module.

Everything here is a Python loop over time steps built from ordinary torch
ops, computed in the dtype of the input (callers upcast, e.g. to float64,
for ground truth). The input GEMM of each layer is done once for the whole
sequence before the loop, as a careful user would write it; each step then
runs the recurrent GEMM and the cell's pointwise math. The code deliberately
shares nothing with :mod:`rnnfast.functional`, so that it checks it.

Both functions take the arguments of :func:`rnnfast.functional.lstm`:
padded ``[T, B, I]`` (``[B, T, I]`` with ``batch_first``) input, or the
``data`` ``[N, I]`` of a PackedSequence with its ``batch_sizes``. Packed rows
active at step ``t`` are the first ``batch_sizes[t]`` rows; the forward
direction keeps each sequence's state from its last step, the reverse
direction starts each sequence at its own last step from ``h_0``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

__all__ = [
    "Regularisers",
    "lstm_reference",
    "layer_norm_lstm_reference",
    "ReferenceLSTM",
    "ReferenceLayerNormLSTM",
]

# cell(input_part [b, 4H], h [b, P], c [b, H]) -> (h' [b, P], c' [b, H])
_Cell = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


# A zoneout coefficient per step: a [b_t, width] 0/1 tensor (training's
# mask) or a float (evaluation's rate); None for no zoneout.
_Zoneout = Optional[Union[Sequence[Tensor], float]]


def _recurrence(steps: Sequence[Tensor], h0: Tensor, c0: Tensor, cell: _Cell,
                reverse: bool, zoneout_h: _Zoneout = None,
                zoneout_c: _Zoneout = None) -> tuple[list[Tensor], Tensor, Tensor]:
    """Runs ``cell`` over time for one layer and one direction.

    ``steps[t]`` is the input part of the gates at step t, ``[b_t, 4H]``,
    where ``b_t`` (non-increasing in t) rows are active; ``h0`` ``[B, P]``,
    ``c0`` ``[B, H]``. Rows past ``b_t`` keep their state, so the forward
    direction ends each sequence with its own last step and the reverse one
    starts each sequence from ``h0`` at its own last step.

    Zoneout (Krueger et al. 2016): the cell's ``h``, ``c`` are candidates,
    and the carried states ``s_t = a s_{t-1} + (1 - a) s~_t`` with ``a``
    from ``zoneout_h`` / ``zoneout_c`` (step t's mask rows, or a rate).

    Returns the per-step outputs ``[b_t, P]`` and the final ``h`` ``[B, P]``,
    ``c`` ``[B, H]``.
    """
    def coefficient(z, t):
        return z if isinstance(z, float) else z[t].to(h0.dtype)

    h, c = h0, c0
    outputs: list[Tensor] = [h0] * len(steps)
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    for t in order:
        rows = steps[t].shape[0]
        h_t, c_t = cell(steps[t], h[:rows], c[:rows])
        if zoneout_h is not None:
            a = coefficient(zoneout_h, t)
            h_t = a * h[:rows] + (1 - a) * h_t
        if zoneout_c is not None:
            a = coefficient(zoneout_c, t)
            c_t = a * c[:rows] + (1 - a) * c_t
        outputs[t] = h_t
        if rows == h.shape[0]:
            h, c = h_t, c_t
        else:
            h, c = torch.cat([h_t, h[rows:]]), torch.cat([c_t, c[rows:]])
    return outputs, h, c


def _stack_layers(
    input: Tensor,
    hx: Optional[tuple[Tensor, Tensor]],
    groups: list[list[Optional[Tensor]]],
    layer_fn: Callable[[list[Optional[Tensor]], Tensor], Tensor],
    make_cell: Callable[[list[Optional[Tensor]]], _Cell],
    out_size: int,
    *,
    num_layers: int,
    dropout: float,
    training: bool,
    bidirectional: bool,
    batch_first: bool,
    batch_sizes: Optional[Tensor],
    regularisers: "Regularisers",
) -> tuple[Tensor, Tensor, Tensor]:
    """Layers, directions, dropout, batch_first, packing and the recurrent
    regularisers around one layer's math: ``layer_fn(weights, layer_input)``
    gives the input part of the gates for all steps (``[T, B, 4H]`` or
    ``[N, 4H]``), ``make_cell(weights)`` the per-step cell."""
    reg = regularisers
    directions = 2 if bidirectional else 1
    packed = batch_sizes is not None
    if batch_first and not packed:
        input = input.transpose(0, 1)
    batch = int(batch_sizes[0]) if packed else input.shape[1]
    hidden = groups[0][1].shape[0] // 4  # weight_hh: [4H, P]
    if hx is None:
        opts = dict(dtype=input.dtype, device=input.device)
        hx = (torch.zeros(num_layers * directions, batch, out_size, **opts),
              torch.zeros(num_layers * directions, batch, hidden, **opts))
    h0, c0 = hx
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    layer_input = input
    def per_step(t: Tensor) -> list[Tensor]:
        return list(t.split(batch_sizes.tolist())) if packed else list(t.unbind(0))

    def zoneout(rate: float, kind: str, idx: int, shape) -> _Zoneout:
        if rate == 0:
            return None
        if not training:
            return float(rate)
        return per_step(reg.mask(kind, idx, shape, rate, input.device))

    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            idx = layer * directions + direction
            weights = list(groups[idx])
            w_hh = weights[1]
            rows = (input.shape[0],) if packed else tuple(input.shape[:2])
            z_h = zoneout(reg.zoneout_hidden, "zoneout_hidden", idx,
                          (*rows, w_hh.shape[1]))
            z_c = zoneout(reg.zoneout_cell, "zoneout_cell", idx,
                          (*rows, w_hh.shape[0] // 4))
            if training and reg.weight_dropout > 0:  # DropConnect
                keep = reg.mask("weight_hh", idx, w_hh.shape, 1 - reg.weight_dropout,
                                input.device)
                weights[1] = w_hh * keep.to(w_hh.dtype) / (1 - reg.weight_dropout)
            gates_x = layer_fn(weights, layer_input)
            outs, h, c = _recurrence(per_step(gates_x), h0[idx], c0[idx],
                                     make_cell(weights), reverse=direction == 1,
                                     zoneout_h=z_h, zoneout_c=z_c)
            outputs.append(torch.cat(outs) if packed else torch.stack(outs))
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if dropout > 0 and training and layer < num_layers - 1:
            if reg.variational_dropout:  # one mask per sequence and feature
                keep = reg.mask("dropout", layer, (batch, layer_input.shape[-1]),
                                1 - dropout, input.device)
                keep = keep.to(layer_input.dtype) / (1 - dropout)
                if packed:  # each packed row's sequence is its index in its step
                    keep = torch.cat([keep[:n] for n in batch_sizes.tolist()])
                layer_input = layer_input * keep
            else:
                layer_input = F.dropout(layer_input, p=dropout, training=True)
    output = layer_input
    if batch_first and not packed:
        output = output.transpose(0, 1)
    return output, torch.stack(h_n), torch.stack(c_n)


class Regularisers:
    """The recurrent regularisers of a reference call, and their masks.

    ``masks`` maps a kind ("zoneout_hidden", "zoneout_cell" per layer and
    direction, "weight_hh" per layer and direction, "dropout" per layer with
    ``variational_dropout``) to a list of bool masks (True: keep the
    previous state for zoneout, keep the weight / feature for the dropouts),
    as :func:`rnnfast.functional.lstm` draws them, so a test can feed both
    the same masks. A kind not given is drawn here, from the default
    generator.
    """

    def __init__(self, zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0,
                 weight_dropout: float = 0.0, variational_dropout: bool = False,
                 masks: Optional[dict[str, Sequence[Tensor]]] = None) -> None:
        self.zoneout_hidden = zoneout_hidden
        self.zoneout_cell = zoneout_cell
        self.weight_dropout = weight_dropout
        self.variational_dropout = variational_dropout
        self.masks = masks or {}

    def mask(self, kind: str, index: int, shape, p: float, device) -> Tensor:
        given = self.masks.get(kind)
        if given is not None:
            m = given[index]
            assert tuple(m.shape) == tuple(shape), (kind, index, m.shape, shape)
            return m
        return torch.rand(tuple(shape), device=device) < p


def _group(weights: Sequence[Tensor], num_layers: int, bidirectional: bool,
           allowed: Sequence[int], what: str) -> list[list[Tensor]]:
    groups = num_layers * (2 if bidirectional else 1)
    per = len(weights) // groups if groups > 0 else 0
    if groups <= 0 or len(weights) % groups != 0 or per not in allowed:
        raise ValueError(
            f"{what}: expected {' or '.join(str(a * groups) for a in allowed)} weights "
            f"for {num_layers} layer(s) and {2 if bidirectional else 1} direction(s), "
            f"got {len(weights)}")
    return [list(weights[g * per:(g + 1) * per]) for g in range(groups)]


def lstm_reference(
    input: Tensor,
    hx: Optional[tuple[Tensor, Tensor]],
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
    masks: Optional[dict[str, Sequence[Tensor]]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A multi-layer LSTM as a Python loop over time; the signature and
    semantics of :func:`rnnfast.functional.lstm` (and ``torch._VF.lstm``).

    Args:
        input: ``[T, B, I]`` (``[B, T, I]`` with ``batch_first``), or packed
            rows ``[N, I]`` with ``batch_sizes``.
        hx: ``(h_0, c_0)``, ``[num_layers * D, B, P]`` and
            ``[num_layers * D, B, H]``; None for zeros.
        weights: for each layer, then each direction, ``weight_ih``
            ``[4H, in]``, ``weight_hh`` ``[4H, P]``, then ``bias_ih``,
            ``bias_hh`` ``[4H]`` when ``bias``, then ``weight_hr`` ``[P, H]``
            when projecting (``nn.LSTM._flat_weights``' order). Gate order
            i, f, g, o.
        dropout, training: dropout on the outputs of all layers but the last,
            applied when ``training``.
        batch_sizes: int64 CPU tensor ``[T]`` of a PackedSequence.
        zoneout_hidden, zoneout_cell, weight_dropout, variational_dropout:
            the recurrent regularisers of :func:`rnnfast.functional.lstm`.
        masks: their training masks (see :class:`Regularisers`).

    Returns:
        ``(output, h_n, c_n)``: ``[T, B, D * P]`` (or ``[N, D * P]``) and the
        final states shaped like ``hx``.
    """
    base = 4 if bias else 2
    groups = _group(weights, num_layers, bidirectional, (base, base + 1),
                    "lstm_reference")

    def unpack(w):
        w_ih, w_hh = w[0], w[1]
        b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
        w_hr = w[base] if len(w) == base + 1 else None
        return w_ih, w_hh, b_ih, b_hh, w_hr

    def layer_fn(w, x):
        w_ih, _, b_ih, _, _ = unpack(w)
        return F.linear(x, w_ih, b_ih)  # [T, B, 4H] or [N, 4H]

    def make_cell(w) -> _Cell:
        _, w_hh, _, b_hh, w_hr = unpack(w)

        def cell(gates_x, h, c):
            gates = gates_x + F.linear(h, w_hh, b_hh)
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if w_hr is not None:
                h = F.linear(h, w_hr)
            return h, c
        return cell

    w_hr = unpack(groups[0])[4]
    out_size = w_hr.shape[0] if w_hr is not None else groups[0][1].shape[0] // 4
    return _stack_layers(
        input, hx, groups, layer_fn, make_cell, out_size, num_layers=num_layers,
        dropout=dropout, training=training, bidirectional=bidirectional,
        batch_first=batch_first, batch_sizes=batch_sizes,
        regularisers=Regularisers(zoneout_hidden, zoneout_cell, weight_dropout,
                                  variational_dropout, masks))


def layer_norm_lstm_reference(
    input: Tensor,
    hx: Optional[tuple[Tensor, Tensor]],
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
    masks: Optional[dict[str, Sequence[Tensor]]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""A multi-layer LayerNorm-LSTM (Ba, Kiros & Hinton 2016, section 3.1)
    as a Python loop over time::

        gates = LN_ih(W_ih x_t) + LN_hh(W_hh h_{t-1}) + b_ih + b_hh   # LN over 4H
        i, f, g, o = gates.chunk(4)                                  # nn.LSTM's order
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(LN_cell(c_t))                        # LN over H

    The raw ``c_t`` is carried to the next step. Each LN is
    ``F.layer_norm`` (biased variance) with its own gain and bias.

    Args: as :func:`lstm_reference` (no projection), plus ``eps`` of the
        layer norms. ``weights`` holds, for each layer, then each direction:
        ``weight_ih`` ``[4H, in]``, ``weight_hh`` ``[4H, H]``,
        [``bias_ih`` ``[4H]``, ``bias_hh`` ``[4H]`` when ``bias``],
        ``ln_ih_weight`` ``[4H]``, ``ln_ih_bias`` ``[4H]``,
        ``ln_hh_weight`` ``[4H]``, ``ln_hh_bias`` ``[4H]``,
        ``ln_cell_weight`` ``[H]``, ``ln_cell_bias`` ``[H]``. The
        regularisers and ``masks`` as :func:`lstm_reference`'s.

    Returns:
        ``(output, h_n, c_n)``: ``[T, B, D * H]`` (or ``[N, D * H]``) and the
        final states ``[num_layers * D, B, H]``.
    """
    base = 4 if bias else 2
    groups = _group(weights, num_layers, bidirectional, (base + 6,),
                    "layer_norm_lstm_reference")

    def unpack(w):
        w_ih, w_hh = w[0], w[1]
        b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
        return (w_ih, w_hh, b_ih, b_hh) + tuple(w[base:base + 6])

    def layer_fn(w, x):
        w_ih, _, b_ih, _, ln_ih_w, ln_ih_b, _, _, _, _ = unpack(w)
        gates_x = F.layer_norm(F.linear(x, w_ih), (w_ih.shape[0],), ln_ih_w, ln_ih_b, eps)
        if b_ih is not None:
            gates_x = gates_x + b_ih
        return gates_x

    def make_cell(w) -> _Cell:
        _, w_hh, _, b_hh, _, _, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b = unpack(w)
        gates_size, hidden = w_hh.shape[0], w_hh.shape[0] // 4

        def cell(gates_x, h, c):
            gates = gates_x + F.layer_norm(F.linear(h, w_hh), (gates_size,),
                                           ln_hh_w, ln_hh_b, eps)
            if b_hh is not None:
                gates = gates + b_hh
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(F.layer_norm(c, (hidden,), ln_c_w, ln_c_b, eps))
            return h, c
        return cell

    out_size = groups[0][1].shape[0] // 4
    return _stack_layers(
        input, hx, groups, layer_fn, make_cell, out_size, num_layers=num_layers,
        dropout=dropout, training=training, bidirectional=bidirectional,
        batch_first=batch_first, batch_sizes=batch_sizes,
        regularisers=Regularisers(zoneout_hidden, zoneout_cell, weight_dropout,
                                  variational_dropout, masks))


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------

def _permute_hidden(t: Tensor, permutation: Optional[Tensor]) -> Tensor:
    return t if permutation is None else t.index_select(1, permutation)


class _ReferenceRNN(nn.Module):
    """Parameters in nn.LSTM's naming and order, and nn.LSTM's forward
    contract (padded, batch_first, unbatched and PackedSequence input)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int,
                 bias: bool, batch_first: bool, dropout: float, bidirectional: bool,
                 out_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self._out_size = out_size
        self._flat_weights_names: list[str] = []

    def _add(self, name: str, shape: tuple[int, ...], factory: dict) -> None:
        self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        self._flat_weights_names.append(name)

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    def _functional(self, input: Tensor, hx, batch_sizes: Optional[Tensor]):
        raise NotImplementedError

    def forward(self, input: Union[Tensor, PackedSequence],
                hx: Optional[tuple[Tensor, Tensor]] = None):
        """``(output, (h_n, c_n))`` as ``torch.nn.LSTM.forward``."""
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if hx is not None:
                hx = (_permute_hidden(hx[0], sorted_indices),
                      _permute_hidden(hx[1], sorted_indices))
            output, h_n, c_n = self._functional(data, hx, batch_sizes)
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    (_permute_hidden(h_n, unsorted_indices),
                     _permute_hidden(c_n, unsorted_indices)))
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        output, h_n, c_n = self._functional(input, hx, None)
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.bias}, batch_first={self.batch_first}, "
                f"dropout={self.dropout}, bidirectional={self.bidirectional}")


class ReferenceLSTM(_ReferenceRNN):
    """torch.nn.LSTM's constructor, parameter names, initialisation and
    forward, computed by :func:`lstm_reference`."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size or hidden_size)
        self.proj_size = proj_size
        factory = dict(device=device, dtype=dtype)
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else self._out_size * directions
            for direction in range(directions):
                sfx = "_reverse" if direction == 1 else ""
                self._add(f"weight_ih_l{layer}{sfx}", (4 * hidden_size, layer_in), factory)
                self._add(f"weight_hh_l{layer}{sfx}", (4 * hidden_size, self._out_size),
                          factory)
                if bias:
                    self._add(f"bias_ih_l{layer}{sfx}", (4 * hidden_size,), factory)
                    self._add(f"bias_hh_l{layer}{sfx}", (4 * hidden_size,), factory)
                if proj_size > 0:
                    self._add(f"weight_hr_l{layer}{sfx}", (proj_size, hidden_size), factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def _functional(self, input, hx, batch_sizes):
        return lstm_reference(
            input, hx, self._flat_weights, bias=self.bias, num_layers=self.num_layers,
            dropout=self.dropout, training=self.training,
            bidirectional=self.bidirectional, batch_first=self.batch_first,
            batch_sizes=batch_sizes)


class ReferenceLayerNormLSTM(_ReferenceRNN):
    """A LayerNorm-LSTM module computed by :func:`layer_norm_lstm_reference`.

    Parameters per layer ``k`` and direction suffix ``s`` (``''`` or
    ``'_reverse'``), in this order: ``weight_ih_l{k}{s}`` ``[4H, in]``,
    ``weight_hh_l{k}{s}`` ``[4H, H]``, ``bias_ih_l{k}{s}``,
    ``bias_hh_l{k}{s}`` ``[4H]`` (when ``bias``), ``ln_ih_weight_l{k}{s}``,
    ``ln_ih_bias_l{k}{s}``, ``ln_hh_weight_l{k}{s}``, ``ln_hh_bias_l{k}{s}``
    ``[4H]``, ``ln_cell_weight_l{k}{s}``, ``ln_cell_bias_l{k}{s}`` ``[H]``.
    Weights and biases start as nn.LSTM's (``U(-1/sqrt(H), 1/sqrt(H))``),
    layer-norm gains at 1 and layer-norm biases at 0.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, hidden_size)
        self.eps = eps
        factory = dict(device=device, dtype=dtype)
        directions = 2 if bidirectional else 1
        gates = 4 * hidden_size
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * directions
            for direction in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                self._add(f"weight_ih{sfx}", (gates, layer_in), factory)
                self._add(f"weight_hh{sfx}", (gates, hidden_size), factory)
                if bias:
                    self._add(f"bias_ih{sfx}", (gates,), factory)
                    self._add(f"bias_hh{sfx}", (gates,), factory)
                for name, size in (("ln_ih", gates), ("ln_hh", gates), ("ln_cell", hidden_size)):
                    self._add(f"{name}_weight{sfx}", (size,), factory)
                    self._add(f"{name}_bias{sfx}", (size,), factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name, param in self.named_parameters():
            if name.startswith("ln_"):
                nn.init.ones_(param) if "_weight" in name else nn.init.zeros_(param)
            else:
                nn.init.uniform_(param, -stdv, stdv)

    def _functional(self, input, hx, batch_sizes):
        return layer_norm_lstm_reference(
            input, hx, self._flat_weights, bias=self.bias, num_layers=self.num_layers,
            dropout=self.dropout, training=self.training,
            bidirectional=self.bidirectional, batch_first=self.batch_first,
            batch_sizes=batch_sizes, eps=self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"
