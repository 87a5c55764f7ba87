"""The rnnfast custom ops: typed wrappers, fake (meta) kernels and autograd.

This is the only module that touches ``torch.ops.rnnfast``. The ops are
declared in C++ (csrc/rnnfast.cpp) and implemented per device there; here
they get shape functions for torch.compile / torch.export and their
autograd formulas, whose backward is itself an op.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _torch_version

try:
    from . import _C  # loads the library and registers the ops
except ImportError as e:  # most often: built against another torch
    raise _torch_version.load_error(e, torch.__version__, Path(__file__).parent) from e
_MISMATCH = _torch_version.mismatch_warning(_C.built_against_torch, torch.__version__)
if _MISMATCH:
    warnings.warn(_MISMATCH, RuntimeWarning, stacklevel=2)

__all__ = ["lstm_forward", "lstm_backward", "layer_norm_lstm_forward",
           "layer_norm_lstm_backward"]


def _check_same_device(input: Tensor, **tensors: Optional[Tensor]) -> None:
    """What the real kernels check, for the fake (meta) kernels, in their
    words (torch.nn.LSTM's, then the argument)."""
    for name, t in tensors.items():
        if t is not None:
            kind = "hidden" if name in ("hx", "cx") else "parameter"
            torch._check(t.device == input.device,
                         lambda: f"Input and {kind} tensors are not at the same device, "
                                 f"found input tensor at {input.device} and {kind} tensor "
                                 f"at {t.device} (rnnfast: {name})")


def _contiguous_like(t: Tensor) -> Tensor:
    """An empty tensor of ``t``'s shape, dtype and device in the contiguous
    layout, whatever ``t``'s layout: every tensor the real kernels return is
    contiguous (``torch.empty_like`` would keep a transposed input's strides,
    e.g. a batch_first input's gradient, and Inductor checks the promise)."""
    return t.new_empty(t.shape)


def _call(op, function: type, args: tuple):
    """``op(*args)``, by the route the moment needs: under a torch.func
    transform, through ``function`` (see the section at the end); when no
    gradient can be asked of the result, straight to the device's kernel;
    else through the op's autograd kernel.

    The straight call does what that kernel does without a gradient (the
    call below autograd), without its cost: ``torch.library.register_autograd``
    makes it a Python function that runs at every call, also under
    ``torch.no_grad()``, and it cost 15 us a call on the Xeon (a two-layer
    decode step at H=8 took 156 us under no_grad, 111 under
    inference_mode). Not while torch.compile, torch.export or torch.jit.trace
    records the call: they see the op as they always did."""
    if _functorch_active():
        return function.apply(*args)
    if (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))):
        with _below_autograd():
            return op(*args)
    return op(*args)


