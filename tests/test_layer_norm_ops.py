"""The ``rnnfast::layer_norm_lstm_forward`` / ``layer_norm_lstm_backward``
ops on their own: float64 gradcheck through the registered autograd with
every LayerNorm parameter, the backward op against autograd and against the
plain-PyTorch reference, ``torch.library.opcheck``, and saved activations."""

from __future__ import annotations

import itertools

import pytest
import torch

from rnnfast.reference import layer_norm_lstm_reference
from utils import backward_args_from, layer_norm_sample_inputs, make_op_args

OPS = torch.ops.rnnfast

# Positions of the differentiable arguments of layer_norm_lstm_forward.
DIFF_NAMES = ["input", "hx", "cx", "weight_ih", "weight_hh", "bias_ih", "bias_hh",
              "ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias", "ln_cell_weight",
              "ln_cell_bias"]


def _ln_sample(**kwargs):
    return make_op_args(layer_norm=True, **kwargs)


# --------------------------------------------------------------------------
# 1. gradcheck
# --------------------------------------------------------------------------
GRADCHECK_GRID = list(itertools.product([True, False], [False, True], [False, True]))


@pytest.mark.parametrize(
    "bias,reverse,packed", GRADCHECK_GRID,
    ids=[f"{'bias' if b else 'nobias'}-{'rev' if r else 'fwd'}-{'packed' if k else 'padded'}"
         for b, r, k in GRADCHECK_GRID])
def test_gradcheck_layer_norm_lstm_forward(device, bias, reverse, packed):
    sample = _ln_sample(steps=3, batch=3, input_size=2, hidden=3, bias=bias, reverse=reverse,
                        lengths=[3, 2, 2, 1] if packed else None, device=device,
                        requires_grad=True, seed=7)
    # input, hx, cx, weight_ih, weight_hh (+ both biases), the six LN parameters
    assert len(sample.diff_args) == 5 + 2 * bias + 6
    if packed:
        bs = sample.batch_sizes
        assert bs.dtype == torch.int64 and bs.device.type == "cpu"
        assert sample.args[0].dim() == 2  # [N, I]
    # The LN parameters are not their trivial initial values.
    ln = sample.diff_args[-6:]
    for gain in ln[0::2]:
        assert not torch.allclose(gain, torch.ones_like(gain))
    for beta in ln[1::2]:
        assert beta.abs().min() > 0
    assert torch.autograd.gradcheck(sample.outputs, tuple(sample.diff_args),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_each_output_alone(device):
    """Gradients when only one of output / hy / cy is used (the others'
    gradients arrive as None and must count as zero)."""
    sample = _ln_sample(lengths=[3, 1], hidden=3, reverse=True, device=device,
                        requires_grad=True, seed=3)
    for k in range(3):
        assert torch.autograd.gradcheck(lambda *a, k=k: sample.outputs(*a)[k],
                                        tuple(sample.diff_args), eps=1e-6, atol=1e-8,
                                        rtol=1e-6)


def test_gradcheck_non_default_eps(device):
    """A large eps changes the normalisation; gradients follow it."""
    sample = _ln_sample(lengths=[3, 2], eps=0.5, device=device, requires_grad=True, seed=4)
    assert sample.args[-1] == 0.5
    assert torch.autograd.gradcheck(sample.outputs, tuple(sample.diff_args),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------
# The backward op called directly
# --------------------------------------------------------------------------
@pytest.mark.parametrize("packed,reverse,bias", [(True, True, True), (False, False, False),
                                                  (True, False, False)])
def test_backward_op_matches_autograd(device, packed, reverse, bias):
    """layer_norm_lstm_backward called directly gives the gradients autograd
    gives; its shared bias gradient is that of bias_ih, bias_hh, ln_ih_bias
    and ln_hh_bias alike."""
    sample = _ln_sample(lengths=[4, 3, 1] if packed else None, hidden=4, reverse=reverse,
                        bias=bias, device=device, requires_grad=True, seed=9)
    args = backward_args_from(sample)
    grads = OPS.layer_norm_lstm_backward.default(*args)
    assert len(grads) == 10
    (g_in, g_hx, g_cx, g_wih, g_whh, g_bias, g_ln_ih_w, g_ln_hh_w, g_ln_cell_w,
     g_ln_cell_b) = grads
    expected = torch.autograd.grad(sample.outputs(), sample.diff_args, args[:3])
    got = [g_in, g_hx, g_cx, g_wih, g_whh] + ([g_bias, g_bias] if bias else []) + [
        g_ln_ih_w, g_bias, g_ln_hh_w, g_bias, g_ln_cell_w, g_ln_cell_b]
    assert len(got) == len(expected)
    for name, g, e in zip([n for i, n in enumerate(DIFF_NAMES) if bias or i not in (5, 6)],
                          got, expected):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12,
                                   msg=lambda m, k=name: f"{k}: {m}")


@pytest.mark.parametrize("packed,bias", [(False, True), (True, False)])
def test_forward_and_backward_ops_match_reference(device, packed, bias):
    """One forward layer: the op's outputs and the backward op's gradients
    equal the plain-PyTorch reference's (layer_norm_lstm_reference with one
    layer, one direction) and its autograd."""
    sample = _ln_sample(lengths=[4, 3, 1] if packed else None, steps=4, hidden=4, bias=bias,
                        eps=1e-3, device=device, requires_grad=True, seed=21)
    x, hx, cx, *weights = sample.args[:13]
    weights = [w for w in weights if w is not None]
    out, hy, cy = layer_norm_lstm_reference(
        x, (hx[None], cx[None]), weights, bias=bias, batch_sizes=sample.batch_sizes,
        eps=sample.args[-1])
    hy, cy = hy[0], cy[0]
    got = OPS.layer_norm_lstm_forward.default(*sample.args)
    for name, g, e in zip(("output", "hy", "cy"), got[:3], (out, hy, cy)):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12,
                                   msg=lambda m, k=name: f"{k}: {m}")
    args = backward_args_from(sample)
    expected = torch.autograd.grad((out, hy, cy), sample.diff_args, args[:3])
    grads = OPS.layer_norm_lstm_backward.default(*args)
    g_bias = grads[5]
    got_grads = list(grads[:5]) + ([g_bias, g_bias] if bias else []) + [
        grads[6], g_bias, grads[7], g_bias, grads[8], grads[9]]
    for name, g, e in zip([n for i, n in enumerate(DIFF_NAMES) if bias or i not in (5, 6)],
                          got_grads, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10,
                                   msg=lambda m, k=name: f"{k}: {m}")


