"""The plain-PyTorch references of rnnfast.reference against torch.nn.LSTM,
a hand-written LayerNorm-LSTM step, per-sequence runs and gradcheck."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnfast.reference import (
    ReferenceLayerNormLSTM,
    ReferenceLSTM,
    layer_norm_lstm_reference,
    lstm_reference,
)

DT = torch.float64
T, B, I, H = 5, 3, 4, 6
LENGTHS = [5, 3, 2]  # unsorted on purpose: pack sorts them


def _input(batch_first, generator):
    shape = (B, T, I) if batch_first else (T, B, I)
    return torch.randn(shape, dtype=DT, generator=generator)


def _run(module, x, hx, packed, batch_first):
    """Runs a module on padded or packed input; returns padded output."""
    if packed:
        x = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=batch_first,
                                 enforce_sorted=False)
    out, (h_n, c_n) = module(x, hx)
    if packed:
        out, _ = pad_packed_sequence(out, batch_first=batch_first)
    return out, h_n, c_n


@pytest.mark.parametrize("bias,bidirectional,proj,packed,batch_first",
                         list(itertools.product([True, False], repeat=5)))
def test_reference_lstm_matches_nn_lstm(bias, bidirectional, proj, packed, batch_first):
    g = torch.Generator().manual_seed(0)
    kwargs = dict(num_layers=2, bias=bias, batch_first=batch_first,
                  bidirectional=bidirectional, proj_size=3 if proj else 0, dtype=DT)
    torch.manual_seed(1)
    ours = ReferenceLSTM(I, H, **kwargs)
    theirs = torch.nn.LSTM(I, H, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    x = _input(batch_first, g).requires_grad_()
    D = 2 if bidirectional else 1
    hx = (torch.randn(2 * D, B, 3 if proj else H, dtype=DT, generator=g),
          torch.randn(2 * D, B, H, dtype=DT, generator=g))
    got = _run(ours, x, hx, packed, batch_first)
    want = _run(theirs, x, hx, packed, batch_first)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # gradients too: the same random weighting of every output
    w = [torch.randn(t.shape, dtype=DT, generator=g) for t in want]
    grads_ours = torch.autograd.grad(sum((a * b).sum() for a, b in zip(got, w)),
                                     [x, *ours.parameters()])
    grads_theirs = torch.autograd.grad(sum((a * b).sum() for a, b in zip(want, w)),
                                       [x, *theirs.parameters()])
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_reference_lstm_unbatched_and_default_state():
    torch.manual_seed(0)
    ours = ReferenceLSTM(I, H, dtype=DT)
    theirs = torch.nn.LSTM(I, H, dtype=DT)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(T, I, dtype=DT)
    for a, b in zip(ours(x)[1], theirs(x)[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-12, atol=1e-12)


def _layer_norm(v, gain, bias, eps):
    """LayerNorm written out: biased variance over the last dimension."""
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps) * gain + bias


def _hand_step(x, h, c, p, eps):
    """One LayerNorm-LSTM step from the paper's equations."""
    gates = (_layer_norm(x @ p["weight_ih_l0"].T, p["ln_ih_weight_l0"], p["ln_ih_bias_l0"], eps)
             + _layer_norm(h @ p["weight_hh_l0"].T, p["ln_hh_weight_l0"], p["ln_hh_bias_l0"],
                           eps)
             + p["bias_ih_l0"] + p["bias_hh_l0"])
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(
        _layer_norm(c, p["ln_cell_weight_l0"], p["ln_cell_bias_l0"], eps))
    return h, c


