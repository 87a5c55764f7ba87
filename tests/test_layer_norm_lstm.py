"""What only rnnfast.LayerNormLSTM has, beyond the tests it shares with
every cell (test_cells.py): eps, the functional form with flat weights, the
LayerNorm parameters and their initialisation, loading nn.LSTM weights,
repr, a larger float32 size, and its ops against the plain-PyTorch
reference (non-default eps, several gradient blocks)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import rnnfast
from rnnfast.reference import ReferenceLayerNormLSTM, layer_norm_lstm_reference
from utils import (LAYER_NORM_LSTM_CELL, TOLERANCES, assert_results_close, backward_args_from,
                   float64_twin, forward_backward, make_layer_norm_lstm_pair, make_op_args,
                   random_input, random_states, randomize_layer_norm_, upcast)

T, B, I, H = 5, 4, 3, 5
LENGTHS_UNSORTED = [2, 5, 1, 4]  # enforce_sorted=False
LN_SUFFIXES = ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias", "ln_cell_weight",
               "ln_cell_bias")


# --------------------------------------------------------------------------
# 1. eps, the functional form
# --------------------------------------------------------------------------
# float32 results are compared with the float64 reference run on the same
# (float32) weights and inputs, with an atol relative to each result's
# largest magnitude: weight gradients are sums over every row, and a
# LayerNorm of a small-variance vector (W_hh h for small h) amplifies
# rounding by up to 1/sqrt(eps), so float32's own error reaches ~2e-5 of the
# largest value here (the float32 reference's too).
F32_TOL = dict(atol=5e-5, rtol=1e-5, scaled=True)


def _upcast_states(hx):
    return None if hx is None else tuple(h.double() for h in hx)


@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_parity_non_default_eps(device, eps):
    """eps reaches every LayerNorm: the result depends on it and equals the
    reference's with that eps."""
    ours, ref = make_layer_norm_lstm_pair(I, H, num_layers=2, bidirectional=True, eps=eps,
                                          device=device)
    assert ours.eps == eps
    x = random_input(False, device=device)
    hx = random_states(2, 2, H, H, device=device)
    got = forward_backward(ours, x, hx, lengths=LENGTHS_UNSORTED, enforce_sorted=False)
    expected = forward_backward(ref, x, hx, lengths=LENGTHS_UNSORTED, enforce_sorted=False)
    assert_results_close(got, expected, **TOLERANCES[torch.float64])
    default = rnnfast.LayerNormLSTM(I, H, num_layers=2, bidirectional=True).double().to(device)
    default.load_state_dict(ours.state_dict())
    out_default = forward_backward(default, x, hx, lengths=LENGTHS_UNSORTED,
                                   enforce_sorted=False, backward=False)
    assert (out_default["output"] - got["output"]).abs().max() > 1e-6


def test_parity_functional_with_flat_weights(device):
    """rnnfast.functional.layer_norm_lstm and layer_norm_lstm_reference take
    the same flat weight list (the module's _flat_weights)."""
    ours, _ = make_layer_norm_lstm_pair(I, H, num_layers=2, bidirectional=True, device=device)
    x = random_input(False, device=device)
    hx = random_states(2, 2, H, H, device=device)
    kwargs = dict(num_layers=2, bidirectional=True, eps=1e-4)
    got = rnnfast.functional.layer_norm_lstm(x, hx, ours._flat_weights, **kwargs)
    expected = layer_norm_lstm_reference(x, hx, ours._flat_weights, **kwargs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOLERANCES[torch.float64])


# --------------------------------------------------------------------------
# 2. parameters, initialisation, nn.LSTM weights, repr
# --------------------------------------------------------------------------
CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, bias=False),
    dict(num_layers=2, batch_first=True, dropout=0.25, bidirectional=True),
]


