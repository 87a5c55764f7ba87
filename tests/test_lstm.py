"""rnnfast.LSTM as a drop-in torch.nn.LSTM: parity of outputs and every
gradient, initialisation and state_dict, repr, errors, NaN/Inf, strides,
unbatched input, dropout, determinism and bfloat16."""

from __future__ import annotations

import itertools
import re
import warnings

import pytest
import torch
from torch import nn

import rnnfast
from utils import (TOLERANCES, assert_error_within_twice, assert_results_close,
                   bad_forward_cases, forward_backward, make_lstm_pair)

T, B, I, H, P = 5, 4, 3, 6, 4  # P: proj_size of the proj cases
LENGTHS_SORTED = [5, 4, 4, 2]
LENGTHS_UNSORTED = [2, 5, 1, 4]  # enforce_sorted=False


def _input(batch_first, dtype=torch.float64, device="cpu", steps=T, batch=B, size=I):
    shape = (batch, steps, size) if batch_first else (steps, batch, size)
    return torch.randn(shape, dtype=dtype, device=device)


def _states(num_layers, directions, out_size, hidden, dtype=torch.float64, device="cpu",
            batch=B):
    opts = dict(dtype=dtype, device=device)
    return (torch.randn(num_layers * directions, batch, out_size, **opts) * 0.5,
            torch.randn(num_layers * directions, batch, hidden, **opts) * 0.5)


# --------------------------------------------------------------------------
# 2. parity with torch.nn.LSTM
# --------------------------------------------------------------------------
INPUT_KINDS = ["padded", "packed_sorted", "packed_unsorted"]
PARITY_GRID = list(itertools.product([True, False], [False, True], [False, True], [0, P],
                                     INPUT_KINDS, [False, True]))
PARITY_IDS = [f"{'bias' if b else 'nobias'}-{'bf' if bf else 'tf'}-{'bi' if d else 'uni'}-"
              f"proj{p}-{k}-{'hx' if h else 'nohx'}" for b, bf, d, p, k, h in PARITY_GRID]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias,batch_first,bidirectional,proj_size,kind,with_hx", PARITY_GRID,
                         ids=PARITY_IDS)
def test_parity_with_nn_lstm(device, dtype, bias, batch_first, bidirectional, proj_size, kind,
                             with_hx):
    ours, ref = make_lstm_pair(I, H, num_layers=2, bias=bias, batch_first=batch_first,
                               bidirectional=bidirectional, proj_size=proj_size, dtype=dtype,
                               device=device)
    x = _input(batch_first, dtype, device)
    hx = None
    if with_hx:
        hx = _states(2, 1 + bidirectional, proj_size or H, H, dtype, device)
    lengths = {"padded": None, "packed_sorted": LENGTHS_SORTED,
               "packed_unsorted": LENGTHS_UNSORTED}[kind]
    kwargs = dict(lengths=lengths, enforce_sorted=kind != "packed_unsorted")
    got = forward_backward(ours, x, hx, **kwargs)
    expected = forward_backward(ref, x, hx, **kwargs)
    assert_results_close(got, expected, **TOLERANCES[dtype])
    # Every gradient exists, and the loss reaches every parameter.
    for key, value in got.items():
        if key.startswith("grad"):
            assert value is not None, key
            if key.startswith("grad."):
                assert value.abs().sum() > 0, key
    if lengths is not None:  # pad_packed_sequence gives back the lengths
        assert torch.equal(got["lengths"], torch.tensor(lengths))


