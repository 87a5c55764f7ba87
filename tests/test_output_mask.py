"""The backward computes only the gradients autograd asks for.

``lstm_backward`` and ``layer_norm_lstm_backward`` take an ``output_mask``
(one flag per output, as ATen's ``_cudnn_rnn_backward``); the autograd
formulas fill it from ``ctx.needs_input_grad``. Frozen weights, an input
without ``requires_grad`` (the first layer over a frozen embedding), frozen
LayerNorm parameters or initial states without gradient: the gradients that
are asked for must equal those of the all-gradients run, the others must be
None, and their GEMMs must not run.
"""

from __future__ import annotations

import re

import pytest
import torch

from utils import (CELLS, backward_args_from, make_packed, profiled_calls, random_input,
                   random_states)

I, H, LAYERS = 3, 5, 2
LENGTHS = [5, 4, 4, 2]


def _frozen(pattern: str):
    """A scenario freezing the parameters whose names match ``pattern``."""
    return lambda name: re.fullmatch(pattern, name) is not None


def NOTHING_FROZEN(name: str) -> bool:
    return False


# name -> (parameters frozen, input needs grad, h_0 needs grad, c_0 needs grad)
SCENARIOS = {
    "frozen-weights": (_frozen(r"weight_(ih|hh|hr)_l\d+"), True, True, True),
    "input-without-grad": (NOTHING_FROZEN, False, True, True),
    "frozen-first-layer-over-frozen-input": (_frozen(r".*_l0"), False, False, False),
    "only-biases": (_frozen(r"(?!bias_).*"), False, False, False),
    "frozen-layer-norm": (_frozen(r"ln_.*"), True, True, True),
    "frozen-ln-gains": (_frozen(r"ln_.*_weight_l\d+"), True, True, True),
    "states-without-grad": (NOTHING_FROZEN, True, False, False),
    "c0-without-grad": (NOTHING_FROZEN, True, True, False),
    "frozen-input-and-weights": (_frozen(r"(?!bias_|ln_).*"), False, True, True),
}


def _module(cell, device):
    kwargs = cell.kwargs(num_layers=LAYERS, proj_size=3)
    return cell.module(I, H, **kwargs).to(device=device, dtype=torch.float64)


def _run(model, x, h0, c0, packed: bool) -> dict:
    """Output, then the backward of a fixed weighted sum of every output;
    returns the gradients of every leaf that requires one (None for the
    others)."""
    inp = make_packed(x, LENGTHS) if packed else x
    out, (h_n, c_n) = model(inp, (h0, c0))
    data = out.data if packed else out
    g = torch.Generator(device="cpu").manual_seed(7)

    def weights(t):
        return torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)

    loss = (data * weights(data)).sum() + (h_n * weights(h_n)).sum() + \
        (c_n * weights(c_n)).sum()
    loss.backward()
    grads = {"input": x.grad, "h0": h0.grad, "c0": c0.grad}
    grads.update({f"grad.{n}": p.grad for n, p in model.named_parameters()})
    return grads


def _leaves(cell, device, frozen, input_grad, h0_grad, c0_grad):
    torch.manual_seed(1)
    model = _module(cell, device)
    x = random_input(False, device=device, steps=max(LENGTHS), batch=len(LENGTHS), size=I)
    out_size = getattr(model, "proj_size", 0) or H
    h0, c0 = random_states(LAYERS, 1, out_size, H, device=device, batch=len(LENGTHS))
    for n, p in model.named_parameters():
        p.requires_grad_(not frozen(n))
    return model, x.requires_grad_(input_grad), h0.requires_grad_(h0_grad), \
        c0.requires_grad_(c0_grad)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_asked_gradients_unchanged_others_none(device, cell, scenario, packed):
    frozen, input_grad, h0_grad, c0_grad = SCENARIOS[scenario]
    if "layer-norm" in scenario or "ln-" in scenario:
        if not cell.layer_norm:
            pytest.skip("the LSTM has no LayerNorm parameters")
    everything = _run(*_leaves(cell, device, NOTHING_FROZEN, True, True, True), packed)
    model, x, h0, c0 = _leaves(cell, device, frozen, input_grad, h0_grad, c0_grad)
    got = _run(model, x, h0, c0, packed)
    wanted = {"input": input_grad, "h0": h0_grad, "c0": c0_grad}
    wanted.update({f"grad.{n}": p.requires_grad for n, p in model.named_parameters()})
    assert any(wanted.values()) and not all(wanted.values()), "scenario skips nothing"
    for name, asked in wanted.items():
        if not asked:
            assert got[name] is None, name
            continue
        assert got[name] is not None, name
        # The same products over the same operands: bitwise on the CPU.
        tol = dict(atol=0, rtol=0) if device == "cpu" else dict(atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got[name], everything[name], **tol, msg=name)


# --------------------------------------------------------------------------
# The backward op with a partial mask
# --------------------------------------------------------------------------
def _masks(cell):
    """Each output alone off, each alone on, and the frozen-input-and-weights
    mask (states, biases and LayerNorm parameters only)."""
    n = len(cell.backward_grads)
    weights_or_input = [any(a in ("input", "weight_ih", "weight_hh", "weight_hr")
                            for a in names) for names in cell.backward_grads]
    return ([[i != k for i in range(n)] for k in range(n)]
            + [[i == k for i in range(n)] for k in range(n)]
            + [[not w for w in weights_or_input]])


def _op_samples(cell, device):
    """Padded and packed, with a projection where the cell has one."""
    proj = 2 if cell.has_projection else 0
    return [cell.op_sample(device=device, proj=proj, hidden=3, seed=5),
            cell.op_sample(device=device, proj=proj, hidden=3, lengths=[3, 2, 2, 1],
                           reverse=True, seed=6)]


