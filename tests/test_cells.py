"""One set of tests for every recurrent cell, over ``cell x device``.

Each test takes a :class:`utils.Cell` (``rnnfast.LSTM`` against
``torch.nn.LSTM``, ``rnnfast.LayerNormLSTM`` against the plain-PyTorch
``ReferenceLayerNormLSTM``) and a device (CPU always, CUDA when present):

1. the ops: float64 gradcheck, the backward op against autograd, opcheck,
   workspaces, non-contiguous arguments, argument checks;
2. the modules: outputs and every gradient against the reference, no_grad,
   frozen weights;
3. nn.LSTM's forward contract: unbatched, batch_first, PackedSequence,
   empty batch, dropout;
4. bad input (nn.LSTM's exception class and words) and constructor errors;
5. NaN / Inf, strides, determinism, reduced precision.

What only one cell has (nn.LSTM's initialisation, repr and state_dict; the
LayerNorm parameters and eps; the activation sweep) is in test_lstm.py and
test_layer_norm_lstm.py; what only CUDA has, in test_cuda.py.
"""

from __future__ import annotations

import itertools
import re
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import rnnfast
from utils import (CELLS, LAYER_NORM_LSTM_CELL, LSTM_CELL, OLD_NN_LSTM, TOLERANCES,
                   assert_error_within_twice, assert_results_close, backward_args_from,
                   bad_forward_cases, float64_twin, forward_backward, make_packed,
                   random_input, random_states, randomize_layer_norm_, upcast)

T, B, I, P = 5, 4, 3, 4  # P: proj_size of the projection cases (LSTM only)
LENGTHS_SORTED = [5, 4, 4, 2]
LENGTHS_UNSORTED = [2, 5, 1, 4]  # enforce_sorted=False
INPUT_KINDS = ["padded", "packed_sorted", "packed_unsorted"]
GRADCHECK_TOL = dict(eps=1e-6, atol=1e-8, rtol=1e-6)
# float32 LayerNorm-LSTM results are compared with the float64 reference run
# on the same (float32) weights and inputs, with an atol relative to each
# result's largest magnitude: weight gradients are sums over every row, and
# a LayerNorm of a small-variance vector (W_hh h for small h) amplifies
# rounding by up to 1/sqrt(eps), so float32's own error reaches ~2e-5 of the
# largest value here (the float32 reference's too).
LN_F32_TOL = dict(atol=5e-5, rtol=1e-5, scaled=True)


def _states_for(model, dtype=torch.float64, device="cpu", batch=B):
    """Random ``(h_0, c_0)`` shaped for ``model``."""
    directions = 2 if model.bidirectional else 1
    return random_states(model.num_layers, directions, model.proj_size or model.hidden_size,
                         model.hidden_size, dtype, device, batch)


def _lengths(kind):
    return {"padded": None, "packed_sorted": LENGTHS_SORTED,
            "packed_unsorted": LENGTHS_UNSORTED}[kind]


def _assert_every_gradient_reached(res):
    """Every gradient exists and is finite, and the loss reaches every
    parameter."""
    for key, value in res.items():
        if key.startswith("grad"):
            assert value is not None, key
            assert torch.isfinite(value).all(), key
            if key.startswith("grad."):
                assert value.abs().sum() > 0, key


def _cell_params(per_cell: dict) -> list:
    """``pytest.param(cell, *values)`` for each cell and each of its rows
    in ``per_cell`` (``{cell: [(id, values...), ...]}``), for parameter
    grids that differ between cells."""
    return [pytest.param(cell, *row[1:], id=f"{cell.name}-{row[0]}")
            for cell, rows in per_cell.items() for row in rows]


def _op_grid_id(bias, reverse, proj, packed):
    return (f"{'bias' if bias else 'nobias'}-{'rev' if reverse else 'fwd'}-"
            f"{f'proj{proj}-' if proj else ''}{'packed' if packed else 'padded'}")


# --------------------------------------------------------------------------
# 1. The ops
# --------------------------------------------------------------------------
def _op_grid(cell):
    projections = [0, 2] if cell.has_projection else [0]
    return [(_op_grid_id(b, r, p, k), b, r, p, k)
            for b, r, p, k in itertools.product([True, False], [False, True], projections,
                                                [False, True])]


@pytest.mark.parametrize("cell,bias,reverse,proj,packed",
                         _cell_params({c: _op_grid(c) for c in CELLS}))
def test_gradcheck(device, cell, bias, reverse, proj, packed):
    """float64 gradcheck of output, hy and cy through the registered
    autograd, w.r.t. every differentiable argument (LayerNorm parameters at
    non-trivial values)."""
    sample = cell.op_sample(steps=3, batch=3, input_size=2, hidden=3, proj=proj, bias=bias,
                            reverse=reverse, lengths=[3, 2, 2, 1] if packed else None,
                            device=device, requires_grad=True, seed=7)
    # input, hx, cx, weight_ih, weight_hh (+ both biases) (+ weight_hr) (+ six LN)
    assert len(sample.diff_args) == 5 + 2 * bias + (proj > 0) + 6 * cell.layer_norm
    if packed:
        bs = sample.batch_sizes
        assert bs.dtype == torch.int64 and bs.device.type == "cpu"
        assert sample.args[0].dim() == 2  # [N, I]
    for name, value in zip(sample.diff_names, sample.diff_args):
        if name.startswith("ln_") and name.endswith("_weight"):
            assert not torch.allclose(value, torch.ones_like(value)), name
        elif name.startswith("ln_"):
            assert value.abs().min() > 0, name
    assert torch.autograd.gradcheck(sample.outputs, tuple(sample.diff_args), **GRADCHECK_TOL)


def test_gradcheck_each_output_alone(device, cell):
    """Gradients when only one of output / hy / cy is used (the others'
    gradients arrive as None and must count as zero)."""
    sample = cell.op_sample(lengths=[3, 1], hidden=3, reverse=cell.layer_norm,
                            proj=2 if cell.has_projection else 0, device=device,
                            requires_grad=True, seed=3)
    for k in range(3):
        assert torch.autograd.gradcheck(lambda *a, k=k: sample.outputs(*a)[k],
                                        tuple(sample.diff_args), **GRADCHECK_TOL)


def _backward_matches_autograd(cell, sample):
    args = backward_args_from(sample)
    grads = cell.backward(*args)
    expected = torch.autograd.grad(sample.outputs(), sample.diff_args, args[:3])
    got = cell.gradients_by_argument(sample, grads)
    assert len(got) == len(expected)
    for (name, g), e in zip(got, expected):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12,
                                   msg=lambda m, k=name: f"{k}: {m}")


BACKWARD_CASES = {
    LSTM_CELL: [("packed-rev-bias-proj", True, True, True)],
    LAYER_NORM_LSTM_CELL: [("packed-rev-bias", True, True, True),
                           ("padded-fwd-nobias", False, False, False),
                           ("packed-fwd-nobias", True, False, False)],
}


@pytest.mark.parametrize("cell,packed,reverse,bias", _cell_params(BACKWARD_CASES))
def test_backward_op_matches_autograd(device, cell, packed, reverse, bias):
    """The backward op called directly gives the gradients autograd gives;
    its one bias gradient is that of every bias argument."""
    sample = cell.op_sample(lengths=[4, 3, 1] if packed else None, hidden=4,
                            proj=2 if cell.has_projection else 0, reverse=reverse, bias=bias,
                            device=device, requires_grad=True, seed=9)
    _backward_matches_autograd(cell, sample)


