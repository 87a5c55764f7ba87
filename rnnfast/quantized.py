"""Int8 dynamic-quantized inference on the CPU: :class:`LSTM` and
:class:`LayerNormLSTM`, and :func:`quantize_dynamic`, which puts them in
place of the float layers of a model.

What is quantized how:

* weights (``weight_ih``, ``weight_hh`` and a projection's ``weight_hr``):
  int8, symmetric, one scale per output row (each of the 4H gate rows its
  own): ``scale[j] = max|W[j, :]| / 127``, ``W_q = round(W / scale)``;
* activations (each row of ``x_t``, ``h_{t-1}`` and a projection's input)
  at each use, symmetric per row: ``a_scale = max|a| / 127``;
* products accumulated exactly in int32 and dequantized with
  ``a_scale[b] * w_scale[j]``; biases, LayerNorms, the cell state, the cell
  math and every output in float32.

The modules hold their weights as buffers: ``weight_*`` (int8, nn.LSTM's
names and shapes) with ``weight_*_scale`` (float32), and the float32
biases and LayerNorm parameters under their float names, so ``state_dict``
and ``load_state_dict`` round-trip them and a whole model saved with
``torch.save`` loads with ``torch.load``'s default ``weights_only=True``.
The kernels read a packed copy of each int8 weight, made when the module is
built or loaded (not saved).
"""

from __future__ import annotations

import copy
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _quantized_ops as qops
from . import functional as RF
from . import modules as float_modules
from .modules import _RecurrentBase

__all__ = ["LSTM", "LayerNormLSTM", "quantize_dynamic", "quantize_weight"]