def test_backward_op_mask_outputs(device, cell):
    """An output asked for equals the all-outputs result bitwise; one not
    asked for is an empty [0] tensor with its argument's dtype and device."""
    for sample in _op_samples(cell, device):
        args = backward_args_from(sample)
        full = cell.backward(*args)
        assert all(g.numel() > 0 for g in full)
        like = {name: sample.args[sample.arg_names.index(name)]
                for names in cell.backward_grads for name in names[:1]}
        for mask in _masks(cell):
            got = cell.backward(*args, mask)
            assert len(got) == len(full)
            for asked, g, f, names in zip(mask, got, full, cell.backward_grads):
                if asked:
                    assert torch.equal(g, f), (mask, names)
                else:
                    ref = like[names[0]] if like[names[0]] is not None else args[6]
                    assert g.shape == (0,), (mask, names)
                    assert g.dtype == ref.dtype and g.device == ref.device, (mask, names)


def test_opcheck_backward_partial_mask(device, cell):
    """Fake kernel, schema and autograd registration agree under a partial
    mask (what the fake promises for an output not asked for is checked
    against the real kernel)."""
    masks = _masks(cell)
    for sample, mask in zip(_op_samples(cell, device), (masks[-1], masks[0])):
        torch.library.opcheck(cell.backward, (*backward_args_from(sample), mask))


def _gemm_calls(fn) -> int:
    """Matrix products over many rows run by ``fn`` (the backward's bulk
    GEMMs: ATen's, or on the CPU oneDNN's where it runs them,
    ``rnnfast::onednn_matmul``; the per-step products use the backend's own
    packed weights on the CPU)."""
    return profiled_calls(fn, ("aten::mm", "aten::addmm", "aten::addmm_",
                               "rnnfast::onednn_matmul"))


@pytest.mark.parametrize("cell", CELLS, ids=repr)
def test_partial_mask_skips_the_gemms(cell):
    """Work evidence without timing: the GEMMs of the gradients not asked for
    do not run (float32 on the CPU: every bulk product is ATen's or oneDNN's)."""
    sample = cell.op_sample(dtype=torch.float32, lengths=[3, 2, 2, 1], hidden=4,
                            proj=2 if cell.has_projection else 0, seed=9)
    args = backward_args_from(sample)
    n = len(cell.backward_grads)
    states_only = [names[0] in ("hx", "cx") for names in cell.backward_grads]
    full = _gemm_calls(lambda: cell.backward(*args))
    # grad_input, grad_weight_ih, grad_weight_hh (and grad_weight_hr): one or
    # more products each.
    assert full >= (4 if cell.has_projection else 3)
    assert _gemm_calls(lambda: cell.backward(*args, states_only)) == 0
    for k, names in enumerate(cell.backward_grads):
        if names[0] in ("input", "weight_ih", "weight_hh", "weight_hr"):
            without = [i != k for i in range(n)]
            assert _gemm_calls(lambda: cell.backward(*args, without)) < full, names


@pytest.mark.parametrize("cell", CELLS, ids=repr)
def test_autograd_asks_only_what_is_needed(cell):
    """Through the module: a layer over a frozen input (an embedding with
    requires_grad=False) with frozen weights, training only its biases (and
    LayerNorm parameters) and initial states, runs no input or weight GEMM
    in its backward; the same layer with everything trainable does."""
    def backward_gemms(freeze: bool) -> int:
        model = cell.module(I, H, **cell.kwargs(proj_size=3)).float()
        for n, p in model.named_parameters():
            p.requires_grad_(not (freeze and re.match(r"weight_", n)))
        x = torch.randn(6, 4, I).requires_grad_(not freeze)
        out_size = getattr(model, "proj_size", 0) or H
        h0 = torch.randn(1, 4, out_size, requires_grad=True)
        c0 = torch.randn(1, 4, H, requires_grad=True)
        out, (h_n, c_n) = model(x, (h0, c0))
        loss = out.sum() + h_n.sum() + c_n.sum()
        n = _gemm_calls(lambda: loss.backward())
        assert h0.grad is not None and c0.grad is not None
        assert (x.grad is None) == freeze
        return n

    assert backward_gemms(freeze=False) >= 3
    assert backward_gemms(freeze=True) == 0


@pytest.mark.parametrize("cell", CELLS, ids=repr)
def test_empty_batch_mask(cell):
    """An empty batch (nothing to compute) honours the mask too: the outputs
    asked for as without a mask (zeros), empty [0] tensors for the others."""
    args = backward_args_from(cell.op_sample(batch=0, proj=2 if cell.has_projection else 0))
    full = cell.backward(*args)
    mask = [i % 2 == 0 for i in range(len(full))]
    for asked, g, f in zip(mask, cell.backward(*args, mask), full):
        if asked:
            assert torch.equal(g, f) and not g.any()
        else:
            assert g.shape == (0,)


@pytest.mark.parametrize("cell", CELLS, ids=repr)
def test_compiled_frozen_weights(cell):
    """torch.compile (fullgraph) traces the masked backward: frozen weights
    get no gradient, the biases the same as eager with every gradient."""
    model = cell.module(I, H, **cell.kwargs(proj_size=3))
    x = torch.randn(6, 2, I)
    out, _ = model(x)
    out.sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("weight_"))
    out, _ = torch.compile(model, fullgraph=True)(x)
    out.sum().backward()
    for n, p in model.named_parameters():
        if n.startswith("weight_"):
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, eager[n], atol=1e-6, rtol=1e-5, msg=n)