def test_forward_outputs_shapes_and_workspaces(device, cell):
    """Output and states shaped like the input's; the saved activations
    have one row per input row in training and none in inference; inference
    and training compute the same outputs."""
    for sample in cell.sample_inputs(device):
        x, hx, cx, w_ih = sample.args[:4]
        hidden = w_ih.shape[0] // 4
        out, hy, cy, *saved = cell.forward(*sample.args)
        assert out.shape == (*x.shape[:-1], hx.shape[-1]), sample
        assert hy.shape == hx.shape and cy.shape == cx.shape, sample
        rows = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]
        n = rows if sample.training else 0
        if cell.layer_norm:
            cells, n_ih, n_hh, stats, cell_states = saved
            assert cells.shape == (n, hidden), sample
            assert n_ih.shape == n_hh.shape == (n, 4 * hidden), sample
            assert stats.shape[0] == n, sample
        else:
            gates, cells, cell_states = saved
            assert gates.shape == (n, 4 * hidden) and cells.shape == (n, hidden), sample
        # the carried cell states are only kept with zoneout on c
        assert cell_states.shape == (0, hidden), sample
        assert not any(t.requires_grad for t in saved)
        train = sample.with_arg("training", True)
        for a, b in zip((out, hy, cy), cell.forward(*train)[:3]):
            assert torch.equal(a, b), sample


def test_eval_forward_outputs_are_not_differentiable(cell):
    """training=False saves nothing, so its outputs carry no gradient (rather
    than a graph whose backward could only fail)."""
    sample = cell.op_sample(training=False, requires_grad=True)
    out, hy, cy = sample.outputs()
    assert not (out.requires_grad or hy.requires_grad or cy.requires_grad)
    with pytest.raises(RuntimeError, match="does not require grad"):
        (out.sum() + hy.sum() + cy.sum()).backward()


def test_double_backward_is_refused(cell):
    sample = cell.op_sample(requires_grad=True)
    out, hy, cy = sample.outputs()
    (g,) = torch.autograd.grad(out.pow(2).sum(), sample.args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


OPCHECK_SAMPLES = {cell: [(s.name, i) for i, s in enumerate(cell.sample_inputs("cpu"))]
                   for cell in CELLS}


@pytest.mark.parametrize("cell,index", _cell_params(OPCHECK_SAMPLES))
def test_opcheck_forward(device, cell, index):
    """Every sample; those of training=True forwards with inputs that
    require grad (so the autograd registration is exercised), the
    training=False ones as inference calls."""
    training = cell.sample_inputs(device)[index].training
    sample = cell.sample_inputs(device, requires_grad=training)[index]
    torch.library.opcheck(cell.forward, sample.args)


def test_opcheck_eval_forward_with_inputs_requiring_grad(device, cell):
    """training=False with inputs that require grad: opcheck (its
    aot_dispatch test runs a backward) accepts the op only if the backward
    of such a call works, since nothing tells autograd the op is not
    differentiable there."""
    sample = [s for s in cell.sample_inputs(device, requires_grad=True) if not s.training][0]
    torch.library.opcheck(cell.forward, sample.args)


def test_opcheck_backward(device, cell):
    samples = cell.sample_inputs(device, include_eval=False)
    assert len(samples) >= 4
    # The LSTM's first four samples cover padded, packed, both directions,
    # biases and projection; the LayerNorm-LSTM's five, its every kind.
    for sample in samples[:5 if cell.layer_norm else 4]:
        torch.library.opcheck(cell.backward, backward_args_from(sample))


def _strided(t):
    """A non-contiguous view holding the same values as ``t``."""
    if t is None or t.dim() == 0:
        return t
    if t.dim() == 1:
        base = torch.zeros(t.shape[0], 2, dtype=t.dtype, device=t.device)
        base[:, 1] = t
        return base[:, 1]
    base = t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not base.is_contiguous() or min(base.shape[-2:]) <= 1
    return base


STRIDED_SAMPLES = {LSTM_CELL: [("padded-bias", 0), ("proj", 2), ("packed-proj-rev", 3)],
                   LAYER_NORM_LSTM_CELL: [("padded-bias", 0), ("padded-rev", 1),
                                          ("packed-rev", 2)]}


@pytest.mark.parametrize("cell,index", _cell_params(STRIDED_SAMPLES))
def test_non_contiguous_arguments(device, cell, index):
    """Every differentiable argument a non-contiguous view: bitwise the
    same outputs, the same gradients."""
    sample = cell.sample_inputs(device, requires_grad=True)[index]
    strided = [_strided(t).requires_grad_() for t in sample.diff_args]
    assert any(not t.is_contiguous() for t in strided)
    got = sample.outputs(*strided)
    expected = sample.outputs()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    upstream = [torch.randn_like(t) for t in expected]
    g_got = torch.autograd.grad(got, strided, upstream)
    g_exp = torch.autograd.grad(expected, sample.diff_args, upstream)
    for g, e in zip(g_got, g_exp):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)


def test_op_rejects_mismatched_device_in_cpu_kernel(cell):
    """The CPU kernel's own check: an hx on another device (meta) is a
    RuntimeError in nn.LSTM's words, naming the op and the argument, not a
    crash. The CPU kernel
    is reached with redispatch because the dispatcher would pick the Meta
    kernel."""
    sample = cell.op_sample()
    args = sample.with_arg("hx", sample.arg("hx").to("meta"))
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"^Input and hidden tensors are not at the same "
                                           r"device, found input tensor at cpu and hidden "
                                           rf"tensor at meta \(rnnfast.{cell.forward_op}: hx\)"):
        cell.forward.redispatch(cpu, *args)


@pytest.mark.parametrize("which", ["input", "hx"])
def test_op_rejects_mismatched_devices(cell, which):
    """A plain op call mixing meta and CPU tensors must be rejected like the
    real kernels reject mixed devices, rather than return outputs on
    different devices (the Meta / fake kernel runs for such a call)."""
    sample = cell.op_sample()
    with pytest.raises(RuntimeError, match="device"):
        cell.forward(*sample.with_arg(which, sample.arg(which).to("meta")))


def _narrow(name, n):
    return lambda s: s.with_arg(name, s.arg(name)[..., :n])


OP_ARGUMENT_ERRORS = {
    LSTM_CELL: [
        ("hx", _narrow("hx", 2), r"rnnfast.lstm_forward: expected hx of size \[3, 3\], "
                                 r"got \[3, 2\]"),
        ("cx", lambda s: s.with_arg("cx", s.arg("cx")[:2]),
         r"rnnfast.lstm_forward: expected cx of size \[3, 3\], got \[2, 3\]"),
        ("weight_ih", _narrow("weight_ih", 1), r"expected weight_ih of size \[12, 2\]"),
        ("input_dim", lambda s: s.with_arg("input", s.arg("input")[0]),
         r"input of 3 dimensions"),
        ("dtype", lambda s: s.with_arg("hx", s.arg("hx").float()),
         r"rnnfast.lstm_forward: hx must have the dtype of input"),
        ("one_bias", lambda s: s.with_arg("bias_hh", None), r"both biases or neither"),
        ("empty_seq", lambda s: s.with_arg("input", s.arg("input")[:0]),
         r"sequence length to be larger than 0"),
        ("int_input", lambda s: s.with_arg("input", s.arg("input").long()), r"floating point"),
    ],
    LAYER_NORM_LSTM_CELL: [
        ("ln_ih_weight", lambda s: s.with_arg("ln_ih_weight", s.arg("ln_ih_weight")[:-1]),
         r"rnnfast.layer_norm_lstm_forward: expected ln_ih_weight of size \[12\], "
         r"got \[11\]"),
        ("ln_hh_bias", lambda s: s.with_arg("ln_hh_bias", s.arg("ln_hh_bias")[:-1]),
         r"rnnfast.layer_norm_lstm_forward: expected ln_hh_bias of size \[12\]"),
        ("ln_cell_weight",
         lambda s: s.with_arg("ln_cell_weight", s.arg("ln_cell_weight").repeat(2)),
         r"expected ln_cell_weight of size \[3\], got \[6\]"),
        ("ln_cell_bias_dtype",
         lambda s: s.with_arg("ln_cell_bias", s.arg("ln_cell_bias").float()),
         r"rnnfast.layer_norm_lstm_forward: ln_cell_bias must have the dtype of input"),
        ("hx", _narrow("hx", 2), r"rnnfast.layer_norm_lstm_forward: expected hx of size "
                                 r"\[3, 3\], got \[3, 2\]"),
        ("int_input", lambda s: s.with_arg("input", s.arg("input").long()),
         r"rnnfast.layer_norm_lstm_forward: input must be a floating point"),
    ],
}