# The guard autograd's own kernel enters to call below itself (torch.library's
# register_autograd uses it alike); a name of ours, so tests can count our uses.
_below_autograd = torch._C._AutoDispatchBelowAutograd


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrence keeps its workspace in."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lstm_forward(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    weight_hr: Optional[Tensor],
    batch_sizes: Optional[Tensor],
    reverse: bool,
    training: bool,
    zoneout_hidden_mask: Optional[Tensor] = None,
    zoneout_cell_mask: Optional[Tensor] = None,
    zoneout_hidden: float = 0.0,
    zoneout_cell: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction over a whole time-major sequence.

    Args:
        input: ``[T, B, I]``, or packed rows ``[N, I]`` when ``batch_sizes``
            (int64 CPU tensor ``[T]``, non-increasing) is given.
        hx, cx: initial states ``[B, P]`` and ``[B, H]``.
        weight_ih: ``[4H, I]``; weight_hh: ``[4H, P]``; biases ``[4H]`` or
            None; weight_hr: ``[P, H]`` (projection) or None. Gate order
            i, f, g, o, as torch.nn.LSTM.
        reverse: run from the last step to the first.
        training: keep what the backward needs.
        zoneout_hidden_mask, zoneout_cell_mask: zoneout (Krueger et al.
            2016) in training: bool masks shaped like the output (``P``
            wide) and like the cell states (``H`` wide); where True the
            state keeps its previous value,
            ``s_t = m s_{t-1} + (1 - m) s~_t`` (``h`` after the projection).
        zoneout_hidden, zoneout_cell: zoneout in evaluation, without a mask:
            ``s_t = z s_{t-1} + (1 - z) s~_t`` with the rate ``z`` in
            ``[0, 1)``. A mask and a nonzero rate of the same state are
            refused.

    Returns:
        ``(output, hy, cy, gates, cells, cell_states)``: output
        ``[T, B, P]`` or ``[N, P]``, final states ``[B, P]``, ``[B, H]``,
        and the saved activations (empty unless training; ``cells`` are the
        ``c~_t`` the outputs were computed from, ``cell_states`` the carried
        ``c_t``, empty without zoneout on ``c``).
    """
    args = (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
            batch_sizes, reverse, training, zoneout_hidden_mask, zoneout_cell_mask,
            zoneout_hidden, zoneout_cell)
    return _call(torch.ops.rnnfast.lstm_forward.default, _LSTMForwardFunction, args)


def lstm_backward(
    grad_output: Tensor,
    grad_hy: Tensor,
    grad_cy: Tensor,
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    weight_hr: Optional[Tensor],
    batch_sizes: Optional[Tensor],
    reverse: bool,
    output: Tensor,
    gates: Tensor,
    cells: Tensor,
    output_mask: Sequence[bool] = (True,) * 7,
    cell_states: Optional[Tensor] = None,
    zoneout_hidden_mask: Optional[Tensor] = None,
    zoneout_cell_mask: Optional[Tensor] = None,
    zoneout_hidden: float = 0.0,
    zoneout_cell: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`lstm_forward` from its saved activations.

    Returns ``(grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh,
    grad_bias, grad_weight_hr)``; ``grad_bias`` is the gradient of each of
    the two biases, ``grad_weight_hr`` is empty without a projection.

    ``output_mask`` (seven bools, one per output, as ATen's
    ``_cudnn_rnn_backward``) says which gradients to compute: the reverse
    time loop always runs, but the GEMM or reduction of an output not asked
    for is skipped and that output is an empty ``[0]`` tensor of the dtype
    and device of the argument it is the gradient of (``weight_ih`` for
    ``grad_bias``).

    The zoneout arguments are the forward's, and ``cell_states`` its output
    of that name (needed with zoneout on ``c``).
    """
    args = (grad_output, grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh,
            weight_hr, batch_sizes, reverse, output, gates, cells, list(output_mask),
            cell_states, zoneout_hidden_mask, zoneout_cell_mask, zoneout_hidden,
            zoneout_cell)
    return _call(torch.ops.rnnfast.lstm_backward.default, _LSTMBackwardFunction, args)


def _zoneout_on_cell(zoneout_cell_mask: Optional[Tensor], zoneout_cell: float) -> bool:
    return zoneout_cell_mask is not None or zoneout_cell != 0


def _fake_forward(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor,
                  batch_sizes: Optional[Tensor], training: bool, out_size: int,
                  saved_widths: tuple[int, ...], zoneout_cell: bool,
                  **weights: Optional[Tensor]):
    """Shapes of a forward op's outputs: output, hy, cy, then one
    ``[rows, width]`` saved activation per entry of ``saved_widths`` (no rows
    unless training), then the carried cell states ``[rows, H]`` (no rows
    unless training with zoneout on c), in the compute dtype."""
    torch._check(input.dim() == (2 if batch_sizes is not None else 3),
                 lambda: f"rnnfast: unexpected input of {input.dim()} dimensions")
    _check_same_device(input, hx=hx, cx=cx, weight_ih=weight_ih, **weights)
    torch._check(input.shape[-1] == weight_ih.shape[1],
                 lambda: "rnnfast: input size does not match weight_ih")
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    saved = rows if training else 0
    cdt = _compute_dtype(input.dtype)
    hidden = weight_ih.shape[0] // 4
    return (
        input.new_empty((*input.shape[:-1], out_size)),
        _contiguous_like(hx),
        _contiguous_like(cx),
        *(input.new_empty((saved, width), dtype=cdt) for width in saved_widths),
        input.new_empty((saved if zoneout_cell else 0, hidden), dtype=cdt),
    )


@torch.library.register_fake("rnnfast::lstm_forward")
def _lstm_forward_fake(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                       weight_hr, batch_sizes, reverse, training,
                       zoneout_hidden_mask=None, zoneout_cell_mask=None,
                       zoneout_hidden=0.0, zoneout_cell=0.0):
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    return _fake_forward(input, hx, cx, weight_ih, batch_sizes, training, out_size,
                         (4 * hidden, hidden),
                         _zoneout_on_cell(zoneout_cell_mask, zoneout_cell),
                         weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh,
                         weight_hr=weight_hr, zoneout_hidden_mask=zoneout_hidden_mask,
                         zoneout_cell_mask=zoneout_cell_mask)


