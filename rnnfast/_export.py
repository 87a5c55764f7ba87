"""How an rnnfast layer is captured by ``torch.onnx.export`` and
``torch.jit.trace``, with nothing asked of the user.

:mod:`rnnfast.functional` runs each layer and direction through
:func:`lstm_forward` / :func:`layer_norm_lstm_forward` here, which pick the
form the current capture understands:

- eager, ``torch.compile`` and ``torch.export``: the fused op of
  :mod:`rnnfast.ops`;
- ``torch.onnx.export`` (the torch.export-based exporter, ``dynamo=True``):
  an LSTM without projection becomes ONNX's own ``LSTM`` operator (one node
  per layer and direction, so runtimes run their fused kernel; in the
  captured program it is a ``torch.onnx.ops`` placeholder); a
  LayerNorm-LSTM, which has no ONNX operator, and an LSTM with a projection,
  which ONNX's ``LSTM`` lacks, become a ``Scan`` over time whose body holds
  one step (``LayerNormalization`` inside), the input product hoisted out of
  it;
- ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter): the
  fused LSTM op is translated to ONNX's ``LSTM`` by a symbolic registered
  below (which also takes the exporter's form of a PackedSequence, padded
  data and lengths, for a unidirectional LSTM); the LayerNorm-LSTM and the
  projection run a TorchScript loop over time that the exporter turns into
  an ONNX ``Loop``;
- ``torch.jit.trace``: the fused op, called from a small TorchScript function
  that decides at run time whether to keep activations for the backward (a
  Python-side decision would be frozen into the trace, and the trace's own
  check, run under ``torch.no_grad``, would see a different graph).

The TorchScript helpers here call ``torch.ops.rnnfast`` themselves (the one
exception to :mod:`rnnfast.ops` being the only module that does): TorchScript
can call an op by its schema, not a Python wrapper.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

__all__ = ["lstm_forward", "layer_norm_lstm_forward"]

_State = tuple[Tensor, Tensor, Tensor]

# The modules' argument checks compare sizes in Python; under torch.jit.trace
# each comparison warns that its result is frozen into the trace. They only
# decide whether to raise, not what the graph computes, so their warnings are
# noise, and torch silences those of its own nn modules the same way
# (torch.jit.TracerWarning.ignore_lib_warnings).
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                        module=r"rnnfast\.modules")


# How the current call is being captured. rnnfast.functional asks once per
# call and hands the answer to every layer; eager calls are told apart
# without torch.onnx.is_in_onnx_export(), which imports two modules each time
# (4-5 us beside an op call on the Xeon; asked three times per layer of an
# eager call, it was about a fifth of a two-layer decode step at H=8).
EAGER = "eager"  # eager, torch.compile and torch.export: the fused op
TRACE = "trace"  # torch.jit.trace
ONNX = "onnx"  # torch.onnx.export(..., dynamo=True)
ONNX_TORCHSCRIPT = "onnx-torchscript"  # torch.onnx.export(..., dynamo=False)


try:  # the flag torch.onnx.export(dynamo=True) sets while it runs
    from torch.onnx._internal.exporter import _flags as _onnx_export_flags
except ImportError:  # another torch's layout: is_in_onnx_export() alone
    _onnx_export_flags = None


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, also under Dynamo, which answers
    False for it whatever the truth (torch._dynamo's tracing-state table).
    That matters because torch.onnx.export(dynamo=True) tries
    ``torch.export(strict=False)`` first and, when that fails (as rnnfast's
    refusal of zoneout's training masks makes it), ``strict=True``, whose
    Dynamo would otherwise trace the fused ops the ONNX converter cannot
    translate and bury the refusal under a ConversionError. Dynamo reads the
    exporter's own module flag as the constant it is."""
    if torch.onnx.is_in_onnx_export():
        return True
    return bool(getattr(_onnx_export_flags, "_is_onnx_exporting", False))