def test_parity_single_layer_and_three_layers(device):
    for num_layers in (1, 3):
        ours, ref = make_lstm_pair(I, H, num_layers=num_layers, bidirectional=True,
                                   proj_size=2, device=device)
        x = _input(False, device=device)
        assert_results_close(forward_backward(ours, x), forward_backward(ref, x),
                             **TOLERANCES[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_parity_large_batch_parallel_rows(device, dtype):
    """Enough rows per step (300 rows of H=64: the CPU kernels split work in
    tasks of 16K cell elements) that the pointwise kernels run in parallel,
    with a packed input whose batch shrinks across the task boundary; run
    twice, the results are bitwise equal."""
    ours, ref = make_lstm_pair(5, 64, bidirectional=True, proj_size=16, dtype=dtype,
                               device=device)
    x = torch.randn(3, 300, 5, dtype=dtype, device=device)
    lengths = [3] * 200 + [2] * 80 + [1] * 20
    got = forward_backward(ours, x, lengths=lengths)
    assert_results_close(got, forward_backward(ref, x, lengths=lengths), **TOLERANCES[dtype])
    again = forward_backward(ours, x, lengths=lengths)
    for key, value in got.items():
        assert value is None or torch.equal(value, again[key]), key


def test_parity_no_grad_and_inference_mode(device):
    ours, ref = make_lstm_pair(I, H, num_layers=2, bidirectional=True, device=device)
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


def test_parity_frozen_weights_input_grad_only(device):
    """Gradients w.r.t. the input when no parameter requires grad."""
    ours, ref = make_lstm_pair(I, H, num_layers=2, proj_size=2, device=device)
    for m in (ours, ref):
        m.requires_grad_(False)
    x = _input(False, device=device)
    got, expected = forward_backward(ours, x), forward_backward(ref, x)
    assert_results_close(got, expected, **TOLERANCES[torch.float64])
    assert got["grad_input"].abs().sum() > 0


# --------------------------------------------------------------------------
# 3. initialisation, names, state_dict, repr
# --------------------------------------------------------------------------
CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, proj_size=2, bias=False),
    dict(num_layers=2, batch_first=True, dropout=0.25, bidirectional=True, proj_size=3),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_same_seed_same_parameters(kwargs):
    torch.manual_seed(123)
    ref = nn.LSTM(I, H, **kwargs)
    torch.manual_seed(123)
    ours = rnnfast.LSTM(I, H, **kwargs)
    ref_params, our_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert list(our_params) == list(ref_params)
    for name, p in ref_params.items():
        assert our_params[name].shape == p.shape, name
        assert torch.equal(our_params[name], p), name
    # The RNG is left in the same state: the draws are the same in number.
    torch.manual_seed(123)
    nn.LSTM(I, H, **kwargs)
    after_ref = torch.rand(3)
    torch.manual_seed(123)
    rnnfast.LSTM(I, H, **kwargs)
    assert torch.equal(torch.rand(3), after_ref)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_state_dict_both_directions(kwargs):
    torch.manual_seed(1)
    ref = nn.LSTM(I, H, **kwargs).double()
    torch.manual_seed(2)
    ours = rnnfast.LSTM(I, H, **kwargs).double()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())  # strict
    for (n1, a), (n2, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)
    # And back: a fresh nn.LSTM loads rnnfast's weights and computes the same.
    torch.manual_seed(3)
    ours2 = rnnfast.LSTM(I, H, **kwargs).double()
    ref2 = nn.LSTM(I, H, **kwargs).double()
    ref2.load_state_dict(ours2.state_dict())
    ours2.eval(), ref2.eval()
    x = _input(kwargs.get("batch_first", False))
    out_ours, (h_ours, c_ours) = ours2(x)
    out_ref, (h_ref, c_ref) = ref2(x)
    torch.testing.assert_close(out_ours, out_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(h_ours, h_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(c_ours, c_ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kwargs", CONFIGS + [dict(dropout=0.5, num_layers=2, bias=False)],
                         ids=[str(c) for c in CONFIGS] + ["dropout-nobias"])
def test_repr_matches_nn_lstm(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ours = nn.LSTM(I, H, **kwargs), rnnfast.LSTM(I, H, **kwargs)
    assert ours.extra_repr() == ref.extra_repr()
    assert repr(ours) == repr(ref)  # both classes are named LSTM


def test_module_attributes_match_nn_lstm():
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True, dropout=0.5)
    ref, ours = nn.LSTM(I, H, **kwargs), rnnfast.LSTM(I, H, **kwargs)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
        assert type(getattr(ours, attr)) is type(getattr(ref, attr)), attr
    assert ours._flat_weights_names == ref._flat_weights_names
    assert len(ours._flat_weights) == len(ref._flat_weights)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_all_weights_and_flatten_parameters(kwargs):
    ours, ref = make_lstm_pair(I, H, **kwargs)
    ours.flatten_parameters()  # exists, and changes nothing
    ref.flatten_parameters()
    assert len(ours.all_weights) == len(ref.all_weights)
    for group_ours, group_ref in zip(ours.all_weights, ref.all_weights):
        assert len(group_ours) == len(group_ref)
        for a, b in zip(group_ours, group_ref):
            assert isinstance(a, nn.Parameter)
            assert torch.equal(a, b)
    # all_weights are the module's parameters themselves, not copies.
    params = {id(p) for p in ours.parameters()}
    assert all(id(w) in params for group in ours.all_weights for w in group)
    x = _input(kwargs.get("batch_first", False))
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-10, rtol=1e-10)


def test_module_to_dtype_and_parameters_stay_leaves():
    ours = rnnfast.LSTM(I, H, num_layers=2).double()
    assert all(p.dtype == torch.float64 and p.is_leaf for p in ours.parameters())
    out, _ = ours(_input(False))
    assert out.dtype == torch.float64


# --------------------------------------------------------------------------
# 6. bad input: the same exception class as nn.LSTM, a clear message
# --------------------------------------------------------------------------
BAD_FORWARD = bad_forward_cases(T, B, I, H, LENGTHS_SORTED)


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_bad_input_raises_like_nn_lstm(case):
    args, match, *same_words = BAD_FORWARD[case]
    ours, ref = make_lstm_pair(I, H, num_layers=2, bidirectional=True, dtype=torch.float32)
    with pytest.raises(Exception) as ref_info:
        ref(*args)
    with pytest.raises(ref_info.type, match=match) as ours_info:
        ours(*args)
    assert type(ours_info.value) is ref_info.type, (ours_info.value, ref_info.value)
    # The words are nn.LSTM's, except where nn.LSTM fails from deep inside
    # (packed input with a wrong state or input size: an error of _VF.lstm).
    if (same_words or [True])[0] and re.search(match, str(ref_info.value)) is None:
        pytest.fail(f"the expected words are not nn.LSTM's: {ref_info.value}")


def test_batch_first_seq_len_0_raises_like_nn_lstm():
    ours, ref = make_lstm_pair(I, H, batch_first=True, dtype=torch.float32)
    x = torch.randn(B, 0, I)
    with pytest.raises(RuntimeError, match="larger than 0"):
        ref(x)
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
        ours(x)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional,proj_size", [(False, 0), (True, 2)])
def test_empty_batch_like_nn_lstm(batch_first, bidirectional, proj_size):
    ours, ref = make_lstm_pair(I, H, num_layers=2, batch_first=batch_first,
                               bidirectional=bidirectional, proj_size=proj_size)
    x = _input(batch_first, batch=0)
    got = forward_backward(ours, x)
    expected = forward_backward(ref, x)
    assert got["output"].shape == expected["output"].shape
    assert got["output"].numel() == 0
    assert got["h_n"].shape == expected["h_n"].shape == (4 if bidirectional else 2, 0,
                                                          proj_size or H)
    assert got["c_n"].shape == expected["c_n"].shape
    assert_results_close(got, expected, atol=0, rtol=0)


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
    "proj_equal_hidden": (dict(proj_size=H), "proj_size has to be smaller than hidden_size"),
    "proj_above_hidden": (dict(proj_size=H + 1), "proj_size has to be smaller than hidden_size"),
    "proj_negative": (dict(proj_size=-1), "proj_size should be a positive integer or zero"),
    "bias_not_bool": (dict(bias=1), "bias should be of type bool, got: int"),
    "batch_first_not_bool": (dict(batch_first=None), "batch_first should be of type bool"),
}