def _masked(output_mask, grads):
    """The fake kernels' outputs under ``output_mask``: each entry of
    ``grads`` is ``(like, make)``; an output asked for is ``make()``, one not
    asked for an empty ``[0]`` tensor like ``like`` (what the real kernels
    return)."""
    torch._check(len(output_mask) == len(grads),
                 lambda: f"rnnfast: output_mask must have {len(grads)} entries")
    return tuple(make() if asked else like.new_empty((0,))
                 for asked, (like, make) in zip(output_mask, grads))


@torch.library.register_fake("rnnfast::lstm_backward")
def _lstm_backward_fake(grad_output, grad_hy, grad_cy, input, hx, cx, weight_ih,
                        weight_hh, weight_hr, batch_sizes, reverse, output, gates,
                        cells, output_mask=(True,) * 7, cell_states=None,
                        zoneout_hidden_mask=None, zoneout_cell_mask=None,
                        zoneout_hidden=0.0, zoneout_cell=0.0):
    hr_like = weight_hr if weight_hr is not None else weight_ih
    return _masked(output_mask, (
        (input, lambda: _contiguous_like(input)),
        (hx, lambda: _contiguous_like(hx)),
        (cx, lambda: _contiguous_like(cx)),
        (weight_ih, lambda: _contiguous_like(weight_ih)),
        (weight_hh, lambda: _contiguous_like(weight_hh)),
        (weight_ih, lambda: weight_ih.new_empty((weight_ih.shape[0],))),
        (hr_like, lambda: _contiguous_like(hr_like) if weight_hr is not None
         else weight_ih.new_empty((0,))),
    ))


def _save_zoneout(ctx, zoneout_hidden_mask, zoneout_cell_mask, zoneout_hidden,
                  zoneout_cell, cell_states):
    """What a backward needs of a forward's zoneout: its masks (in
    ``ctx.saved_tensors``' tail, with the carried cell states) and rates."""
    ctx.zoneout_rates = (zoneout_hidden, zoneout_cell)
    return (zoneout_hidden_mask, zoneout_cell_mask, cell_states)


def _zoneout_kwargs(ctx, zoneout_hidden_mask, zoneout_cell_mask, cell_states):
    return dict(cell_states=cell_states, zoneout_hidden_mask=zoneout_hidden_mask,
                zoneout_cell_mask=zoneout_cell_mask,
                zoneout_hidden=ctx.zoneout_rates[0], zoneout_cell=ctx.zoneout_rates[1])


def _lstm_setup_context(ctx, inputs, output):
    (input, hx, cx, weight_ih, weight_hh, bias_ih, _bias_hh, weight_hr,
     batch_sizes, reverse, training, zoneout_hidden_mask, zoneout_cell_mask,
     zoneout_hidden, zoneout_cell) = inputs
    out, hy, cy, gates, cells, cell_states = output
    ctx.mark_non_differentiable(gates, cells, cell_states)
    # No zero-filled [N, 4H] gradients for the saved activations: a missing
    # gradient arrives as None.
    ctx.set_materialize_grads(False)
    if not training:  # nothing was saved: these outputs have no gradient
        ctx.mark_non_differentiable(out, hy, cy)
    ctx.reverse = reverse
    ctx.training = training
    ctx.has_bias = bias_ih is not None
    ctx.save_for_backward(input, hx, cx, weight_ih, weight_hh, weight_hr,
                          batch_sizes, out, gates, cells,
                          *_save_zoneout(ctx, zoneout_hidden_mask, zoneout_cell_mask,
                                         zoneout_hidden, zoneout_cell, cell_states))