@pytest.mark.parametrize("cell,change,match", _cell_params(OP_ARGUMENT_ERRORS))
def test_op_argument_errors(cell, change, match):
    """The op's own checks: a RuntimeError naming the op and the argument."""
    with pytest.raises(RuntimeError, match=match):
        cell.forward(*change(cell.op_sample()))


@pytest.mark.parametrize("batch_sizes,match", [
    ([3, 1, 2], "non-increasing"),
    ([3, 0], "positive"),
    ([3, 2], r"sum to 5 but the packed input has 6 rows"),
])
def test_op_rejects_bad_batch_sizes(cell, batch_sizes, match):
    sample = cell.op_sample(lengths=[3, 2, 1])  # 6 rows
    args = sample.with_arg("batch_sizes", torch.tensor(batch_sizes, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=rf"rnnfast.{cell.forward_op}: .*{match}"):
        cell.forward(*args)


def test_backward_op_names_itself_in_errors(cell):
    """The backward op's argument errors name the backward op."""
    args = list(backward_args_from(cell.op_sample()))
    args[4] = args[4][:, :2]  # hx
    with pytest.raises(RuntimeError, match=rf"rnnfast.{cell.backward_op}: expected hx of size"):
        cell.backward(*args)


# The backward op's positions of the tensors its forward's checks do not
# cover (gradients, the forward's output and what it saved), with the width
# of each (None: the output's, whose shape is [T, B, P]).
BACKWARD_TENSORS = {
    LSTM_CELL: {"grad_output": 0, "grad_hy": 1, "grad_cy": 2, "output": 11,
                "gates": 12, "cells": 13},
    LAYER_NORM_LSTM_CELL: {"grad_output": 0, "grad_hy": 1, "grad_cy": 2, "output": 18,
                           "cells": 19, "normalized_ih": 20, "normalized_hh": 21,
                           "stats": 22},
}


@pytest.mark.parametrize("narrow", [True, False], ids=["narrower", "wider"])
@pytest.mark.parametrize("name", sorted({n for names in BACKWARD_TENSORS.values()
                                         for n in names}))
def test_backward_op_refuses_a_misshapen_gradient_or_saved_tensor(cell, name, narrow):
    """Each tensor the backward op reads besides the forward's arguments is
    checked for its whole size before any kernel indexes it: one a column
    narrower (or wider) than the op's sizes say is refused with its name,
    where it was read past its end (a gradient of h or c corrupted the heap
    on the CPU; on a GPU it is an illegal address)."""
    positions = BACKWARD_TENSORS[cell]
    if name not in positions:
        pytest.skip(f"{cell.backward_op} has no {name}")
    args = list(backward_args_from(cell.op_sample()))
    i = positions[name]
    t = args[i]
    args[i] = t[..., :-1] if narrow else torch.cat([t, t[..., :1]], dim=-1)
    with pytest.raises(RuntimeError,
                       match=rf"rnnfast.{cell.backward_op}: expected {name} of size "):
        cell.backward(*args)


def test_backward_op_after_an_evaluating_forward_says_why(cell):
    """Saved tensors of a forward run without training=True are empty: the
    backward op says that this is why it cannot run."""
    sample = cell.op_sample()
    args = list(backward_args_from(sample))
    for name, i in BACKWARD_TENSORS[cell].items():
        if name not in ("grad_output", "grad_hy", "grad_cy", "output"):
            args[i] = args[i][:0]
    with pytest.raises(RuntimeError, match=rf"rnnfast.{cell.backward_op}: the forward was "
                                           r"run without training=True"):
        cell.backward(*args)


def _misshapen(t):
    """Versions of a tensor argument that no op may take for it (but the
    exceptions _op_calls names): a column fewer or more, a row fewer, no
    rows, a dimension more or fewer, integers in place of floats (and
    floats in place of integers)."""
    out = {"unsqueezed": t.unsqueeze(0),
           "other_dtype": t.long() if t.is_floating_point() else t.float()}
    if t.dim() >= 1:
        out.update(wider=torch.cat([t, t[..., :1]], -1), first_only=t[0], no_rows=t[:0])
        if t.size(-1) > 1:
            out["narrower"] = t[..., :-1]
        if t.size(0) > 1:
            out["row_fewer"] = t[:-1]
    return out


def _op_calls(cell):
    """(op name, op, arguments, the (position, misshaping) pairs that are
    valid) for every op of the cell: its forward and backward, padded and
    packed, and the stacked network op. A padded input a row fewer is a
    shorter sequence."""
    calls = []
    for kwargs in ({}, {"lengths": [3, 2, 1]}):
        sample = cell.op_sample(**kwargs)
        shorter = set() if kwargs else {(0, "row_fewer")}
        calls.append((cell.forward_op, cell.forward, list(sample.args), shorter))
        calls.append((cell.backward_op, cell.backward, list(backward_args_from(sample)),
                      set()))
    torch.manual_seed(0)
    if cell.layer_norm:
        model = rnnfast.LayerNormLSTM(4, 6, num_layers=2)
        h0, c0 = torch.zeros(2, 3, 6), torch.zeros(2, 3, 6)
    else:
        model = rnnfast.LSTM(4, 6, num_layers=2, proj_size=3)
        h0, c0 = torch.zeros(2, 3, 3), torch.zeros(2, 3, 6)
    calls.append(("stacked_inference", torch.ops.rnnfast.stacked_inference.default,
                  [torch.randn(5, 3, 4), h0, c0, [w.detach() for w in model._flat_weights],
                   2, False, False, None, True, cell.layer_norm, 1e-5, 0.0, 0.0],
                  {(0, "row_fewer")}))
    return calls


def test_every_op_refuses_every_misshapen_tensor(cell):
    """Every tensor argument of every op (and each weight of the stacked
    op's list), misshapen in each way of _misshapen, is refused with an
    exception: none is read past its end, crashes the process or gives a
    result. Each op's arguments as given run."""
    accepted = []
    with torch.no_grad():  # (the stacked op is for inference only)
        for name, op, args, valid in _op_calls(cell):
            op(*args)
            for i, arg in enumerate(args):
                variants = []
                if isinstance(arg, torch.Tensor):
                    variants = [(k, v) for k, v in _misshapen(arg).items()
                                if (i, k) not in valid]
                elif isinstance(arg, list) and arg and isinstance(arg[0], torch.Tensor):
                    for j, w in enumerate(arg):
                        variants += [(f"[{j}] {k}", arg[:j] + [v] + arg[j + 1:])
                                     for k, v in _misshapen(w).items()]
                    variants.append(("one weight fewer", arg[:-1]))
                for kind, value in variants:
                    try:
                        op(*args[:i], value, *args[i + 1:])
                    except (RuntimeError, ValueError, TypeError, IndexError):
                        continue
                    accepted.append(f"{name} argument {i}: {kind}")
    assert not accepted, accepted


# --------------------------------------------------------------------------
# 2. The modules against the reference: outputs and every gradient
# --------------------------------------------------------------------------
def _expected(cell, ref, x, hx, dtype, **run):
    """The reference's results, and the comparison to make: nn.LSTM in the
    same dtype; the LayerNorm reference in float64 for float32 (its own
    float32 rounding is no better than rnnfast's)."""
    if cell.layer_norm and dtype == torch.float32:
        hx64 = None if hx is None else tuple(h.double() for h in hx)
        return forward_backward(float64_twin(ref), x.double(), hx64, **run), LN_F32_TOL
    return forward_backward(ref, x, hx, **run), TOLERANCES[dtype]


def _assert_parity(cell, got, expected, tol, dtype):
    if dtype == torch.float64 or not cell.layer_norm:
        assert_results_close(got, expected, **tol)
    else:
        assert all(v.dtype == dtype for k, v in got.items() if k != "lengths"
                   and v is not None and v.is_floating_point())
        assert_results_close(upcast(got), expected, **tol)


# The fourth axis: the LSTM without and with a projection (two layers), the
# LayerNorm-LSTM (no projection) with one and two layers.
PARITY_VARIANTS = {LSTM_CELL: [("proj0", dict(num_layers=2)),
                               (f"proj{P}", dict(num_layers=2, proj_size=P))],
                   LAYER_NORM_LSTM_CELL: [("L1", dict(num_layers=1)), ("L2", dict(num_layers=2))]}
PARITY_GRID = {
    cell: [(f"{'bias' if b else 'nobias'}-{'bf' if bf else 'tf'}-{'bi' if d else 'uni'}-"
            f"{vid}-{k}-{'hx' if h else 'nohx'}", b, bf, d, variant, k, h)
           for b, bf, d, (vid, variant), k, h in itertools.product(
               [True, False], [False, True], [False, True], PARITY_VARIANTS[cell],
               INPUT_KINDS, [False, True])]
    for cell in CELLS}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell,bias,batch_first,bidirectional,variant,kind,with_hx",
                         _cell_params(PARITY_GRID))