def capture() -> str:
    """One of EAGER, TRACE, ONNX, ONNX_TORCHSCRIPT."""
    tracing = torch.jit.is_tracing()
    # Both ONNX exporters run under one of these: the TorchScript one traces,
    # the other runs torch.export, which sets is_compiling.
    if not tracing and not torch.compiler.is_compiling():
        return EAGER
    if _in_onnx_export():
        return ONNX_TORCHSCRIPT if tracing else ONNX
    return TRACE if tracing else EAGER


def _refuse_packed(batch_sizes: Optional[Tensor], what: str) -> None:
    if batch_sizes is not None:
        raise RuntimeError(
            f"rnnfast: ONNX export of {what} with a PackedSequence input is not "
            "supported; export with padded input [T, B, I] instead (the only "
            "PackedSequence export is of a unidirectional rnnfast.LSTM without "
            "projection by torch.onnx.export(..., dynamo=False))")


def _check_zoneout_export(mode: str, zoneout_hidden_mask: Optional[Tensor],
                          zoneout_cell_mask: Optional[Tensor]) -> None:
    """Zoneout exports in evaluation mode (its rates, a fixed formula); the
    random masks of training mode have no exported form."""
    if mode in (ONNX, ONNX_TORCHSCRIPT) and (zoneout_hidden_mask is not None
                                             or zoneout_cell_mask is not None):
        raise RuntimeError(
            "rnnfast: ONNX export of a layer with zoneout in training mode (random "
            "masks) is not supported; call model.eval() before exporting (zoneout "
            "then exports as its evaluation formula)")


def _zoneout_rates(zoneout_hidden: float, zoneout_cell: float) -> list[float]:
    """The rates as the export loops take them: nothing when both are zero
    (the list's length is a constant of the trace)."""
    return [] if zoneout_hidden == 0 and zoneout_cell == 0 else [zoneout_hidden,
                                                                zoneout_cell]


# ---- the LSTM ------------------------------------------------------------------

def lstm_forward(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor,
                 weight_hh: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
                 weight_hr: Optional[Tensor], batch_sizes: Optional[Tensor],
                 reverse: bool, training: bool,
                 zoneout_hidden_mask: Optional[Tensor] = None,
                 zoneout_cell_mask: Optional[Tensor] = None,
                 zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0, *,
                 mode: str) -> _State:
    """``ops.lstm_forward``'s ``(output, hy, cy)``, in the form the current
    capture (``mode``, :func:`capture`'s answer) understands (see the
    module's doc). Zoneout in evaluation (the rates) exports as a Scan or
    Loop over time, ONNX's LSTM having none."""
    _check_zoneout_export(mode, zoneout_hidden_mask, zoneout_cell_mask)
    zoneout = _zoneout_rates(zoneout_hidden, zoneout_cell)
    if mode == ONNX:
        _refuse_packed(batch_sizes, "rnnfast.LSTM")
        if weight_hr is None and not zoneout:
            return _onnx_lstm(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                              reverse)
        return _scan_layer(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                           weight_hr, None, reverse, 0.0, zoneout)
    if mode == ONNX_TORCHSCRIPT:
        if reverse:
            # The exporter's packing pass wants the packed input used once, by
            # one LSTM node for both directions; rnnfast's ops are per direction.
            _refuse_packed(batch_sizes, "a bidirectional rnnfast.LSTM by the "
                           "TorchScript-based exporter")
        if weight_hr is not None or zoneout:
            _refuse_packed(batch_sizes, "rnnfast.LSTM with proj_size or zoneout")
            return _loop_layer()(input, hx, cx, weight_ih, weight_hh,
                                 _present(bias_ih, bias_hh),
                                 [] if weight_hr is None else [weight_hr], [], reverse,
                                 0.0, zoneout)
        # translated to ONNX's LSTM by _lstm_symbolic below
    if mode == TRACE:
        return _traced_lstm_forward()(input, hx, cx, weight_ih, weight_hh, bias_ih,
                                      bias_hh, weight_hr, batch_sizes, reverse,
                                      zoneout_hidden_mask, zoneout_cell_mask,
                                      zoneout_hidden, zoneout_cell)
    return ops.lstm_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                            weight_hr, batch_sizes, reverse, training, zoneout_hidden_mask,
                            zoneout_cell_mask, zoneout_hidden, zoneout_cell)[:3]


