"""The recurrent regularisers (issue 15): zoneout on h and c inside the fused
kernels, DropConnect on W_hh and variational dropout.

Ground truth is rnnfast.reference fed with the same masks: at the op level
the masks are made here and given to both; at the module level the masks
rnnfast.functional draws are recorded (every one goes through
``functional._bernoulli_mask``) and handed to the reference.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import rnnfast
import rnnfast.functional as RF
from rnnfast import _export
from rnnfast.reference import layer_norm_lstm_reference, lstm_reference
from utils import (LSTM_CELL, assert_error_within_twice, backward_op_args,
                   forward_backward, make_packed, random_input, random_states,
                   weighted_loss, zoneout_masks)

ZONEOUT_KINDS = {"h": (0.3, 0.0), "c": (0.0, 0.4), "hc": (0.3, 0.4)}


def _op_sample(cell, *, lengths=None, proj=0, seed=0, requires_grad=True):
    kwargs = dict(steps=4, batch=3, input_size=3, hidden=4, lengths=lengths,
                  requires_grad=requires_grad, seed=seed)
    if proj:
        kwargs["proj"] = proj
    return cell.op_sample(**kwargs)


def _reference_layer(cell, sample, training, z_h, z_c, mask_h, mask_c):
    """One layer, one direction of the reference with the sample's weights."""
    x, hx, cx, *rest = sample.args
    if cell.layer_norm:
        weights = [w for w in rest[:10] if w is not None]
        bias = rest[2] is not None
        fn, extra = layer_norm_lstm_reference, dict(eps=sample.args[16])
    else:
        weights = [w for w in rest[:5] if w is not None]
        bias = rest[2] is not None
        fn, extra = lstm_reference, {}
    masks = {}
    if mask_h is not None:
        masks["zoneout_hidden"] = [mask_h]
    if mask_c is not None:
        masks["zoneout_cell"] = [mask_c]
    out, hy, cy = fn(x, (hx[None], cx[None]), weights, bias=bias,
                     batch_sizes=sample.batch_sizes, training=training,
                     zoneout_hidden=z_h, zoneout_cell=z_c, masks=masks, **extra)
    return out, hy[0], cy[0]


def check_zoneout_in_bfloat16(cell, device, hidden=40, proj=6):
    """Zoneout on h and c in bfloat16 on ``device``, packed rows (with a
    projection of ``proj`` for the LSTM, so its bfloat16 h~_t): every output
    and gradient of the op is at most twice as far from a float64 run of
    the reference (same rounded arguments, same masks) as the reference's
    own bfloat16 run on that device, plus one bfloat16 ulp."""
    from dataclasses import replace

    z_h, z_c = 0.3, 0.4
    base = cell.op_sample(steps=6, batch=4, input_size=3, hidden=hidden,
                          proj=0 if cell.layer_norm else proj, lengths=[6, 5, 3, 1], seed=3)

    def copy(device, dtype):
        return replace(base, args=tuple(
            a.detach().to(torch.bfloat16).to(device=device, dtype=dtype).requires_grad_()
            if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in base.args))

    low, exact = copy(device, torch.bfloat16), copy("cpu", torch.float64)
    x, hx, cx = base.args[:3]
    mask_h, mask_c = zoneout_masks(base, z_h, z_c)
    g = torch.Generator().manual_seed(2)
    up = [t.to(torch.bfloat16) for t in (torch.randn(x.shape[0], hx.shape[-1], generator=g),
                                          torch.randn(hx.shape, generator=g),
                                          torch.randn(cx.shape, generator=g))]

    def results(sample, outputs):
        device = outputs[0].device
        grads = torch.autograd.grad(outputs, sample.diff_args,
                                    [u.to(device=device, dtype=outputs[0].dtype) for u in up])
        named = dict(zip(("output", "hy", "cy"), outputs))
        named.update({f"grad.{n}": t for n, t in zip(sample.diff_names, grads)})
        return named

    ours = results(low, cell.forward(*low.args, zoneout_hidden_mask=mask_h.to(device),
                                     zoneout_cell_mask=mask_c.to(device))[:3])
    reference = results(low, _reference_layer(cell, low, True, z_h, z_c,
                                              mask_h.to(device), mask_c.to(device)))
    truth = results(exact, _reference_layer(cell, exact, True, z_h, z_c, mask_h, mask_c))
    assert ours["output"].dtype == torch.bfloat16
    assert_error_within_twice(ours, reference, truth, torch.bfloat16)


