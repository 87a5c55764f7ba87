"""Helpers shared by the rnnfast test files.

Everything here is plain functions (no fixtures), so any test file can
``from utils import ...``; the fixtures themselves live in conftest.py.

The central one is :class:`Cell`: a description of one recurrent cell
(module class, reference, op names, sample inputs, how the backward op's
gradients map to the forward op's arguments). ``CELLS`` lists every cell, and
the ``cell`` fixture of conftest.py runs one set of tests (test_cells.py) over
``cell x device``. Each cell's :func:`sample_inputs` /
:func:`layer_norm_sample_inputs` feed, as in pytorch/extension-cpp, its
gradient, opcheck and compile tests alike.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnfast
from rnnfast._torch_version import torch_release
from rnnfast.reference import ReferenceLayerNormLSTM

# The words rnnfast's errors copy are those of torch 2.13's nn.LSTM and later
# (the suite checks them there against nn.LSTM itself). An older nn.LSTM
# checks less and words some errors differently (torch 2.8 accepts
# input_size=0 and bias=1, and says "input must have the type torch.float32,
# got type torch.float64"); against it, rnnfast's errors are checked against
# the tests' tables alone.
NN_LSTM_WORDS_SINCE = (2, 13)
TORCH_RELEASE = torch_release(torch.__version__)  # (major, minor)
OLD_NN_LSTM = TORCH_RELEASE < NN_LSTM_WORDS_SINCE


@functools.cache
def _dynamo_reads_built_packed_sequences() -> bool:
    """Whether this torch's Dynamo reads the fields of a PackedSequence
    built inside the compiled region, probed with torch alone."""
    def rebuilt(p: PackedSequence) -> Tensor:
        q = PackedSequence(p.data * 2, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
        return q.data

    packed = pack_padded_sequence(torch.randn(3, 2, 1), torch.tensor([3, 2]))
    torch._dynamo.reset()
    try:
        torch.compile(rebuilt, backend="eager", fullgraph=True)(packed)
        return True
    except Exception as e:  # noqa: BLE001 (what torch raises is torch's)
        if "tuple index out of range" not in str(e):
            raise
        return False
    finally:
        torch._dynamo.reset()


def skip_unless_dynamo_reads_built_packed_sequences() -> None:
    """Skips the calling test where this torch's Dynamo cannot read the
    fields of a PackedSequence built inside the compiled region, as an LSTM
    layer's packed output is. torch 2.12's cannot: `.data` of one raises
    InternalTorchDynamoError (IndexError) in Dynamo's own tuple handling
    (its namedtuple field getters were moved off the base tuple variable
    that PackedSequence gets; pytorch/pytorch#181687 restores them; 2.11,
    2.13 and 2.14 read them)."""
    if not _dynamo_reads_built_packed_sequences():
        import pytest

        pytest.skip(f"torch {torch.__version__}'s Dynamo cannot read a PackedSequence built "
                    "inside the compiled region (IndexError in Dynamo, with torch alone; "
                    "pytorch/pytorch#181687)")


# Tolerances per dtype for comparisons against torch.nn.LSTM (same math, a
# different summation order).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}


def claimed_archs(arch_list: str) -> tuple[set[str], set[str]]:
    """TORCH_CUDA_ARCH_LIST's (build_info()["cuda_archs"]'s) machine-code and
    PTX archs, as cuobjdump names them: "7.5;8.0;9.0+PTX" gives ({"75",
    "80", "90"}, {"90"})."""
    sass, ptx = set(), set()
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if not item:
            continue
        name = item.removesuffix("+PTX").replace(".", "")
        sass.add(name)
        if item.endswith("+PTX"):
            ptx.add(name)
    return sass, ptx


def cuda_tool(name: str) -> Optional[str]:
    """A CUDA toolkit program (nvcc, cuobjdump, ...): in the toolkit that
    torch.utils.cpp_extension builds with, on PATH, or in the copy of
    NVIDIA's binary tools that Triton (a dependency of torch's CUDA wheels)
    ships; None where none is found."""
    import importlib.util
    import os
    import shutil

    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    candidates = [os.path.join(home, "bin", name)] if home else []
    candidates.append(shutil.which(name))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        candidates += [os.path.join(location, "backends", "nvidia", "bin", name)
                       for location in triton.submodule_search_locations]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


# --------------------------------------------------------------------------
# Random inputs of the module tests
# --------------------------------------------------------------------------
def profiled_calls(fn: Callable[[], object], names: Sequence[str]) -> int:
    """How many times ``fn`` called the ops (or profiler ranges) ``names``,
    by torch.profiler's CPU events: evidence of work done or skipped that
    no timing gives."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in names)