def _zeros_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _lstm_backward_autograd(ctx, grad_output, grad_hy, grad_cy, *_saved_grads):
    (input, hx, cx, weight_ih, weight_hh, weight_hr, batch_sizes, out, gates,
     cells, *zoneout) = ctx.saved_tensors
    if not ctx.training:  # outputs were marked non-differentiable
        return (None,) * 15
    # Only the gradients autograd asks for (frozen weights, an input without
    # requires_grad): the others' GEMMs are skipped and they are None.
    (need_input, need_hx, need_cx, need_w_ih, need_w_hh, need_b_ih, need_b_hh,
     need_w_hr) = ctx.needs_input_grad[:8]
    mask = [need_input, need_hx, need_cx, need_w_ih, need_w_hh,
            ctx.has_bias and (need_b_ih or need_b_hh),
            weight_hr is not None and need_w_hr]
    grads = lstm_backward(
        _zeros_if_none(grad_output, out), _zeros_if_none(grad_hy, hx),
        _zeros_if_none(grad_cy, cx), input, hx, cx, weight_ih, weight_hh,
        weight_hr, batch_sizes, ctx.reverse, out, gates, cells, mask,
        **_zoneout_kwargs(ctx, *zoneout))
    (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias,
     grad_w_hr) = (g if asked else None for g, asked in zip(grads, mask))
    return (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh,
            grad_bias if need_b_ih else None, grad_bias if need_b_hh else None,
            grad_w_hr) + (None,) * 7


torch.library.register_autograd(
    "rnnfast::lstm_forward", _lstm_backward_autograd, setup_context=_lstm_setup_context)


# ---- LayerNorm-LSTM ---------------------------------------------------------

_STATS_WIDTH = 4  # per-row statistics saved by layer_norm_lstm_forward