def _op_zoneout(mode, z_h, z_c, mask_h, mask_c):
    """The op's zoneout arguments: masks in training, rates in evaluation."""
    if mode == "mask":
        return dict(zoneout_hidden_mask=mask_h, zoneout_cell_mask=mask_c)
    return dict(zoneout_hidden=z_h, zoneout_cell=z_c)


# ---- the ops against the reference, float64 -------------------------------------

@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("kind", list(ZONEOUT_KINDS))
@pytest.mark.parametrize("mode", ["mask", "rate"])
@pytest.mark.parametrize("proj", [0, 2])
def test_op_matches_reference_outputs_and_every_gradient(cell, layout, kind, mode, proj):
    """Outputs, final states and the gradient of every argument of the fused
    op with zoneout equal the reference's (same masks, or the same rates)."""
    if proj and not cell.has_projection:
        pytest.skip("the LayerNorm-LSTM has no projection")
    z_h, z_c = ZONEOUT_KINDS[kind]
    sample = _op_sample(cell, lengths=[4, 3, 3, 1] if layout == "packed" else None,
                        proj=proj, seed=3)
    mask_h, mask_c = zoneout_masks(sample, z_h, z_c)
    zo = _op_zoneout(mode, z_h, z_c, mask_h, mask_c)
    got = cell.forward(*sample.args, **zo)[:3]
    expected = _reference_layer(cell, sample, mode == "mask", z_h, z_c,
                                mask_h if mode == "mask" else None,
                                mask_c if mode == "mask" else None)
    for name, g, e in zip(("output", "hy", "cy"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12,
                                   msg=lambda m, k=name: f"{k}: {m}")
    g = torch.Generator().manual_seed(5)
    upstream = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in expected]
    got_grads = torch.autograd.grad(got, sample.diff_args, upstream)
    exp_grads = torch.autograd.grad(expected, sample.diff_args, upstream)
    for name, g, e in zip(sample.diff_names, got_grads, exp_grads):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10,
                                   msg=lambda m, k=name: f"grad {k}: {m}")


@pytest.mark.parametrize("mode", ["mask", "rate"])
def test_gradcheck_with_fixed_masks(cell, mode):
    sample = _op_sample(cell, lengths=[3, 2, 1], proj=2 if cell.has_projection else 0,
                        seed=4)
    mask_h, mask_c = zoneout_masks(sample, 0.4, 0.4, seed=2)
    zo = _op_zoneout(mode, 0.4, 0.4, mask_h, mask_c)

    def fn(*diff):
        return tuple(cell.forward(*sample.with_args(diff), **zo)[:3])

    assert torch.autograd.gradcheck(fn, sample.diff_args, atol=1e-7)


@pytest.mark.parametrize("mode", ["mask", "rate"])
def test_opcheck_with_zoneout(cell, mode):
    sample = _op_sample(cell, seed=6, requires_grad=True)
    mask_h, mask_c = zoneout_masks(sample, 0.3, 0.5, seed=3)
    zo = _op_zoneout(mode, 0.3, 0.5, mask_h, mask_c)
    torch.library.opcheck(cell.forward, sample.args, zo)


def test_backward_op_opcheck_with_zoneout(cell):
    sample = _op_sample(cell, seed=7, requires_grad=False)
    mask_h, mask_c = zoneout_masks(sample, 0.3, 0.5, seed=4)
    zo = _op_zoneout("mask", 0.3, 0.5, mask_h, mask_c)
    saved = cell.forward(*sample.args, **zo)
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in saved[:3]]
    args = backward_op_args(cell, sample, grads, saved)
    kwargs = dict(cell_states=saved[-1], **zo)
    torch.library.opcheck(cell.backward, args, kwargs)


