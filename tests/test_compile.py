"""torch.compile(fullgraph=True) of models built on rnnfast.LSTM and
rnnfast.LayerNormLSTM: the forward and every gradient equal eager mode. Compiling is slow on a small
CPU machine, so there are few compiles and each checks a lot."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import rnnfast
from utils import make_packed, randomize_layer_norm_, skip_unless_dynamo_reads_built_packed_sequences

T, B, I, H = 5, 3, 4, 6
LENGTHS = [2, 5, 3]  # unsorted: enforce_sorted=False


class Tagger(nn.Module):
    """A 2-layer bidirectional rnnfast.LSTM (or another recurrent module
    with its interface, e.g. rnnfast.LayerNormLSTM) and a linear head."""

    def __init__(self, batch_first=False, rnn=rnnfast.LSTM, **kwargs):
        super().__init__()
        self.lstm = rnn(I, H, num_layers=2, bidirectional=True, batch_first=batch_first,
                        **kwargs)
        self.head = nn.Linear(2 * H, 3)

    def forward(self, x, hx=None):
        out, (h_n, c_n) = self.lstm(x, hx)
        if isinstance(out, torch.nn.utils.rnn.PackedSequence):
            out = out.data
        return self.head(out), h_n, c_n


def _loss(y, h_n, c_n):
    return (y * torch.linspace(0.5, 1.5, y.shape[-1], dtype=y.dtype, device=y.device)).sum() \
        + 2 * h_n.sum() + 3 * c_n.sum()


def _run(model, x, hx=None, lengths=None):
    """Outputs and gradients (input, states, parameters) of one step."""
    x = x.detach().clone().requires_grad_()
    states = None if hx is None else tuple(h.detach().clone().requires_grad_() for h in hx)
    inp = x if lengths is None else make_packed(x, lengths, enforce_sorted=False)
    model.zero_grad(set_to_none=True)
    y, h_n, c_n = model(inp, states)
    _loss(y, h_n, c_n).backward()
    res = {"y": y.detach(), "h_n": h_n.detach(), "c_n": c_n.detach(), "grad_x": x.grad}
    if states is not None:
        res["grad_h0"], res["grad_c0"] = states[0].grad, states[1].grad
    # A compiled module shares its parameters with the original, whose
    # names have no "_orig_mod." prefix.
    params = getattr(model, "_orig_mod", model).named_parameters()
    res.update({f"grad.{n}": p.grad for n, p in params})
    return res


def _assert_same(got, expected, tol):
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def test_compile_fullgraph_matches_eager(device):
    """Inductor, fullgraph, float64; two calls (the second must not
    recompile) with and without initial states."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Tagger().to(device, torch.float64)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    hx = (torch.randn(4, B, H, dtype=torch.float64, device=device),
          torch.randn(4, B, H, dtype=torch.float64, device=device))
    tol = dict(atol=1e-10, rtol=1e-10)
    _assert_same(_run(compiled, x, hx), _run(model, x, hx), tol)
    x2 = torch.randn(T, B, I, dtype=torch.float64, device=device)
    _assert_same(_run(compiled, x2, hx), _run(model, x2, hx), tol)
    torch._dynamo.reset()