@pytest.mark.parametrize("case", list(CTOR_CASES))
def test_constructor_errors_like_nn_lstm(case):
    overrides, match = CTOR_CASES[case]
    kwargs = dict(input_size=I, hidden_size=H, num_layers=2)
    kwargs.update(overrides)
    with pytest.raises(Exception) as ref_info:
        nn.LSTM(**kwargs)
    with pytest.raises(ref_info.type, match=match) as ours_info:
        rnnfast.LSTM(**kwargs)
    assert type(ours_info.value) is ref_info.type
    assert re.search(match, str(ref_info.value)), ref_info.value


def test_dropout_with_one_layer_warns_like_nn_lstm():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        nn.LSTM(I, H, dropout=0.5)
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        rnnfast.LSTM(I, H, dropout=0.5)


# --------------------------------------------------------------------------
# 7. NaN and Inf propagate as in nn.LSTM
# --------------------------------------------------------------------------
NAN_CONFIGS = [dict(), dict(bidirectional=True), dict(proj_size=2, bidirectional=True),
               dict(bias=False)]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["input", "h0", "c0"])
@pytest.mark.parametrize("kwargs", NAN_CONFIGS, ids=[str(c) for c in NAN_CONFIGS])
def test_nan_inf_propagate_like_nn_lstm(device, value, where, kwargs):
    ours, ref = make_lstm_pair(I, H, num_layers=2, device=device, **kwargs)
    directions = 2 if kwargs.get("bidirectional") else 1
    x = _input(False, device=device)
    hx = _states(2, directions, kwargs.get("proj_size") or H, H, device=device)
    if where == "input":
        x[2, 1, 0] = value
    elif where == "h0":
        hx[0][0, 1, 0] = value
    else:
        hx[1][0, 1, 0] = value
    got = forward_backward(ours, x, hx)
    expected = forward_backward(ref, x, hx)
    for key, e in expected.items():
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


