"""rnnfast.LayerNormLSTM against the plain-PyTorch reference
(rnnfast.reference.ReferenceLayerNormLSTM): parity of outputs and every
gradient, parameters and initialisation, loading nn.LSTM weights, repr,
nn.LSTM's forward contract and errors, NaN, strides, determinism, a larger
float32 size and bfloat16."""

from __future__ import annotations

import itertools
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import rnnfast
from rnnfast.reference import ReferenceLayerNormLSTM, layer_norm_lstm_reference
from utils import (TOLERANCES, assert_error_within_twice, assert_results_close,
                   bad_forward_cases, forward_backward, make_layer_norm_lstm_pair, make_packed,
                   randomize_layer_norm_, upcast)

T, B, I, H = 5, 4, 3, 5
LENGTHS_SORTED = [5, 4, 4, 2]
LENGTHS_UNSORTED = [2, 5, 1, 4]  # enforce_sorted=False
LN_SUFFIXES = ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias", "ln_cell_weight",
               "ln_cell_bias")


def _input(batch_first, dtype=torch.float64, device="cpu", steps=T, batch=B, size=I):
    shape = (batch, steps, size) if batch_first else (steps, batch, size)
    return torch.randn(shape, dtype=dtype, device=device)


def _states(num_layers, directions, hidden=H, dtype=torch.float64, device="cpu", batch=B):
    opts = dict(dtype=dtype, device=device)
    return (torch.randn(num_layers * directions, batch, hidden, **opts) * 0.5,
            torch.randn(num_layers * directions, batch, hidden, **opts) * 0.5)


def _lengths(kind):
    return {"padded": None, "packed_sorted": LENGTHS_SORTED,
            "packed_unsorted": LENGTHS_UNSORTED}[kind]


def _assert_every_gradient_reached(res):
    for key, value in res.items():
        if key.startswith("grad"):
            assert value is not None, key
            assert torch.isfinite(value).all(), key
            if key.startswith("grad."):
                assert value.abs().sum() > 0, key


# --------------------------------------------------------------------------
# 2. parity with the reference
# --------------------------------------------------------------------------
INPUT_KINDS = ["padded", "packed_sorted", "packed_unsorted"]
PARITY_GRID = list(itertools.product([True, False], [False, True], [False, True], [1, 2],
                                     INPUT_KINDS, [False, True]))
PARITY_IDS = [f"{'bias' if b else 'nobias'}-{'bf' if bf else 'tf'}-{'bi' if d else 'uni'}-"
              f"L{n}-{k}-{'hx' if h else 'nohx'}" for b, bf, d, n, k, h in PARITY_GRID]
# float32 results are compared with the float64 reference run on the same
# (float32) weights and inputs, with an atol relative to each result's
# largest magnitude: weight gradients are sums over every row, and a
# LayerNorm of a small-variance vector (W_hh h for small h) amplifies
# rounding by up to 1/sqrt(eps), so float32's own error reaches ~2e-5 of the
# largest value here (the float32 reference's too).
F32_TOL = dict(atol=5e-5, rtol=1e-5, scaled=True)


def _float64_twin(ref: ReferenceLayerNormLSTM) -> ReferenceLayerNormLSTM:
    """A float64 copy of ``ref`` (same arguments, same values)."""
    twin = ReferenceLayerNormLSTM(ref.input_size, ref.hidden_size, ref.num_layers, ref.bias,
                                  ref.batch_first, ref.dropout, ref.bidirectional, ref.eps)
    twin.load_state_dict(ref.state_dict())
    return twin.to(device=next(ref.parameters()).device, dtype=torch.float64)


def _upcast_states(hx):
    return None if hx is None else tuple(h.double() for h in hx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias,batch_first,bidirectional,num_layers,kind,with_hx",
                         PARITY_GRID, ids=PARITY_IDS)