def _onnx_gate_order(t: Tensor) -> Tensor:
    """torch's gate blocks i, f, g, o (along dim 0) in ONNX's order i, o, f, c.
    Slices rather than a split, so the exporter folds it into the
    initializers (its constant folding skips multi-output ops)."""
    h = t.shape[0] // 4
    return torch.cat([t[:h], t[3 * h:], t[h:2 * h], t[2 * h:3 * h]], 0)


def _onnx_lstm(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor,
               weight_hh: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
               reverse: bool) -> _State:
    """One layer and direction as ONNX's ``LSTM`` operator.

    ONNX wants ``W`` ``[1, 4H, I]`` and ``R`` ``[1, 4H, H]`` in gate order
    i, o, f, c, ``B`` ``[1, 8H]`` = ``[Wb, Rb]``, states ``[1, B, H]``, and
    returns ``Y`` ``[T, 1, B, H]``, ``Y_h`` and ``Y_c`` ``[1, B, H]``.
    """
    hidden = weight_hh.shape[0] // 4
    steps, batch = input.shape[0], input.shape[1]
    w = _onnx_gate_order(weight_ih).unsqueeze(0)
    r = _onnx_gate_order(weight_hh).unsqueeze(0)
    b = None
    if bias_ih is not None and bias_hh is not None:
        b = torch.cat([_onnx_gate_order(bias_ih), _onnx_gate_order(bias_hh)]).unsqueeze(0)
    y, y_h, y_c = torch.onnx.ops.symbolic_multi_out(
        "LSTM",
        [input, w, r, b, None, hx.unsqueeze(0), cx.unsqueeze(0)],
        {"hidden_size": int(hidden), "direction": "reverse" if reverse else "forward"},
        dtypes=[input.dtype] * 3,
        shapes=[[steps, 1, batch, hidden], [1, batch, hidden], [1, batch, hidden]],
    )
    return y.squeeze(1), y_h.squeeze(0), y_c.squeeze(0)


# ---- the LayerNorm-LSTM --------------------------------------------------------

def layer_norm_lstm_forward(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor,
                            weight_hh: Tensor, bias_ih: Optional[Tensor],
                            bias_hh: Optional[Tensor], ln_ih_weight: Tensor,
                            ln_ih_bias: Tensor, ln_hh_weight: Tensor, ln_hh_bias: Tensor,
                            ln_cell_weight: Tensor, ln_cell_bias: Tensor,
                            batch_sizes: Optional[Tensor], reverse: bool, training: bool,
                            eps: float, zoneout_hidden_mask: Optional[Tensor] = None,
                            zoneout_cell_mask: Optional[Tensor] = None,
                            zoneout_hidden: float = 0.0,
                            zoneout_cell: float = 0.0, *, mode: str) -> _State:
    """``ops.layer_norm_lstm_forward``'s ``(output, hy, cy)``, in the form
    the current capture (``mode``, :func:`capture`'s answer) understands
    (see the module's doc)."""
    ln = (ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight,
          ln_cell_bias)
    _check_zoneout_export(mode, zoneout_hidden_mask, zoneout_cell_mask)
    zoneout = _zoneout_rates(zoneout_hidden, zoneout_cell)
    if mode == ONNX:
        _refuse_packed(batch_sizes, "rnnfast.LayerNormLSTM")
        return _scan_layer(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, None,
                           ln, reverse, eps, zoneout)
    if mode == ONNX_TORCHSCRIPT:
        _refuse_packed(batch_sizes, "rnnfast.LayerNormLSTM")
        return _loop_layer()(input, hx, cx, weight_ih, weight_hh,
                             _present(bias_ih, bias_hh), [], list(ln), reverse, eps,
                             zoneout)
    if mode == TRACE:
        return _traced_layer_norm_lstm_forward()(
            input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, *ln, batch_sizes,
            reverse, eps, zoneout_hidden_mask, zoneout_cell_mask, zoneout_hidden,
            zoneout_cell)
    return ops.layer_norm_lstm_forward(
        input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, *ln, batch_sizes, reverse,
        training, eps, zoneout_hidden_mask, zoneout_cell_mask, zoneout_hidden,
        zoneout_cell)[:3]