def layer_norm_lstm_forward(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    ln_ih_weight: Tensor,
    ln_ih_bias: Tensor,
    ln_hh_weight: Tensor,
    ln_hh_bias: Tensor,
    ln_cell_weight: Tensor,
    ln_cell_bias: Tensor,
    batch_sizes: Optional[Tensor],
    reverse: bool,
    training: bool,
    eps: float,
    zoneout_hidden_mask: Optional[Tensor] = None,
    zoneout_cell_mask: Optional[Tensor] = None,
    zoneout_hidden: float = 0.0,
    zoneout_cell: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LayerNorm-LSTM layer in one direction over a whole sequence.

    The cell (Ba, Kiros & Hinton 2016, section 3.1)::

        gates = LN_ih(W_ih x_t) + LN_hh(W_hh h_{t-1}) + b_ih + b_hh   # LN over 4H
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(LN_cell(c_t))                         # LN over H

    Sizes as :func:`lstm_forward` (no projection, so ``P == H``);
    ``ln_ih_*`` and ``ln_hh_*`` are ``[4H]``, ``ln_cell_*`` ``[H]``.

    Zoneout as :func:`lstm_forward`'s, with ``h~_t = o tanh(LN_cell(c~_t))``.

    Returns ``(output, hy, cy, cells, normalized_ih, normalized_hh,
    stats, cell_states)``; the last five are saved activations, empty unless
    training (``cell_states`` also without zoneout on ``c``). The backward
    recomputes the gates from ``normalized_ih`` and ``normalized_hh``.
    """
    args = (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, ln_ih_weight,
            ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias,
            batch_sizes, reverse, training, eps, zoneout_hidden_mask, zoneout_cell_mask,
            zoneout_hidden, zoneout_cell)
    return _call(torch.ops.rnnfast.layer_norm_lstm_forward.default,
                 _LayerNormLSTMForwardFunction, args)


def layer_norm_lstm_backward(
    grad_output: Tensor,
    grad_hy: Tensor,
    grad_cy: Tensor,
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    ln_ih_weight: Tensor,
    ln_ih_bias: Tensor,
    ln_hh_weight: Tensor,
    ln_hh_bias: Tensor,
    ln_cell_weight: Tensor,
    ln_cell_bias: Tensor,
    batch_sizes: Optional[Tensor],
    reverse: bool,
    output: Tensor,
    cells: Tensor,
    normalized_ih: Tensor,
    normalized_hh: Tensor,
    stats: Tensor,
    output_mask: Sequence[bool] = (True,) * 10,
    cell_states: Optional[Tensor] = None,
    zoneout_hidden_mask: Optional[Tensor] = None,
    zoneout_cell_mask: Optional[Tensor] = None,
    zoneout_hidden: float = 0.0,
    zoneout_cell: float = 0.0,
) -> tuple[Tensor, ...]:
    """Gradients of :func:`layer_norm_lstm_forward`.

    Returns ``(grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh,
    grad_bias, grad_ln_ih_weight, grad_ln_hh_weight, grad_ln_cell_weight,
    grad_ln_cell_bias)``; ``grad_bias`` is the gradient of each of
    ``bias_ih``, ``bias_hh``, ``ln_ih_bias`` and ``ln_hh_bias``.

    ``output_mask`` (ten bools, one per output) as in :func:`lstm_backward`;
    an output not asked for is an empty ``[0]`` tensor like its argument
    (``ln_ih_bias`` for ``grad_bias``). The bias and LayerNorm parameter
    gradients share one reduction, which runs when any of them is asked for.
    ``cell_states`` and the zoneout arguments as :func:`lstm_backward`'s.
    """
    args = (grad_output, grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh,
            bias_ih, bias_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
            ln_cell_weight, ln_cell_bias, batch_sizes, reverse, output, cells,
            normalized_ih, normalized_hh, stats, list(output_mask), cell_states,
            zoneout_hidden_mask, zoneout_cell_mask, zoneout_hidden, zoneout_cell)
    return _call(torch.ops.rnnfast.layer_norm_lstm_backward.default,
                 _LayerNormLSTMBackwardFunction, args)


@torch.library.register_fake("rnnfast::layer_norm_lstm_forward")
def _layer_norm_lstm_forward_fake(input, hx, cx, weight_ih, weight_hh, bias_ih,
                                  bias_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight,
                                  ln_hh_bias, ln_cell_weight, ln_cell_bias,
                                  batch_sizes, reverse, training, eps,
                                  zoneout_hidden_mask=None, zoneout_cell_mask=None,
                                  zoneout_hidden=0.0, zoneout_cell=0.0):
    hidden = weight_ih.shape[0] // 4
    return _fake_forward(
        input, hx, cx, weight_ih, batch_sizes, training, hidden,
        (hidden, 4 * hidden, 4 * hidden, _STATS_WIDTH),
        _zoneout_on_cell(zoneout_cell_mask, zoneout_cell),
        weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh,
        ln_ih_weight=ln_ih_weight, ln_ih_bias=ln_ih_bias, ln_hh_weight=ln_hh_weight,
        ln_hh_bias=ln_hh_bias, ln_cell_weight=ln_cell_weight, ln_cell_bias=ln_cell_bias,
        zoneout_hidden_mask=zoneout_hidden_mask, zoneout_cell_mask=zoneout_cell_mask)


@torch.library.register_fake("rnnfast::layer_norm_lstm_backward")
def _layer_norm_lstm_backward_fake(grad_output, grad_hy, grad_cy, input, hx, cx,
                                   weight_ih, weight_hh, bias_ih, bias_hh,
                                   ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                                   ln_cell_weight, ln_cell_bias, batch_sizes, reverse,
                                   output, cells, normalized_ih, normalized_hh,
                                   stats, output_mask=(True,) * 10, cell_states=None,
                                   zoneout_hidden_mask=None, zoneout_cell_mask=None,
                                   zoneout_hidden=0.0, zoneout_cell=0.0):
    return _masked(output_mask, tuple(
        (t, lambda t=t: _contiguous_like(t))
        for t in (input, hx, cx, weight_ih, weight_hh, ln_ih_bias, ln_ih_weight,
                  ln_hh_weight, ln_cell_weight, ln_cell_bias)))


def _layer_norm_lstm_setup_context(ctx, inputs, output):
    (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, ln_ih_weight, ln_ih_bias,
     ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, batch_sizes, reverse,
     training, _eps, zoneout_hidden_mask, zoneout_cell_mask, zoneout_hidden,
     zoneout_cell) = inputs
    out, hy, cy, cells, normalized_ih, normalized_hh, stats, cell_states = output
    ctx.mark_non_differentiable(cells, normalized_ih, normalized_hh, stats, cell_states)
    ctx.set_materialize_grads(False)  # as in _lstm_setup_context
    if not training:  # nothing was saved: these outputs have no gradient
        ctx.mark_non_differentiable(out, hy, cy)
    ctx.reverse = reverse
    ctx.training = training
    ctx.has_bias = bias_ih is not None
    ctx.save_for_backward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                          ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                          ln_cell_weight, ln_cell_bias, batch_sizes, out, cells,
                          normalized_ih, normalized_hh, stats,
                          *_save_zoneout(ctx, zoneout_hidden_mask, zoneout_cell_mask,
                                         zoneout_hidden, zoneout_cell, cell_states))


def _layer_norm_lstm_backward_autograd(ctx, grad_output, grad_hy, grad_cy, *_unused):
    (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, ln_ih_weight, ln_ih_bias,
     ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, batch_sizes, out, cells,
     normalized_ih, normalized_hh, stats, *zoneout) = ctx.saved_tensors
    if not ctx.training:  # outputs were marked non-differentiable
        return (None,) * 21
    # Only the gradients autograd asks for, as in _lstm_backward_autograd.
    need = ctx.needs_input_grad
    (need_input, need_hx, need_cx, need_w_ih, need_w_hh, need_b_ih, need_b_hh,
     need_ln_ih_w, need_ln_ih_b, need_ln_hh_w, need_ln_hh_b, need_ln_cell_w,
     need_ln_cell_b) = need[:13]
    need_bias = ctx.has_bias and (need_b_ih or need_b_hh)
    mask = [need_input, need_hx, need_cx, need_w_ih, need_w_hh,
            need_bias or need_ln_ih_b or need_ln_hh_b, need_ln_ih_w, need_ln_hh_w,
            need_ln_cell_w, need_ln_cell_b]
    grads = layer_norm_lstm_backward(
        _zeros_if_none(grad_output, out), _zeros_if_none(grad_hy, hx),
        _zeros_if_none(grad_cy, cx), input, hx, cx, weight_ih, weight_hh, bias_ih,
        bias_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight,
        ln_cell_bias, batch_sizes, ctx.reverse, out, cells, normalized_ih,
        normalized_hh, stats, mask, **_zoneout_kwargs(ctx, *zoneout))
    (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_ln_ih_w,
     grad_ln_hh_w, grad_ln_cell_w, grad_ln_cell_b) = (
        g if asked else None for g, asked in zip(grads, mask))

    def bias_grad(needed):
        return grad_bias if needed else None

    return (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh,
            bias_grad(ctx.has_bias and need_b_ih), bias_grad(ctx.has_bias and need_b_hh),
            grad_ln_ih_w, bias_grad(need_ln_ih_b), grad_ln_hh_w, bias_grad(need_ln_hh_b),
            grad_ln_cell_w, grad_ln_cell_b) + (None,) * 8


torch.library.register_autograd(
    "rnnfast::layer_norm_lstm_forward", _layer_norm_lstm_backward_autograd,
    setup_context=_layer_norm_lstm_setup_context)


# ---- a whole network's forward for inference ----------------------------------
# _call asks its questions at every op call. A multi-layer call whose result
# needs no gradient (rnnfast.functional establishes that) asks them once,
# with direct_route(), and runs the whole network as one op below autograd,
# rnnfast::stacked_inference (csrc/stack.cpp), which calls each layer's op
# from C++. Between layers a decode step's Python ran from L3 once the
# previous layer's weights had evicted the L2 cache (see stack.cpp).

_STACKED_INFERENCE = torch.ops.rnnfast.stacked_inference.default


def direct_route() -> bool:
    """Whether op calls made now may go straight to the device's kernels
    when their result needs no gradient (what :func:`_call` does for one
    such call): no torch.func transform active, and nothing (torch.compile,
    torch.export, torch.jit.trace, an ONNX exporter) recording the calls."""
    return not (torch.jit.is_tracing() or _functorch_active()
                or torch.compiler.is_compiling())


def stacked_inference(input: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[Tensor],
                      num_layers: int, bidirectional: bool, batch_first: bool,
                      batch_sizes: Optional[Tensor], has_biases: bool, layer_norm: bool,
                      eps: float, zoneout_hidden: float, zoneout_cell: float
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """``(output, h_n, c_n)`` of a stacked network without dropout between
    layers, nothing saved and no zoneout mask (the rates), for a caller that
    has established that no gradient is needed and :func:`direct_route`:
    ``rnnfast::stacked_inference`` (see its schema in csrc/rnnfast.cpp)."""
    with _below_autograd():
        return _STACKED_INFERENCE(input, h0, c0, weights, num_layers, bidirectional,
                                  batch_first, batch_sizes, has_biases, layer_norm, eps,
                                  zoneout_hidden, zoneout_cell)


# ---- regulariser masks ----------------------------------------------------------

def bernoulli_masks(seed: Tensor, shape: Sequence[int], rates: Sequence[float]) -> Tensor:
    """Bool masks ``[len(rates), *shape]`` on the CPU, row ``j`` true with
    probability ``rates[j]`` (to 2^-16), from a counter-based generator keyed
    by ``seed`` (an int64 CPU tensor of one element): the same seed gives the
    same masks whatever the number of threads. No gradient."""
    return torch.ops.rnnfast.bernoulli_masks.default(seed, list(shape), list(rates))


@torch.library.register_fake("rnnfast::bernoulli_masks")
def _bernoulli_masks_fake(seed, shape, rates):
    return seed.new_empty((len(rates), *shape), dtype=torch.bool)


# ---- no double backward ------------------------------------------------------

def _no_setup_context(ctx, inputs, output):
    pass


def _double_backward_error(name: str):
    """The autograd formula of a backward op: a clear refusal."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"rnnfast: {name} is not differentiable: double backward (a gradient "
            "of a gradient, e.g. a gradient penalty) through rnnfast layers is "
            "not supported")
    return backward


def _refuse_double_backward(name: str):
    torch.library.register_autograd(f"rnnfast::{name}", _double_backward_error(name),
                                    setup_context=_no_setup_context)


for _name in ("lstm_backward", "layer_norm_lstm_backward"):
    _refuse_double_backward(_name)


# ---- torch.func (functorch) transforms ----------------------------------------
#
# ``torch.library.register_autograd`` makes an old-style autograd.Function
# (its forward takes ``ctx``), which torch.func's transforms refuse. While a
# transform is active (``torch.func.grad``, ``vjp``, ``jacrev``, ``vmap``,
# ``jvp``, ``jacfwd``), the wrappers above route the ops through the
# new-style Functions below instead: the same setup_context and backward, the
# op itself as the forward, ``vmap`` from the ops' batching rules (the last
# section) and a clear refusal of forward-mode AD. Without a transform (eager,
# torch.compile, torch.export) the ops are called directly, as before.

_FORWARD_MODE_ERROR = (
    "rnnfast: forward-mode AD (torch.func.jvp, torch.func.jacfwd, "
    "torch.autograd.forward_ad) through rnnfast layers is not supported: the "
    "kernels have no tangent (JVP) formula. Use reverse mode instead: "
    "torch.func.jacrev, torch.func.vjp or torch.func.grad give the same "
    "Jacobians and gradients")


def _functorch_active() -> bool:
    """Whether a torch.func transform (or a forward-mode AD level, which only
    the Functions below refuse with a clear message) is active. Never under
    torch.compile, whose trace calls the ops themselves."""
    if torch.compiler.is_compiling():
        return False
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.forward_ad._current_level >= 0)