def test_off_is_bit_identical(cell):
    """Absent, None and zero zoneout arguments give the very same bits, and
    no carried cell states are kept."""
    for sample in cell.sample_inputs("cpu", requires_grad=True):
        plain = cell.forward(*sample.args)
        off = cell.forward(*sample.args, zoneout_hidden_mask=None, zoneout_cell_mask=None,
                           zoneout_hidden=0.0, zoneout_cell=0.0)
        for a, b in zip(plain, off):
            assert torch.equal(a, b), sample
        assert off[-1].shape[0] == 0, sample
        if sample.training:
            ga = torch.autograd.grad(plain[0].sum() + plain[2].sum(), sample.diff_args)
            gb = torch.autograd.grad(off[0].sum() + off[2].sum(), sample.diff_args)
            for a, b in zip(ga, gb):
                assert torch.equal(a, b), sample


def test_module_off_is_bit_identical_to_default(cell):
    """A module built with every regulariser at its off value computes the
    bits (outputs and gradients) of one built without them."""
    torch.manual_seed(0)
    base = cell.module(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    off = cell.module(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64,
                      zoneout_hidden=0.0, zoneout_cell=0.0, weight_dropout=0.0,
                      variational_dropout=False)
    off.load_state_dict(base.state_dict())
    x = random_input(False)
    a, b = forward_backward(base, x), forward_backward(off, x)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cell_states_are_the_carried_states(cell):
    """In training with zoneout on c the op keeps the carried c_t, and cy is
    the last one."""
    sample = _op_sample(cell, seed=9, requires_grad=False)
    _, mask_c = zoneout_masks(sample, 0.0, 0.5, seed=5)
    out = cell.forward(*sample.args, zoneout_cell_mask=mask_c)
    cell_states, cy = out[-1], out[2]
    B = cy.shape[0]
    assert cell_states.shape == (sample.args[0].shape[0] * B, cy.shape[1])
    torch.testing.assert_close(cell_states[-B:], cy, atol=0, rtol=0)


# ---- eval formula, statistics --------------------------------------------------

def test_eval_formula_holds_exactly(cell):
    """One step in evaluation: h_1 = z_h h_0 + (1 - z_h) h~_1 and
    c_1 = z_c c_0 + (1 - z_c) c~_1, h~ and c~ the outputs without zoneout."""
    sample = _op_sample(cell, seed=10, requires_grad=False)
    args = sample.with_arg("input", sample.arg("input")[:1])
    args = list(args)
    args[sample.arg_names.index("training")] = False
    hx, cx = sample.arg("hx"), sample.arg("cx")
    _, h_cand, c_cand, *_ = cell.forward(*args)
    z_h, z_c = 0.25, 0.6
    out, hy, cy, *_ = cell.forward(*args, zoneout_hidden=z_h, zoneout_cell=z_c)
    torch.testing.assert_close(hy, z_h * hx + (1 - z_h) * h_cand, atol=1e-15, rtol=0)
    torch.testing.assert_close(cy, z_c * cx + (1 - z_c) * c_cand, atol=1e-15, rtol=0)
    torch.testing.assert_close(out[0], hy, atol=0, rtol=0)


def _within_sigmas(fraction, p, n, sigmas=5.0):
    return abs(fraction - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_zoned_out_fraction_matches_rate(cell, rate):
    """In training, the fraction of units whose h (the output) or c (the
    carried state) is exactly its previous value is the rate."""
    torch.manual_seed(123)
    T, B, H = 20, 16, 32
    m = cell.module(8, H, zoneout_hidden=rate, zoneout_cell=rate)
    x = torch.randn(T, B, 8)
    # through the op, to see the carried cell states
    w = m._flat_weights
    hx = torch.zeros(B, H)
    mask_h, mask_c, _, _ = RF._zoneout_args(x, H, H, rate, rate, True)
    if cell.layer_norm:
        res = cell.forward(x, hx, hx, *w, None, False, True, 1e-5, mask_h, mask_c)
    else:
        res = cell.forward(x, hx, hx, *w, None, None, False, True, mask_h, mask_c)
    out, cell_states = res[0], res[-1].view(T, B, H)
    same_h = (out[1:] == out[:-1]).double().mean().item()
    same_c = (cell_states[1:] == cell_states[:-1]).double().mean().item()
    n = (T - 1) * B * H
    assert _within_sigmas(same_h, rate, n), (same_h, rate)
    assert _within_sigmas(same_c, rate, n), (same_c, rate)
    # and the module draws masks at the rate
    out_m, _ = m(x)
    same = (out_m[1:] == out_m[:-1]).double().mean().item()
    assert _within_sigmas(same, rate, n), (same, rate)


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_dropped_weights_have_zero_gradient_at_the_rate(cell, rate):
    """DropConnect: the fraction of exact zeros in weight_hh.grad is the
    rate; the parameter itself is not modified; evaluation uses it as is."""
    torch.manual_seed(7)
    m = cell.module(6, 16, weight_dropout=rate)
    before = m.weight_hh_l0.detach().clone()
    out, _ = m(torch.randn(10, 8, 6))
    out.sum().backward()
    grad = m.weight_hh_l0.grad
    zeros = (grad == 0).double().mean().item()
    assert _within_sigmas(zeros, rate, grad.numel()), (zeros, rate)
    assert torch.equal(m.weight_hh_l0, before)
    m.eval()
    plain = cell.module(6, 16)
    plain.load_state_dict(m.state_dict())
    plain.eval()
    x = torch.randn(5, 2, 6)
    assert torch.equal(m(x)[0], plain(x)[0])


def test_seed_reproduces_masks(cell):
    m = cell.module(4, 6, num_layers=2, dropout=0.3, zoneout_hidden=0.2,
                    zoneout_cell=0.3, weight_dropout=0.4, variational_dropout=True)
    x = torch.randn(5, 3, 4)
    torch.manual_seed(11)
    a = m(x)[0]
    b = m(x)[0]
    torch.manual_seed(11)
    c = m(x)[0]
    assert torch.equal(a, c) and not torch.equal(a, b)


# ---- modules against the reference, every option -----------------------------

class _Recorder:
    """Records every mask rnnfast.functional draws, by kind."""

    def __init__(self, monkeypatch):
        self.masks: dict[str, list] = {}
        original = RF._bernoulli_masks

        def record(shape, rates, device, kinds):
            masks = original(shape, rates, device, kinds)
            for kind, m in zip(kinds, masks):
                self.masks.setdefault(kind, []).append(m)
            return masks

        monkeypatch.setattr(RF, "_bernoulli_masks", record)


def _reference_of(cell, module, x, hx, lengths, masks):
    kwargs = dict(bias=module.bias, num_layers=module.num_layers, dropout=module.dropout,
                  training=module.training, bidirectional=module.bidirectional,
                  zoneout_hidden=module.zoneout_hidden, zoneout_cell=module.zoneout_cell,
                  weight_dropout=module.weight_dropout,
                  variational_dropout=module.variational_dropout, masks=masks)
    if cell.layer_norm:
        fn = layer_norm_lstm_reference
        kwargs["eps"] = module.eps
    else:
        fn = lstm_reference
    batch_sizes = None
    inp = x
    if lengths is not None:
        packed = make_packed(x, lengths)
        inp, batch_sizes = packed.data, packed.batch_sizes
    return fn(inp, hx, module._flat_weights, batch_sizes=batch_sizes, **kwargs)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("proj", [0, 3])
@pytest.mark.parametrize("training", [True, False])
def test_module_every_option_matches_reference(cell, monkeypatch, packed, bidirectional,
                                               proj, training):
    """Two layers with zoneout on h and c, DropConnect and variational
    dropout together: outputs, states and every parameter's gradient equal
    the reference's fed with the masks the module drew (training) or the
    rates (evaluation)."""
    if proj and not cell.has_projection:
        pytest.skip("the LayerNorm-LSTM has no projection")
    torch.manual_seed(5)
    kwargs = cell.kwargs(proj_size=proj, num_layers=2, bidirectional=bidirectional,
                         dropout=0.3, zoneout_hidden=0.3, zoneout_cell=0.4,
                         weight_dropout=0.25, variational_dropout=True,
                         dtype=torch.float64)
    m = cell.module(3, 5, **kwargs)
    m.train(training)
    lengths = [5, 4, 4, 2] if packed else None
    x = random_input(False)
    directions = 2 if bidirectional else 1
    hx = random_states(2, directions, proj or 5, 5)
    recorder = _Recorder(monkeypatch)
    ours = forward_backward(m, x, hx, lengths=lengths)
    if training:
        assert set(recorder.masks) == {"zoneout_hidden", "zoneout_cell", "weight_hh",
                                       "dropout"}
    else:
        assert recorder.masks == {}
    xr = x.detach().clone().requires_grad_()
    hr = tuple(h.detach().clone().requires_grad_() for h in hx)
    m.zero_grad(set_to_none=True)
    out, h_n, c_n = _reference_of(cell, m, xr, hr, lengths, recorder.masks)
    weighted_loss(out, h_n, c_n).backward()
    expected = {"output": out, "h_n": h_n, "c_n": c_n, "grad_input": xr.grad,
                "grad_h0": hr[0].grad, "grad_c0": hr[1].grad}
    expected.update({f"grad.{n}": p.grad for n, p in m.named_parameters()})
    for key, e in expected.items():
        torch.testing.assert_close(ours[key], e, atol=1e-10, rtol=1e-10,
                                   msg=lambda msg, k=key: f"{k}: {msg}")


def test_variational_dropout_shares_one_mask_over_time(cell, monkeypatch):
    """The inter-layer dropout mask is one per sequence and feature: an
    element dropped at one step is dropped at every step (seen as a zero
    gradient of the second layer's input weights for every step)."""
    torch.manual_seed(3)
    m = cell.module(4, 8, num_layers=2, dropout=0.5, variational_dropout=True)
    recorder = _Recorder(monkeypatch)
    x = torch.randn(6, 3, 4, requires_grad=True)
    out, _ = m(x)
    (mask,) = recorder.masks["dropout"]
    assert mask.shape == (3, 8)  # one per sequence and feature, none per step
    assert 0.2 < mask.double().mean().item() < 0.8
    y = torch.ones(6, 3, 8, dtype=torch.float64)
    dropped = RF._variational_dropout(y, 0.5, None)
    assert set(dropped.unique().tolist()) == {0.0, 2.0}
    assert (dropped == dropped[:1]).all()  # the same at every step


def test_variational_dropout_packed_follows_each_row_sequence():
    y = torch.arange(1.0, 9.0).view(8, 1).expand(8, 2).contiguous()
    batch_sizes = torch.tensor([3, 3, 1, 1])
    torch.manual_seed(0)
    got = RF._variational_dropout(y, 0.5, batch_sizes)
    torch.manual_seed(0)
    keep = RF._bernoulli_mask((3, 2), 0.5, y.device, "dropout").double() / 0.5
    rows = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    torch.testing.assert_close(got, y * keep[rows].to(y.dtype))


# ---- bad input --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["zoneout_hidden", "zoneout_cell", "weight_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, True, "0.1", float("nan")])
def test_bad_rate_is_a_value_error_naming_it(cell, name, value):
    with pytest.raises(ValueError, match=name):
        cell.module(3, 4, **{name: value})
    fn = RF.layer_norm_lstm if cell.layer_norm else RF.lstm
    m = cell.module(3, 4)
    x = torch.randn(2, 1, 3)
    hx = (torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match=name):
        fn(x, hx, m._flat_weights, **{name: value})


def test_variational_dropout_must_be_a_bool(cell):
    with pytest.raises(TypeError, match="variational_dropout"):
        cell.module(3, 4, variational_dropout=1)


def test_op_refuses_bad_masks(cell):
    sample = _op_sample(cell, seed=12, requires_grad=False)
    mask_h, mask_c = zoneout_masks(sample, 0.5, 0.5)
    with pytest.raises(RuntimeError, match="zoneout_hidden_mask must be a bool tensor"):
        cell.forward(*sample.args, zoneout_hidden_mask=mask_h.float())
    with pytest.raises(RuntimeError, match="expected zoneout_cell_mask of size"):
        cell.forward(*sample.args, zoneout_cell_mask=mask_c[:-1])
    with pytest.raises(RuntimeError, match="not both"):
        cell.forward(*sample.args, zoneout_cell_mask=mask_c, zoneout_cell=0.5)
    with pytest.raises(ValueError, match="zoneout_hidden must be in"):
        cell.forward(*sample.args, zoneout_hidden=1.0)


def test_backward_without_cell_states_is_refused(cell):
    sample = _op_sample(cell, seed=13, requires_grad=False)
    _, mask_c = zoneout_masks(sample, 0.0, 0.5)
    saved = cell.forward(*sample.args)
    grads = [torch.ones_like(t) for t in saved[:3]]
    args = backward_op_args(cell, sample, grads, saved)
    with pytest.raises(RuntimeError, match="needs the forward's cell_states"):
        cell.backward(*args, zoneout_cell_mask=mask_c)


def test_backward_refuses_misshapen_cell_states(cell):
    """The carried cell states a backward with zoneout on c reads are
    checked for their whole size: a column fewer is refused by name."""
    sample = _op_sample(cell, seed=13, requires_grad=False)
    _, mask_c = zoneout_masks(sample, 0.0, 0.5)
    saved = cell.forward(*sample.args, zoneout_cell_mask=mask_c)
    grads = [torch.ones_like(t) for t in saved[:3]]
    args = backward_op_args(cell, sample, grads, saved)
    cell.backward(*args, zoneout_cell_mask=mask_c, cell_states=saved[-1])
    with pytest.raises(RuntimeError, match=rf"rnnfast.{cell.backward_op}: expected "
                                           r"cell_states of size"):
        cell.backward(*args, zoneout_cell_mask=mask_c, cell_states=saved[-1][:, :-1])


# ---- torch.compile, export ---------------------------------------------------------

@pytest.mark.parametrize("packed", [False, True])
def test_compile_aot_eager_matches_eager(cell, packed):
    """torch.compile (aot_eager) of a module with every option, in training:
    the same masks (same seed) and the same outputs and gradients."""
    torch._dynamo.reset()
    kwargs = cell.kwargs(proj_size=2, num_layers=2, bidirectional=True, dropout=0.2,
                         zoneout_hidden=0.3, zoneout_cell=0.3, weight_dropout=0.2,
                         variational_dropout=True)
    torch.manual_seed(1)
    m = cell.module(3, 4, **kwargs)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=not packed)
    x = torch.randn(5, 3, 3)
    lengths = [5, 3, 2] if packed else None
    torch.manual_seed(2)
    a = forward_backward(m, x, lengths=lengths)
    torch.manual_seed(2)
    b = forward_backward(compiled, x, lengths=lengths)
    for key in ("output", "h_n", "c_n", "grad_input", "grad.weight_hh_l0",
                "grad.weight_hh_l1_reverse"):
        got = b[key.replace("grad.", "grad._orig_mod.")]
        torch.testing.assert_close(got, a[key], atol=1e-6, rtol=1e-6,
                                   msg=lambda msg, k=key: f"{k}: {msg}")


def test_compile_inductor_eval_and_train(cell):
    """Inductor: evaluation (the rates) equals eager; training runs and gives
    gradients (Inductor draws its own random masks)."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    m = cell.module(3, 4, zoneout_hidden=0.3, zoneout_cell=0.2, weight_dropout=0.2)
    compiled = torch.compile(m)
    x = torch.randn(5, 2, 3)
    m.eval()
    torch.testing.assert_close(compiled(x)[0], m(x)[0], atol=1e-6, rtol=1e-6)
    m.train()
    out, _ = compiled(x)
    out.sum().backward()
    assert torch.isfinite(m.weight_hh_l0.grad).all()


@pytest.mark.parametrize("proj", [0, 2])
def test_export_loops_compute_the_eval_formula(cell, proj):
    """The ONNX export forms (the Scan of the torch.export-based exporter,
    the TorchScript Loop of the other) of a layer in evaluation with zoneout
    compute what the fused op computes."""
    if proj and not cell.has_projection:
        pytest.skip("the LayerNorm-LSTM has no projection")
    sample = _op_sample(cell, proj=proj, seed=14, requires_grad=False)
    args = list(sample.args)
    args[sample.arg_names.index("training")] = False
    expected = cell.forward(*args, zoneout_hidden=0.3, zoneout_cell=0.45)[:3]
    x, hx, cx, w_ih, w_hh, b_ih, b_hh, *rest = args
    if cell.layer_norm:
        ln, w_hr, eps = tuple(rest[:6]), None, args[16]
    else:
        ln, w_hr, eps = None, rest[0], 0.0
    scan = _export._scan_layer(x, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, ln, False, eps,
                               [0.3, 0.45])
    loop = _export._loop_layer()(x, hx, cx, w_ih, w_hh, [b_ih, b_hh],
                                 [] if w_hr is None else [w_hr],
                                 [] if ln is None else list(ln), False, eps, [0.3, 0.45])
    for got in (scan, loop):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["onnx", "onnx-torchscript"])
def test_onnx_export_in_training_mode_with_zoneout_is_refused(cell, mode, monkeypatch):
    """Training's random masks have no exported form: a clear error from
    either exporter's capture (rnnfast._export.capture's answer; the real
    exports are in test_export.py)."""
    m = cell.module(3, 4, zoneout_hidden=0.2)
    monkeypatch.setattr(_export, "capture", lambda: mode)
    with pytest.raises(RuntimeError, match="call model.eval"):
        m(torch.randn(2, 1, 3))


@pytest.mark.parametrize("mode", ["onnx", "onnx-torchscript"])
def test_masks_drawn_for_an_onnx_export_have_the_rate(mode, monkeypatch):
    """While an ONNX exporter captures the call, the masks are torch.rand < p
    (what exports): True at the rate, independently per element and mask."""
    monkeypatch.setattr(_export, "capture", lambda: mode)
    torch.manual_seed(0)
    a, b = RF._bernoulli_masks((400, 500), [0.3, 0.8], torch.device("cpu"), ["x", "y"])
    assert a.dtype == torch.bool and a.shape == (400, 500)
    assert abs(a.float().mean().item() - 0.3) < 0.005
    assert abs(b.float().mean().item() - 0.8) < 0.005
    assert abs((a & b).float().mean().item() - 0.24) < 0.005


@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(zoneout_hidden=0.3, zoneout_cell=0.2), id="zoneout"),
    pytest.param(dict(weight_dropout=0.5), id="weight_dropout"),
    pytest.param(dict(num_layers=2, dropout=0.5, variational_dropout=True), id="variational"),
])
def test_jit_trace_in_training_mode_draws_fresh_masks(cell, kwargs):
    """A layer traced in training mode records its mask draws (aten::rand;
    the tracer cannot record the CPU mask op): fresh masks at every call,
    sized by the call's input, and a backward to every parameter."""
    m = cell.module(3, 4, **kwargs).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on random ops
        traced = torch.jit.trace(m, (torch.randn(4, 2, 3),), check_trace=False)
    x = torch.randn(7, 3, 3)
    first, second = traced(x)[0], traced(x)[0]
    assert first.shape == (7, 3, 4) and not torch.equal(first, second)
    first.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_jit_trace_with_zoneout_in_eval(cell):
    m = cell.module(3, 4, zoneout_hidden=0.3, zoneout_cell=0.2).eval()
    x = torch.randn(5, 2, 3)
    traced = torch.jit.trace(m, (x,), check_trace=False)
    torch.testing.assert_close(traced(x)[0], m(x)[0], atol=0, rtol=0)


