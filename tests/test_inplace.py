"""In-place use of the outputs, as nn.LSTM allows it: the outputs are
tensors of their own, not views of an op's result, so changing one in place
is refused only where nn.LSTM refuses it too (at backward, when a value the
backward needs was changed), never at once."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import rnnfast
from utils import make_packed

T, B, I, H = 4, 3, 5, 6
LENGTHS = [4, 2, 3]

LAYOUTS = {  # constructor arguments, and whether the input is packed
    "time_major": (dict(), False),
    "batch_first_bi_2": (dict(batch_first=True, bidirectional=True, num_layers=2), False),
    "packed": (dict(), True),
}


def _modules(kind, kwargs):
    """(module under test, module whose behaviour it must match)."""
    torch.manual_seed(0)
    if kind == "LSTM":
        ours = rnnfast.LSTM(I, H, **kwargs)
        theirs = nn.LSTM(I, H, **kwargs)
        theirs.load_state_dict(ours.state_dict())
        return ours, theirs
    # nn.LSTM has no LayerNorm-LSTM; the rule it sets is the same for both.
    return rnnfast.LayerNormLSTM(I, H, **kwargs), None


def _input(kwargs, packed, requires_grad=True):
    torch.manual_seed(1)
    x = torch.randn(T, B, I, requires_grad=requires_grad)
    if packed:
        return x, make_packed(x, LENGTHS, enforce_sorted=False)
    return x, (x.transpose(0, 1) if kwargs.get("batch_first") else x)


def _data(out):
    return out.data if isinstance(out, PackedSequence) else out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["LSTM", "LayerNormLSTM"])
def test_in_place_on_output_in_grad_mode_without_backward(kind, layout):
    """A validation loop that forgot torch.no_grad(): in-place activations
    and in-place dropout on the output work and change it as they should."""
    kwargs, packed = LAYOUTS[layout]
    ours, theirs = _modules(kind, kwargs)
    _, inp = _input(kwargs, packed)
    out, (h_n, c_n) = ours(inp)
    expected = _data(out).detach().relu()
    _data(out).relu_()
    torch.testing.assert_close(_data(out), expected, atol=0, rtol=0)
    nn.Dropout(p=0.5, inplace=True).eval()(_data(out))  # eval: unchanged
    torch.testing.assert_close(_data(out), expected, atol=0, rtol=0)
    torch.manual_seed(3)
    nn.Dropout(p=0.5, inplace=True).train()(_data(out))
    assert ((_data(out) == 0) | (_data(out) == 2 * expected)).all()
    if theirs is not None:  # nn.LSTM does exactly the same
        out_t, _ = theirs(inp)
        _data(out_t).relu_()
        torch.testing.assert_close(_data(out_t), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["LSTM", "LayerNormLSTM"])
def test_in_place_on_final_states_then_backward(kind, layout):
    """h_n and c_n changed in place still backpropagate, with nn.LSTM's
    gradients."""
    kwargs, packed = LAYOUTS[layout]

    def run(module):
        x, inp = _input(kwargs, packed)
        module.zero_grad(set_to_none=True)
        out, (h_n, c_n) = module(inp)
        h_n.mul_(2).tanh_()
        c_n.add_(1).relu_()
        loss = (_data(out) * 1.5).sum() + (h_n ** 2).sum() + (c_n ** 2).sum()
        loss.backward()
        return x.grad, {n: p.grad for n, p in module.named_parameters()}

    ours, theirs = _modules(kind, kwargs)
    grad_x, grads = run(ours)
    assert grad_x is not None and grad_x.abs().sum() > 0
    assert all(g is not None for g in grads.values())
    if theirs is not None:
        grad_x_t, grads_t = run(theirs)
        torch.testing.assert_close(grad_x, grad_x_t, atol=1e-5, rtol=1e-5)
        for n in grads:
            torch.testing.assert_close(grads[n], grads_t[n], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["LSTM", "LayerNormLSTM"])
def test_in_place_on_saved_output_refused_at_backward(kind):
    """The output of a one-layer unidirectional module is what the backward
    reads; changing it in place is refused when backward runs, in nn.LSTM's
    words, and not before."""
    ours, theirs = _modules(kind, {})
    for module in (ours, theirs) if theirs is not None else (ours,):
        _, inp = _input({}, False)
        out, _ = module(inp)
        out.relu_()  # allowed
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