def test_parity_with_reference(device, dtype, cell, bias, batch_first, bidirectional, variant,
                               kind, with_hx):
    ours, ref = cell.make_pair(I, cell.hidden, bias=bias, batch_first=batch_first,
                               bidirectional=bidirectional, dtype=dtype, device=device,
                               **variant)
    x = random_input(batch_first, dtype, device)
    hx = _states_for(ours, dtype, device) if with_hx else None
    lengths = _lengths(kind)
    run = dict(lengths=lengths, enforce_sorted=kind != "packed_unsorted")
    got = forward_backward(ours, x, hx, **run)
    expected, tol = _expected(cell, ref, x, hx, dtype, **run)
    _assert_parity(cell, got, expected, tol, dtype)
    # Every gradient exists (input, h0, c0, each parameter incl. ln_*) and
    # the loss reaches every parameter.
    per_direction = 2 + 2 * bias + (variant.get("proj_size", 0) > 0) + 6 * cell.layer_norm
    n_params = variant["num_layers"] * (1 + bidirectional) * per_direction
    assert sum(k.startswith("grad.") for k in got) == n_params
    assert ("grad_h0" in got) == with_hx
    _assert_every_gradient_reached(got)
    if lengths is not None:  # pad_packed_sequence gives back the lengths
        assert torch.equal(got["lengths"], torch.tensor(lengths))


def test_parity_single_layer_and_three_layers(device, cell):
    for num_layers in (1, 3):
        ours, ref = cell.make_pair(I, cell.hidden, device=device,
                                   **cell.kwargs(num_layers=num_layers, bidirectional=True,
                                                 proj_size=2))
        x = random_input(False, device=device)
        assert_results_close(forward_backward(ours, x), forward_backward(ref, x),
                             **TOLERANCES[torch.float64])


def test_parity_no_grad_and_inference_mode(device, cell):
    ours, ref = cell.make_pair(I, cell.hidden, num_layers=2, bidirectional=True, device=device)
    x = random_input(False, device=device)
    with torch.no_grad():
        expected = ref(x)
        got_no_grad = ours(x)
    with torch.inference_mode():
        got_inference = ours(x)
    for got in (got_no_grad, got_inference):
        torch.testing.assert_close(got[0], expected[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(got[1], expected[1], atol=1e-10, rtol=1e-10)
        assert got[0].grad_fn is None


def test_parity_frozen_weights_input_grad_only(device, cell):
    """Gradients w.r.t. the input when no parameter requires grad."""
    ours, ref = cell.make_pair(I, cell.hidden, device=device,
                               **cell.kwargs(num_layers=2, proj_size=2))
    for m in (ours, ref):
        m.requires_grad_(False)
    x = random_input(False, device=device)
    got, expected = forward_backward(ours, x), forward_backward(ref, x)
    assert_results_close(got, expected, **TOLERANCES[torch.float64])
    assert got["grad_input"].abs().sum() > 0


# --------------------------------------------------------------------------
# How a call reaches the kernel (rnnfast.ops._call, rnnfast._export.capture)
# --------------------------------------------------------------------------
class _CountingBelowAutograd:
    """Stands in for rnnfast.ops._below_autograd (the guard it enters to
    call a kernel past its autograd), counting its uses."""

    entered = 0
    _guard = torch._C._AutoDispatchBelowAutograd

    def __enter__(self):
        type(self).entered += 1
        self._inner = self._guard()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


@pytest.fixture
def below_autograd(monkeypatch):
    """The count of calls that went straight to a kernel."""
    counter = type("Counter", (_CountingBelowAutograd,), {"entered": 0})
    monkeypatch.setattr(rnnfast.ops, "_below_autograd", counter)
    return counter


def test_op_without_gradient_goes_straight_to_the_kernel(device, cell, below_autograd):
    """Where no gradient can be asked of the result (no_grad, or nothing
    requiring grad), the ops module calls the kernel below autograd: the same
    outputs, bit for bit, as the call through the op's autograd kernel."""
    wrapper = getattr(rnnfast.ops, cell.forward_op)
    for sample in cell.sample_inputs(device):
        for requires_grad in (False, True):
            args = tuple(a.detach().requires_grad_(requires_grad)
                         if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                         for a in sample.args)
            with torch.no_grad():
                through_autograd = cell.forward(*args)
                before = below_autograd.entered
                straight = wrapper(*args)
                assert below_autograd.entered == before + 1, sample
            for a, b in zip(straight, through_autograd):
                assert torch.equal(a, b), sample
                assert a.grad_fn is None and not a.requires_grad
    # grad mode, nothing requiring grad: straight too
    sample = cell.sample_inputs(device)[0]
    before = below_autograd.entered
    out = wrapper(*sample.args)[0]
    assert below_autograd.entered == before + 1 and out.grad_fn is None


def test_module_routes_by_what_gradient_is_needed(device, cell, below_autograd):
    """A training forward goes through autograd, and its backward's ops
    (run by the autograd engine with grad mode off) straight to their
    kernels: one each per layer and direction; the gradients are the
    reference's."""
    ours, ref = cell.make_pair(I, cell.hidden, num_layers=2, bidirectional=True,
                               device=device)
    x = random_input(False, device=device)
    with torch.no_grad():
        ours(x)
    assert below_autograd.entered == 1  # the whole network: one stacked_inference
    below_autograd.entered = 0
    out, (h_n, c_n) = ours(x)
    assert below_autograd.entered == 0 and out.grad_fn is not None
    out.sum().backward()
    assert below_autograd.entered == 4
    ref(x)[0].sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-10, msg=name)


def _count_stacked_calls(monkeypatch) -> list:
    """Records each call of ops.stacked_inference, the inference route of
    rnnfast.functional: (num_layers, bidirectional, layer_norm)."""
    real, calls = rnnfast.ops.stacked_inference, []

    def spy(*args):
        calls.append((args[4], args[5], args[9]))
        return real(*args)
    monkeypatch.setattr(rnnfast.ops, "stacked_inference", spy)
    return calls


INFERENCE_ROUTE_CASES = {
    "2layers-bidirectional": dict(num_layers=2, bidirectional=True),
    "batch_first-projection": dict(batch_first=True, proj_size=2),
    "packed-bias_false": dict(bias=False, packed=True),
    "packed-2layers-bidirectional": dict(num_layers=2, bidirectional=True, packed=True),
    "zoneout-rates": dict(num_layers=2, zoneout_hidden=0.3, zoneout_cell=0.2),
    "training-no_dropout": dict(num_layers=2, train=True),
    "eval-dropout": dict(num_layers=2, dropout=0.5),
}


@pytest.mark.parametrize("case", list(INFERENCE_ROUTE_CASES))
def test_inference_route_gives_the_general_routes_bits(device, cell, case, monkeypatch):
    """A call that needs no gradient and draws no random mask runs as one
    stacked_inference op (the layers called from C++): bitwise the outputs
    and states of the general route (per layer from Python), padded and
    packed, uni- and bidirectional."""
    kwargs = dict(INFERENCE_ROUTE_CASES[case])
    packed, train = kwargs.pop("packed", False), kwargs.pop("train", False)
    model = cell.module(I, cell.hidden, device=device, dtype=torch.float64,
                        **cell.kwargs(**kwargs)).train(train)
    x = random_input(model.batch_first, device=device)
    if packed:
        x = make_packed(x, LENGTHS_UNSORTED, enforce_sorted=False)
    calls = _count_stacked_calls(monkeypatch)
    with torch.no_grad():
        out, (h, c) = model(x)
    assert calls == [(model.num_layers, model.bidirectional, cell.layer_norm)]
    monkeypatch.setattr(rnnfast.functional, "_inference_route", lambda *a: False)
    with torch.no_grad():
        out_ref, (h_ref, c_ref) = model(x)
    assert len(calls) == 1
    if packed:
        out, out_ref = out.data, out_ref.data
    for got, expected in ((out, out_ref), (h, h_ref), (c, c_ref)):
        assert torch.equal(got, expected)


def test_inference_route_not_taken_where_the_call_needs_more(cell, monkeypatch):
    """A gradient to keep, a torch.func transform, a trace, or a random mask
    to draw (zoneout and DropConnect in training, dropout between layers):
    the general route."""
    calls = _count_stacked_calls(monkeypatch)
    model = cell.module(I, cell.hidden, num_layers=2, dtype=torch.float64)
    x = random_input(False)
    model(x)[0].sum().backward()  # the gradient
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        torch.func.vmap(lambda xi: torch.func.functional_call(model, params, (xi,))[0],
                        in_dims=1)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (x,), check_trace=False)
    for kwargs in (dict(zoneout_hidden=0.2), dict(weight_dropout=0.3),
                   dict(num_layers=2, dropout=0.3)):
        with torch.no_grad():
            cell.module(I, cell.hidden, dtype=torch.float64, **kwargs).train()(x)
    assert calls == []
    with torch.no_grad():
        model(x)
    assert len(calls) == 1