# --------------------------------------------------------------------------
# 8. non-contiguous input and states
# --------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
def test_non_contiguous_input_and_states(device, batch_first):
    ours, ref = make_lstm_pair(I, H, num_layers=2, bidirectional=True, proj_size=2,
                               batch_first=batch_first, device=device)
    x = _input(batch_first, device=device)
    h0, c0 = _states(2, 2, 2, H, device=device)
    # Transposed views with the same values, and a strided slice of a wider tensor.
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(*x.shape[:-1], 2 * I, dtype=x.dtype, device=device)
    wide[..., ::2] = x
    x_s = wide[..., ::2]
    h0_t = h0.transpose(0, 1).contiguous().transpose(0, 1)
    c0_t = c0.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    assert not any(t.is_contiguous() for t in (x_t, x_s, h0_t, c0_t))
    def run(xi, h, c):
        xi, h, c = (t.detach().requires_grad_() for t in (xi, h, c))
        out, (h_n, c_n) = ours(xi, (h, c))
        grads = torch.autograd.grad(out.sum() + 2 * h_n.sum() + 3 * c_n.sum(), (xi, h, c))
        return (out, h_n, c_n) + grads

    expected = run(x, h0, c0)
    for xi in (x_t, x_s):
        got = run(xi, h0_t, c0_t)
        for name, g, e in zip(("output", "h_n", "c_n", "grad_input", "grad_h0", "grad_c0"),
                              got, expected):
            torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12,
                                       msg=lambda m, k=name: f"{k}: {m}")
    # And nn.LSTM agrees on the strided inputs.
    out_ref, _ = ref(x_s, (h0_t, c0_t))
    torch.testing.assert_close(ours(x_s, (h0_t, c0_t))[0], out_ref, atol=1e-10, rtol=1e-10)


def test_non_contiguous_parameters(device):
    """Parameters that are non-contiguous views (e.g. after a user swapped
    in a transposed tensor) give the same results."""
    ours, ref = make_lstm_pair(I, H, num_layers=2, proj_size=2, device=device)
    strided = rnnfast.LSTM(I, H, num_layers=2, proj_size=2).double().to(device)
    for name, p in ours.named_parameters():
        if p.dim() == 2:
            view = p.detach().t().contiguous().t()
        else:
            view = torch.zeros(p.shape[0], 2, dtype=p.dtype, device=device)
            view[:, 0] = p.detach()
            view = view[:, 0]
        assert not view.is_contiguous() or min(view.shape) == 1
        setattr(strided, name, nn.Parameter(view))
    x = _input(False, device=device)
    assert_results_close(forward_backward(strided, x), forward_backward(ours, x),
                         atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------
# 9. unbatched input, dropout
# --------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched_equals_batch_of_one(device, batch_first, with_hx):
    ours, ref = make_lstm_pair(I, H, num_layers=2, bidirectional=True, proj_size=2,
                               batch_first=batch_first, device=device)
    x = torch.randn(T, I, dtype=torch.float64, device=device)
    hx = _states(2, 2, 2, H, device=device, batch=1) if with_hx else None
    hx2 = tuple(h.squeeze(1) for h in hx) if with_hx else None
    out, (h_n, c_n) = ours(x, hx2)
    assert out.shape == (T, 4) and h_n.shape == (4, 2) and c_n.shape == (4, H)
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


def test_dropout_eval_equals_no_dropout(device):
    ours = rnnfast.LSTM(I, H, num_layers=3, dropout=0.5, bidirectional=True).double().to(device)
    plain = rnnfast.LSTM(I, H, num_layers=3, bidirectional=True).double().to(device)
    plain.load_state_dict(ours.state_dict())
    ours.eval()
    x = _input(False, device=device)
    got, expected = ours(x), plain(x)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)


def test_dropout_train_mode(device):
    ours = rnnfast.LSTM(I, H, num_layers=2, dropout=0.5).double().to(device)
    ours.train()
    x = _input(False, device=device)
    res_train = forward_backward(ours, x)
    ours.eval()
    with torch.no_grad():
        out_eval, (h_eval, c_eval) = ours(x)
    assert not torch.allclose(res_train["output"], out_eval)
    # The first layer comes before any dropout: its final states are unchanged.
    torch.testing.assert_close(res_train["h_n"][0], h_eval[0], atol=0, rtol=0)
    assert not torch.allclose(res_train["h_n"][1], h_eval[1])
    for key, value in res_train.items():
        if key.startswith("grad"):
            assert torch.isfinite(value).all() and value.abs().sum() > 0, key
    # Same seed, same mask.
    torch.manual_seed(5)
    ours.train()
    a = ours(x)[0]
    torch.manual_seed(5)
    b = ours(x)[0]
    assert torch.equal(a, b)