def random_input(batch_first: bool, dtype=torch.float64, device="cpu", steps: int = 5,
                 batch: int = 4, size: int = 3) -> Tensor:
    """A padded input ``[steps, batch, size]`` (``[batch, steps, size]``
    with ``batch_first``) from the global generator."""
    shape = (batch, steps, size) if batch_first else (steps, batch, size)
    return torch.randn(shape, dtype=dtype, device=device)


def random_states(num_layers: int, directions: int, out_size: int, hidden: int,
                  dtype=torch.float64, device="cpu", batch: int = 4) -> tuple[Tensor, Tensor]:
    """``(h_0, c_0)``: ``[num_layers * directions, batch, out_size]`` and
    ``[num_layers * directions, batch, hidden]``, from N(0, 0.25)."""
    opts = dict(dtype=dtype, device=device)
    return (torch.randn(num_layers * directions, batch, out_size, **opts) * 0.5,
            torch.randn(num_layers * directions, batch, hidden, **opts) * 0.5)


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
    """Arguments of ``torch.ops.rnnfast.<op>`` with a readable name.

    For ``op == "lstm_forward"``, ``args`` is ``(input, hx, cx, weight_ih,
    weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, reverse,
    training)``; for ``"layer_norm_lstm_forward"`` it is ``(input, hx, cx,
    weight_ih, weight_hh, bias_ih, bias_hh, ln_ih_weight, ln_ih_bias,
    ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, batch_sizes,
    reverse, training, eps)``.
    """

    name: str
    args: tuple
    # Positions in ``args`` of the differentiable tensors that are present.
    diff_positions: list = field(default_factory=list)
    op: str = "lstm_forward"

    @property
    def op_overload(self):
        return getattr(torch.ops.rnnfast, self.op).default

    @property
    def arg_names(self) -> list[str]:
        """The op's argument names, from its schema."""
        return [a.name for a in self.op_overload._schema.arguments]

    @property
    def diff_names(self) -> list[str]:
        """The names of :attr:`diff_args`."""
        return [self.arg_names[i] for i in self.diff_positions]

    def arg(self, name: str):
        return self.args[self.arg_names.index(name)]

    def with_arg(self, name: str, value) -> tuple:
        """``args`` with the argument ``name`` replaced by ``value``."""
        args = list(self.args)
        args[self.arg_names.index(name)] = value
        return tuple(args)

    @property
    def training(self) -> bool:
        return self.args[-2] if self.op == "layer_norm_lstm_forward" else self.args[-1]

    @property
    def batch_sizes(self) -> Optional[Tensor]:
        return self.args[-4] if self.op == "layer_norm_lstm_forward" else self.args[-3]

    @property
    def reverse(self) -> bool:
        return self.args[-3] if self.op == "layer_norm_lstm_forward" else self.args[-2]

    def outputs(self, *diff_values: Tensor) -> tuple:
        """``(output, hy, cy)`` of the op (through its autograd) on ``args``,
        or on ``args`` with the differentiable tensors replaced by
        ``diff_values`` (so it is a function gradcheck can call)."""
        args = self.with_args(diff_values) if diff_values else self.args
        return tuple(self.op_overload(*args)[:3])

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
                 seed: int = 0, name: Optional[str] = None, layer_norm: bool = False,
                 eps: float = 1e-5) -> OpSample:
    """Random arguments for one ``lstm_forward`` call, or, with
    ``layer_norm``, one ``layer_norm_lstm_forward`` call (no projection)
    whose LayerNorm gains are drawn from U(0.5, 1.5) and biases from
    U(-0.5, 0.5), so no LayerNorm parameter has its trivial initial value.

    Padded input ``[steps, batch, input_size]``, or, with ``lengths``
    (non-increasing, ``len(lengths)`` sequences), packed rows
    ``[sum(lengths), input_size]`` with their ``batch_sizes``.
    """
    assert not (layer_norm and proj), "the LayerNorm-LSTM op has no projection"
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
    if layer_norm:
        # The same draws as without layer_norm up to here, then the LN
        # parameters: ln_ih weight/bias, ln_hh weight/bias [4H], ln_cell [H].
        for size in (4 * hidden, 4 * hidden, hidden):
            gain = (torch.rand(size, generator=g, dtype=torch.float64) + 0.5)
            args += [gain.to(device=device, dtype=dtype).requires_grad_(requires_grad),
                     rand(size, scale=0.5)]
        args += [batch_sizes, reverse, training, eps]
        diff = [i for i in range(13) if args[i] is not None]
    else:
        args += [rand(out, hidden, scale=k) if proj > 0 else None]
        args += [batch_sizes, reverse, training]
        diff = [i for i in range(8) if args[i] is not None]
    if name is None:
        name = "-".join([
            *(["ln"] if layer_norm else []),
            *([f"eps{eps:g}"] if layer_norm and eps != 1e-5 else []),
            "packed" if lengths is not None else "padded",
            "bias" if bias else "nobias",
            "reverse" if reverse else "forward",
            *([] if layer_norm else [f"proj{proj}" if proj else "noproj"]),
            "train" if training else "eval",
        ])
    return OpSample(name, tuple(args), diff,
                    "layer_norm_lstm_forward" if layer_norm else "lstm_forward")


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