def _expected_parameters(input_size, hidden, num_layers=1, bias=True, bidirectional=False,
                         **_):
    """The specified names and shapes, in order."""
    out = []
    for k in range(num_layers):
        layer_in = input_size if k == 0 else hidden * (2 if bidirectional else 1)
        for s in ("", "_reverse") if bidirectional else ("",):
            out += [(f"weight_ih_l{k}{s}", (4 * hidden, layer_in)),
                    (f"weight_hh_l{k}{s}", (4 * hidden, hidden))]
            if bias:
                out += [(f"bias_ih_l{k}{s}", (4 * hidden,)), (f"bias_hh_l{k}{s}", (4 * hidden,))]
            out += [(f"{name}_l{k}{s}", (hidden if "cell" in name else 4 * hidden,))
                    for name in LN_SUFFIXES]
    return out


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_parameter_names_shapes_and_init(kwargs):
    torch.manual_seed(123)
    ref = nn.LSTM(I, H, **kwargs)
    after_ref = torch.rand(3)
    torch.manual_seed(123)
    ours = rnnfast.LayerNormLSTM(I, H, **kwargs)
    after_ours = torch.rand(3)
    params = [(n, tuple(p.shape)) for n, p in ours.named_parameters()]
    assert params == _expected_parameters(I, H, **kwargs)
    assert [n for n, _ in params] == ours._flat_weights_names
    # The reference has the same names in the same order (so they share
    # state_dicts and flat weight lists).
    assert list(ReferenceLayerNormLSTM(I, H, **kwargs).state_dict()) == [n for n, _ in params]
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith("ln_"):
            fill = 1.0 if "_weight_" in name else 0.0
            assert torch.equal(p, torch.full_like(p, fill)), name
        else:  # same seed, same plain weights as nn.LSTM
            assert torch.equal(p, ref_params.pop(name)), name
    assert not ref_params, f"nn.LSTM parameters missing: {list(ref_params)}"
    # The same number of random draws: the RNG is left in the same state.
    assert torch.equal(after_ours, after_ref)
    # reset_parameters restores the initial values.
    randomize_layer_norm_(ours)
    torch.manual_seed(123)
    ours.reset_parameters()
    torch.manual_seed(123)
    fresh = rnnfast.LayerNormLSTM(I, H, **kwargs)
    for (n, a), (_, b) in zip(ours.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_load_nn_lstm_state_dict(kwargs):
    """nn.LSTM's weights load by name (strict=False: only the ln_* keys are
    missing); with LayerNorms at their initial values the cell is still a
    different one (its output is not nn.LSTM's) but the reference's."""
    torch.manual_seed(1)
    lstm = nn.LSTM(I, H, **kwargs).double()
    ours = rnnfast.LayerNormLSTM(I, H, eps=1e-12, **kwargs).double()
    result = ours.load_state_dict(lstm.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(
        n for n, _ in ours.named_parameters() if n.startswith("ln_"))
    assert result.missing_keys and all(k.startswith("ln_") for k in result.missing_keys)
    for name, p in lstm.named_parameters():
        assert torch.equal(getattr(ours, name), p), name
    ref = ReferenceLayerNormLSTM(I, H, eps=1e-12, **kwargs).double()
    assert ref.load_state_dict(lstm.state_dict(), strict=False).unexpected_keys == []
    ours.eval(), ref.eval(), lstm.eval()
    x = random_input(kwargs.get("batch_first", False))
    out, (h_n, c_n) = ours(x)
    out_ref, (h_ref, c_ref) = ref(x)
    out_lstm, _ = lstm(x)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(h_n, h_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(c_n, c_ref, atol=1e-10, rtol=1e-10)
    assert (out - out_lstm).abs().max() > 1e-3


def test_load_rnnfast_lstm_state_dict():
    torch.manual_seed(2)
    lstm = rnnfast.LSTM(I, H, num_layers=2, bidirectional=True)
    ours = rnnfast.LayerNormLSTM(I, H, num_layers=2, bidirectional=True)
    result = ours.load_state_dict(lstm.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert len(result.missing_keys) == 4 * 6
    assert all(torch.equal(getattr(ours, n), p) for n, p in lstm.named_parameters())


@pytest.mark.parametrize("kwargs", CONFIGS + [dict(dropout=0.5, num_layers=2, bias=False)],
                         ids=[str(c) for c in CONFIGS] + ["dropout-nobias"])
def test_repr(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lstm = nn.LSTM(I, H, **kwargs)
        ours = rnnfast.LayerNormLSTM(I, H, **kwargs)
        ours_eps = rnnfast.LayerNormLSTM(I, H, eps=1e-3, **kwargs)
    assert ours.extra_repr() == lstm.extra_repr()
    assert "eps" not in repr(ours)
    assert repr(ours) == f"LayerNormLSTM({lstm.extra_repr()})"
    assert ours_eps.extra_repr() == lstm.extra_repr() + ", eps=0.001"
    assert repr(ours_eps) == f"LayerNormLSTM({lstm.extra_repr()}, eps=0.001)"


def test_module_attributes():
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=True, dropout=0.5)
    lstm = nn.LSTM(I, H, **kwargs)
    ours = rnnfast.LayerNormLSTM(I, H, eps=1e-4, **kwargs)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional"):
        assert getattr(ours, attr) == getattr(lstm, attr), attr
        assert type(getattr(ours, attr)) is type(getattr(lstm, attr)), attr
    assert ours.eps == 1e-4
    assert len(ours.all_weights) == 4
    assert all(len(group) == 10 for group in ours.all_weights)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_constructor_rejects_non_positive_eps(eps):
    with pytest.raises(ValueError, match="eps must be positive"):
        rnnfast.LayerNormLSTM(I, H, eps=eps)


# --------------------------------------------------------------------------
# 3. a larger float32 size
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
def test_float32_parity_larger_hidden(device, kind):
    """H = 70 (not a multiple of any SIMD width) and B = 37 rows (several
    threads' worth of pointwise work): float32 results against the float64
    reference."""
    ours, ref = make_layer_norm_lstm_pair(11, 70, num_layers=2, bidirectional=True,
                                          dtype=torch.float32, device=device)
    x = torch.randn(6, 37, 11, device=device)
    hx = random_states(2, 2, 70, 70, dtype=torch.float32, device=device, batch=37)
    lengths = None if kind == "padded" else [(5 * i) % 6 + 1 for i in range(37)]
    run = dict(lengths=lengths, enforce_sorted=False)
    got = forward_backward(ours, x, hx, **run)
    exact = forward_backward(float64_twin(ref), x.double(), _upcast_states(hx), **run)
    assert_results_close(upcast(got), exact, **F32_TOL)




# --------------------------------------------------------------------------
# 4. the ops against the reference
# --------------------------------------------------------------------------
DIFF_NAMES = ["input", "hx", "cx", "weight_ih", "weight_hh", "bias_ih", "bias_hh",
              "ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias", "ln_cell_weight",
              "ln_cell_bias"]


def _ln_sample(**kwargs):
    return make_op_args(layer_norm=True, **kwargs)


def test_gradcheck_non_default_eps(device):
    """A large eps changes the normalisation; gradients follow it."""
    sample = _ln_sample(lengths=[3, 2], eps=0.5, device=device, requires_grad=True, seed=4)
    assert sample.args[-1] == 0.5
    assert torch.autograd.gradcheck(sample.outputs, tuple(sample.diff_args),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


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
    got = sample.op_overload(*sample.args)
    for name, g, e in zip(("output", "hy", "cy"), got[:3], (out, hy, cy)):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12,
                                   msg=lambda m, k=name: f"{k}: {m}")
    args = backward_args_from(sample)
    expected = torch.autograd.grad((out, hy, cy), sample.diff_args, args[:3])
    grads = LAYER_NORM_LSTM_CELL.backward(*args)
    got_grads = LAYER_NORM_LSTM_CELL.gradients_by_argument(sample, grads)
    assert [n for n, _ in got_grads] == [n for i, n in enumerate(DIFF_NAMES)
                                         if bias or i not in (5, 6)]
    for (name, g), e in zip(got_grads, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10,
                                   msg=lambda m, k=name: f"{k}: {m}")


@pytest.mark.parametrize("packed,reverse", [(False, False), (False, True), (True, False),
                                            (True, True)])
def test_backward_over_several_gradient_blocks(device, packed, reverse, monkeypatch):
    """The CPU backward runs its input and weight gradient GEMMs per block of
    steps (CpuBackend::grad_block_rows, here set to 1024 rows): a sequence of
    several blocks, with uneven step sizes when packed, still gives the
    reference's gradients."""
    monkeypatch.setenv("RNNFAST_CPU_GRAD_BLOCK_ROWS", "1024")
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
    grads = LAYER_NORM_LSTM_CELL.backward(*args)
    got = LAYER_NORM_LSTM_CELL.gradients_by_argument(sample, grads)
    assert [n for n, _ in got] == DIFF_NAMES
    for (name, g), e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-9,
                                   msg=lambda m, k=name: f"{k}: {m}")