def test_stacked_inference_refuses_a_call_that_needs_a_gradient(cell):
    """The op has no autograd formula: with grad mode on, an argument that
    requires grad is refused rather than given a result without one."""
    model = cell.module(I, cell.hidden, num_layers=2, dtype=torch.float64)
    x, (h0, c0) = random_input(False), (torch.zeros(2, B, cell.hidden, dtype=torch.float64),) * 2
    weights = model._flat_weights
    args = (x, h0, c0, weights, 2, False, False, None, True, cell.layer_norm, 1e-5, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="inference only"):
        torch.ops.rnnfast.stacked_inference(*args)
    with torch.no_grad():
        out, h_n, c_n = torch.ops.rnnfast.stacked_inference(*args)
        expected = model(x, (h0, c0))
    assert torch.equal(out, expected[0]) and torch.equal(h_n, expected[1][0])


def test_functional_states_of_too_few_layers_raise_index_error_on_both_routes():
    """rnnfast.functional.lstm reads h0 and c0 per layer-direction as
    torch._VF.lstm does: too few is an IndexError, by the inference route as
    by the general one."""
    model = rnnfast.LSTM(I, 5, num_layers=2)
    x, h = torch.randn(T, B, I), (torch.zeros(1, B, 5), torch.zeros(1, B, 5))
    with pytest.raises(IndexError):
        torch._VF.lstm(x, h, model._flat_weights, True, 2, 0.0, False, False, False)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(IndexError):
            rnnfast.functional.lstm(x, h, model._flat_weights, num_layers=2)