def test_parity_with_reference(device, dtype, bias, batch_first, bidirectional, num_layers,
                               kind, with_hx):
    ours, ref = make_layer_norm_lstm_pair(I, H, num_layers=num_layers, bias=bias,
                                          batch_first=batch_first,
                                          bidirectional=bidirectional, dtype=dtype,
                                          device=device)
    x = _input(batch_first, dtype, device)
    hx = _states(num_layers, 1 + bidirectional, dtype=dtype, device=device) if with_hx else None
    lengths = _lengths(kind)
    kwargs = dict(lengths=lengths, enforce_sorted=kind != "packed_unsorted")
    got = forward_backward(ours, x, hx, **kwargs)
    if dtype == torch.float64:
        expected = forward_backward(ref, x, hx, **kwargs)
        assert_results_close(got, expected, **TOLERANCES[dtype])
    else:
        expected = forward_backward(_float64_twin(ref), x.double(), _upcast_states(hx),
                                    **kwargs)
        assert all(v.dtype == dtype for k, v in got.items() if k != "lengths"
                   and v is not None and v.is_floating_point())
        assert_results_close(upcast(got), expected, **F32_TOL)
    # Every gradient exists (input, h0, c0, each parameter incl. ln_*) and
    # the loss reaches every parameter.
    n_params = num_layers * (1 + bidirectional) * ((4 if bias else 2) + 6)
    assert sum(k.startswith("grad.") for k in got) == n_params
    assert ("grad_h0" in got) == with_hx
    _assert_every_gradient_reached(got)
    if lengths is not None:
        assert torch.equal(got["lengths"], torch.tensor(lengths))


@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_parity_non_default_eps(device, eps):
    """eps reaches every LayerNorm: the result depends on it and equals the
    reference's with that eps."""
    ours, ref = make_layer_norm_lstm_pair(I, H, num_layers=2, bidirectional=True, eps=eps,
                                          device=device)
    assert ours.eps == eps
    x = _input(False, device=device)
    hx = _states(2, 2, device=device)
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
    x = _input(False, device=device)
    hx = _states(2, 2, device=device)
    kwargs = dict(num_layers=2, bidirectional=True, eps=1e-4)
    got = rnnfast.functional.layer_norm_lstm(x, hx, ours._flat_weights, **kwargs)
    expected = layer_norm_lstm_reference(x, hx, ours._flat_weights, **kwargs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOLERANCES[torch.float64])