# ---- a Scan over time (torch.export -> ONNX Scan) ------------------------------

def _scan_layer(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor,
                weight_hh: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
                weight_hr: Optional[Tensor], ln: Optional[tuple[Tensor, ...]],
                reverse: bool, eps: float, zoneout: list[float] = ()) -> _State:
    """One layer and direction as ``torch.scan`` over time, which the ONNX
    exporter writes as an ONNX ``Scan``: the input product (and its
    LayerNorm) for all steps before it, one step of the recurrence in its
    body. ``ln`` holds the six LayerNorm parameters of a LayerNorm-LSTM, or
    is None for a plain LSTM (``weight_hr``: its projection or None);
    ``zoneout`` the evaluation rates ``[z_h, z_c]`` or nothing."""
    from torch._higher_order_ops.scan import scan

    hidden = weight_hh.shape[0] // 4
    gates_x = F.linear(input, weight_ih)                       # [T, B, 4H]
    if ln is not None:
        gates_x = F.layer_norm(gates_x, (4 * hidden,), ln[0], ln[1], eps)
    if bias_ih is not None and bias_hh is not None:
        gates_x = gates_x + (bias_ih + bias_hh)

    def step(carry: tuple[Tensor, Tensor], gx: Tensor):
        h, c = carry                                           # [B, P], [B, H]
        gates_h = F.linear(h, weight_hh)                       # [B, 4H]
        if ln is not None:
            gates_h = F.layer_norm(gates_h, (4 * hidden,), ln[2], ln[3], eps)
        i, f, g, o = (gx + gates_h).chunk(4, -1)
        c_cand = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        cn = (F.layer_norm(c_cand, (hidden,), ln[4], ln[5], eps) if ln is not None
              else c_cand)
        h_cand = torch.sigmoid(o) * torch.tanh(cn)
        if weight_hr is not None:
            h_cand = F.linear(h_cand, weight_hr)
        if zoneout:  # evaluation's zoneout: s = z s_prev + (1 - z) s~
            z_h, z_c = zoneout
            h = z_h * h + (1 - z_h) * h_cand
            c = z_c * c + (1 - z_c) * c_cand
        else:
            h, c = h_cand, c_cand
        return (h, c), h.clone()  # a scan output may not alias its carry

    (hy, cy), output = scan(step, (hx, cx), gates_x, reverse=reverse)
    return output, hy, cy


# ---- torch.jit.trace: decide about saving at run time ---------------------------

_traced_fns: dict[str, object] = {}