def layer_norm_sample_inputs(device, dtype=torch.float64, requires_grad: bool = False,
                             *, include_eval: bool = True) -> list[OpSample]:
    """The ``layer_norm_lstm_forward`` counterpart of :func:`sample_inputs`:
    padded and packed input, with and without biases, both directions,
    a non-default eps, ``training`` True and (when ``include_eval``) False."""
    common = dict(device=device, dtype=dtype, requires_grad=requires_grad, layer_norm=True)
    samples = [
        make_op_args(bias=True, reverse=False, seed=11, **common),
        make_op_args(bias=False, reverse=True, seed=12, **common),
        make_op_args(lengths=[4, 2, 2, 1], hidden=4, reverse=True, seed=13, **common),
        make_op_args(lengths=[3, 3, 1], bias=False, eps=1e-3, seed=14, **common),
        make_op_args(steps=1, batch=1, input_size=1, hidden=1, seed=15,
                     name="ln-tiny-T1-B1-H1", **common),
    ]
    if include_eval:
        samples += [
            make_op_args(training=False, seed=16, **common),
            make_op_args(lengths=[3, 1], training=False, reverse=True, seed=17, **common),
        ]
    return samples


def backward_args_from(sample: OpSample, seed: int = 100) -> tuple:
    """Arguments of ``torch.ops.rnnfast.lstm_backward`` (or
    ``layer_norm_lstm_backward`` for a ``layer_norm_lstm_forward`` sample)
    for the forward of a ``training=True`` sample, with random upstream
    gradients."""
    assert sample.training, "the backward ops need the activations of a training forward"
    with torch.no_grad():
        saved = sample.op_overload(*sample.args)
    g = torch.Generator().manual_seed(seed)

    def rand_like(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)

    def detach(*ts):
        return [None if t is None else t.detach() for t in ts]

    if sample.op == "layer_norm_lstm_forward":
        (x, hx, cx, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b,
         ln_cell_w, ln_cell_b, batch_sizes, reverse, _training, _eps) = sample.args
        out, hy, cy = saved[:3]
        return (rand_like(out), rand_like(hy), rand_like(cy),
                *detach(x, hx, cx, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_hh_w,
                        ln_hh_b, ln_cell_w, ln_cell_b),
                batch_sizes, reverse, *saved[:1], *saved[3:7])

    (x, hx, cx, w_ih, w_hh, _b_ih, _b_hh, w_hr, batch_sizes, reverse, training) = sample.args
    out, hy, cy, gates, cells, _cell_states = saved  # (no zoneout: empty)
    x, hx, cx, w_ih, w_hh, w_hr = detach(x, hx, cx, w_ih, w_hh, w_hr)
    return (rand_like(out), rand_like(hy), rand_like(cy), x, hx, cx, w_ih, w_hh, w_hr,
            batch_sizes, reverse, out, gates, cells)