def _transformable(op, setup_context, backward) -> type:
    """A new-style autograd.Function computing ``op`` with the given
    setup_context and backward, for use under torch.func transforms."""

    class Function(torch.autograd.Function):
        generate_vmap_rule = True  # runs forward under vmap: the op's batching rule

        @staticmethod
        def forward(*args):
            return op(*args)

        @staticmethod
        def jvp(ctx, *tangents):
            raise RuntimeError(_FORWARD_MODE_ERROR)

    Function.setup_context = staticmethod(setup_context)
    Function.backward = staticmethod(backward)
    Function.__name__ = Function.__qualname__ = f"{op._opname}_function"
    return Function


_LSTMForwardFunction = _transformable(
    torch.ops.rnnfast.lstm_forward.default, _lstm_setup_context, _lstm_backward_autograd)
_LSTMBackwardFunction = _transformable(
    torch.ops.rnnfast.lstm_backward.default, _no_setup_context,
    _double_backward_error("lstm_backward"))
_LayerNormLSTMForwardFunction = _transformable(
    torch.ops.rnnfast.layer_norm_lstm_forward.default, _layer_norm_lstm_setup_context,
    _layer_norm_lstm_backward_autograd)
_LayerNormLSTMBackwardFunction = _transformable(
    torch.ops.rnnfast.layer_norm_lstm_backward.default, _no_setup_context,
    _double_backward_error("layer_norm_lstm_backward"))