_PACKED = "_packed"  # suffix of a packed weight's (non-persistent) buffer
_SCALE = "_scale"    # suffix of a weight's scale buffer


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 quantization of a float weight ``[n, k]``:
    returns ``(W_q, scale)``, int8 ``[n, k]`` and float32 ``[n]``, with
    ``W ~ scale[:, None] * W_q`` (a row of zeros gets scale 1)."""
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _zoneout_of(mod: nn.Module) -> dict:
    """The zoneout rates of a float module (none for nn.LSTM). Zoneout
    changes the evaluation output (s_t = z s_{t-1} + (1 - z) s~_t), so the
    int8 module keeps it; DropConnect and variational dropout act only in
    training and have nothing to carry over."""
    return dict(zoneout_hidden=float(getattr(mod, "zoneout_hidden", 0.0)),
                zoneout_cell=float(getattr(mod, "zoneout_cell", 0.0)))


class _QuantizedRecurrent(_RecurrentBase):
    """Buffers, packing, loading and the refusal of training shared by the
    int8 modules; forward-argument handling is the float modules'."""

    _float_name = "rnnfast.LSTM"

    def _register_buffers(self, per_direction) -> None:
        """Registers, per layer then direction, what ``per_direction(layer,
        suffix)`` lists as ``(name, shape, quantized)``: an int8 weight with
        its scale (and packed copy) when quantized, else a float32 buffer."""
        self._all_weights: list[list[str]] = []
        self._quantized_names: list[str] = []
        for layer in range(self.num_layers):
            for direction in range(self._directions):
                entries = per_direction(layer, self._suffix(direction))
                for name, shape, quantized in entries:
                    if quantized:
                        self.register_buffer(name, torch.zeros(shape, dtype=torch.int8))
                        self.register_buffer(name + _SCALE, torch.ones(shape[0]))
                        self._quantized_names.append(name)
                    else:
                        self.register_buffer(name, torch.zeros(shape))
                self._all_weights.append([name for name, _, _ in entries])
        self._repack()

    def _repack(self) -> None:
        """Packs every int8 weight into the layout the kernels read (a
        non-persistent buffer: rebuilt here after building or loading, never
        saved)."""
        for name in self._quantized_names:
            packed = qops.quantized_pack_weight(getattr(self, name))
            if name + _PACKED in self._buffers:
                self._buffers[name + _PACKED] = packed
            else:
                self.register_buffer(name + _PACKED, packed, persistent=False)
        self._forget_op_arguments()

    # The stacked op's weights (every layer's and direction's, in order),
    # gathered once and kept (a one-step decode call would otherwise spend
    # as long looking them up as the kernels take); forgotten whenever a
    # buffer may have been replaced: repacking (building, loading),
    # assigning a buffer, and Module._apply (.to(), .float(), ...).
    def _op_arguments(self) -> list[Optional[Tensor]]:
        args = self.__dict__.get("_op_args")
        if args is None:
            args = [t for names in self._all_weights for t in self._cell_arguments(names)]
            self.__dict__["_op_args"] = args
        return args

    def _forget_op_arguments(self) -> None:
        self.__dict__["_op_args"] = None

    def __setattr__(self, name, value) -> None:
        if name in self.__dict__.get("_buffers", ()):
            self._forget_op_arguments()
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        self._forget_op_arguments()
        return super()._apply(fn, recurse)

    def _weight(self, name: Optional[str]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(packed weight, scale) of an int8 weight, (None, None) for None."""
        if name is None:
            return None, None
        return self._buffers[name + _PACKED], self._buffers[name + _SCALE]

    @classmethod
    def _copy_from(cls, qmod: "_QuantizedRecurrent", mod: nn.Module) -> "_QuantizedRecurrent":
        for names in qmod._all_weights:
            for name in names:
                source = getattr(mod, name)
                if name in qmod._quantized_names:
                    q, scale = quantize_weight(source)
                    qmod._buffers[name] = q
                    qmod._buffers[name + _SCALE] = scale
                else:
                    qmod._buffers[name] = source.detach().to(device="cpu",
                                                             dtype=torch.float32).clone()
        qmod._repack()
        return qmod

    def _dtype(self) -> torch.dtype:
        return torch.float32

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        for name in self._quantized_names:
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor) and value.dtype != torch.int8:
                error_msgs.append(
                    f"{type(self).__name__}: {prefix + name} must be an int8 weight, got "
                    f"{value.dtype}: a float state_dict does not load into a quantized "
                    f"module; load it into the float module ({self._float_name}) and "
                    f"quantize that with rnnfast.quantize_dynamic")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        self._repack()

    def __getstate__(self):
        # The packed copies are rebuilt on load (__setstate__): not pickled.
        state = self.__dict__.copy()
        state["_buffers"] = {k: v for k, v in self._buffers.items()
                             if not k.endswith(_PACKED)}
        state["_op_args"] = None
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._repack()

    def _refuse_training(self, data: Tensor, hx: Optional[tuple[Tensor, Tensor]]) -> None:
        if not torch.is_grad_enabled():
            return
        tensors = [data] + ([t for t in hx if isinstance(t, Tensor)]
                            if isinstance(hx, (tuple, list)) else [])
        tensors += list(self._buffers.values())  # a leaf module: its own buffers
        if any(isinstance(t, Tensor) and t.requires_grad for t in tensors):
            raise RuntimeError(
                f"rnnfast.quantized.{type(self).__name__} is for inference only: its int8 "
                f"weights have no gradients, and an input or buffer requires grad. Train "
                f"the float module ({self._float_name}) and quantize it afterwards with "
                f"rnnfast.quantize_dynamic; call this one under torch.no_grad() or "
                f"torch.inference_mode(), or with inputs that do not require grad")

    def forward(self, input: Union[Tensor, PackedSequence],
                hx: Optional[tuple[Tensor, Tensor]] = None):
        """``(output, (h_n, c_n))``, as the float module's forward (padded,
        batch_first, unbatched or PackedSequence input; float32 on the CPU),
        never with dropout. Refuses inputs that require grad in grad mode."""
        data = input.data if isinstance(input, PackedSequence) else input
        self._refuse_training(data, hx)
        if isinstance(data, Tensor) and data.device.type != "cpu":
            raise RuntimeError(
                f"rnnfast.quantized.{type(self).__name__} runs on the CPU only (its int8 "
                f"kernels are CPU kernels); got an input on {data.device}. Move the input "
                f"to the CPU, or use the float module on {data.device}")
        return super().forward(input, hx)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dtype=torch.qint8"

    def _cell_arguments(self, names: list[str]) -> tuple:
        """The weight arguments of the cell's op (those after ``input, hx,
        cx``) for the layer and direction whose buffers are ``names``."""
        raise NotImplementedError

    def _stack(self, input: Tensor, hx: tuple[Tensor, Tensor],
               batch_sizes: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Every layer and direction through the cell's stacked int8 op."""
        raise NotImplementedError

    def _run(self, input: Tensor, hx: tuple[Tensor, Tensor],
             batch_sizes: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        # The layers composed in C++ (one call per forward), time-major as
        # rnnfast.functional composes the float ones.
        transpose = self.batch_first and batch_sizes is None
        output, h_n, c_n = self._stack(input.transpose(0, 1) if transpose else input, hx,
                                       batch_sizes)
        return (output.transpose(0, 1) if transpose else output), h_n, c_n


class LSTM(_QuantizedRecurrent):
    r"""An int8 dynamic-quantized LSTM for inference on the CPU, with
    :class:`torch.nn.LSTM`'s forward contract (padded, batch_first,
    unbatched, PackedSequence, hx, bidirectional, multi-layer, proj_size).

    Build it from a trained float LSTM with :meth:`from_float` or
    :func:`quantize_dynamic`; constructed directly (same arguments as
    nn.LSTM) it holds zero weights until it loads a quantized state_dict.

    Buffers per layer ``k`` and direction suffix ``s``: ``weight_ih_l{k}{s}``
    ``[4H, in]``, ``weight_hh_l{k}{s}`` ``[4H, P]`` (and
    ``weight_hr_l{k}{s}`` ``[P, H]``) in int8 with ``..._scale`` float32
    per-row scales; ``bias_ih_l{k}{s}``, ``bias_hh_l{k}{s}`` float32. The
    dropout argument is kept for the repr and never applied.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, *,
                 zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size)
        self._set_regularisers(zoneout_hidden, zoneout_cell, 0.0, False)
        gates = 4 * int(hidden_size)

        def per_direction(layer, sfx):
            entries = [(f"weight_ih_l{layer}{sfx}", (gates, self._layer_input_size(layer)), True),
                       (f"weight_hh_l{layer}{sfx}", (gates, self._out_size), True)]
            if bias:
                entries += [(f"bias_ih_l{layer}{sfx}", (gates,), False),
                            (f"bias_hh_l{layer}{sfx}", (gates,), False)]
            if proj_size > 0:
                entries.append((f"weight_hr_l{layer}{sfx}", (proj_size, int(hidden_size)), True))
            return entries

        self._register_buffers(per_direction)

    @classmethod
    def from_float(cls, mod: nn.Module) -> "LSTM":
        """The int8 copy of a float ``torch.nn.LSTM`` or ``rnnfast.LSTM``
        (any float dtype or device; the copy lives on the CPU)."""
        if type(mod) not in (nn.LSTM, float_modules.LSTM):
            raise TypeError("rnnfast.quantized.LSTM.from_float: expected a torch.nn.LSTM "
                            f"or rnnfast.LSTM, got {type(mod).__name__}")
        qmod = cls(mod.input_size, mod.hidden_size, mod.num_layers, mod.bias,
                   mod.batch_first, float(mod.dropout), mod.bidirectional, mod.proj_size,
                   **_zoneout_of(mod))
        return cls._copy_from(qmod, mod)

    def _cell_arguments(self, names):
        biases = ((self._buffers[names[2]], self._buffers[names[3]]) if self.bias
                  else (None, None))
        return (*self._weight(names[0]), *self._weight(names[1]), *biases,
                *self._weight(names[-1] if self.proj_size > 0 else None))

    def _stack(self, input, hx, batch_sizes):
        return qops.quantized_lstm_stack(
            input, hx[0], hx[1], self._op_arguments(), self.num_layers, self.bidirectional,
            batch_sizes, self.zoneout_hidden, self.zoneout_cell)


class LayerNormLSTM(_QuantizedRecurrent):
    r"""An int8 dynamic-quantized :class:`rnnfast.LayerNormLSTM` for
    inference on the CPU, with its forward contract. ``weight_ih`` and
    ``weight_hh`` are int8 with per-row scales (as :class:`LSTM`'s); the
    biases and the LayerNorm parameters (``ln_*``) stay float32, and the
    LayerNorms run in float32 on the dequantized products. Build it with
    :meth:`from_float` or :func:`quantize_dynamic`.
    """

    _name = "LayerNormLSTM"
    _float_name = "rnnfast.LayerNormLSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, eps: float = 1e-5, *,
                 zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0)
        self._set_regularisers(zoneout_hidden, zoneout_cell, 0.0, False)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = float(eps)
        gates, hidden = 4 * int(hidden_size), int(hidden_size)

        def per_direction(layer, sfx):
            entries = [(f"weight_ih_l{layer}{sfx}", (gates, self._layer_input_size(layer)), True),
                       (f"weight_hh_l{layer}{sfx}", (gates, hidden), True)]
            if bias:
                entries += [(f"bias_ih_l{layer}{sfx}", (gates,), False),
                            (f"bias_hh_l{layer}{sfx}", (gates,), False)]
            entries += [(f"{n}_l{layer}{sfx}", (gates if n.startswith(("ln_ih", "ln_hh"))
                                                 else hidden,), False)
                        for n in RF._LN_NAMES]
            return entries

        self._register_buffers(per_direction)

    @classmethod
    def from_float(cls, mod: nn.Module) -> "LayerNormLSTM":
        """The int8 copy of a float ``rnnfast.LayerNormLSTM``."""
        if type(mod) is not float_modules.LayerNormLSTM:
            raise TypeError("rnnfast.quantized.LayerNormLSTM.from_float: expected a "
                            f"rnnfast.LayerNormLSTM, got {type(mod).__name__}")
        qmod = cls(mod.input_size, mod.hidden_size, mod.num_layers, mod.bias,
                   mod.batch_first, float(mod.dropout), mod.bidirectional, mod.eps,
                   **_zoneout_of(mod))
        return cls._copy_from(qmod, mod)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", eps={self.eps}" if self.eps != 1e-5 else "")

    def _cell_arguments(self, names):
        biases = ((self._buffers[names[2]], self._buffers[names[3]]) if self.bias
                  else (None, None))
        return (*self._weight(names[0]), *self._weight(names[1]), *biases,
                *(self._buffers[n] for n in names[-len(RF._LN_NAMES):]))

    def _stack(self, input, hx, batch_sizes):
        return qops.quantized_layer_norm_lstm_stack(
            input, hx[0], hx[1], self._op_arguments(), self.num_layers, self.bidirectional,
            batch_sizes, self.eps, self.zoneout_hidden, self.zoneout_cell)


def _quantized_copy(mod: nn.Module) -> Optional[nn.Module]:
    """The int8 module for a float recurrent layer rnnfast quantizes, else None."""
    if type(mod) in (nn.LSTM, float_modules.LSTM):
        return LSTM.from_float(mod)
    if type(mod) is float_modules.LayerNormLSTM:
        return LayerNormLSTM.from_float(mod)
    return None


def quantize_dynamic(model: nn.Module, dtype: torch.dtype = torch.qint8) -> nn.Module:
    """A copy of ``model`` in which every ``torch.nn.LSTM``, ``rnnfast.LSTM``
    and ``rnnfast.LayerNormLSTM`` (the root module included; subclasses are
    left alone, as they may change forward) is replaced by its int8
    inference module from :mod:`rnnfast.quantized`; ``model`` itself is not
    changed. The quantized layers run on the CPU.

    Raises:
        ValueError: ``dtype`` is not ``torch.qint8`` (the only one).
    """
    if dtype != torch.qint8:
        raise ValueError(f"rnnfast.quantize_dynamic: only dtype=torch.qint8 is supported, "
                         f"got {dtype}")
    root = _quantized_copy(model)
    if root is not None:
        return root
    model = copy.deepcopy(model)

    def replace(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            quantized = _quantized_copy(child)
            if quantized is not None:
                setattr(parent, name, quantized)
            else:
                replace(child)

    replace(model)
    return model


# Whole quantized models load with torch.load's default weights_only=True.
# Unpickling one sets its attributes and repacks its int8 buffers
# (__setstate__): no other code runs.
torch.serialization.add_safe_globals([LSTM, LayerNormLSTM])