def _script(fn):
    """``torch.jit.script(fn)`` without the deprecation notice: the user
    asked for a trace or an export, not for TorchScript."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(fn)


def _traced_lstm_forward():
    """A TorchScript function calling the fused LSTM op; it asks for the
    saved activations only when autograd will need them, decided when the
    traced module runs."""
    fn = _traced_fns.get("lstm")
    if fn is None:
        def rnnfast_lstm_layer(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor,
                               weight_hh: Tensor, bias_ih: Optional[Tensor],
                               bias_hh: Optional[Tensor], weight_hr: Optional[Tensor],
                               batch_sizes: Optional[Tensor], reverse: bool,
                               zoneout_hidden_mask: Optional[Tensor],
                               zoneout_cell_mask: Optional[Tensor],
                               zoneout_hidden: float, zoneout_cell: float
                               ) -> tuple[Tensor, Tensor, Tensor]:
            save = torch.is_grad_enabled() and (
                input.requires_grad or hx.requires_grad or cx.requires_grad
                or weight_ih.requires_grad or weight_hh.requires_grad
                or (bias_ih is not None and bias_ih.requires_grad)
                or (bias_hh is not None and bias_hh.requires_grad)
                or (weight_hr is not None and weight_hr.requires_grad))
            out, hy, cy, gates, cells, cell_states = torch.ops.rnnfast.lstm_forward(
                input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                batch_sizes, reverse, save, zoneout_hidden_mask, zoneout_cell_mask,
                zoneout_hidden, zoneout_cell)
            return out, hy, cy

        fn = _traced_fns["lstm"] = _script(rnnfast_lstm_layer)
    return fn


def _traced_layer_norm_lstm_forward():
    """As :func:`_traced_lstm_forward`, for the fused LayerNorm-LSTM op."""
    fn = _traced_fns.get("layer_norm_lstm")
    if fn is None:
        def rnnfast_layer_norm_lstm_layer(
                input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor,
                weight_hh: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
                ln_ih_weight: Tensor, ln_ih_bias: Tensor, ln_hh_weight: Tensor,
                ln_hh_bias: Tensor, ln_cell_weight: Tensor, ln_cell_bias: Tensor,
                batch_sizes: Optional[Tensor], reverse: bool, eps: float,
                zoneout_hidden_mask: Optional[Tensor], zoneout_cell_mask: Optional[Tensor],
                zoneout_hidden: float, zoneout_cell: float
        ) -> tuple[Tensor, Tensor, Tensor]:
            save = torch.is_grad_enabled() and (
                input.requires_grad or hx.requires_grad or cx.requires_grad
                or weight_ih.requires_grad or weight_hh.requires_grad
                or (bias_ih is not None and bias_ih.requires_grad)
                or (bias_hh is not None and bias_hh.requires_grad)
                or ln_ih_weight.requires_grad or ln_ih_bias.requires_grad
                or ln_hh_weight.requires_grad or ln_hh_bias.requires_grad
                or ln_cell_weight.requires_grad or ln_cell_bias.requires_grad)
            out, hy, cy, cells, n_ih, n_hh, stats, cell_states = (
                torch.ops.rnnfast.layer_norm_lstm_forward(
                    input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, ln_ih_weight,
                    ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias,
                    batch_sizes, reverse, save, eps, zoneout_hidden_mask,
                    zoneout_cell_mask, zoneout_hidden, zoneout_cell))
            return out, hy, cy

        fn = _traced_fns["layer_norm_lstm"] = _script(rnnfast_layer_norm_lstm_layer)
    return fn


# ---- torch.onnx.export(..., dynamo=False) ---------------------------------------

def _present(*tensors: Optional[Tensor]) -> list[Tensor]:
    """All of ``tensors``, or an empty list if one is None."""
    return [] if any(t is None for t in tensors) else list(tensors)


def _loop_layer():
    """A TorchScript loop over time for one layer and direction, which the
    TorchScript-based ONNX exporter writes as an ONNX ``Loop`` (one step in
    its body). Lists stand for optional arguments (a list's length is a
    constant of the trace, so the exporter drops the branches it decides,
    where an Optional tensor would leave an ONNX ``If`` in the loop):
    ``biases`` holds ``bias_ih, bias_hh`` or nothing, ``projection``
    ``weight_hr`` or nothing, ``ln`` the six LayerNorm parameters of a
    LayerNorm-LSTM or nothing, ``zoneout`` the evaluation zoneout rates
    ``[z_h, z_c]`` or nothing."""
    fn = _traced_fns.get("loop")
    if fn is None:
        def rnnfast_loop_layer(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor,
                               weight_hh: Tensor, biases: list[Tensor],
                               projection: list[Tensor], ln: list[Tensor], reverse: bool,
                               eps: float, zoneout: list[float]
                               ) -> tuple[Tensor, Tensor, Tensor]:
            hidden = weight_hh.size(0) // 4
            gates_x = torch.matmul(input, weight_ih.t())           # [T, B, 4H]
            if len(ln) == 6:
                gates_x = F.layer_norm(gates_x, [4 * hidden], ln[0], ln[1], eps)
            if len(biases) == 2:
                gates_x = gates_x + (biases[0] + biases[1])
            if reverse:
                gates_x = gates_x.flip(0)
            h = hx
            c = cx
            outputs: list[Tensor] = []
            for t in range(gates_x.size(0)):
                gates_h = torch.matmul(h, weight_hh.t())
                if len(ln) == 6:
                    gates_h = F.layer_norm(gates_h, [4 * hidden], ln[2], ln[3], eps)
                gates = gates_x[t] + gates_h
                i, f, g, o = gates.chunk(4, 1)
                c_cand = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                if len(ln) == 6:
                    h_cand = torch.sigmoid(o) * torch.tanh(
                        F.layer_norm(c_cand, [hidden], ln[4], ln[5], eps))
                else:
                    h_cand = torch.sigmoid(o) * torch.tanh(c_cand)
                if len(projection) == 1:
                    h_cand = torch.matmul(h_cand, projection[0].t())
                if len(zoneout) == 2:
                    h = zoneout[0] * h + (1.0 - zoneout[0]) * h_cand
                    c = zoneout[1] * c + (1.0 - zoneout[1]) * c_cand
                else:
                    h = h_cand
                    c = c_cand
                outputs.append(h)
            output = torch.stack(outputs)
            if reverse:
                output = output.flip(0)
            return output, h, c

        fn = _traced_fns["loop"] = _script(rnnfast_loop_layer)
    return fn


def _lstm_symbolic(g, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                   batch_sizes, reverse, training, zoneout_hidden_mask=None,
                   zoneout_cell_mask=None, zoneout_hidden=None, zoneout_cell=None):
    """``rnnfast::lstm_forward`` (without projection) as ONNX's ``LSTM``,
    for the TorchScript-based exporter: the weights gathered
    into ONNX's gate order, the two biases concatenated, the states given a
    direction axis. The last three outputs (saved activations) are unused in
    an exported graph and come out empty."""
    from torch.onnx import symbolic_helper as sh

    hidden = sh._get_tensor_sizes(weight_hh)[0] // 4
    order = torch.cat([torch.arange(0, hidden), torch.arange(3 * hidden, 4 * hidden),
                       torch.arange(hidden, 3 * hidden)])
    perm = g.op("Constant", value_t=order)

    def onnx_layout(w):
        return sh._unsqueeze_helper(g, g.op("Gather", w, perm, axis_i=0), [0])

    def missing():
        value = g.op("prim::Constant")
        value.setType(torch._C.OptionalType.ofTensor())
        return value

    # The exporter writes a PackedSequence as the padded input and its
    # lengths: batch_sizes then holds the lengths, ONNX's sequence_lens.
    # (int32 already: the exporter's pack_padded_sequence casts them.)
    lengths = missing() if sh._is_none(batch_sizes) else batch_sizes
    b = missing()
    if not sh._is_none(bias_ih) and not sh._is_none(bias_hh):
        b = sh._unsqueeze_helper(
            g, g.op("Concat", g.op("Gather", bias_ih, perm, axis_i=0),
                    g.op("Gather", bias_hh, perm, axis_i=0), axis_i=0), [0])
    # (zoneout never reaches here: lstm_forward above exports it as a Loop)
    direction = "reverse" if sh._maybe_get_const(reverse, "b") else "forward"
    y, y_h, y_c = g.op(
        "LSTM", input, onnx_layout(weight_ih), onnx_layout(weight_hh), b, lengths,
        sh._unsqueeze_helper(g, hx, [0]), sh._unsqueeze_helper(g, cx, [0]),
        hidden_size_i=hidden, direction_s=direction, outputs=3)
    unused = g.op("Constant", value_t=torch.empty(0))
    return (sh._squeeze_helper(g, y, [1]), sh._squeeze_helper(g, y_h, [0]),
            sh._squeeze_helper(g, y_c, [0]), unused, unused, unused)


_ONNX_MIN_OPSET = 7  # ONNX's LSTM exists from opset 7 (torch's lowest)
if hasattr(torch.onnx, "register_custom_op_symbolic"):  # gone with the TorchScript exporter
    torch.onnx.register_custom_op_symbolic("rnnfast::lstm_forward", _lstm_symbolic,
                                           _ONNX_MIN_OPSET)
