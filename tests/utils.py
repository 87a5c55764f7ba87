"""Helpers shared by the rnnfast test files.

Everything here is plain functions (no fixtures), so any test file can
``from utils import ...``; the fixtures themselves live in conftest.py.

The central one is :func:`sample_inputs`, which, as in pytorch/extension-cpp,
feeds the gradient, opcheck and compile tests of the ``rnnfast::lstm_forward``
op alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnfast

# Tolerances per dtype for comparisons against torch.nn.LSTM (same math, a
# different summation order).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}


# --------------------------------------------------------------------------
# Packed sequences
# --------------------------------------------------------------------------
def batch_sizes_from_lengths(lengths: Sequence[int]) -> Tensor:
    """The ``batch_sizes`` of a PackedSequence of sequences of the given
    (non-increasing) lengths: an int64 CPU tensor ``[max(lengths)]``."""
    lengths = list(lengths)
    assert lengths == sorted(lengths, reverse=True), "lengths must be non-increasing"
    return torch.tensor([sum(1 for n in lengths if n > t) for t in range(lengths[0])],
                        dtype=torch.int64)


def make_packed(padded: Tensor, lengths: Sequence[int], *, batch_first: bool = False,
                enforce_sorted: bool = True) -> PackedSequence:
    """``pack_padded_sequence`` of ``padded`` (``[T, B, *]`` or ``[B, T, *]``
    with ``batch_first``); differentiable w.r.t. ``padded``."""
    return pack_padded_sequence(padded, torch.tensor(list(lengths), dtype=torch.int64),
                                batch_first=batch_first, enforce_sorted=enforce_sorted)


# --------------------------------------------------------------------------
# Samples of the lstm_forward op
# --------------------------------------------------------------------------
@dataclass
class OpSample:
    """Arguments of ``torch.ops.rnnfast.lstm_forward`` with a readable name.

    ``args`` is ``(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
    weight_hr, batch_sizes, reverse, training)``.
    """

    name: str
    args: tuple
    # Positions in ``args`` of the differentiable tensors that are present.
    diff_positions: list = field(default_factory=list)

    def __repr__(self) -> str:  # shows in pytest ids / failure messages
        return f"OpSample({self.name})"

    @property
    def diff_args(self) -> list:
        return [self.args[i] for i in self.diff_positions]

    def with_args(self, diff_values: Sequence[Tensor]) -> tuple:
        """``args`` with the differentiable tensors replaced by ``diff_values``."""
        args = list(self.args)
        for i, v in zip(self.diff_positions, diff_values):
            args[i] = v
        return tuple(args)


def make_op_args(*, steps: int = 3, batch: int = 3, input_size: int = 2, hidden: int = 3,
                 proj: int = 0, bias: bool = True, reverse: bool = False,
                 lengths: Optional[Sequence[int]] = None, training: bool = True,
                 device="cpu", dtype=torch.float64, requires_grad: bool = False,
                 seed: int = 0, name: Optional[str] = None) -> OpSample:
    """Random arguments for one ``lstm_forward`` call.

    Padded input ``[steps, batch, input_size]``, or, with ``lengths``
    (non-increasing, ``len(lengths)`` sequences), packed rows
    ``[sum(lengths), input_size]`` with their ``batch_sizes``.
    """
    g = torch.Generator().manual_seed(seed)
    out = proj if proj > 0 else hidden

    def rand(*shape, scale=1.0):
        t = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    if lengths is not None:
        batch_sizes = batch_sizes_from_lengths(lengths)
        batch = len(lengths)
        x = rand(int(batch_sizes.sum()), input_size)
    else:
        batch_sizes = None
        x = rand(steps, batch, input_size)
    k = hidden ** -0.5 * 2  # a little larger than nn.LSTM's init: saturate some gates
    args = [x, rand(batch, out), rand(batch, hidden), rand(4 * hidden, input_size, scale=k),
            rand(4 * hidden, out, scale=k)]
    args += [rand(4 * hidden, scale=k), rand(4 * hidden, scale=k)] if bias else [None, None]
    args += [rand(out, hidden, scale=k) if proj > 0 else None]
    args += [batch_sizes, reverse, training]
    diff = [i for i in range(8) if args[i] is not None]
    if name is None:
        name = "-".join([
            "packed" if lengths is not None else "padded",
            "bias" if bias else "nobias",
            "reverse" if reverse else "forward",
            f"proj{proj}" if proj else "noproj",
            "train" if training else "eval",
        ])
    return OpSample(name, tuple(args), diff)


def sample_inputs(device, dtype=torch.float64, requires_grad: bool = False,
                  *, include_eval: bool = True) -> list[OpSample]:
    """A small, varied set of ``lstm_forward`` argument tuples: padded and
    packed input, with and without biases and projection, both directions,
    ``training`` True and (when ``include_eval``) False."""
    common = dict(device=device, dtype=dtype, requires_grad=requires_grad)
    samples = [
        make_op_args(bias=True, reverse=False, seed=1, **common),
        make_op_args(bias=False, reverse=True, seed=2, **common),
        make_op_args(proj=2, hidden=4, seed=3, **common),
        make_op_args(lengths=[4, 2, 2, 1], proj=2, hidden=4, reverse=True, seed=4, **common),
        make_op_args(lengths=[3, 3, 1], bias=False, seed=5, **common),
        make_op_args(steps=1, batch=1, input_size=1, hidden=1, seed=6, name="tiny-T1-B1-H1",
                     **common),
    ]
    if include_eval:
        samples += [
            make_op_args(training=False, seed=7, **common),
            make_op_args(lengths=[3, 1], training=False, proj=1, seed=8, **common),
        ]
    return samples


def backward_args_from(sample: OpSample, seed: int = 100) -> tuple:
    """Arguments of ``torch.ops.rnnfast.lstm_backward`` for the forward of a
    ``training=True`` sample, with random upstream gradients."""
    (x, hx, cx, w_ih, w_hh, _b_ih, _b_hh, w_hr, batch_sizes, reverse, training) = sample.args
    assert training, "lstm_backward needs the activations of a training forward"
    with torch.no_grad():
        out, hy, cy, gates, cells = torch.ops.rnnfast.lstm_forward.default(*sample.args)
    g = torch.Generator().manual_seed(seed)

    def rand_like(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)

    det = [None if t is None else t.detach() for t in (x, hx, cx, w_ih, w_hh, w_hr)]
    x, hx, cx, w_ih, w_hh, w_hr = det
    return (rand_like(out), rand_like(hy), rand_like(cy), x, hx, cx, w_ih, w_hh, w_hr,
            batch_sizes, reverse, out, gates, cells)


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------
def make_lstm_pair(input_size: int, hidden_size: int, *, dtype=torch.float64, device="cpu",
                   seed: int = 0, **kwargs) -> tuple[rnnfast.LSTM, nn.LSTM]:
    """``(rnnfast.LSTM, torch.nn.LSTM)`` with the same arguments and
    identical weights (loaded from the nn.LSTM's state_dict)."""
    torch.manual_seed(seed)
    ref = nn.LSTM(input_size, hidden_size, **kwargs).to(device=device, dtype=dtype)
    ours = rnnfast.LSTM(input_size, hidden_size, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _loss_weights(shape, dtype, device, seed) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(tuple(shape), generator=g, dtype=torch.float64) + 0.5).to(
        device=device, dtype=dtype)


def weighted_loss(output: Tensor, h_n: Tensor, c_n: Tensor) -> Tensor:
    """A scalar that weights every element of output, h_n and c_n by a
    different fixed factor, so each path gets its own gradient."""
    def term(t, scale, seed):
        return (t * _loss_weights(t.shape, t.dtype, t.device, seed)).sum() * scale
    return term(output, 1.0, 11) + term(h_n, 2.0, 12) + term(c_n, 3.0, 13)


def forward_backward(model: nn.Module, x: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None,
                     *, lengths: Optional[Sequence[int]] = None,
                     enforce_sorted: bool = True, backward: bool = True) -> dict:
    """Runs ``model`` on copies of ``x`` (padded, laid out per
    ``model.batch_first``) and ``hx``, packing ``x`` first when ``lengths``
    is given, then the backward of :func:`weighted_loss`.

    Returns a dict of tensors: ``output`` (``.data`` for packed input),
    ``padded`` (``pad_packed_sequence`` of a packed output), ``lengths``,
    ``h_n``, ``c_n`` and the gradients ``grad_input``, ``grad_h0``,
    ``grad_c0``, ``grad.<parameter name>``.
    """
    batch_first = getattr(model, "batch_first", False)
    x = x.detach().clone().requires_grad_(backward)
    inp = x
    if lengths is not None:
        inp = make_packed(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    if hx is not None:
        hx = tuple(h.detach().clone().requires_grad_(backward) for h in hx)
    model.zero_grad(set_to_none=True)
    output, (h_n, c_n) = model(inp, hx)
    res = {"h_n": h_n, "c_n": c_n}
    if isinstance(output, PackedSequence):
        padded, out_lengths = pad_packed_sequence(output, batch_first=batch_first)
        res.update(output=output.data, padded=padded, lengths=out_lengths,
                   sorted_indices=output.sorted_indices)
        loss_out = output.data
    else:
        res["output"] = output
        loss_out = output
    if backward:
        weighted_loss(loss_out, h_n, c_n).backward()
        res["grad_input"] = x.grad
        if hx is not None:
            res["grad_h0"], res["grad_c0"] = hx[0].grad, hx[1].grad
        for name, p in model.named_parameters():
            res[f"grad.{name}"] = p.grad
    return res


def assert_results_close(ours: dict, ref: dict, **tol) -> None:
    """Every entry of ``ref`` is present in ``ours`` and close to it."""
    assert set(ours) == set(ref), f"keys differ: {sorted(set(ours) ^ set(ref))}"
    for key, expected in ref.items():
        got = ours[key]
        if expected is None or got is None:
            assert got is None and expected is None, f"{key}: {got!r} vs {expected!r}"
            continue
        torch.testing.assert_close(got, expected, **tol, msg=lambda m, k=key: f"{k}: {m}")


# --------------------------------------------------------------------------
# Activation accuracy
# --------------------------------------------------------------------------
def activation_probe(dtype=torch.float32, device="cpu", hidden: int = 19
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, sigmoid(values), tanh(values))``, each ``[N, hidden]``, as
    computed by the forward kernel: one step, one row per value, input size
    1, ``weight_ih`` all ones and everything else zero, so every lane of row
    n gets the pre-activation ``values[n]`` (no sum mixes values, so inf and
    NaN stay where they are) and the saved gates hold the activations.
    ``hidden`` = 19 covers a full vector and a tail at every SIMD width. The
    values sweep [-20, 20] finely, plus the branch points of fast
    approximations (+-0.3), the limits of exp (+-88, +-89), huge values,
    subnormals, +-0, +-inf and NaN."""
    special = [0.3, 0.2999, 0.3001, 10.0, 15.0, 20.0, 40.0, 80.0, 87.0, 88.0, 88.8, 89.0,
               100.0, 1e4, 1e38, 1e-30, 1e-40, float("inf")]
    values = torch.cat([
        torch.linspace(-20, 20, 4001, dtype=torch.float64),
        torch.linspace(-1, 1, 2001, dtype=torch.float64),
        torch.tensor(special + [-v for v in special] + [0.0, -0.0, float("nan")],
                     dtype=torch.float64),
    ]).to(device=device, dtype=dtype)
    rows = values.numel()
    opts = dict(dtype=dtype, device=device)
    _, _, _, gates, _ = torch.ops.rnnfast.lstm_forward.default(
        values.view(1, rows, 1), torch.zeros(rows, hidden, **opts),
        torch.zeros(rows, hidden, **opts), torch.ones(4 * hidden, 1, **opts),
        torch.zeros(4 * hidden, hidden, **opts), None, None, None, None, False, True)
    gates = gates.view(rows, 4, hidden)
    return values[:, None].expand(rows, hidden), gates[:, 0], gates[:, 2]


def assert_activations_accurate(values: Tensor, sigmoid: Tensor, tanh: Tensor) -> None:
    """Against float64 torch: NaN exactly where torch has NaN, the limits at
    +-inf, an absolute error of at most 2 ulps of 1 in the value's dtype, and
    a relative error of at most 8 ulps for tanh near 0 (where tanh(x) ~ x)."""
    eps = torch.finfo(values.dtype).eps
    x = values.double()
    for name, got, expected in (("sigmoid", sigmoid, torch.sigmoid(x)),
                                ("tanh", tanh, torch.tanh(x))):
        got = got.double()
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(got), nan), \
            f"{name}: NaN at x={x[torch.isnan(got) != nan].tolist()}"
        err = (got - expected).abs()[~nan]
        worst = int(err.argmax())
        assert err.max() <= 2 * eps, \
            f"{name}: error {err.max().item():.3g} at x={x[~nan][worst].item()}"
        if name == "tanh":
            small = (x.abs() < 0.5) & (x != 0) & ~nan
            rel = ((got - expected).abs() / expected.abs())[small]
            assert rel.max() <= 8 * eps, f"tanh: relative error {rel.max().item():.3g} near 0"
            # (The sign of -0 may not survive the probe's GEMM.)
            assert (got[x == 0] == 0).all(), "tanh(0) must be 0"