@pytest.mark.parametrize("packed,reverse", [(False, False), (False, True), (True, False),
                                            (True, True)])
def test_backward_over_several_gradient_blocks(device, packed, reverse):
    """The backward runs its input and weight gradient GEMMs per block of
    about 1024 rows (layer_norm_lstm_driver.h's kGradBlockRows): a sequence of
    several blocks, with uneven step sizes when packed, still gives the
    reference's gradients."""
    lengths = [500, 480, 400, 330, 200, 150, 64, 3] if packed else None  # 2127 rows
    sample = _ln_sample(steps=250, batch=9, input_size=2, hidden=2, lengths=lengths,
                        reverse=reverse, device=device, requires_grad=True, seed=31)
    rows = sample.args[0].shape[0] * (1 if packed else sample.args[0].shape[1])
    assert rows > 2 * 1024
    x, hx, cx, *weights = sample.args[:13]
    # One direction (d) of a bidirectional reference whose other direction
    # gets detached copies (and no gradient).
    d = 1 if reverse else 0
    copies = [w.detach().clone() for w in weights]
    both = [list(weights), copies] if d == 0 else [copies, list(weights)]
    states = [(hx, cx), (hx.detach(), cx.detach())][::1 if d == 0 else -1]
    out, hy, cy = layer_norm_lstm_reference(
        x, tuple(torch.stack(pair) for pair in zip(*states)), both[0] + both[1],
        bias=True, bidirectional=True, batch_sizes=sample.batch_sizes, eps=sample.args[-1])
    out, hy, cy = out[..., d * 2:(d + 1) * 2], hy[d], cy[d]
    args = backward_args_from(sample)
    expected = torch.autograd.grad((out, hy, cy), sample.diff_args, args[:3])
    grads = OPS.layer_norm_lstm_backward.default(*args)
    g_bias = grads[5]
    got = list(grads[:5]) + [g_bias, g_bias, grads[6], g_bias, grads[7], g_bias, grads[8],
                             grads[9]]
    for name, g, e in zip(DIFF_NAMES, got, expected):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-9,
                                   msg=lambda m, k=name: f"{k}: {m}")