# ---- vmap rules -----------------------------------------------------------------
#
# A forward over a vmapped batch of sequences with shared weights is one call
# with the vmapped dimension folded into the op's batch dimension (one
# recurrence over V*B rows instead of V recurrences). Everything else loops
# over the vmapped dimension, one op call per slice: packed input (its rows
# interleave the sequences), per-sample weights (model ensembles), and the
# backward ops, whose weight gradients must stay per sample (per-sample
# gradients, ``vmap(grad(...))``), where folding would sum them.

def _vmap_loop(op, info, in_dims, args):
    """The batched op as one call per slice of the vmapped dimension."""
    results = []
    for v in range(info.batch_size):
        sliced = [a.select(d, v) if isinstance(a, Tensor) and d is not None else a
                  for a, d in zip(args, in_dims)]
        results.append(op(*sliced))
    outputs = tuple(torch.stack(parts) for parts in zip(*results))
    return outputs, (0,) * len(outputs)


def _fold_into_batch(t: Tensor, dim: Optional[int], size: int, batch_dim: int) -> Tensor:
    """``t`` with its vmapped dimension ``dim`` (or, if None, a broadcast one)
    merged into its batch dimension ``batch_dim`` (of the unbatched shape),
    vmapped index major."""
    t = t.movedim(dim, batch_dim) if dim is not None else \
        t.unsqueeze(batch_dim).expand(*t.shape[:batch_dim], size, *t.shape[batch_dim:])
    return t.flatten(batch_dim, batch_dim + 1)


