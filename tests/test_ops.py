"""The ``rnnfast::lstm_forward`` / ``lstm_backward`` ops on their own:
float64 gradcheck through the registered autograd, ``torch.library.opcheck``,
non-contiguous arguments, and argument checks."""

from __future__ import annotations

import itertools

import pytest
import torch

import rnnfast
from utils import (activation_probe, assert_activations_accurate, backward_args_from,
                   make_op_args, sample_inputs)

OPS = torch.ops.rnnfast


def _forward_outputs(sample):
    """The differentiable outputs (output, hy, cy) as a function of the
    sample's differentiable arguments; gates and cells are workspaces."""
    def fn(*diff):
        out, hy, cy, _gates, _cells = rnnfast.ops.lstm_forward(*sample.with_args(diff))
        return out, hy, cy
    return fn


# --------------------------------------------------------------------------
# 1. gradcheck
# --------------------------------------------------------------------------
GRADCHECK_GRID = list(itertools.product([True, False], [False, True], [0, 2], [False, True]))


@pytest.mark.parametrize(
    "bias,reverse,proj,packed", GRADCHECK_GRID,
    ids=[f"{'bias' if b else 'nobias'}-{'rev' if r else 'fwd'}-proj{p}-"
         f"{'packed' if k else 'padded'}" for b, r, p, k in GRADCHECK_GRID])
def test_gradcheck_lstm_forward(device, bias, reverse, proj, packed):
    sample = make_op_args(steps=3, batch=3, input_size=2, hidden=3, proj=proj, bias=bias,
                          reverse=reverse, lengths=[3, 2, 2, 1] if packed else None,
                          device=device, dtype=torch.float64, requires_grad=True, seed=7)
    # input, hx, cx, weight_ih, weight_hh (+ both biases) (+ weight_hr)
    assert len(sample.diff_args) == 5 + 2 * bias + (proj > 0)
    assert torch.autograd.gradcheck(_forward_outputs(sample), tuple(sample.diff_args),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_each_output_alone(device):
    """Gradients when only one of output / hy / cy is used (the others'
    gradients arrive as None and must count as zero)."""
    sample = make_op_args(lengths=[3, 1], proj=2, hidden=3, device=device,
                          requires_grad=True, seed=3)
    fn = _forward_outputs(sample)
    for k in range(3):
        assert torch.autograd.gradcheck(lambda *a, k=k: fn(*a)[k], tuple(sample.diff_args),
                                        eps=1e-6, atol=1e-8, rtol=1e-6)


def test_forward_outputs_shapes_and_workspaces(device):
    for sample in sample_inputs(device):
        x, hx, cx, w_ih, *_rest = sample.args
        training = sample.args[-1]
        hidden = w_ih.shape[0] // 4
        out_size = hx.shape[-1]
        out, hy, cy, gates, cells = OPS.lstm_forward.default(*sample.args)
        assert out.shape == (*x.shape[:-1], out_size), sample
        assert hy.shape == hx.shape and cy.shape == cx.shape, sample
        rows = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]
        saved = rows if training else 0
        assert gates.shape == (saved, 4 * hidden) and cells.shape == (saved, hidden), sample
        assert not gates.requires_grad and not cells.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_activations_accurate_at_every_value(device, dtype):
    """sigmoid and tanh of the kernels (which use fast approximations for
    float) against float64 torch over a sweep with +-inf, NaN, huge values
    and the approximation's branch points."""
    assert_activations_accurate(*activation_probe(dtype, device))


def test_eval_forward_outputs_are_not_differentiable():
    """training=False saves nothing, so its outputs carry no gradient (rather
    than a graph whose backward could only fail)."""
    sample = make_op_args(training=False, requires_grad=True)
    out, hy, cy, _, _ = rnnfast.ops.lstm_forward(*sample.args)
    assert not (out.requires_grad or hy.requires_grad or cy.requires_grad)
    with pytest.raises(RuntimeError, match="does not require grad"):
        (out.sum() + hy.sum() + cy.sum()).backward()