def test_forward_outputs_shapes_and_workspaces(device):
    for sample in layer_norm_sample_inputs(device):
        x, hx, cx, w_ih = sample.args[:4]
        hidden = w_ih.shape[0] // 4
        out, hy, cy, cells, n_ih, n_hh, stats = sample.op_overload(*sample.args)
        assert out.shape == (*x.shape[:-1], hidden), sample
        assert hy.shape == hx.shape and cy.shape == cx.shape, sample
        rows = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]
        saved = rows if sample.training else 0
        assert cells.shape == (saved, hidden), sample
        assert n_ih.shape == n_hh.shape == (saved, 4 * hidden), sample
        assert stats.shape[0] == saved, sample
        # Inference and training compute the same outputs.
        train = list(sample.args)
        train[-2] = True
        for a, b in zip((out, hy, cy), OPS.layer_norm_lstm_forward.default(*train)[:3]):
            assert torch.equal(a, b), sample


def test_eval_forward_outputs_are_not_differentiable():
    sample = _ln_sample(training=False, requires_grad=True)
    out, hy, cy = sample.outputs()
    assert not (out.requires_grad or hy.requires_grad or cy.requires_grad)
    with pytest.raises(RuntimeError, match="does not require grad"):
        (out.sum() + hy.sum() + cy.sum()).backward()


def test_double_backward_is_refused():
    sample = _ln_sample(requires_grad=True)
    out, hy, cy = sample.outputs()
    (g,) = torch.autograd.grad(out.pow(2).sum(), sample.args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# --------------------------------------------------------------------------
# 5. opcheck
# --------------------------------------------------------------------------
_SAMPLES = layer_norm_sample_inputs("cpu")


@pytest.mark.parametrize("index", range(len(_SAMPLES)), ids=[s.name for s in _SAMPLES])
def test_opcheck_layer_norm_lstm_forward(device, index):
    """Every sample; training=True forwards with inputs that require grad
    (so the autograd registration is exercised), training=False ones as
    inference calls."""
    training = layer_norm_sample_inputs(device)[index].training
    sample = layer_norm_sample_inputs(device, requires_grad=training)[index]
    torch.library.opcheck(OPS.layer_norm_lstm_forward.default, sample.args)


def test_opcheck_eval_forward_with_inputs_requiring_grad(device):
    sample = [s for s in layer_norm_sample_inputs(device, requires_grad=True)
              if not s.training][0]
    torch.library.opcheck(OPS.layer_norm_lstm_forward.default, sample.args)


def test_opcheck_layer_norm_lstm_backward(device):
    samples = layer_norm_sample_inputs(device, include_eval=False)
    assert len(samples) >= 4
    for sample in samples:
        torch.library.opcheck(OPS.layer_norm_lstm_backward.default, backward_args_from(sample))


# --------------------------------------------------------------------------
# Argument checks of the op
# --------------------------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    (lambda a: a.__setitem__(7, a[7][:-1]), r"expected ln_ih_\* / ln_hh_\* parameter of size"),
    (lambda a: a.__setitem__(10, a[10][:-1]), r"expected ln_ih_\* / ln_hh_\* parameter of size"),
    (lambda a: a.__setitem__(11, a[11].repeat(2)), r"expected ln_cell_\* parameter of size"),
    (lambda a: a.__setitem__(12, a[12].float()), r"LayerNorm parameter must have the dtype"),
    (lambda a: a.__setitem__(1, a[1][:, :2]), r"expected hx of size \[3, 3\], got \[3, 2\]"),
    (lambda a: a.__setitem__(0, a[0].long()), r"floating point"),
], ids=["ln_ih_weight", "ln_hh_bias", "ln_cell_weight", "ln_cell_bias_dtype", "hx",
        "int_input"])
def test_op_argument_errors(change, match):
    args = list(_ln_sample().args)
    change(args)
    with pytest.raises(RuntimeError, match=match):
        OPS.layer_norm_lstm_forward.default(*args)