def test_stacked_inference_opcheck(cell):
    """torch.library.opcheck of the stacked op: its schema (no mutation or
    aliasing) and its fake-tensor run (the layer ops' fake kernels), 2
    layers, bidirectional, zoneout rates. Its autograd registration is
    deliberately absent (it refuses a call that needs a gradient)."""
    model = cell.module(I, cell.hidden, num_layers=2, bidirectional=True, dtype=torch.float64)
    h0, c0 = random_states(2, 2, cell.hidden, cell.hidden)
    args = (random_input(False), h0, c0, [w.detach() for w in model._flat_weights], 2, True,
            False, None, True, cell.layer_norm, 1e-5, 0.1, 0.2)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.rnnfast.stacked_inference.default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_compiled_module_calls_the_op_itself(cell, below_autograd):
    """Under torch.compile the graph holds the op as before: the shortcut
    is an eager one, taken neither while tracing nor by the compiled code."""
    ours, _ = cell.make_pair(I, cell.hidden, num_layers=2)
    x = random_input(False)
    with torch.no_grad():
        expected = ours(x)
        below_autograd.entered = 0
        got = torch.compile(ours, backend="aot_eager", fullgraph=True)(x)
    assert below_autograd.entered == 0
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def _calls_of(fn, run) -> int:
    """How many times ``run()`` calls the Python function ``fn`` (counted by
    a profile hook: replacing ``fn`` would also replace it in the tables
    Dynamo builds once per process)."""
    calls = 0

    def hook(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code is fn.__code__:
            calls += 1

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        run()
    finally:
        sys.setprofile(previous)
    return calls


def test_eager_call_does_not_ask_about_onnx_export(cell):
    """Eager calls are told apart from captures without
    torch.onnx.is_in_onnx_export (which imports two modules a call); a
    torch.jit.trace asks it once per call of the layers, not per layer."""
    ours, _ = cell.make_pair(I, cell.hidden, num_layers=3)
    x = random_input(False)
    results = []
    assert _calls_of(torch.onnx.is_in_onnx_export, lambda: results.append(ours(x))) == 0
    assert _calls_of(torch.onnx.is_in_onnx_export, lambda: results.append(
        torch.jit.trace(ours, (x,), check_trace=False))) == 1
    for a, b in zip(torch.utils._pytree.tree_leaves(results[1](x)),
                    torch.utils._pytree.tree_leaves(results[0])):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------
# 3. nn.LSTM's forward contract
# --------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched_equals_batch_of_one(device, cell, batch_first, with_hx):
    ours, ref = cell.make_pair(I, cell.hidden, batch_first=batch_first, device=device,
                               **cell.kwargs(num_layers=2, bidirectional=True, proj_size=2))
    x = torch.randn(T, I, dtype=torch.float64, device=device)
    hx = _states_for(ours, device=device, batch=1) if with_hx else None
    hx2 = tuple(h.squeeze(1) for h in hx) if with_hx else None
    out_size = ours.proj_size or ours.hidden_size
    out, (h_n, c_n) = ours(x, hx2)
    assert out.shape == (T, 2 * out_size) and h_n.shape == (4, out_size)
    assert c_n.shape == (4, cell.hidden)
    out_b, (h_b, c_b) = ours(x.unsqueeze(0 if batch_first else 1), hx)
    torch.testing.assert_close(out, out_b.squeeze(0 if batch_first else 1), atol=0, rtol=0)
    torch.testing.assert_close(h_n, h_b.squeeze(1), atol=0, rtol=0)
    torch.testing.assert_close(c_n, c_b.squeeze(1), atol=0, rtol=0)
    out_r, (h_r, c_r) = ref(x, hx2)
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(h_n, h_r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(c_n, c_r, atol=1e-10, rtol=1e-10)
    # And the gradients, through the unbatched path.
    assert_results_close(forward_backward(ours, x, hx2), forward_backward(ref, x, hx2),
                         **TOLERANCES[torch.float64])


def test_batch_first_is_a_transpose(device, cell):
    kwargs = cell.kwargs(num_layers=2, bidirectional=True, proj_size=2)
    ours, _ = cell.make_pair(I, cell.hidden, device=device, **kwargs)
    ours_bf = cell.module(I, cell.hidden, batch_first=True, **kwargs).double().to(device)
    ours_bf.load_state_dict(ours.state_dict())
    x = random_input(False, device=device)
    hx = _states_for(ours, device=device)
    out, (h_n, c_n) = ours(x, hx)
    out_bf, (h_bf, c_bf) = ours_bf(x.transpose(0, 1), hx)  # states stay [L*D, B, H]
    assert out_bf.shape == (B, T, 2 * (ours.proj_size or ours.hidden_size))
    torch.testing.assert_close(out_bf, out.transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(h_bf, h_n, atol=0, rtol=0)
    torch.testing.assert_close(c_bf, c_n, atol=0, rtol=0)


@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_sequence_in_packed_sequence_out(device, cell, batch_first):
    """A PackedSequence (unsorted, enforce_sorted=False) gives a
    PackedSequence with the input's batch_sizes and indices, and h_n / c_n
    in the caller's batch order: each sequence's are those of running it
    alone, at its own length."""
    ours, _ = cell.make_pair(I, cell.hidden, batch_first=batch_first, device=device,
                             **cell.kwargs(num_layers=2, bidirectional=True, proj_size=2))
    ours.eval()
    x = random_input(batch_first, device=device)
    hx = _states_for(ours, device=device)
    packed = make_packed(x, LENGTHS_UNSORTED, batch_first=batch_first, enforce_sorted=False)
    out, (h_n, c_n) = ours(packed, hx)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    assert torch.equal(out.sorted_indices, packed.sorted_indices)
    assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
    assert out.data.shape == (sum(LENGTHS_UNSORTED), 2 * (ours.proj_size or ours.hidden_size))
    padded, lengths = nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first)
    assert lengths.tolist() == LENGTHS_UNSORTED
    for b, n in enumerate(LENGTHS_UNSORTED):
        xb = x[b, :n] if batch_first else x[:n, b]
        out_b, (h_b, c_b) = ours(xb, (hx[0][:, b], hx[1][:, b]))
        got_b = padded[b, :n] if batch_first else padded[:n, b]
        torch.testing.assert_close(got_b, out_b, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(h_n[:, b], h_b, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(c_n[:, b], c_b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional,proj_size", [(False, 0), (True, 2)],
                         ids=["uni", "bi-proj2"])
def test_empty_batch_like_nn_lstm(cell, batch_first, bidirectional, proj_size):
    """A batch of 0 sequences gives empty outputs shaped like nn.LSTM's, and
    a backward that works: nn.LSTM's (zero) gradients."""
    kwargs = cell.kwargs(num_layers=2, batch_first=batch_first, bidirectional=bidirectional,
                         proj_size=proj_size)
    ours, ref = cell.make_pair(I, cell.hidden, **kwargs)
    lstm = nn.LSTM(I, cell.hidden, **kwargs).double() if cell.layer_norm else ref
    x = random_input(batch_first, batch=0)
    got = forward_backward(ours, x)
    expected = forward_backward(lstm, x)
    assert got["output"].shape == expected["output"].shape
    assert got["output"].numel() == 0
    out_size = ours.proj_size or cell.hidden
    assert got["h_n"].shape == expected["h_n"].shape == (4 if bidirectional else 2, 0,
                                                          out_size)
    assert got["c_n"].shape == expected["c_n"].shape
    assert got["grad_input"].shape == x.shape
    if not cell.layer_norm:
        assert_results_close(got, expected, atol=0, rtol=0)
    for name, p in ours.named_parameters():
        g = got[f"grad.{name}"]
        assert g is None or (g.shape == p.shape and not g.any()), name


def test_dropout_eval_equals_no_dropout(device, cell):
    ours, _ = cell.make_pair(I, cell.hidden, num_layers=3, dropout=0.5, bidirectional=True,
                             device=device)
    plain = cell.module(I, cell.hidden, num_layers=3, bidirectional=True).double().to(device)
    plain.load_state_dict(ours.state_dict())
    ours.eval()
    x = random_input(False, device=device)
    got, expected = ours(x), plain(x)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)


def test_dropout_between_layers_in_training(device, cell):
    """In training mode dropout acts between layers only (not on the first
    layer's states, not on the last layer's output); the plain-PyTorch
    reference of the LayerNorm-LSTM draws the same mask for the same seed
    (nn.LSTM's native kernel draws its own)."""
    ours, ref = cell.make_pair(I, cell.hidden, num_layers=2, dropout=0.5, bidirectional=True,
                               device=device)
    ours.train(), ref.train()
    x = random_input(False, device=device)
    torch.manual_seed(5)
    res_train = forward_backward(ours, x)
    if cell.layer_norm:
        torch.manual_seed(5)
        assert_results_close(res_train, forward_backward(ref, x), **TOLERANCES[torch.float64])
    _assert_every_gradient_reached(res_train)
    ours.eval()
    with torch.no_grad():
        out_eval, (h_eval, c_eval) = ours(x)
    assert not torch.allclose(res_train["output"], out_eval)
    torch.testing.assert_close(res_train["h_n"][:2], h_eval[:2], atol=0, rtol=0)
    assert not torch.allclose(res_train["h_n"][2:], h_eval[2:])
    # Same seed, same mask.
    ours.train()
    torch.manual_seed(6)
    a = ours(x)[0]
    torch.manual_seed(6)
    assert torch.equal(a, ours(x)[0])


def test_dropout_ignored_with_one_layer(cell):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = cell.module(I, cell.hidden, num_layers=1, dropout=0.9).double()
    x = random_input(False)
    train_out = ours(x)[0]
    ours.eval()
    torch.testing.assert_close(train_out, ours(x)[0], atol=0, rtol=0)


def test_dropout_one_zeroes_second_layerrandom_input(cell):
    """dropout=1 in training: the second layer sees zeros, as in nn.LSTM."""
    ours, ref = cell.make_pair(I, cell.hidden, num_layers=2, dropout=1.0)
    x = random_input(False)
    got, expected = ours(x), ref(x)
    torch.testing.assert_close(got[0], expected[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[1][0], expected[1][0], atol=1e-10, rtol=1e-10)
    # The second layer's output does not depend on the input.
    torch.testing.assert_close(ours(x * 2)[0], got[0], atol=0, rtol=0)


# --------------------------------------------------------------------------
# 4. Bad input: nn.LSTM's exception class and words
# --------------------------------------------------------------------------
BAD_FORWARD = bad_forward_cases(T, B, I, LSTM_CELL.hidden, LENGTHS_SORTED)


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_bad_input_raises_like_nn_lstm(cell, case):
    """The exception class of nn.LSTM with the same arguments (both cells
    get an LSTM's hidden size, so one table serves), nn.LSTM's words, and
    the LayerNorm-LSTM's words are rnnfast.LSTM's but for the class and op
    names."""
    args, match, *same_words = BAD_FORWARD[case]
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True)
    lstm = nn.LSTM(I, LSTM_CELL.hidden, **kwargs)
    fast = rnnfast.LSTM(I, LSTM_CELL.hidden, **kwargs)
    ours = cell.module(I, LSTM_CELL.hidden, **kwargs)
    if OLD_NN_LSTM:  # rnnfast keeps torch 2.13's words (utils.NN_LSTM_WORDS_SINCE)
        with pytest.raises(Exception, match=match) as fast_info:
            fast(*args)
        with pytest.raises(type(fast_info.value), match=match):
            ours(*args)
        return
    with pytest.raises(Exception) as ref_info:
        lstm(*args)
    with pytest.raises(ref_info.type, match=match) as fast_info:
        fast(*args)
    with pytest.raises(ref_info.type, match=match) as ours_info:
        ours(*args)
    assert type(ours_info.value) is ref_info.type, (ours_info.value, ref_info.value)
    assert str(ours_info.value) == str(fast_info.value).replace(
        "LSTM:", f"{cell.module.__name__}:").replace(
        f"rnnfast.{LSTM_CELL.forward_op}:", f"rnnfast.{cell.forward_op}:")
    # The words are nn.LSTM's, except where nn.LSTM fails from deep inside
    # (packed input with a wrong state or input size: an error of _VF.lstm).
    if (same_words or [True])[0] and re.search(match, str(ref_info.value)) is None:
        pytest.fail(f"the expected words are not nn.LSTM's: {ref_info.value}")


def test_batch_first_seq_len_0_raises_like_nn_lstm(cell):
    ours = cell.module(I, cell.hidden, batch_first=True)
    with pytest.raises(RuntimeError, match="larger than 0"):
        nn.LSTM(I, cell.hidden, batch_first=True)(torch.randn(B, 0, I))
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
        ours(torch.randn(B, 0, I))


# Arguments nn.LSTM's constructor takes and its forward refuses (its
# _VF.lstm's argument parser): the same class, at the same moment.
FORWARD_TIME_ARGUMENT_CASES = {
    "bidirectional_int": (dict(bidirectional=1), r"received an invalid combination of arguments"),
    "bidirectional_none": (dict(bidirectional=None),
                           r"received an invalid combination of arguments"),
    "num_layers_bool": (dict(num_layers=True), r"received an invalid combination of arguments"),
}


def _overridden(overrides: dict) -> str:
    """The argument an error must name."""
    (name,) = overrides
    return name


@pytest.mark.parametrize("case", list(FORWARD_TIME_ARGUMENT_CASES))
def test_constructor_arguments_refused_at_forward_like_nn_lstm(cell, case):
    overrides, match = FORWARD_TIME_ARGUMENT_CASES[case]
    kwargs = dict(input_size=I, hidden_size=cell.hidden, **overrides)
    lstm, ours = nn.LSTM(**kwargs), cell.module(**kwargs)  # both constructors accept
    x = random_input(False, dtype=torch.float32)
    with pytest.raises(Exception) as ref_info:
        lstm(x)
    with pytest.raises(ref_info.type, match=match) as ours_info:
        ours(x)
    assert type(ours_info.value) is ref_info.type
    assert re.search(match, str(ref_info.value)), ref_info.value
    assert re.search(rf"{cell.module.__name__}: .*{_overridden(overrides)}",
                     str(ours_info.value)), ours_info.value


FUNCTIONAL_CASES = {
    "hx_tensor": ("stacked", {}, r"received an invalid combination of arguments"),
    "hx_three_states": ("three", {}, r"lstm expects two hidden states"),
    "bidirectional_int": ("pair", dict(bidirectional=1),
                          r"received an invalid combination of arguments"),
    "num_layers_bool": ("pair", dict(num_layers=True),
                        r"received an invalid combination of arguments"),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
def test_functional_refuses_like_vf_lstm(cell, case):
    """rnnfast.functional takes torch._VF.lstm's arguments and refuses what
    it refuses, with its exception class and words, naming the function."""
    states, overrides, match = FUNCTIONAL_CASES[case]
    H = cell.hidden
    ours, lstm = cell.module(I, H), nn.LSTM(I, H)
    x, h = torch.randn(T, B, I), torch.zeros(1, B, H)
    hx = {"stacked": torch.stack([h, h]), "three": (h, h, h), "pair": (h, h)}[states]
    with pytest.raises(Exception) as ref_info:
        torch._VF.lstm(x, hx, lstm._flat_weights, True, overrides.get("num_layers", 1), 0.0,
                       False, overrides.get("bidirectional", False), False)
    functional = getattr(rnnfast.functional, cell.name)
    with pytest.raises(ref_info.type, match=match) as ours_info:
        functional(x, hx, ours._flat_weights, **overrides)
    assert re.search(match, str(ref_info.value)), ref_info.value
    assert str(ours_info.value).startswith(f"rnnfast.functional.{cell.name}: ")


def test_hidden_states_accepted_like_nn_lstm(cell):
    """Where nn.LSTM rebuilds the (h_0, c_0) tuple itself, it takes a plain
    tensor or a longer tuple (only the first two states count): unbatched
    input, and packed input with a permutation. rnnfast takes them too, with
    the same results."""
    H = cell.hidden
    ours, ref = cell.make_pair(I, H, num_layers=2, bidirectional=True, dtype=torch.float32)
    h, c = (torch.randn(4, B, H) * 0.5 for _ in range(2))
    x = torch.randn(T, B, I)
    unsorted = make_packed(x, LENGTHS_UNSORTED, enforce_sorted=False)
    # name: (input, hx as given, the same states as a tuple of two)
    calls = {
        "unbatched_tensor": (x[:, 0], torch.stack([h[:, 0], c[:, 0]]), (h[:, 0], c[:, 0])),
        "unbatched_three": (x[:, 0], (h[:, 0], c[:, 0], c[:, 0]), (h[:, 0], c[:, 0])),
        "packed_unsorted_three": (unsorted, (h, c, c), (h, c)),
        "packed_unsorted_tensor": (unsorted, torch.stack([h, c]), (h, c)),
    }
    lstm = nn.LSTM(I, H, num_layers=2, bidirectional=True)
    for name, (inp, hx, pair) in calls.items():
        lstm(inp, hx)  # nn.LSTM takes it
        got, (h_n, c_n) = ours(inp, hx)
        expected, (h_r, c_r) = ref(inp, pair)
        if isinstance(got, PackedSequence):
            got, expected = got.data, expected.data
        for g, e in ((got, expected), (h_n, h_r), (c_n, c_r)):
            torch.testing.assert_close(g, e, **TOLERANCES[torch.float32],
                                       msg=lambda m, k=name: f"{k}: {m}")


def test_bool_sizes_accepted_like_nn_lstm(cell):
    """nn.LSTM takes a bool size (True is an int of value 1)."""
    lstm = nn.LSTM(I, True)
    ours = cell.module(I, True)
    assert ours.hidden_size is lstm.hidden_size
    out, (h_n, c_n) = ours(torch.randn(T, B, I))
    assert out.shape == lstm(torch.randn(T, B, I))[0].shape == (T, B, 1)
    assert h_n.shape == c_n.shape == (1, B, 1)
    out, _ = cell.module(True, 3)(torch.randn(T, B, 1))
    assert out.shape == (T, B, 3)


CTOR_CASES = {
    "dropout_negative": (dict(dropout=-0.1), "dropout should be a number in range"),
    "dropout_above_1": (dict(dropout=1.5), "dropout should be a number in range"),
    "dropout_bool": (dict(dropout=True), "dropout should be a number in range"),
    "dropout_str": (dict(dropout="0.1"), "dropout should be a number in range"),
    "hidden_0": (dict(hidden_size=0), "hidden_size must be greater than zero"),
    "hidden_negative": (dict(hidden_size=-3), "hidden_size must be greater than zero"),
    "hidden_float": (dict(hidden_size=4.0), "hidden_size should be of type int"),
    "input_0": (dict(input_size=0), "input_size must be greater than zero"),
    "input_float": (dict(input_size=2.5), "input_size should be of type int"),
    "input_0_hidden_float": (dict(input_size=0, hidden_size=2.5),
                             "input_size must be greater than zero"),
    "num_layers_0": (dict(num_layers=0), "num_layers must be greater than zero"),
    "proj_equal_hidden": (dict(proj_size=6), "proj_size has to be smaller than hidden_size"),
    "proj_above_hidden": (dict(proj_size=7), "proj_size has to be smaller than hidden_size"),
    "proj_negative": (dict(proj_size=-1), "proj_size should be a positive integer or zero"),
    "bias_not_bool": (dict(bias=1), "bias should be of type bool, got: int"),
    "batch_first_not_bool": (dict(batch_first=None), "batch_first should be of type bool"),
}
CTOR_GRID = {cell: [(case, case) for case in CTOR_CASES
                    if cell.has_projection or not case.startswith("proj")] for cell in CELLS}


@pytest.mark.parametrize("cell,case", _cell_params(CTOR_GRID))
def test_constructor_errors_like_nn_lstm(cell, case):
    overrides, match = CTOR_CASES[case]
    kwargs = dict(input_size=I, hidden_size=LSTM_CELL.hidden, num_layers=2)
    kwargs.update(overrides)
    if OLD_NN_LSTM:  # rnnfast keeps torch 2.13's checks and words
        with pytest.raises((TypeError, ValueError), match=match):
            cell.module(**kwargs)
        return
    with pytest.raises(Exception) as ref_info:
        nn.LSTM(**kwargs)
    with pytest.raises(ref_info.type, match=match) as ours_info:
        cell.module(**kwargs)
    assert type(ours_info.value) is ref_info.type
    assert re.search(match, str(ref_info.value)), ref_info.value
    assert str(ours_info.value) == str(ref_info.value)


def test_dropout_with_one_layer_warns_like_nn_lstm(cell):
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        nn.LSTM(I, cell.hidden, dropout=0.5)
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        cell.module(I, cell.hidden, dropout=0.5)


# --------------------------------------------------------------------------
# 5. NaN / Inf, strides, determinism, reduced precision
# --------------------------------------------------------------------------
NAN_CONFIGS = [dict(), dict(bidirectional=True), dict(proj_size=2, bidirectional=True),
               dict(bias=False)]
NAN_GRID = {
    # nn.LSTM: NaN and +-inf in each place, four layer configurations.
    LSTM_CELL: [(f"{c}-{w}-{vid}", v, w, "padded", c)
                for c in NAN_CONFIGS for w in ("input", "h0", "c0")
                for vid, v in (("nan", float("nan")), ("inf", float("inf")),
                               ("-inf", float("-inf")))],
    # The reference: NaN (a LayerNorm of a row with inf is NaN everywhere in
    # it, which says little), padded and packed, one and two directions.
    LAYER_NORM_LSTM_CELL: [(f"{k}-{'bi' if d else 'uni'}-{w}", float("nan"), w, k,
                            dict(bidirectional=d))
                           for d in (False, True) for k in ("padded", "packed_unsorted")
                           for w in ("input", "h0", "c0")],
}


@pytest.mark.parametrize("cell,value,where,kind,kwargs", _cell_params(NAN_GRID))
def test_nan_inf_propagate_like_reference(device, cell, value, where, kind, kwargs):
    ours, ref = cell.make_pair(I, cell.hidden, num_layers=2, device=device, **kwargs)
    x = random_input(False, device=device)
    hx = _states_for(ours, device=device)
    if where == "input":
        x[1 if cell.layer_norm else 2, 1, 0] = value
    elif where == "h0":
        hx[0][0, 1, 0] = value
    else:
        hx[1][0, 1, 0] = value
    run = dict(lengths=_lengths(kind), enforce_sorted=False)
    got = forward_backward(ours, x, hx, **run)
    expected = forward_backward(ref, x, hx, **run)
    assert set(got) == set(expected)
    for key, e in expected.items():
        if e is None or not e.is_floating_point():
            continue
        g = got[key]
        assert torch.equal(torch.isnan(g), torch.isnan(e)), key
        assert torch.equal(torch.isinf(g), torch.isinf(e)), key
        finite = torch.isfinite(e)
        torch.testing.assert_close(g[finite], e[finite], atol=1e-10, rtol=1e-10,
                                   msg=lambda m, k=key: f"{k}: {m}")
    # The poisoned batch element is affected, the others are not.
    if value != value:  # NaN
        assert torch.isnan(got["h_n"][:, 1]).any()
        assert not torch.isnan(got["h_n"][:, [0, 2, 3]]).any()


@pytest.mark.parametrize("batch_first", [False, True])
def test_non_contiguous_input_andrandom_states(device, cell, batch_first):
    ours, ref = cell.make_pair(I, cell.hidden, batch_first=batch_first, device=device,
                               **cell.kwargs(num_layers=2, bidirectional=True, proj_size=2))
    x = random_input(batch_first, device=device)
    h0, c0 = _states_for(ours, device=device)
    # Transposed views with the same values, and a strided slice of a wider tensor.
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(*x.shape[:-1], 2 * I, dtype=x.dtype, device=device)
    wide[..., ::2] = x
    x_s = wide[..., ::2]
    h0_t = h0.transpose(0, 1).contiguous().transpose(0, 1)
    c0_t = c0.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    assert not any(t.is_contiguous() for t in (x_t, x_s, h0_t, c0_t))

    def run(model, xi, h, c):  # (forward_backward would copy the views)
        xi, h, c = (t.detach().requires_grad_() for t in (xi, h, c))
        out, (h_n, c_n) = model(xi, (h, c))
        grads = torch.autograd.grad(out.sum() + 2 * h_n.sum() + 3 * c_n.sum(),
                                    (xi, h, c, *model.parameters()))
        return (out, h_n, c_n) + grads

    expected = run(ours, x, h0, c0)
    for xi in (x_t, x_s):
        got = run(ours, xi, h0_t, c0_t)
        assert len(got) == len(expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12,
                                       msg=lambda m, i=i: f"result {i}: {m}")
    # And the reference agrees on the strided inputs.
    for i, (g, e) in enumerate(zip(run(ref, x_s, h0_t, c0_t), expected)):
        torch.testing.assert_close(g, e, **TOLERANCES[torch.float64],
                                   msg=lambda m, i=i: f"reference, result {i}: {m}")


@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
def test_non_contiguous_parameters(device, cell, kind):
    """Parameters (LayerNorm ones included) that are non-contiguous views
    (e.g. after a user swapped in a transposed tensor) give the same
    results."""
    kwargs = cell.kwargs(num_layers=2, proj_size=2)
    ours, _ = cell.make_pair(I, cell.hidden, device=device, **kwargs)
    strided = cell.module(I, cell.hidden, **kwargs).double().to(device)
    for name, p in ours.named_parameters():
        if p.dim() == 2:
            view = p.detach().t().contiguous().t()
        else:
            view = torch.zeros(p.shape[0], 2, dtype=p.dtype, device=device)
            view[:, 0] = p.detach()
            view = view[:, 0]
        # (weight_hr of proj_size 2 and hidden 6 has no 1-sized dimension either)
        assert not view.is_contiguous(), name
        setattr(strided, name, nn.Parameter(view))
    x = random_input(False, device=device)
    run = dict(lengths=_lengths(kind), enforce_sorted=False)
    assert_results_close(forward_backward(strided, x, **run), forward_backward(ours, x, **run),
                         atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
def test_bitwise_deterministic(device, cell, dtype, kind):
    ours = cell.module(8, 32, **cell.kwargs(num_layers=2, bidirectional=True, proj_size=16))
    ours = randomize_layer_norm_(ours.to(device, dtype))
    x = torch.randn(7, 37, 8, dtype=dtype, device=device)
    lengths = None if kind == "padded" else [(5 * i) % 7 + 1 for i in range(37)]
    runs = [forward_backward(ours, x, lengths=lengths, enforce_sorted=False) for _ in range(2)]
    for key in runs[0]:
        a, b = runs[0][key], runs[1][key]
        if a is None:
            assert b is None
            continue
        assert torch.equal(a, b), key


LOW_PRECISION_GRID = {
    # Against nn.LSTM in bfloat16 and float16.
    LSTM_CELL: [(f"{d}-{k}-{kid}", dtype, kwargs, k)
                for d, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16))
                for kid, kwargs in (("bi", dict(bidirectional=True)),
                                    ("proj-nobias", dict(proj_size=3, bias=False)))
                for k in ("padded", "packed_unsorted")],
    # Against the reference in bfloat16.
    LAYER_NORM_LSTM_CELL: [(f"bf16-{k}-{b}", torch.bfloat16,
                            dict(bidirectional=True, bias=b == "bias"), k)
                           for b in ("bias", "nobias") for k in ("padded", "packed_unsorted")],
}


@pytest.mark.parametrize("cell,dtype,kwargs,kind", _cell_params(LOW_PRECISION_GRID))
def test_low_precision_error_within_twice_pytorch(cell, dtype, kwargs, kind):
    """model.to(bfloat16 / float16) on the CPU: forward and backward run,
    and each result's error against a float64 run (on the same rounded
    weights and inputs) is at most twice PyTorch's own error in that
    dtype."""
    H = 8
    ours, ref = cell.make_pair(I, H, num_layers=2, dtype=dtype, **kwargs)
    assert all(p.dtype == dtype for p in ours.parameters())
    x = random_input(False, dtype=dtype, steps=7)
    hx = _states_for(ours, dtype=dtype)
    lengths = None if kind == "padded" else [3, 7, 1, 5]
    run = dict(lengths=lengths, enforce_sorted=False)
    got = forward_backward(ours, x, hx, **run)
    pt = forward_backward(ref, x, hx, **run)
    exact = forward_backward(float64_twin(ref), x.double(), tuple(h.double() for h in hx),
                             **run)
    _assert_every_gradient_reached(got)
    assert_error_within_twice(got, pt, exact, dtype)