def test_parity_no_grad_and_inference_mode(device):
    ours, ref = make_layer_norm_lstm_pair(I, H, num_layers=2, bidirectional=True,
                                          device=device)
    x = _input(False, device=device)
    with torch.no_grad():
        expected = ref(x)
        got_no_grad = ours(x)
    with torch.inference_mode():
        got_inference = ours(x)
    for got in (got_no_grad, got_inference):
        torch.testing.assert_close(got[0], expected[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(got[1], expected[1], atol=1e-10, rtol=1e-10)
        assert got[0].grad_fn is None


# --------------------------------------------------------------------------
# 3. parameters, initialisation, nn.LSTM weights, repr
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
    x = _input(kwargs.get("batch_first", False))
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


@pytest.mark.parametrize("kwargs", [dict(hidden_size=0), dict(input_size=2.5),
                                    dict(num_layers=0), dict(dropout=1.5), dict(bias=1),
                                    dict(batch_first=None)], ids=str)
def test_constructor_errors_like_nn_lstm(kwargs):
    args = dict(input_size=I, hidden_size=H, num_layers=2)
    args.update(kwargs)
    with pytest.raises(Exception) as ref_info:
        nn.LSTM(**args)
    with pytest.raises(ref_info.type) as ours_info:
        rnnfast.LayerNormLSTM(**args)
    assert type(ours_info.value) is ref_info.type
    assert str(ours_info.value) == str(ref_info.value)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_constructor_rejects_non_positive_eps(eps):
    with pytest.raises(ValueError, match="eps must be positive"):
        rnnfast.LayerNormLSTM(I, H, eps=eps)


# --------------------------------------------------------------------------
# 4. nn.LSTM's forward contract
# --------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched_equals_batch_of_one(device, batch_first, with_hx):
    ours, ref = make_layer_norm_lstm_pair(I, H, num_layers=2, bidirectional=True,
                                          batch_first=batch_first, device=device)
    x = torch.randn(T, I, dtype=torch.float64, device=device)
    hx = _states(2, 2, device=device, batch=1) if with_hx else None
    hx2 = tuple(h.squeeze(1) for h in hx) if with_hx else None
    out, (h_n, c_n) = ours(x, hx2)
    assert out.shape == (T, 2 * H) and h_n.shape == (4, H) and c_n.shape == (4, H)
    out_b, (h_b, c_b) = ours(x.unsqueeze(0 if batch_first else 1), hx)
    torch.testing.assert_close(out, out_b.squeeze(0 if batch_first else 1), atol=0, rtol=0)
    torch.testing.assert_close(h_n, h_b.squeeze(1), atol=0, rtol=0)
    torch.testing.assert_close(c_n, c_b.squeeze(1), atol=0, rtol=0)
    assert_results_close(forward_backward(ours, x, hx2), forward_backward(ref, x, hx2),
                         **TOLERANCES[torch.float64])


def test_batch_first_is_a_transpose(device):
    ours, _ = make_layer_norm_lstm_pair(I, H, num_layers=2, bidirectional=True, device=device)
    ours_bf = rnnfast.LayerNormLSTM(I, H, num_layers=2, bidirectional=True,
                                    batch_first=True).double().to(device)
    ours_bf.load_state_dict(ours.state_dict())
    x = _input(False, device=device)
    hx = _states(2, 2, device=device)
    out, (h_n, c_n) = ours(x, hx)
    out_bf, (h_bf, c_bf) = ours_bf(x.transpose(0, 1), hx)  # states stay [L*D, B, H]
    assert out_bf.shape == (B, T, 2 * H)
    torch.testing.assert_close(out_bf, out.transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(h_bf, h_n, atol=0, rtol=0)
    torch.testing.assert_close(c_bf, c_n, atol=0, rtol=0)


@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_sequence_in_packed_sequence_out(device, batch_first):
    """A PackedSequence (unsorted, enforce_sorted=False) gives a
    PackedSequence with the input's batch_sizes and indices, and h_n / c_n
    in the caller's batch order: each sequence's are those of running it
    alone, at its own length."""
    ours, _ = make_layer_norm_lstm_pair(I, H, num_layers=2, bidirectional=True,
                                        batch_first=batch_first, device=device)
    ours.eval()
    x = _input(batch_first, device=device)
    hx = _states(2, 2, device=device)
    packed = make_packed(x, LENGTHS_UNSORTED, batch_first=batch_first, enforce_sorted=False)
    out, (h_n, c_n) = ours(packed, hx)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    assert torch.equal(out.sorted_indices, packed.sorted_indices)
    assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
    assert out.data.shape == (sum(LENGTHS_UNSORTED), 2 * H)
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
@pytest.mark.parametrize("bidirectional", [False, True])
def test_empty_batch(batch_first, bidirectional):
    """A batch of 0 sequences gives empty outputs shaped like nn.LSTM's,
    and a backward that works (zero gradients)."""
    ours, ref = make_layer_norm_lstm_pair(I, H, num_layers=2, batch_first=batch_first,
                                          bidirectional=bidirectional)
    lstm = nn.LSTM(I, H, num_layers=2, batch_first=batch_first,
                   bidirectional=bidirectional).double()
    x = _input(batch_first, batch=0)
    got = forward_backward(ours, x)
    expected = forward_backward(lstm, x, backward=False)
    assert got["output"].shape == expected["output"].shape
    assert got["output"].numel() == 0
    assert got["h_n"].shape == expected["h_n"].shape == (4 if bidirectional else 2, 0, H)
    assert got["c_n"].shape == expected["c_n"].shape
    assert got["grad_input"].shape == x.shape
    for name, p in ours.named_parameters():
        g = got[f"grad.{name}"]
        assert g is None or (g.shape == p.shape and not g.any()), name


def test_dropout_eval_equals_no_dropout(device):
    ours = rnnfast.LayerNormLSTM(I, H, num_layers=3, dropout=0.5,
                                 bidirectional=True).double().to(device)
    randomize_layer_norm_(ours)
    plain = rnnfast.LayerNormLSTM(I, H, num_layers=3, bidirectional=True).double().to(device)
    plain.load_state_dict(ours.state_dict())
    ours.eval()
    x = _input(False, device=device)
    got, expected = ours(x), plain(x)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)


def test_dropout_between_layers_in_training(device):
    """In training mode dropout acts between layers only (not on the first
    layer's states, not on the last layer's output), with the reference's
    mask for the same seed (neither draws random numbers elsewhere)."""
    ours, ref = make_layer_norm_lstm_pair(I, H, num_layers=2, dropout=0.5, bidirectional=True,
                                          device=device)
    ours.train(), ref.train()
    x = _input(False, device=device)
    torch.manual_seed(5)
    res_train = forward_backward(ours, x)
    torch.manual_seed(5)
    res_ref = forward_backward(ref, x)
    assert_results_close(res_train, res_ref, **TOLERANCES[torch.float64])
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


BAD_FORWARD = bad_forward_cases(T, B, I, H, LENGTHS_SORTED)


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_bad_input_raises_like_nn_lstm(case):
    """The exception class of nn.LSTM (and rnnfast.LSTM) with the same
    arguments, and the same words."""
    args, match, *same_words = BAD_FORWARD[case]
    torch.manual_seed(0)
    lstm = nn.LSTM(I, H, num_layers=2, bidirectional=True)
    fast = rnnfast.LSTM(I, H, num_layers=2, bidirectional=True)
    ours = rnnfast.LayerNormLSTM(I, H, num_layers=2, bidirectional=True)
    with pytest.raises(Exception) as ref_info:
        lstm(*args)
    with pytest.raises(ref_info.type, match=match) as fast_info:
        fast(*args)
    with pytest.raises(ref_info.type, match=match) as ours_info:
        ours(*args)
    assert type(ours_info.value) is ref_info.type, (ours_info.value, ref_info.value)
    # The same words as rnnfast.LSTM, but for the class name.
    assert str(ours_info.value) == str(fast_info.value).replace("LSTM:", "LayerNormLSTM:")
    if (same_words or [True])[0]:
        assert re.search(match, str(ref_info.value)), ref_info.value


def test_batch_first_seq_len_0_raises_like_nn_lstm():
    ours = rnnfast.LayerNormLSTM(I, H, batch_first=True)
    with pytest.raises(RuntimeError, match="larger than 0"):
        nn.LSTM(I, H, batch_first=True)(torch.randn(B, 0, I))
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
        ours(torch.randn(B, 0, I))


# --------------------------------------------------------------------------
# 7. NaN, strides, determinism, size, bfloat16
# --------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["input", "h0", "c0"])
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_nan_propagates_like_reference(device, where, kind, bidirectional):
    ours, ref = make_layer_norm_lstm_pair(I, H, num_layers=2, bidirectional=bidirectional,
                                          device=device)
    x = _input(False, device=device)
    hx = _states(2, 1 + bidirectional, device=device)
    if where == "input":
        x[1, 1, 0] = float("nan")
    elif where == "h0":
        hx[0][0, 1, 0] = float("nan")
    else:
        hx[1][0, 1, 0] = float("nan")
    kwargs = dict(lengths=_lengths(kind), enforce_sorted=False)
    got = forward_backward(ours, x, hx, **kwargs)
    expected = forward_backward(ref, x, hx, **kwargs)
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
    # The poisoned sequence is NaN, the others are not.
    assert torch.isnan(got["h_n"][:, 1]).any()
    assert not torch.isnan(got["h_n"][:, [0, 2, 3]]).any()


@pytest.mark.parametrize("batch_first", [False, True])
def test_non_contiguous_input_and_states(device, batch_first):
    ours, ref = make_layer_norm_lstm_pair(I, H, num_layers=2, bidirectional=True,
                                          batch_first=batch_first, device=device)
    x = _input(batch_first, device=device)
    h0, c0 = _states(2, 2, device=device)
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
    for i, (g, e) in enumerate(zip(run(ref, x_s, h0_t, c0_t), expected)):
        torch.testing.assert_close(g, e, **TOLERANCES[torch.float64],
                                   msg=lambda m, i=i: f"reference, result {i}: {m}")


def test_non_contiguous_parameters(device):
    """Parameters (LayerNorm ones included) that are non-contiguous views
    give the same results."""
    ours, _ = make_layer_norm_lstm_pair(I, H, num_layers=2, device=device)
    strided = rnnfast.LayerNormLSTM(I, H, num_layers=2).double().to(device)
    for name, p in ours.named_parameters():
        if p.dim() == 2:
            view = p.detach().t().contiguous().t()
        else:
            view = torch.zeros(p.shape[0], 2, dtype=p.dtype, device=device)
            view[:, 0] = p.detach()
            view = view[:, 0]
        assert not view.is_contiguous()
        setattr(strided, name, nn.Parameter(view))
    x = _input(False, device=device)
    assert_results_close(forward_backward(strided, x, lengths=LENGTHS_UNSORTED,
                                          enforce_sorted=False),
                         forward_backward(ours, x, lengths=LENGTHS_UNSORTED,
                                          enforce_sorted=False),
                         atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
def test_bitwise_deterministic(device, dtype, kind):
    ours = rnnfast.LayerNormLSTM(8, 32, num_layers=2, bidirectional=True).to(device, dtype)
    randomize_layer_norm_(ours)
    x = torch.randn(6, 37, 8, dtype=dtype, device=device)
    lengths = None
    if kind != "padded":
        lengths = [(7 * i) % 6 + 1 for i in range(37)]
    runs = [forward_backward(ours, x, lengths=lengths, enforce_sorted=False) for _ in range(2)]
    for key in runs[0]:
        a, b = runs[0][key], runs[1][key]
        if a is None:
            assert b is None
            continue
        assert torch.equal(a, b), key


@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
def test_float32_parity_larger_hidden(device, kind):
    """H = 70 (not a multiple of any SIMD width) and B = 37 rows (several
    threads' worth of pointwise work): float32 results against the float64
    reference."""
    ours, ref = make_layer_norm_lstm_pair(11, 70, num_layers=2, bidirectional=True,
                                          dtype=torch.float32, device=device)
    x = torch.randn(6, 37, 11, device=device)
    hx = _states(2, 2, 70, dtype=torch.float32, device=device, batch=37)
    lengths = None if kind == "padded" else [(5 * i) % 6 + 1 for i in range(37)]
    run = dict(lengths=lengths, enforce_sorted=False)
    got = forward_backward(ours, x, hx, **run)
    exact = forward_backward(_float64_twin(ref), x.double(), _upcast_states(hx), **run)
    assert_results_close(upcast(got), exact, **F32_TOL)


@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("bias", [True, False])
def test_bfloat16_error_within_twice_pytorch(kind, bias):
    """model.to(bfloat16): forward and backward run, and each result's
    error against a float64 reference (on the same rounded weights and
    inputs) is at most twice the reference's own error in bfloat16."""
    dtype = torch.bfloat16
    ours, ref = make_layer_norm_lstm_pair(I, 8, num_layers=2, bidirectional=True, bias=bias,
                                          dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    x = _input(False, dtype=dtype, steps=6)
    hx = _states(2, 2, 8, dtype=dtype)
    lengths = None if kind == "padded" else [3, 6, 1, 5]
    run = dict(lengths=lengths, enforce_sorted=False)
    got = forward_backward(ours, x, hx, **run)
    pt = forward_backward(ref, x, hx, **run)
    exact = forward_backward(_float64_twin(ref), x.double(), _upcast_states(hx), **run)
    _assert_every_gradient_reached(got)
    assert_error_within_twice(got, pt, exact, dtype)