def test_vmap_with_zoneout_masks():
    """torch.func.vmap over the op with masks (one call per slice)."""
    sample = _op_sample(LSTM_CELL, seed=15, requires_grad=False)
    mask_h, mask_c = zoneout_masks(sample, 0.3, 0.3)
    x = torch.stack([sample.args[0], sample.args[0] * 0.5])

    def f(xi):
        return rnnfast.ops.lstm_forward(xi, *sample.args[1:], mask_h, mask_c)[0]

    got = torch.func.vmap(f)(x)
    for i in range(2):
        torch.testing.assert_close(got[i], f(x[i]), atol=0, rtol=0)


def test_extra_repr_names_the_regularisers(cell):
    m = cell.module(3, 4, zoneout_hidden=0.1, weight_dropout=0.5, variational_dropout=True)
    text = repr(m)
    assert "zoneout_hidden=0.1" in text and "weight_dropout=0.5" in text
    assert "variational_dropout=True" in text and "zoneout_cell" not in text
    assert set(m.state_dict()) == set(cell.module(3, 4).state_dict())


def test_torch_func_grad_matches_autograd(cell):
    """torch.func.grad through a module with every regulariser in training
    draws the same masks (same seed) and gives autograd's gradients."""
    from torch.func import functional_call, grad
    m = cell.module(3, 4, zoneout_hidden=0.3, zoneout_cell=0.3, weight_dropout=0.2)
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(5, 2, 3)

    def loss(p):
        return functional_call(m, p, (x,))[0].sum()

    torch.manual_seed(0)
    got = grad(loss)(params)
    torch.manual_seed(0)
    m(x)[0].sum().backward()
    for name, p in m.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-6)


