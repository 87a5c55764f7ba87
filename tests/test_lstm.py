"""What only rnnfast.LSTM has, beyond the tests it shares with every cell
(test_cells.py): nn.LSTM's initialisation, parameter names, state_dict,
repr and attributes; large parallel batches; the accuracy of the kernels'
sigmoid and tanh; double backward; autocast against nn.LSTM."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import rnnfast
from rnnfast.reference import ReferenceLSTM
from utils import (TOLERANCES, activation_probe, assert_activations_accurate,
                   assert_results_close, forward_backward, make_lstm_pair, random_input)

T, B, I, H = 5, 4, 3, 6


# --------------------------------------------------------------------------
# 1. parity with torch.nn.LSTM on a large batch
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_parity_large_batch_parallel_rows(device, dtype):
    """Enough rows per step (300 rows of H=64: the CPU kernels split work in
    tasks of 16K cell elements) that the pointwise kernels run in parallel,
    with a packed input whose batch shrinks across the task boundary; run
    twice, the results are bitwise equal. The weight gradients are sums over
    580 rows, so their tolerance scales with their size (two float32 GEMMs
    summing in different orders, MKL's or oneDNN's against oneDNN's RNN,
    differed by 1.2e-5 in one element of 1280)."""
    ours, ref = make_lstm_pair(5, 64, bidirectional=True, proj_size=16, dtype=dtype,
                               device=device)
    x = torch.randn(3, 300, 5, dtype=dtype, device=device)
    lengths = [3] * 200 + [2] * 80 + [1] * 20
    got = forward_backward(ours, x, lengths=lengths)
    assert_results_close(got, forward_backward(ref, x, lengths=lengths), scaled=True,
                         **TOLERANCES[dtype])
    again = forward_backward(ours, x, lengths=lengths)
    for key, value in got.items():
        assert value is None or torch.equal(value, again[key]), key


# --------------------------------------------------------------------------
# 2. initialisation, names, state_dict, repr
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
    x = random_input(kwargs.get("batch_first", False))
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
    x = random_input(kwargs.get("batch_first", False))
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-10, rtol=1e-10)


def test_module_to_dtype_and_parameters_stay_leaves():
    ours = rnnfast.LSTM(I, H, num_layers=2).double()
    assert all(p.dtype == torch.float64 and p.is_leaf for p in ours.parameters())
    out, _ = ours(random_input(False))
    assert out.dtype == torch.float64


# --------------------------------------------------------------------------
# 3. the kernels' activations, double backward, autocast
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_activations_accurate_at_every_value(device, dtype):
    """sigmoid and tanh of the kernels (which use fast approximations for
    float) against float64 torch over a sweep with +-inf, NaN, huge values
    and the approximation's branch points."""
    assert_activations_accurate(*activation_probe(dtype, device))


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


def _autocast_forward_backward(model, x, device):
    xi = x.clone().requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out, (h_n, c_n) = model(xi)
    (out.float().sum() + h_n.float().sum() + c_n.float().sum()).backward()
    return out.float(), h_n.float(), c_n.float(), xi.grad.float()


# What oneDNN says where it has no bfloat16 LSTM for the CPU (an AVX2-only
# AMD CPU, for one): nn.LSTM itself cannot run under CPU autocast there.
NO_ONEDNN_BF16_LSTM = "could not create a primitive descriptor for the LSTM"


def test_autocast_like_nn_lstm(device):
    """A float32 model under autocast (the usual mixed-precision set-up)
    runs like nn.LSTM's: it works, forward and backward, and the values
    agree to the autocast dtype's precision with nn.LSTM's and with the
    plain-PyTorch reference's under the same autocast. Where nn.LSTM itself
    cannot run (oneDNN has no bfloat16 LSTM for this CPU), the reference is
    the only comparison."""
    ours, ref = make_lstm_pair(I, H, num_layers=2, bidirectional=True, dtype=torch.float32,
                               device=device)
    plain = ReferenceLSTM(I, H, num_layers=2, bidirectional=True).to(device)
    plain.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, device=device)
    got = _autocast_forward_backward(ours, x, device)
    expected = {"reference": _autocast_forward_backward(plain, x, device)}
    try:
        expected["nn.LSTM"] = _autocast_forward_backward(ref, x, device)
    except RuntimeError as e:
        if NO_ONEDNN_BF16_LSTM not in str(e):
            raise
    for name, results in expected.items():
        for what, g, e in zip(("output", "h_n", "c_n", "grad_input"), got, results):
            torch.testing.assert_close(g, e, atol=5e-2, rtol=5e-2,
                                       msg=lambda m, k=f"{name} {what}": f"{k}: {m}")