def test_compile_fullgraph_batch_first_aot_eager(device):
    """batch_first through the AOT-autograd graph (fake kernels, autograd
    registration) with the quick aot_eager backend, float32."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    model = Tagger(batch_first=True).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(B, T, I, device=device)
    _assert_same(_run(compiled, x), _run(model, x), dict(atol=1e-5, rtol=1e-5))
    torch._dynamo.reset()


def test_compile_fullgraph_packed_sequence(device):
    """A PackedSequence input compiles without a graph break (nn.LSTM cannot
    be compiled at all: dynamo refuses to wrap it)."""
    skip_unless_dynamo_reads_built_packed_sequences()
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = Tagger().to(device, torch.float64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    try:
        _assert_same(_run(compiled, x, lengths=LENGTHS), _run(model, x, lengths=LENGTHS),
                     dict(atol=1e-10, rtol=1e-10))
    finally:
        torch._dynamo.reset()


def test_compile_packed_sequence_with_graph_breaks(device):
    """Without fullgraph, a PackedSequence input compiles (with graph
    breaks) and matches eager."""
    skip_unless_dynamo_reads_built_packed_sequences()
    torch._dynamo.reset()
    torch.manual_seed(3)
    model = Tagger().to(device, torch.float64)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    _assert_same(_run(compiled, x, lengths=LENGTHS), _run(model, x, lengths=LENGTHS),
                 dict(atol=1e-10, rtol=1e-10))
    torch._dynamo.reset()


# --------------------------------------------------------------------------
# rnnfast.LayerNormLSTM
# --------------------------------------------------------------------------
def _layer_norm_tagger(seed, dtype, device, **kwargs):
    torch.manual_seed(seed)
    model = Tagger(rnn=rnnfast.LayerNormLSTM, **kwargs).to(device, dtype)
    randomize_layer_norm_(model.lstm, seed)  # gains and biases away from 1 and 0
    return model


def test_compile_layer_norm_lstm_fullgraph_inductor(device):
    """Inductor, fullgraph, float64, with initial states and a non-default
    eps; a second call with new values runs without recompiling."""
    torch._dynamo.reset()
    model = _layer_norm_tagger(4, torch.float64, device, eps=1e-3)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    hx = (torch.randn(4, B, H, dtype=torch.float64, device=device),
          torch.randn(4, B, H, dtype=torch.float64, device=device))
    tol = dict(atol=1e-10, rtol=1e-10)
    try:
        expected = _run(model, x, hx)
        assert len([k for k in expected if k.startswith("grad.lstm.ln_")]) == 4 * 6
        _assert_same(_run(compiled, x, hx), expected, tol)
        x2 = torch.randn(T, B, I, dtype=torch.float64, device=device)
        with torch._dynamo.config.patch(error_on_recompile=True):
            _assert_same(_run(compiled, x2, hx), _run(model, x2, hx), tol)
    finally:
        torch._dynamo.reset()


def test_compile_layer_norm_lstm_fullgraph_aot_eager(device):
    """batch_first, default states, float32, through the AOT-autograd graph
    (fake kernels and the autograd registration of layer_norm_lstm_forward)
    with the quick aot_eager backend."""
    torch._dynamo.reset()
    model = _layer_norm_tagger(5, torch.float32, device, batch_first=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(B, T, I, device=device)
    try:
        _assert_same(_run(compiled, x), _run(model, x), dict(atol=1e-5, rtol=1e-5))
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------
# Inductor: the strides the kernels return are the strides the fake kernels
# promise (Inductor checks them where a kernel's output feeds its own code,
# aot_eager does not)
# --------------------------------------------------------------------------
class _Pipeline(nn.Module):
    """Trainable layers before, between and after rnnfast layers of every
    layout, so that each op's input is a view Inductor made (a transposed
    batch_first input, a permuted output) and each op's gradient feeds
    Inductor code: batch_first and time-major, uni- and bidirectional, 1 and
    2 layers, padded and packed, all in one graph (one compile)."""

    def __init__(self, rnn):
        super().__init__()
        self.pre = nn.Linear(I, I)
        self.bf_bi_2 = rnn(I, H, num_layers=2, bidirectional=True, batch_first=True)
        self.mid = nn.Linear(2 * H, I)
        self.tm_uni_1 = rnn(I, H)
        self.bf_uni_2 = rnn(H, H, num_layers=2, batch_first=True)
        self.packed_bi_1 = rnn(I, H, bidirectional=True, batch_first=True)

    def forward(self, x, packed):  # x: [B, T, I]; packed: of [*, I] rows
        z = torch.tanh(self.pre(x))
        y, (h1, c1) = self.bf_bi_2(z)                      # [B, T, 2H]
        m = self.mid(y)
        y2, (h2, c2) = self.tm_uni_1(m.transpose(0, 1))    # input: a transposed view
        y3, (h3, c3) = self.bf_uni_2(y2.transpose(0, 1))   # [B, T, H]
        # (pack_padded_sequence cannot be traced: the packing comes in)
        packed = PackedSequence(torch.tanh(self.pre(packed.data)), packed.batch_sizes,
                                packed.sorted_indices, packed.unsorted_indices)
        y4, (h4, c4) = self.packed_bi_1(packed)
        w = torch.linspace(0.5, 1.5, H, dtype=x.dtype, device=x.device)
        return ((y3 * w).sum() + (y4.data ** 2).sum() + h1.sum() + 2 * c2.sum()
                + 3 * h3.sum() + c1.sum() + h4.sum() - c3.sum() + (c4 ** 2).sum())


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("rnn", [rnnfast.LSTM, rnnfast.LayerNormLSTM],
                         ids=["LSTM", "LayerNormLSTM"])
def test_compile_inductor_strides_every_layout(device, rnn, dynamic):
    """Inductor (the default backend), fullgraph, forward and backward of
    every layout equal eager mode; with dynamic shapes a second batch and
    length run without recompiling."""
    skip_unless_dynamo_reads_built_packed_sequences()
    torch._dynamo.reset()
    torch.manual_seed(6)
    model = _Pipeline(rnn).to(device, torch.float64)
    if rnn is rnnfast.LayerNormLSTM:
        for name in ("bf_bi_2", "tm_uni_1", "bf_uni_2", "packed_bi_1"):
            randomize_layer_norm_(getattr(model, name), 6)
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)

    def grads(m, x, lengths):
        x = x.detach().clone().requires_grad_()
        rows = make_packed(x.detach().transpose(0, 1), lengths, enforce_sorted=False)
        rows = rows._replace(data=rows.data.clone().requires_grad_())
        m.zero_grad(set_to_none=True)
        loss = m(x, rows)
        loss.backward()
        params = getattr(m, "_orig_mod", m).named_parameters()
        return {"loss": loss.detach(), "grad_x": x.grad, "grad_rows": rows.data.grad,
                **{f"grad.{n}": p.grad.clone() for n, p in params}}

    tol = dict(atol=1e-9, rtol=1e-9)
    shapes = [(3, 5, [2, 5, 3])] + ([(4, 7, [7, 1, 4, 6])] if dynamic else [])
    try:
        for i, (batch, steps, lengths) in enumerate(shapes):
            x = torch.randn(batch, steps, I, dtype=torch.float64, device=device)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = grads(compiled, x, lengths)
            _assert_same(got, grads(model, x, lengths), tol)
    finally:
        torch._dynamo.reset()