def _forward_vmap(op, info, in_dims, args, num_weights: int):
    """A forward op's batching rule: ``args`` are ``(input, hx, cx,
    <num_weights weights>, batch_sizes, ...)``; its outputs ``(output, hy, cy,
    *saved)``, each saved activation ``[T * B, width]`` (rows time-major)."""
    input, hx, cx = args[:3]
    weight_dims = in_dims[3:3 + num_weights + 1]  # the weights and batch_sizes
    # Zoneout masks are per row of the unbatched op: loop rather than fold
    # them. (They follow batch_sizes and the op's 2 or 3 flags.)
    flags = 3 if num_weights == 10 else 2
    masks = args[4 + num_weights + flags:6 + num_weights + flags]
    if (args[3 + num_weights] is not None or any(d is not None for d in weight_dims)
            or any(m is not None for m in masks)):
        return _vmap_loop(op, info, in_dims, args)
    size = info.batch_size
    steps = input.shape[1 if in_dims[0] == 0 else 0]
    folded = (_fold_into_batch(input, in_dims[0], size, 1),
              _fold_into_batch(hx, in_dims[1], size, 0),
              _fold_into_batch(cx, in_dims[2], size, 0))
    output, hy, cy, *saved = op(*folded, *args[3:])
    batch = hy.shape[0] // size
    unfolded = [output.unflatten(1, (size, batch)), hy.unflatten(0, (size, batch)),
                cy.unflatten(0, (size, batch))]
    for s in saved:  # [T * V * B, w] -> [V, T * B, w] (empty unless training)
        if s.shape[0] == 0:
            unfolded.append(s.unsqueeze(0).expand(size, *s.shape))
        else:
            unfolded.append(s.unflatten(0, (steps, size, batch)).transpose(0, 1)
                            .flatten(1, 2))
    return tuple(unfolded), (1, 0, 0) + (0,) * len(saved)


@torch.library.register_vmap("rnnfast::lstm_forward")
def _lstm_forward_vmap(info, in_dims, *args):
    # weight_ih, weight_hh, bias_ih, bias_hh, weight_hr
    return _forward_vmap(torch.ops.rnnfast.lstm_forward.default, info, in_dims, args, 5)


@torch.library.register_vmap("rnnfast::layer_norm_lstm_forward")
def _layer_norm_lstm_forward_vmap(info, in_dims, *args):
    # weight_ih, weight_hh, bias_ih, bias_hh and the six LayerNorm parameters
    return _forward_vmap(torch.ops.rnnfast.layer_norm_lstm_forward.default, info,
                         in_dims, args, 10)


@torch.library.register_vmap("rnnfast::lstm_backward")
def _lstm_backward_vmap(info, in_dims, *args):
    return _vmap_loop(torch.ops.rnnfast.lstm_backward.default, info, in_dims, args)


@torch.library.register_vmap("rnnfast::layer_norm_lstm_backward")
def _layer_norm_lstm_backward_vmap(info, in_dims, *args):
    return _vmap_loop(torch.ops.rnnfast.layer_norm_lstm_backward.default, info,
                      in_dims, args)