def test_backward_op_matches_autograd(device):
    """lstm_backward called directly gives the gradients autograd gives."""
    sample = make_op_args(lengths=[4, 3, 1], proj=2, hidden=4, reverse=True, device=device,
                          requires_grad=True, seed=9)
    args = backward_args_from(sample)
    grad_out, grad_hy, grad_cy = args[:3]
    grads = OPS.lstm_backward.default(*args)
    out, hy, cy, _, _ = rnnfast.ops.lstm_forward(*sample.args)
    expected = torch.autograd.grad((out, hy, cy), sample.diff_args, (grad_out, grad_hy, grad_cy))
    # diff_args: input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr
    g_in, g_hx, g_cx, g_wih, g_whh, g_bias, g_whr = grads
    for got, exp in zip([g_in, g_hx, g_cx, g_wih, g_whh, g_bias, g_bias, g_whr], expected):
        torch.testing.assert_close(got, exp, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------
# 4. opcheck
# --------------------------------------------------------------------------
_SAMPLES = sample_inputs("cpu")


@pytest.mark.parametrize("index", range(len(_SAMPLES)), ids=[s.name for s in _SAMPLES])
def test_opcheck_lstm_forward(device, index):
    """Every sample; those of training=True forwards with inputs that
    require grad (so the autograd registration is exercised), the
    training=False ones as inference calls."""
    sample = sample_inputs(device)[index]
    training = sample.args[-1]
    sample = sample_inputs(device, requires_grad=training)[index]
    torch.library.opcheck(OPS.lstm_forward.default, sample.args)


def test_opcheck_eval_forward_with_inputs_requiring_grad(device):
    """training=False with inputs that require grad: opcheck (its
    aot_dispatch test runs a backward) accepts the op only if the backward
    of such a call works, since nothing tells autograd the op is not
    differentiable there."""
    sample = [s for s in sample_inputs(device, requires_grad=True) if not s.args[-1]][0]
    torch.library.opcheck(OPS.lstm_forward.default, sample.args)


def test_opcheck_lstm_backward(device):
    samples = [s for s in sample_inputs(device, include_eval=False)]
    for sample in samples[:4]:
        torch.library.opcheck(OPS.lstm_backward.default, backward_args_from(sample))


# --------------------------------------------------------------------------
# 8. non-contiguous arguments (op level)
# --------------------------------------------------------------------------
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


@pytest.mark.parametrize("index", [0, 2, 3])
def test_non_contiguous_arguments(device, index):
    sample = sample_inputs(device, requires_grad=True)[index]
    strided = [_strided(t).requires_grad_() for t in sample.diff_args]
    assert any(not t.is_contiguous() for t in strided)
    got = rnnfast.ops.lstm_forward(*sample.with_args(strided))[:3]
    expected = rnnfast.ops.lstm_forward(*sample.args)[:3]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    upstream = [torch.randn_like(t) for t in expected]
    g_got = torch.autograd.grad(got, strided, upstream)
    g_exp = torch.autograd.grad(expected, sample.diff_args, upstream)
    for g, e in zip(g_got, g_exp):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------
# 6. argument checks of the op
# --------------------------------------------------------------------------
def test_op_rejects_mismatched_device_in_cpu_kernel():
    """The CPU kernel's own check: an hx on another device (meta) is a
    RuntimeError naming the argument, not a crash. The CPU kernel is reached
    with redispatch because the dispatcher would pick the Meta kernel."""
    args = list(make_op_args().args)
    args[1] = args[1].to("meta")
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"hx must be on the device of input \(cpu\), got meta"):
        OPS.lstm_forward.default.redispatch(cpu, *args)


@pytest.mark.parametrize("which", [0, 1])
def test_op_rejects_mismatched_devices(which):
    """A plain op call mixing meta and CPU tensors must be rejected like the
    real kernels reject mixed devices, rather than return outputs on
    different devices (the Meta / fake kernel runs for such a call)."""
    args = list(make_op_args().args)
    args[which] = args[which].to("meta")
    with pytest.raises(RuntimeError, match="device"):
        OPS.lstm_forward.default(*args)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.__setitem__(1, a[1][:, :2]), r"expected hx of size \[3, 3\], got \[3, 2\]"),
    (lambda a: a.__setitem__(2, a[2][:2]), r"expected cx of size \[3, 3\], got \[2, 3\]"),
    (lambda a: a.__setitem__(3, a[3][:, :1]), r"expected weight_ih of size \[12, 2\]"),
    (lambda a: a.__setitem__(0, a[0][0]), r"input of 3 dimensions"),
    (lambda a: a.__setitem__(1, a[1].float()), r"hx must have the dtype of input"),
    (lambda a: a.__setitem__(6, None), r"both biases or neither"),
    (lambda a: a.__setitem__(0, a[0][:0]), r"sequence length to be larger than 0"),
    (lambda a: a.__setitem__(0, a[0].long()), r"floating point"),
], ids=["hx", "cx", "weight_ih", "input_dim", "dtype", "one_bias", "empty_seq", "int_input"])
def test_op_argument_errors(change, match):
    args = list(make_op_args().args)
    change(args)
    with pytest.raises(RuntimeError, match=match):
        OPS.lstm_forward.default(*args)


@pytest.mark.parametrize("batch_sizes,match", [
    ([3, 1, 2], "non-increasing"),
    ([3, 0], "positive"),
    ([3, 2], r"sum to 5 but the packed input has 6 rows"),
])
def test_op_rejects_bad_batch_sizes(batch_sizes, match):
    args = list(make_op_args(lengths=[3, 2, 1]).args)  # 6 rows
    args[8] = torch.tensor(batch_sizes, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=match):
        OPS.lstm_forward.default(*args)