def zoneout_masks(sample: OpSample, z_h: float, z_c: float, seed: int = 1
                  ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Fixed zoneout masks of a sample's output rows, for h and c (each None
    where its rate is 0)."""
    g = torch.Generator().manual_seed(seed)
    x, hx, cx = sample.args[:3]
    rows = x.shape[:-1]
    mask_h = (torch.rand((*rows, hx.shape[-1]), generator=g) < z_h) if z_h else None
    mask_c = (torch.rand((*rows, cx.shape[-1]), generator=g) < z_c) if z_c else None
    return mask_h, mask_c


def backward_op_args(cell, sample: OpSample, grads: Sequence[Tensor], saved: Sequence[Tensor]
                     ) -> tuple:
    """The positional arguments of ``cell``'s backward op for a forward of
    ``sample`` whose outputs were ``saved``, with the upstream gradients
    ``grads`` of ``(output, hy, cy)``."""
    x, hx, cx, *rest = sample.args
    if cell.layer_norm:
        return (*grads, x, hx, cx, *rest[:10], sample.batch_sizes, sample.reverse,
                saved[0], *saved[3:7])
    return (*grads, x, hx, cx, rest[0], rest[1], rest[4], sample.batch_sizes,
            sample.reverse, saved[0], saved[3], saved[4])


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------
def _make_pair(ours_cls, ref_cls, input_size, hidden_size, dtype, device, seed, kwargs):
    torch.manual_seed(seed)
    ref = ref_cls(input_size, hidden_size, **kwargs).to(device=device, dtype=dtype)
    ours = ours_cls(input_size, hidden_size, **kwargs).to(device=device, dtype=dtype)
    return ours, ref


def make_lstm_pair(input_size: int, hidden_size: int, *, dtype=torch.float64, device="cpu",
                   seed: int = 0, **kwargs) -> tuple[rnnfast.LSTM, nn.LSTM]:
    """``(rnnfast.LSTM, torch.nn.LSTM)`` with the same arguments and
    identical weights (loaded from the nn.LSTM's state_dict)."""
    ours, ref = _make_pair(rnnfast.LSTM, nn.LSTM, input_size, hidden_size, dtype, device,
                           seed, kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def randomize_layer_norm_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every LayerNorm parameter (``ln_*``) of ``module`` a random,
    non-trivial value, in place: gains from U(0.5, 1.5), biases from
    U(-0.5, 0.5) (the initial 1 and 0 would hide a swapped or ignored
    gain or bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("ln_"):
                u = torch.rand(p.shape, generator=g, dtype=torch.float64)
                p.copy_(u + 0.5 if "_weight_" in name else u - 0.5)
    return module


def make_layer_norm_lstm_pair(input_size: int, hidden_size: int, *, dtype=torch.float64,
                              device="cpu", seed: int = 0, randomize_ln: bool = True,
                              **kwargs) -> tuple[rnnfast.LayerNormLSTM, ReferenceLayerNormLSTM]:
    """``(rnnfast.LayerNormLSTM, ReferenceLayerNormLSTM)`` with the same
    arguments and identical parameters (the reference's state_dict, with
    random LayerNorm gains and biases unless ``randomize_ln`` is False,
    loaded into rnnfast's)."""
    ours, ref = _make_pair(rnnfast.LayerNormLSTM, ReferenceLayerNormLSTM, input_size,
                           hidden_size, dtype, device, seed, kwargs)
    if randomize_ln:
        randomize_layer_norm_(ref, seed)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _loss_weights(shape, dtype, device, seed, round_to=None) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(tuple(shape), generator=g, dtype=torch.float64) + 0.5
    if round_to is not None:
        w = w.to(round_to)
    return w.to(device=device, dtype=dtype)


def weighted_loss(output: Tensor, h_n: Tensor, c_n: Tensor, *,
                  round_to: Optional[torch.dtype] = None) -> Tensor:
    """A scalar that weights every element of output, h_n and c_n by a
    different fixed factor, so each path gets its own gradient. With
    ``round_to``, the factors are first rounded to that dtype, so that runs
    in that dtype and in float64 differentiate the same function."""
    def term(t, scale, seed):
        return (t * _loss_weights(t.shape, t.dtype, t.device, seed, round_to)).sum() * scale
    return term(output, 1.0, 11) + term(h_n, 2.0, 12) + term(c_n, 3.0, 13)


def forward_backward(model: nn.Module, x: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None,
                     *, lengths: Optional[Sequence[int]] = None,
                     enforce_sorted: bool = True, backward: bool = True,
                     round_to: Optional[torch.dtype] = None) -> dict:
    """Runs ``model`` on copies of ``x`` (padded, laid out per
    ``model.batch_first``) and ``hx``, packing ``x`` first when ``lengths``
    is given, then the backward of :func:`weighted_loss`.

    Returns a dict of tensors: ``output`` (``.data`` for packed input),
    ``padded`` (``pad_packed_sequence`` of a packed output), ``lengths``,
    ``h_n``, ``c_n`` and the gradients ``grad_input``, ``grad_h0``,
    ``grad_c0``, ``grad.<parameter name>``. ``round_to``: see
    :func:`weighted_loss`.
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
        weighted_loss(loss_out, h_n, c_n, round_to=round_to).backward()
        res["grad_input"] = x.grad
        if hx is not None:
            res["grad_h0"], res["grad_c0"] = hx[0].grad, hx[1].grad
        for name, p in model.named_parameters():
            res[f"grad.{name}"] = p.grad
    return res


def assert_results_close(ours: dict, ref: dict, *, scaled: bool = False, **tol) -> None:
    """Every entry of ``ref`` is present in ``ours`` and close to it.

    With ``scaled``, ``atol`` is taken relative to the largest magnitude of
    each expected tensor (at least 1): float32 gradients summed over many
    rows are large, and their rounding error grows with them."""
    assert set(ours) == set(ref), f"keys differ: {sorted(set(ours) ^ set(ref))}"
    for key, expected in ref.items():
        got = ours[key]
        if expected is None or got is None:
            assert got is None and expected is None, f"{key}: {got!r} vs {expected!r}"
            continue
        key_tol = dict(tol)
        if scaled and expected.is_floating_point() and expected.numel() > 0:
            key_tol["atol"] = tol["atol"] * max(1.0, expected.abs().max().item())
        if _quickly_close(got, expected, **key_tol):
            continue
        torch.testing.assert_close(got, expected, **key_tol, msg=lambda m, k=key: f"{k}: {m}")


def _quickly_close(got: Tensor, expected: Tensor, *, atol: Optional[float] = None,
                   rtol: Optional[float] = None) -> bool:
    """What ``torch.testing.assert_close`` accepts, decided quickly for the
    common case (it is slow when called for dozens of small tensors per
    test); False means "let assert_close decide and explain"."""
    if (atol is None or rtol is None or not isinstance(got, Tensor)
            or type(got) is not type(expected) or got.shape != expected.shape
            or got.dtype != expected.dtype or got.device != expected.device
            or got.layout != torch.strided or expected.layout != torch.strided):
        return False
    if not got.is_floating_point():
        return torch.equal(got, expected)
    return bool(torch.isclose(got, expected, rtol=rtol, atol=atol).all())


def upcast(results: dict) -> dict:
    """``results`` (of :func:`forward_backward`) with every floating-point
    tensor in float64, to compare with a float64 reference."""
    return {k: v.double() if isinstance(v, Tensor) and v.is_floating_point() else v
            for k, v in results.items()}


def assert_error_within_twice(got: dict, pytorch: dict, exact: dict, dtype, *,
                              floor_eps: float = 1.0) -> None:
    """Reduced precision judged against PyTorch's own error (the one
    tolerance rule of the suite): for every floating-point entry of
    ``exact`` (a float64 run on the rounded weights and inputs), the error of
    ``got`` is at most twice the error of ``pytorch`` (the same math done by
    PyTorch in ``dtype``: nn.LSTM, cuDNN or the reference), plus a floor of
    ``floor_eps`` units in the last place of the entry's largest value. The
    three may be on different devices."""
    eps = torch.finfo(dtype).eps
    for key, e in exact.items():
        if e is None or not e.is_floating_point():
            continue
        assert got[key].dtype == dtype, key
        e = e.double().cpu()
        err_ours = (got[key].double().cpu() - e).abs().max().item()
        err_pt = (pytorch[key].double().cpu() - e).abs().max().item()
        floor = floor_eps * eps * max(e.abs().max().item(), 1e-3)
        assert err_ours <= 2 * err_pt + floor, \
            f"{key}: rnnfast error {err_ours:.3g}, PyTorch's {err_pt:.3g}, floor {floor:.3g}"


# --------------------------------------------------------------------------
# Bad forward arguments
# --------------------------------------------------------------------------
def bad_forward_cases(steps: int, batch: int, input_size: int, hidden: int,
                      lengths: Sequence[int], layers: int = 2, directions: int = 2) -> dict:
    """Bad ``forward`` arguments of a float32 model (``layers`` layers,
    ``directions`` directions, no projection) and the words of the error
    they must raise: ``{name: (args, regex[, same_words_as_nn_lstm])}``.
    ``same_words`` is False where nn.LSTM fails from deep inside (an error
    of _VF.lstm) rather than with words of its own."""
    T, B, I, H, L, D = steps, batch, input_size, hidden, layers, directions

    def states(b=B):
        return torch.randn(L * D, b, H) * 0.5, torch.randn(L * D, b, H) * 0.5

    x3 = torch.randn(T, B, I)
    return {
        "input_1d": ((torch.randn(I),), r"Expected input to be 2D or 3D, got 1D"),
        "input_4d": ((torch.randn(T, B, I, 1),), r"Expected input to be 2D or 3D, got 4D"),
        "input_size": ((torch.randn(T, B, I + 2),),
                       rf"input.size\(-1\) must be equal to input_size. Expected {I}, got {I+2}"),
        "input_size_unbatched": ((torch.randn(T, I + 1),), r"must be equal to input_size"),
        "h0_batch": ((x3, (states(B + 1)[0], states()[1])),
                     rf"Expected hidden\[0\] size \({L * D}, {B}, {H}\), "
                     rf"got \[{L * D}, {B + 1}, {H}\]"),
        "c0_batch": ((x3, (states()[0], states(B - 1)[1])), r"Expected hidden\[1\] size"),
        "h0_layers": ((x3, (torch.zeros(1, B, H), states()[1])),
                      rf"Expected hidden\[0\] size \({L * D}, {B}, {H}\), got \[1, {B}, {H}\]"),
        "c0_hidden": ((x3, (states()[0], torch.zeros(L * D, B, H + 1))),
                      rf"Expected hidden\[1\] size \({L * D}, {B}, {H}\), "
                      rf"got \[{L * D}, {B}, {H + 1}\]"),
        "state_2d_input_3d": ((x3, (torch.zeros(L * D, H), torch.zeros(L * D, H))),
                              r"For batched 3-D input, hx and cx should also be 3-D but got "
                              r"\(2-D, 2-D\)"),
        "state_3d_input_2d": ((torch.randn(T, I), states(1)),
                              r"For unbatched 2-D input, hx and cx should also be 2-D but got "
                              r"\(3-D, 3-D\)"),
        "state_mixed_dims": ((x3, (states()[0], torch.zeros(L * D, H))),
                             r"should also be 3-D but got \(3-D, 2-D\)"),
        "float64_input": ((x3.double(),), r"input dtype \(torch.float64\) does not match weight "
                          r"dtype \(torch.float32\)"),
        "h0_dtype": ((x3, (states()[0].double(), states()[1])),
                     r"hx must have the dtype of input", False),
        "int_input": ((torch.ones(T, B, I, dtype=torch.int64),), r"input dtype \(torch.int64\)"),
        # A device mismatch (on a GPU, most often a CPU input to a CUDA
        # model), here with the meta device, which every machine has.
        "input_device": ((x3.to("meta"),),
                         r"^Input and parameter tensors are not at the same device, found "
                         r"input tensor at meta and parameter tensor at cpu"),
        "h0_device": ((x3, (states()[0].to("meta"), states()[1])),
                      r"^Input and hidden tensors are not at the same device, found input "
                      r"tensor at cpu and hidden tensor at meta"),
        "c0_device": ((x3, (states()[0], states()[1].to("meta"))),
                      r"^Input and hidden tensors are not at the same device"),
        "seq_len_0": ((torch.randn(0, B, I),),
                      r"Expected sequence length to be larger than 0 in RNN"),
        "seq_len_0_unbatched": ((torch.randn(0, I),),
                                r"Expected sequence length to be larger than 0 in RNN"),
        "packed_h0_batch": ((make_packed(torch.randn(T, B, I), lengths),
                             (states(B + 1)[0], states(B + 1)[1])), r"Expected hidden\[0\] size",
                            False),
        "packed_input_size": ((make_packed(torch.randn(T, B, I + 1), lengths),),
                              r"must be equal to input_size", False),
        # hx must be a tuple (or list) of two tensors: nn.LSTM's _VF.lstm
        # refuses anything else (unless nn.LSTM rebuilt the tuple itself:
        # unbatched input, or a permutation of packed input).
        "hx_tensor": ((x3, torch.stack(states())),
                      r"lstm\(\) received an invalid combination of arguments"),
        "hx_three_states": ((x3, (*states(), states()[0])), r"lstm expects two hidden states"),
        "hx_list_of_three": ((x3, [*states(), states()[0]]), r"lstm expects two hidden states"),
        "packed_hx_tensor": ((make_packed(x3, lengths), torch.stack(states())),
                             r"lstm\(\) received an invalid combination of arguments"),
        "packed_hx_three_states": ((make_packed(x3, lengths), (*states(), states()[0])),
                                   r"lstm expects two hidden states"),
    }


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
    _, _, _, gates, *_ = torch.ops.rnnfast.lstm_forward.default(
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
            at = x[small][int(rel.argmax())].item()
            # On CUDA a subnormal pre-activation comes out of two cuBLAS
            # products (activation_probe), which may flush it before the
            # kernel's tanh (built with --ftz=false) sees it: a relative
            # error of 1 at |x| < 1.2e-38 alone points there.
            assert rel.max() <= 8 * eps, \
                f"tanh: relative error {rel.max().item():.3g} near 0, at x={at:.3g}"
            # (The sign of -0 may not survive the probe's GEMM.)
            assert (got[x == 0] == 0).all(), "tanh(0) must be 0"


# --------------------------------------------------------------------------
# Cells: one description per recurrent cell drives the shared tests
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """What the shared tests (test_cells.py) need to know about one cell.

    ``module`` is rnnfast's nn.Module, ``reference`` the module it must agree
    with (torch.nn.LSTM, or the plain-PyTorch reference where nn.LSTM has no
    such cell); ``forward_op`` / ``backward_op`` name its ops in
    ``torch.ops.rnnfast``; ``sample_inputs(device, dtype, requires_grad,
    include_eval=...)`` gives its op samples; ``backward_grads`` says, for
    each output of the backward op, which forward arguments it is the
    gradient of (one gradient serves every bias that enters the gates
    alike); ``hidden`` is the hidden size of the module tests.
    """

    name: str
    module: type
    reference: type
    forward_op: str
    backward_op: str
    sample_inputs: Callable[..., list]
    backward_grads: tuple
    hidden: int
    layer_norm: bool = False

    def __repr__(self) -> str:  # the test ids
        return self.name

    @property
    def forward(self):
        return getattr(torch.ops.rnnfast, self.forward_op).default

    @property
    def backward(self):
        return getattr(torch.ops.rnnfast, self.backward_op).default

    @property
    def has_projection(self) -> bool:
        return not self.layer_norm

    def op_sample(self, **kwargs) -> OpSample:
        """:func:`make_op_args` for this cell's forward op."""
        return make_op_args(layer_norm=self.layer_norm, **kwargs)

    def kwargs(self, proj_size: int = 0, **kwargs) -> dict:
        """Module arguments: ``kwargs``, plus ``proj_size`` where the cell
        has a projection (the LayerNorm-LSTM has none)."""
        if proj_size and self.has_projection:
            kwargs["proj_size"] = proj_size
        return kwargs

    def make_pair(self, input_size: int, hidden_size: int, **kwargs):
        """``(rnnfast module, reference module)`` with identical parameters
        (see :func:`make_lstm_pair`, :func:`make_layer_norm_lstm_pair`)."""
        make = make_layer_norm_lstm_pair if self.layer_norm else make_lstm_pair
        return make(input_size, hidden_size, **kwargs)

    def gradients_by_argument(self, sample: OpSample, grads: Sequence[Tensor]) -> list:
        """``(name, gradient)`` for each of ``sample.diff_args``, read from
        the outputs ``grads`` of the backward op."""
        assert len(grads) == len(self.backward_grads), (len(grads), self.backward_grads)
        by_name = {name: g for names, g in zip(self.backward_grads, grads) for name in names}
        return [(name, by_name[name]) for name in sample.diff_names]


def float64_twin(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` (same arguments, same values)."""
    return copy.deepcopy(module).to(torch.float64)


LSTM_CELL = Cell(
    name="lstm", module=rnnfast.LSTM, reference=nn.LSTM, forward_op="lstm_forward",
    backward_op="lstm_backward", sample_inputs=sample_inputs,
    backward_grads=(("input",), ("hx",), ("cx",), ("weight_ih",), ("weight_hh",),
                    ("bias_ih", "bias_hh"), ("weight_hr",)),
    hidden=6)
LAYER_NORM_LSTM_CELL = Cell(
    name="layer_norm_lstm", module=rnnfast.LayerNormLSTM, reference=ReferenceLayerNormLSTM,
    forward_op="layer_norm_lstm_forward", backward_op="layer_norm_lstm_backward",
    sample_inputs=layer_norm_sample_inputs,
    backward_grads=(("input",), ("hx",), ("cx",), ("weight_ih",), ("weight_hh",),
                    ("bias_ih", "bias_hh", "ln_ih_bias", "ln_hh_bias"), ("ln_ih_weight",),
                    ("ln_hh_weight",), ("ln_cell_weight",), ("ln_cell_bias",)),
    hidden=5, layer_norm=True)
CELLS = [LSTM_CELL, LAYER_NORM_LSTM_CELL]