# ---- the CPU's mask generator (rnnfast::bernoulli_masks) ---------------------------

def test_cpu_masks_depend_on_the_seed_only():
    """Counter-based: the same seed gives the same masks whatever the number
    of threads, another seed other masks; rows follow their own rates."""
    seed = torch.tensor([12345])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rnnfast.ops.bernoulli_masks(seed, (300, 257), [0.1, 0.5, 0.9])
        torch.set_num_threads(2)
        two = rnnfast.ops.bernoulli_masks(seed, (300, 257), [0.1, 0.5, 0.9])
    finally:
        torch.set_num_threads(threads)
    assert one.shape == (3, 300, 257) and one.dtype == torch.bool
    assert torch.equal(one, two)
    other = rnnfast.ops.bernoulli_masks(torch.tensor([12346]), (300, 257), [0.1, 0.5, 0.9])
    assert not torch.equal(one, other)
    n = 300 * 257
    for row, p in zip(one, [0.1, 0.5, 0.9]):
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(row.float().mean().item() - p) < 5 * sigma
    # neighbours (the four draws of one 64-bit word) are uncorrelated
    x = one[1].flatten().float()
    for lag in (1, 2, 3, 4):
        assert abs(torch.corrcoef(torch.stack([x[:-lag], x[lag:]]))[0, 1].item()) < 0.03