@pytest.mark.parametrize("eps", [1e-5, 0.5])
@pytest.mark.parametrize("ln_params", ["identity", "random"])
def test_layer_norm_lstm_matches_hand_written_steps(eps, ln_params):
    torch.manual_seed(0)
    m = ReferenceLayerNormLSTM(I, H, eps=eps, dtype=DT)
    p = dict(m.named_parameters())
    if ln_params == "identity":  # as initialised: gains 1, biases 0
        for name, t in p.items():
            if name.startswith("ln_"):
                want = torch.ones_like(t) if "_weight" in name else torch.zeros_like(t)
                assert torch.equal(t, want), name
    else:
        with torch.no_grad():
            for name, t in p.items():
                if name.startswith("ln_"):
                    t.copy_(torch.randn_like(t))
    x = torch.randn(2, B, I, dtype=DT)
    h0, c0 = torch.randn(1, B, H, dtype=DT), torch.randn(1, B, H, dtype=DT)
    out, (h_n, c_n) = m(x, (h0, c0))
    h, c = h0[0], c0[0]
    for t in range(2):  # two steps: the raw (not normalised) c is carried
        h, c = _hand_step(x[t], h, c, p, eps)
        torch.testing.assert_close(out[t], h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_n[0], h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_n[0], c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_norm_lstm_packed_matches_each_sequence_alone(bidirectional, batch_first):
    """Packed input behaves as running every sequence on its own."""
    torch.manual_seed(0)
    D = 2 if bidirectional else 1
    m = ReferenceLayerNormLSTM(I, H, num_layers=2, bidirectional=bidirectional,
                               batch_first=batch_first, dtype=DT)
    with torch.no_grad():
        for name, t in m.named_parameters():
            if name.startswith("ln_"):
                t.add_(0.1 * torch.randn_like(t))
    x = _input(batch_first, torch.Generator().manual_seed(1))
    hx = (torch.randn(2 * D, B, H, dtype=DT), torch.randn(2 * D, B, H, dtype=DT))
    out, h_n, c_n = _run(m, x, hx, packed=True, batch_first=batch_first)
    for b, length in enumerate(LENGTHS):
        xb = x[b:b + 1, :length] if batch_first else x[:length, b:b + 1]
        ob, (hb, cb) = m(xb, (hx[0][:, b:b + 1].contiguous(), hx[1][:, b:b + 1].contiguous()))
        got = out[b:b + 1, :length] if batch_first else out[:length, b:b + 1]
        torch.testing.assert_close(got, ob, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n[:, b:b + 1], hb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c_n[:, b:b + 1], cb, rtol=1e-12, atol=1e-12)


def test_layer_norm_lstm_without_bias_and_weight_count():
    torch.manual_seed(0)
    m = ReferenceLayerNormLSTM(I, H, bias=False, dtype=DT)
    assert len(m._flat_weights) == 8
    assert [n for n, _ in m.named_parameters()] == [
        "weight_ih_l0", "weight_hh_l0", "ln_ih_weight_l0", "ln_ih_bias_l0",
        "ln_hh_weight_l0", "ln_hh_bias_l0", "ln_cell_weight_l0", "ln_cell_bias_l0"]
    x = torch.randn(T, B, I, dtype=DT)
    out, _ = m(x)
    assert out.shape == (T, B, H)
    with pytest.raises(ValueError, match="expected 8 weights"):
        layer_norm_lstm_reference(x, None, m._flat_weights[:-1], bias=False)
    with pytest.raises(ValueError, match="expected 4 or 5 weights"):
        lstm_reference(x, None, m._flat_weights[:3])


def test_layer_norm_lstm_gradcheck():
    g = torch.Generator().manual_seed(0)
    hidden = 2
    weights = []
    for layer_in in (3, 3):  # one layer, two directions
        weights += [torch.randn(4 * hidden, layer_in, dtype=DT, generator=g),
                    torch.randn(4 * hidden, hidden, dtype=DT, generator=g),
                    torch.randn(4 * hidden, dtype=DT, generator=g),
                    torch.randn(4 * hidden, dtype=DT, generator=g)]
        for size in (4 * hidden, 4 * hidden, hidden):
            weights += [1 + 0.1 * torch.randn(size, dtype=DT, generator=g),
                        0.1 * torch.randn(size, dtype=DT, generator=g)]
    x = torch.randn(3, 2, 3, dtype=DT, generator=g)
    h0 = torch.randn(2, 2, hidden, dtype=DT, generator=g)
    c0 = torch.randn(2, 2, hidden, dtype=DT, generator=g)
    inputs = [t.requires_grad_() for t in (x, h0, c0, *weights)]

    def fn(x, h0, c0, *w):
        return layer_norm_lstm_reference(x, (h0, c0), w, bidirectional=True)

    assert torch.autograd.gradcheck(fn, inputs)


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    m = ReferenceLSTM(I, H, num_layers=2, dropout=0.5, dtype=DT)
    x = torch.randn(T, B, I, dtype=DT)
    m.eval()
    a, b = m(x)[0], m(x)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    m.train()
    assert not torch.allclose(m(x)[0], a)


def test_computes_in_input_dtype():
    m = ReferenceLayerNormLSTM(I, H, dtype=torch.bfloat16)
    out, (h_n, c_n) = m(torch.randn(T, B, I, dtype=torch.bfloat16))
    assert out.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