def test_dropout_ignored_with_one_layer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = rnnfast.LSTM(I, H, num_layers=1, dropout=0.9).double()
    x = _input(False)
    train_out = ours(x)[0]
    ours.eval()
    torch.testing.assert_close(train_out, ours(x)[0], atol=0, rtol=0)


def test_dropout_one_zeroes_second_layer_input():
    """dropout=1 in training: the second layer sees zeros, as in nn.LSTM."""
    ours, ref = make_lstm_pair(I, H, num_layers=2, dropout=1.0)
    x = _input(False)
    got, expected = ours(x), ref(x)
    torch.testing.assert_close(got[0], expected[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[1][0], expected[1][0], atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------
# 10. determinism
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
def test_bitwise_deterministic(device, dtype, kind):
    ours = rnnfast.LSTM(8, 32, num_layers=2, bidirectional=True, proj_size=16).to(device, dtype)
    x = torch.randn(7, 16, 8, dtype=dtype, device=device)
    lengths = None
    if kind != "padded":
        lengths = [7, 3, 6, 1, 5, 7, 2, 4, 7, 6, 5, 4, 3, 2, 1, 7]
    runs = [forward_backward(ours, x, lengths=lengths, enforce_sorted=False) for _ in range(2)]
    for key in runs[0]:
        a, b = runs[0][key], runs[1][key]
        if a is None:
            assert b is None
            continue
        assert torch.equal(a, b), key


# --------------------------------------------------------------------------
# 11. bfloat16 (and float16) on CPU: error at most 2x nn.LSTM's own error
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("kwargs", [dict(num_layers=2, bidirectional=True),
                                    dict(num_layers=2, proj_size=3, bias=False)],
                         ids=["bi", "proj-nobias"])
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
def test_low_precision_error_within_twice_pytorch(dtype, kwargs, kind):
    ours, ref = make_lstm_pair(I, 8, dtype=dtype, **kwargs)
    # The float64 reference uses the rounded weights and input.
    ref64 = nn.LSTM(I, 8, **kwargs).double()
    ref64.load_state_dict(ref.state_dict())
    x = _input(False, dtype=dtype, steps=7)
    hx = _states(2, 2 if kwargs.get("bidirectional") else 1, kwargs.get("proj_size") or 8, 8,
                 dtype=dtype)
    lengths = None if kind == "padded" else [3, 7, 1, 5]
    run = dict(lengths=lengths, enforce_sorted=False)
    got = forward_backward(ours, x, hx, **run)
    pt = forward_backward(ref, x, hx, **run)
    exact = forward_backward(ref64, x.double(), tuple(h.double() for h in hx), **run)
    assert_error_within_twice(got, pt, exact, dtype)


# --------------------------------------------------------------------------
# Beyond the first-order contract
# --------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered")
def test_double_backward_is_correct_or_refused():
    """A gradient penalty (backward of a gradient, as in WGAN-GP) works with
    nn.LSTM. rnnfast must give the same gradients or raise; it must not
    return gradients that silently lack the second-order terms."""
    ours, ref = make_lstm_pair(2, 3)
    x0 = torch.randn(3, 2, 2, dtype=torch.float64)

    def penalty_grads(model):
        x = x0.clone().requires_grad_()
        out, _ = model(x)
        (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        (g.pow(2).sum() + out.sum()).backward()
        return [x.grad] + [p.grad for p in model.parameters()]

    expected = penalty_grads(ref)
    try:
        got = penalty_grads(ours)
    except RuntimeError as e:  # refusing is acceptable, with words
        assert "backward" in str(e) or "differentiable" in str(e), e
        return
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


def test_autocast_like_nn_lstm(device):
    """A float32 model under autocast (the usual mixed-precision set-up)
    runs like nn.LSTM's: it works, forward and backward, and the values
    agree to the autocast dtype's precision."""
    ours, ref = make_lstm_pair(I, H, num_layers=2, bidirectional=True, dtype=torch.float32,
                               device=device)
    x = torch.randn(T, B, I, device=device)
    results = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out, (h_n, c_n) = model(xi)
        (out.float().sum() + h_n.float().sum() + c_n.float().sum()).backward()
        results.append((out.float(), h_n.float(), c_n.float(), xi.grad.float()))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)
