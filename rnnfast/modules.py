"""nn.Module front ends. They hold parameters and call rnnfast.functional.

:class:`LSTM` has torch.nn.LSTM's whole contract: constructor, parameter
names, shapes, gate order and initialisation, forward signature (padded,
batch_first, unbatched and PackedSequence input), errors and repr, so
``load_state_dict`` works both ways and replacing ``torch.nn.LSTM`` with
``rnnfast.LSTM`` needs no other change.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional as RF

__all__ = ["LSTM", "LayerNormLSTM"]

_HiddenState = tuple[Tensor, Tensor]
_Device = Union[torch.device, str, int, None]


def _apply_permutation(t: Tensor, permutation: Optional[Tensor]) -> Tensor:
    return t if permutation is None else t.index_select(1, permutation)


def _packed_batch_size(batch_sizes: Tensor, sorted_indices: Optional[Tensor]) -> int:
    """The number of sequences in a PackedSequence: the size of
    ``sorted_indices`` when there is one (a shape, known while tracing),
    else ``batch_sizes[0].item()``, an int in eager mode and an unbacked
    SymInt under torch.export / torch.compile (``int()`` would fail there)."""
    if sorted_indices is not None:
        return sorted_indices.size(0)
    return batch_sizes[0].item()


class _RecurrentBase(nn.Module):
    """Constructor checks, forward-argument handling and repr shared by the
    rnnfast recurrent modules; the messages and exception classes are
    torch.nn.LSTM's."""

    _name = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0) -> None:
        super().__init__()
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the "
                "probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, "
                "so non-zero dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
        # nn.LSTM's checks, in nn.LSTM's order (so the same error wins).
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(
                f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(
                f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(
                f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError(
                "proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

    def _set_regularisers(self, zoneout_hidden, zoneout_cell, weight_dropout,
                          variational_dropout) -> None:
        """The recurrent regularisers (rnnfast's, keyword-only; all off by
        default): checked as rnnfast.functional checks them."""
        (self.zoneout_hidden, self.zoneout_cell,
         self.weight_dropout) = RF._check_regularisers(
            self._name, zoneout_hidden, zoneout_cell, weight_dropout,
            variational_dropout)
        self.variational_dropout = variational_dropout

    def _regulariser_kwargs(self) -> dict:
        # getattr: a module pickled before the regularisers existed has none
        return dict(zoneout_hidden=getattr(self, "zoneout_hidden", 0.0),
                    zoneout_cell=getattr(self, "zoneout_cell", 0.0),
                    weight_dropout=getattr(self, "weight_dropout", 0.0),
                    variational_dropout=getattr(self, "variational_dropout", False))

    def _register_parameters(self, per_direction, factory) -> None:
        """Registers, for each layer then direction, the parameters that
        ``per_direction(layer, suffix)`` lists as ``(name, shape)`` pairs,
        recording their order in ``_flat_weights_names`` (nn.LSTM's)."""
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(self.num_layers):
            for direction in range(self._directions):
                entries = per_direction(layer, self._suffix(direction))
                for name, shape in entries:
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                names = [name for name, _ in entries]
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)

    @property
    def _flat_weights(self) -> list[Tensor]:
        # Read at every call. A registered parameter is read from _parameters
        # directly: getattr passes through nn.Module.__getattr__, ~0.4 us a
        # name on the Xeon, 10 us a call of a 2-layer LayerNorm-LSTM (24
        # names). A name not there (a parametrization's property, pruning's
        # plain tensor, whatever replaced the parameter) by getattr.
        params = self._parameters
        return [params[name] if name in params else getattr(self, name)
                for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters grouped per layer and direction, as nn.LSTM's."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def __prepare_scriptable__(self):
        """torch.jit.script calls this before it compiles a module (and each
        submodule). The forward composes the fused ops in Python that
        TorchScript cannot compile (its error would name a line of this
        file), so refuse here, naming what works instead."""
        name = type(self).__name__
        raise RuntimeError(
            f"rnnfast.{name} cannot be compiled by torch.jit.script (its forward is "
            f"Python that TorchScript does not compile). Trace it instead: "
            f"torch.jit.trace records the fused ops, runs at any batch size and "
            f"length, and saves with torch.jit.save; a scripted model can hold the "
            f"traced layer (model.rnn = torch.jit.trace(model.rnn, example_input) "
            f"before torch.jit.script(model)). torch.export and torch.compile take "
            f"rnnfast.{name} as it is.")

    def flatten_parameters(self) -> None:
        """A no-op kept for nn.LSTM compatibility: rnnfast reads every
        parameter where it is, so there is nothing to flatten (and DDP sees
        ordinary, separate parameters)."""

    # -- sizes -------------------------------------------------------------
    @property
    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _out_size(self) -> int:
        # int(): nn.LSTM accepts a bool size (isinstance(True, int)).
        return int(self.proj_size if self.proj_size > 0 else self.hidden_size)

    def _layer_input_size(self, layer: int) -> int:
        return int(self.input_size) if layer == 0 else self._out_size * self._directions

    @staticmethod
    def _suffix(direction: int) -> str:
        return "_reverse" if direction == 1 else ""

    # -- forward-argument checks (nn.LSTM's words) --------------------------
    def _dtype(self) -> torch.dtype:
        # nn.LSTM's: the first flat weight's (a named getattr is a tenth of
        # the cost of next(self.parameters()), paid at every call)
        return getattr(self, self._flat_weights_names[0]).dtype

    def _check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        dtype = self._dtype()
        if input.dtype != dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({dtype}). "
                f"Convert input: input.to({dtype}), or convert model: model.to({input.dtype})")
        expected = 2 if batch_sizes is not None else 3
        if input.dim() != expected:
            raise RuntimeError(f"input must have {expected} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {input.size(-1)}")

    def _expected_sizes(self, batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        layers = self.num_layers * self._directions
        return (layers, batch, self._out_size), (layers, batch, int(self.hidden_size))

    def _check_forward_args(self, input: Tensor, hx: _HiddenState,
                            batch_sizes: Optional[Tensor], batch: int) -> None:
        self._check_input(input, batch_sizes)
        h_size, c_size = self._expected_sizes(batch)
        for i, (t, size) in enumerate(((hx[0], h_size), (hx[1], c_size))):
            # Tracing a PackedSequence without sorted_indices, the batch read
            # from batch_sizes is a symbol without a value: torch._check
            # records the equality as a runtime assert, so the comparison
            # below is decided without a data-dependent branch.
            if isinstance(batch, torch.SymInt) and t.dim() == 3:
                torch._check(t.size(1) == batch)
            if tuple(t.size()) != size:
                raise RuntimeError(f"Expected hidden[{i}] size {size}, got {list(t.size())}")

    def _check_functional_arguments(self, hx) -> None:
        """What rnnfast.functional (as nn.LSTM's _VF.lstm) refuses: an hx
        that is not two tensors, a non-int num_layers, a non-bool
        bidirectional."""
        RF._check_arguments(self._name, hx, self.num_layers, self.bidirectional)

    def _zero_state(self, input: Tensor, batch: int) -> _HiddenState:
        layers = self.num_layers * self._directions
        opts = dict(dtype=input.dtype, device=input.device)
        return (torch.zeros(layers, batch, self._out_size, **opts),
                torch.zeros(layers, batch, int(self.hidden_size), **opts))

    def forward(self, input: Union[Tensor, PackedSequence],
                hx: Optional[_HiddenState] = None
                ) -> tuple[Union[Tensor, PackedSequence], _HiddenState]:
        """``(output, (h_n, c_n))``, exactly as ``torch.nn.LSTM.forward``."""
        batch_sizes = None
        sorted_indices = unsorted_indices = None
        is_batched = True
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch = _packed_batch_size(batch_sizes, sorted_indices)
            if hx is None:
                hx = self._zero_state(data, batch)
            else:
                # nn.LSTM checks nothing of a packed input's hx itself: its
                # _VF.lstm does, on hx as given when there is no permutation.
                if sorted_indices is not None:
                    hx = (_apply_permutation(hx[0], sorted_indices),
                          _apply_permutation(hx[1], sorted_indices))
                self._check_functional_arguments(hx)
            self._check_forward_args(data, hx, batch_sizes, batch)
        else:
            data = input
            if data.dim() not in (2, 3):
                raise ValueError(
                    f"{self._name}: Expected input to be 2D or 3D, got {data.dim()}D instead")
            is_batched = data.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                data = data.unsqueeze(batch_dim)
            batch = data.size(batch_dim)
            if hx is None:
                hx = self._zero_state(data, batch)
            else:
                if is_batched and (hx[0].dim() != 3 or hx[1].dim() != 3):
                    raise RuntimeError(
                        "For batched 3-D input, hx and cx should also be 3-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                if not is_batched:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should also be 2-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            self._check_forward_args(data, hx, batch_sizes, batch)
            if data.size(1 - batch_dim) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            self._check_functional_arguments(hx)

        output, h_n, c_n = self._run(data, hx, batch_sizes)

        if batch_sizes is not None:
            packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return packed, (_apply_permutation(h_n, unsorted_indices),
                            _apply_permutation(c_n, unsorted_indices))
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _run(self, input: Tensor, hx: _HiddenState,
             batch_sizes: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        """The sizes and the arguments that differ from their defaults, as
        in nn.LSTM's repr."""
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        for name in ("zoneout_hidden", "zoneout_cell", "weight_dropout"):
            if getattr(self, name, 0.0) != 0:
                s += f", {name}={{{name}}}"
        if getattr(self, "variational_dropout", False):
            s += ", variational_dropout=True"
        return s.format(**self.__dict__)


class LSTM(_RecurrentBase):
    r"""A multi-layer LSTM with fused CPU / CUDA kernels; a drop-in
    replacement for :class:`torch.nn.LSTM`.

    Same arguments, parameters (``weight_ih_l{k}{suffix}`` ``[4H, in]``,
    ``weight_hh_l{k}{suffix}`` ``[4H, P]``, ``bias_ih_l{k}{suffix}``,
    ``bias_hh_l{k}{suffix}`` ``[4H]``, ``weight_hr_l{k}{suffix}`` ``[P, H]``
    with a projection; gate order i, f, g, o), initialisation
    (``U(-1/sqrt(H), 1/sqrt(H))``), inputs, outputs and errors as
    torch.nn.LSTM.

    Args:
        input_size: features of the input ``x``.
        hidden_size: features of the cell state ``c`` (and of ``h`` without a
            projection).
        num_layers: stacked layers. Default 1.
        bias: use ``b_ih`` and ``b_hh``. Default True.
        batch_first: input and output are ``[B, T, *]``. Default False.
        dropout: dropout on the outputs of every layer but the last, in
            training mode. Default 0.
        bidirectional: add a reverse direction. Default False.
        proj_size: size of ``h`` through a learned projection (0: none).
        device, dtype: of the parameters.

    Recurrent regularisers (keyword-only, rnnfast's own; all off by default,
    and off computes exactly what nn.LSTM computes), inside the fused
    kernels:

        zoneout_hidden, zoneout_cell: zoneout rates in ``[0, 1)`` (Krueger
            et al. 2016): in training each unit of ``h`` (after the
            projection) / ``c`` keeps its previous value with that
            probability at each step, ``s_t = m s_{t-1} + (1 - m) s~_t``; in
            evaluation ``s_t = z s_{t-1} + (1 - z) s~_t``.
        weight_dropout: DropConnect on every ``weight_hh`` in training (one
            mask per forward call, layer and direction, kept weights scaled
            by ``1 / (1 - p)``; the parameter is not modified).
        variational_dropout: ``dropout`` uses one mask per sequence and
            feature, shared over time (Gal & Ghahramani 2016).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0,
                 device: _Device = None, dtype: Optional[torch.dtype] = None, *,
                 zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0,
                 weight_dropout: float = 0.0, variational_dropout: bool = False) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size)
        self._set_regularisers(zoneout_hidden, zoneout_cell, weight_dropout,
                               variational_dropout)
        gates = 4 * hidden_size

        def per_direction(layer, sfx):
            entries = [(f"weight_ih_l{layer}{sfx}", (gates, self._layer_input_size(layer))),
                       (f"weight_hh_l{layer}{sfx}", (gates, self._out_size))]
            if bias:
                entries += [(f"bias_ih_l{layer}{sfx}", (gates,)),
                            (f"bias_hh_l{layer}{sfx}", (gates,))]
            if proj_size > 0:
                entries.append((f"weight_hr_l{layer}{sfx}", (proj_size, int(hidden_size))))
            return entries

        self._register_parameters(per_direction, dict(device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))`` for every
        parameter, drawn in nn.LSTM's order (same seed, same weights)."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def _run(self, input: Tensor, hx: _HiddenState,
             batch_sizes: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return RF.lstm(
            input, hx, self._flat_weights, bias=self.bias, num_layers=self.num_layers,
            dropout=self.dropout, training=self.training,
            bidirectional=self.bidirectional, batch_first=self.batch_first,
            batch_sizes=batch_sizes, **self._regulariser_kwargs())


class LayerNormLSTM(_RecurrentBase):
    r"""A multi-layer LayerNorm-LSTM (Ba, Kiros & Hinton 2016, section 3.1)
    with fused CPU / CUDA kernels and :class:`torch.nn.LSTM`'s interface::

        gates = LN_ih(W_ih x_t) + LN_hh(W_hh h_{t-1}) + b_ih + b_hh   # LN over 4H
        i, f, g, o = gates.chunk(4)                                   # nn.LSTM's order
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(LN_cell(c_t))                         # LN over H

    Each LN is ``(v - mean) / sqrt(var + eps) * gamma + beta`` with the biased
    variance (``F.layer_norm``); the raw ``c_t`` is carried to the next step.

    Parameters, per layer ``k`` and direction suffix ``s`` (``''`` or
    ``'_reverse'``): ``weight_ih_l{k}{s}`` ``[4H, in]``, ``weight_hh_l{k}{s}``
    ``[4H, H]``, with ``bias``: ``bias_ih_l{k}{s}``, ``bias_hh_l{k}{s}``
    ``[4H]`` (all initialised as nn.LSTM's, from the same random stream, so
    the same seed gives the same plain weights), and whatever ``bias`` says:
    ``ln_ih_weight_l{k}{s}``, ``ln_ih_bias_l{k}{s}``, ``ln_hh_weight_l{k}{s}``,
    ``ln_hh_bias_l{k}{s}`` ``[4H]``, ``ln_cell_weight_l{k}{s}``,
    ``ln_cell_bias_l{k}{s}`` ``[H]`` (weights 1, biases 0).

    A trained nn.LSTM / rnnfast.LSTM (without projection) loads into it with
    ``layer_norm_lstm.load_state_dict(lstm.state_dict(), strict=False)``: the
    plain weights match by name and the LayerNorm parameters keep their
    initial values.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout,
        bidirectional, device, dtype: as :class:`torch.nn.LSTM`.
        eps: the LayerNorm epsilon. Default 1e-5.
        zoneout_hidden, zoneout_cell, weight_dropout, variational_dropout:
            keyword-only, as :class:`LSTM`'s (the candidate output is
            ``o tanh(LN_cell(c~_t))``).

    ``forward(input, hx=None) -> (output, (h_n, c_n))`` exactly as
    nn.LSTM's: padded, batch_first, unbatched or PackedSequence input.
    """

    _name = "LayerNormLSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, eps: float = 1e-5,
                 device: _Device = None, dtype: Optional[torch.dtype] = None, *,
                 zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0,
                 weight_dropout: float = 0.0, variational_dropout: bool = False) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0)
        self._set_regularisers(zoneout_hidden, zoneout_cell, weight_dropout,
                               variational_dropout)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = float(eps)
        gates = 4 * hidden_size

        def per_direction(layer, sfx):
            entries = [(f"weight_ih_l{layer}{sfx}", (gates, self._layer_input_size(layer))),
                       (f"weight_hh_l{layer}{sfx}", (gates, int(hidden_size)))]
            if bias:
                entries += [(f"bias_ih_l{layer}{sfx}", (gates,)),
                            (f"bias_hh_l{layer}{sfx}", (gates,))]
            entries += [(f"ln_ih_weight_l{layer}{sfx}", (gates,)),
                        (f"ln_ih_bias_l{layer}{sfx}", (gates,)),
                        (f"ln_hh_weight_l{layer}{sfx}", (gates,)),
                        (f"ln_hh_bias_l{layer}{sfx}", (gates,)),
                        (f"ln_cell_weight_l{layer}{sfx}", (int(hidden_size),)),
                        (f"ln_cell_bias_l{layer}{sfx}", (int(hidden_size),))]
            return entries

        self._register_parameters(per_direction, dict(device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's ``U(-1/sqrt(H), 1/sqrt(H))`` for the weights and biases
        (drawn in nn.LSTM's order), 1 for LayerNorm gains, 0 for LayerNorm
        biases."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name in self._flat_weights_names:
            param = getattr(self, name)
            if name.startswith("ln_"):
                nn.init.ones_(param) if "_weight_" in name else nn.init.zeros_(param)
            else:
                nn.init.uniform_(param, -stdv, stdv)

    def extra_repr(self) -> str:
        """nn.LSTM's repr, and ``eps`` when not the default."""
        s = super().extra_repr()
        if self.eps != 1e-5:
            s += f", eps={self.eps}"
        return s

    def _run(self, input: Tensor, hx: _HiddenState,
             batch_sizes: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return RF.layer_norm_lstm(
            input, hx, self._flat_weights, bias=self.bias, num_layers=self.num_layers,
            dropout=self.dropout, training=self.training,
            bidirectional=self.bidirectional, batch_first=self.batch_first,
            batch_sizes=batch_sizes, eps=self.eps, **self._regulariser_kwargs())


# torch.load's default since torch 2.6 (weights_only=True) unpickles only
# allowlisted classes, so a whole model saved with torch.save that holds an
# rnnfast layer would not load. These classes are plain parameter holders:
# unpickling one only sets its __dict__ (nn.Module.__setstate__), no code of
# rnnfast runs, so they are as safe to allowlist as torch.nn.LSTM.
torch.serialization.add_safe_globals([LSTM, LayerNormLSTM])