def test_cpu_masks_edge_cases_and_errors():
    seed = torch.tensor([7])
    assert not rnnfast.ops.bernoulli_masks(seed, (5, 3), [0.0]).any()
    assert rnnfast.ops.bernoulli_masks(seed, (0, 3), [0.5]).shape == (1, 0, 3)
    odd = rnnfast.ops.bernoulli_masks(seed, (7,), [0.5, 0.5])  # a partial last word
    assert odd.shape == (2, 7)
    with pytest.raises(RuntimeError, match=r"every rate must be in \[0, 1\)"):
        rnnfast.ops.bernoulli_masks(seed, (3,), [1.0])
    with pytest.raises(RuntimeError, match="seed must be an int64 CPU tensor of one element"):
        rnnfast.ops.bernoulli_masks(torch.tensor([1.0]), (3,), [0.5])
    torch.library.opcheck(torch.ops.rnnfast.bernoulli_masks.default, (seed, [4, 5], [0.2, 0.7]))


def test_manual_seed_reproduces_a_zoneout_step():
    m = rnnfast.LSTM(6, 8, num_layers=2, zoneout_hidden=0.3, zoneout_cell=0.3)
    x = torch.randn(5, 3, 6)
    torch.manual_seed(3)
    a = m(x)[0]
    torch.manual_seed(3)
    b = m(x)[0]
    c = m(x)[0]
    assert torch.equal(a, b) and not torch.equal(b, c)
