"""Drop-in behaviours beyond the forward contract (issue 14): torch.load of
whole saved models, isinstance, parametrizations and torch.func transforms,
each checked against torch.nn.LSTM (or, for the LayerNorm-LSTM, the
plain-PyTorch reference)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
import torch.nn.utils.prune  # noqa: F401  (nn.utils.prune)
import torch.utils.checkpoint
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap

import rnnfast
from utils import make_layer_norm_lstm_pair, make_lstm_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CELLS = ["lstm", "layer_norm_lstm"]


def make_pair(cell: str, input_size: int = 3, hidden_size: int = 4, **kwargs):
    """(rnnfast module, ground truth) with identical parameters, float64:
    nn.LSTM for the LSTM, the plain-PyTorch reference for the LayerNorm-LSTM."""
    if cell == "lstm":
        return make_lstm_pair(input_size, hidden_size, **kwargs)
    return make_layer_norm_lstm_pair(input_size, hidden_size, **kwargs)


def assert_trees_close(got, expected, **tol):
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], msg=lambda m: f"{k}: {m}", **tol)
    elif isinstance(expected, (tuple, list)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_trees_close(g, e, **tol)
    else:
        torch.testing.assert_close(got, expected, **tol)


# ---------------------------------------------------------------------------
# torch.func
# ---------------------------------------------------------------------------
def _loss_fn(model):
    """loss(params, x) over output, h_n and c_n, so every output's gradient
    path is exercised."""
    def loss(params, x):
        out, (h, c) = functional_call(model, params, (x,))
        return (out * out.cos()).sum() + (h ** 2).sum() + 0.5 * c.sum()
    return loss


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_func_grad_wrt_parameters_and_input(cell, num_layers, bidirectional):
    ours, ref = make_pair(cell, num_layers=num_layers, bidirectional=bidirectional)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for argnums in (0, 1, (0, 1)):
        got = grad(_loss_fn(ours), argnums=argnums)(_params(ours), x)
        expected = grad(_loss_fn(ref), argnums=argnums)(_params(ref), x)
        assert_trees_close(got, expected)
    # ... and the value itself, through grad_and_value
    _, value = torch.func.grad_and_value(_loss_fn(ours))(_params(ours), x)
    torch.testing.assert_close(value, _loss_fn(ref)(_params(ref), x))


@pytest.mark.parametrize("cell", CELLS)
def test_func_grad_packed_sequence_and_projection(cell):
    """grad w.r.t. the parameters through a PackedSequence input (and, for
    the LSTM, a projection), against ordinary autograd of the ground truth:
    torch.func.grad fails there for nn.LSTM itself ("Cannot access data
    pointer of Tensor that doesn't have storage"), and, for any layer, w.r.t.
    an input that goes through pack_padded_sequence."""
    kwargs = dict(proj_size=2) if cell == "lstm" else {}
    ours, ref = make_pair(cell, num_layers=2, bidirectional=True, **kwargs)
    x = torch.randn(5, 3, 3, dtype=torch.float64)

    def loss_fn(model):
        def loss(params, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, [5, 2, 4], enforce_sorted=False)
            out, (h, c) = functional_call(model, params, (packed,))
            return out.data.sin().sum() + (h ** 2).sum() + c.sum()
        return loss

    got = grad(loss_fn(ours))(_params(ours), x)
    params = dict(ref.named_parameters())
    expected = torch.autograd.grad(loss_fn(ref)(params, x), list(params.values()))
    assert_trees_close(got, dict(zip(params, expected)))


@pytest.mark.parametrize("cell", CELLS)
def test_func_jacrev_and_vjp(cell):
    ours, ref = make_pair(cell, num_layers=2, batch_first=True)
    x = torch.randn(2, 4, 3, dtype=torch.float64)

    def out_of(model):
        return lambda x: model(x)[0]

    torch.testing.assert_close(jacrev(out_of(ours))(x), jacrev(out_of(ref))(x))
    jac = jacrev(lambda p: functional_call(ours, p, (x,))[1][0])(_params(ours))
    jac_ref = jacrev(lambda p: functional_call(ref, p, (x,))[1][0])(_params(ref))
    assert_trees_close(jac, jac_ref)
    (out, vjp_fn), (out_ref, vjp_ref) = vjp(out_of(ours), x), vjp(out_of(ref), x)
    torch.testing.assert_close(out, out_ref)
    cotangent = torch.randn_like(out)
    torch.testing.assert_close(vjp_fn(cotangent), vjp_ref(cotangent))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batched", [False, True], ids=["unbatched-seqs", "batched-seqs"])
@pytest.mark.parametrize("in_dim", [0, 1])
def test_func_vmap_over_sequences(cell, batched, in_dim):
    """vmap over a batch of sequences (each unbatched [T, I] or batched
    [T, B, I]) equals the ground truth run on each slice; with and without
    a vmapped initial state."""
    ours, ref = make_pair(cell, num_layers=2, bidirectional=True)
    shape = (5, 2, 3) if batched else (5, 3)
    xs = torch.randn(4, *shape, dtype=torch.float64).movedim(0, in_dim)
    got = vmap(lambda x: ours(x), in_dims=in_dim)(xs)
    for v in range(4):
        expected = ref(xs.select(in_dim, v))
        assert_trees_close((got[0][v], got[1][0][v], got[1][1][v]),
                           (expected[0], *expected[1]))
    # a vmapped initial state with shared input, and both vmapped
    state_shape = (4, 4, 2, 4) if batched else (4, 4, 4)
    h0 = torch.randn(state_shape, dtype=torch.float64)
    c0 = torch.randn(state_shape, dtype=torch.float64)
    x0 = xs.select(in_dim, 0)
    for x, x_dim in ((x0, None), (xs, in_dim)):
        got = vmap(lambda x, h, c: ours(x, (h, c)), in_dims=(x_dim, 0, 0))(x, h0, c0)
        for v in range(4):
            xv = x if x_dim is None else x.select(x_dim, v)
            expected = ref(xv, (h0[v], c0[v]))
            assert_trees_close((got[0][v], got[1][0][v], got[1][1][v]),
                               (expected[0], *expected[1]))


@pytest.mark.parametrize("cell", CELLS)
def test_func_per_sample_gradients(cell):
    """vmap(grad(loss)) over the samples of a batch: each sample's gradient
    of every parameter, as the ground truth's gradient of that sample alone
    (the main use: differential privacy, meta-learning)."""
    ours, ref = make_pair(cell, num_layers=2, bidirectional=True, batch_first=True)
    xs = torch.randn(3, 1, 4, 3, dtype=torch.float64)  # 3 samples of [B=1, T=4, I=3]

    per_sample = vmap(grad(_loss_fn(ours)), in_dims=(None, 0))(_params(ours), xs)
    for v in range(3):
        expected = grad(_loss_fn(ref))(_params(ref), xs[v])
        assert_trees_close({k: t[v] for k, t in per_sample.items()}, expected)


@pytest.mark.parametrize("cell", CELLS)
def test_func_vmap_over_parameters(cell):
    """vmap over stacked parameters (a model ensemble, each member its own
    weights): the ops loop over the members."""
    ours, ref = make_pair(cell)
    members = [make_pair(cell, seed=s)[1] for s in range(3)]
    stacked = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in members])
               for k, _ in ref.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    got = vmap(lambda p: functional_call(ours, p, (x,))[0])(stacked)
    for v, member in enumerate(members):
        torch.testing.assert_close(got[v], member(x)[0])


@pytest.mark.parametrize("cell", CELLS)
def test_func_vmap_then_autograd_backward(cell):
    """Ordinary autograd through a vmapped forward reaches the parameters."""
    ours, ref = make_pair(cell)
    xs = torch.randn(3, 5, 2, 3, dtype=torch.float64)
    vmap(lambda x: ours(x)[0])(xs).pow(2).sum().backward()
    ref(xs.transpose(0, 1).reshape(5, 6, 3))[0].pow(2).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_forward_mode_ad_is_refused_clearly(cell):
    """No tangent formula: jvp, jacfwd and forward_ad raise a RuntimeError
    that names reverse mode, never a silent zero Jacobian."""
    ours, _ = make_pair(cell)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="forward-mode AD .* not supported.*jacrev"):
        jacfwd(lambda x: ours(x)[0])(x)
    with pytest.raises(RuntimeError, match="forward-mode AD .* not supported"):
        jvp(lambda x: ours(x)[0], (x,), (torch.ones_like(x),))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        ours(fwAD.make_dual(x, torch.ones_like(x)))


@pytest.mark.parametrize("cell", CELLS)
def test_func_double_grad_is_refused_clearly(cell):
    ours, _ = make_pair(cell)
    x = torch.randn(3, 1, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="double backward"):
        jacrev(jacrev(lambda x: ours(x)[0].sum()))(x)
    with pytest.raises(RuntimeError, match="double backward"):
        grad(lambda x: grad(lambda x: ours(x)[0].pow(2).sum())(x).sum())(x)
    # torch.func.hessian is forward-over-reverse: refused as forward mode
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.hessian(lambda x: ours(x)[0].sum())(x)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts calls of each rnnfast op that reach the kernels."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rnnfast":
            self.counts[func._opname] = self.counts.get(func._opname, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cell", CELLS)
def test_func_vmap_folds_into_one_recurrence(cell):
    """With shared weights, vmap over V sequences runs each layer's forward
    op once, over V * B rows, not V times; per-sample weights loop."""
    ours, _ = make_pair(cell, num_layers=2)
    op = "lstm_forward" if cell == "lstm" else "layer_norm_lstm_forward"
    with _CountOps() as counter:
        vmap(lambda x: ours(x)[0])(torch.randn(4, 5, 2, 3, dtype=torch.float64))
    assert counter.counts == {op: 2}
    stacked = {k: torch.stack([v.detach()] * 4) for k, v in ours.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with _CountOps() as counter:
        vmap(lambda p: functional_call(ours, p, (x,)))(stacked)
    assert counter.counts == {op: 8}


# ---------------------------------------------------------------------------
# torch.save / torch.load of whole models
# ---------------------------------------------------------------------------
_MODEL_SOURCE = '''
import torch
from torch import nn
import rnnfast


class TinyLM(nn.Module):
    """Embedding -> rnnfast layer -> Linear, as a user's model would be."""

    def __init__(self, layer_cls, vocab=11, width=6, hidden=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = layer_cls(width, hidden, num_layers=2, dropout=0.25, batch_first=True,
                             bidirectional=True)
        self.head = nn.Linear(2 * hidden, vocab)

    def forward(self, tokens, state=None):
        out, state = self.rnn(self.embed(tokens), state)
        return self.head(out), state
'''

_LOAD_SCRIPT = '''
import sys
import torch
from torch import nn
sys.path.insert(0, sys.argv[1])
import rnnfast
from tiny_lm import TinyLM

# What a user allowlists for their own model (as PyTorch's examples do for
# nn.LSTM models); rnnfast's classes are allowlisted by importing rnnfast.
torch.serialization.add_safe_globals([TinyLM, nn.Embedding, nn.Linear])
for layer in sys.argv[2:]:
    model = torch.load(f"{sys.argv[1]}/{layer}.pt")  # the default: weights_only=True
    tokens, expected_out, expected_h, expected_c = torch.load(f"{sys.argv[1]}/{layer}-expected.pt")
    assert type(model.rnn) is getattr(rnnfast, layer), type(model.rnn)
    assert not model.training
    out, (h, c) = model(tokens)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(h, expected_h, rtol=0, atol=0)
    torch.testing.assert_close(c, expected_c, rtol=0, atol=0)
    model.train()
    loss = model(tokens)[0].square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    print("loaded", layer)
'''


def test_whole_model_saved_with_torch_save_loads_with_default_torch_load(tmp_path, monkeypatch):
    """Embedding -> rnnfast layer -> Linear saved with torch.save loads in a
    fresh process with plain torch.load and gives identical outputs (both
    layers, one process)."""
    (tmp_path / "tiny_lm.py").write_text(_MODEL_SOURCE)
    (tmp_path / "load.py").write_text(_LOAD_SCRIPT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tiny_lm", raising=False)
    from tiny_lm import TinyLM
    layers = ["LSTM", "LayerNormLSTM"]
    for layer in layers:
        model = TinyLM(getattr(rnnfast, layer)).eval()
        tokens = torch.randint(0, 11, (3, 7))
        with torch.no_grad():
            out, (h, c) = model(tokens)
        torch.save(model, tmp_path / f"{layer}.pt")
        torch.save((tokens, out, h, c), tmp_path / f"{layer}-expected.pt")
        # all that is left for the user to allowlist is their own classes and torch's
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(
            tmp_path / f"{layer}.pt")) == {"tiny_lm.TinyLM", "torch.nn.modules.sparse.Embedding",
                                          "torch.nn.modules.linear.Linear"}

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path), *layers],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == [f"loaded {layer}" for layer in layers]


def test_rnnfast_classes_are_allowlisted_on_import():
    safe = torch.serialization.get_safe_globals()
    assert rnnfast.LSTM in safe and rnnfast.LayerNormLSTM in safe


# ---------------------------------------------------------------------------
# isinstance: not an nn.LSTM subclass, so that fullgraph compile keeps working
# ---------------------------------------------------------------------------
def test_not_an_nn_lstm_and_the_documented_isinstance_recipe():
    """rnnfast.LSTM is deliberately not a torch.nn.LSTM (see the next test);
    the README's recipe, ``isinstance(m, (nn.LSTM, rnnfast.LSTM))``, finds
    both kinds of layer in a model."""
    model = nn.ModuleDict({"a": rnnfast.LSTM(3, 4), "b": nn.LSTM(3, 4),
                           "c": rnnfast.LayerNormLSTM(3, 4), "d": nn.Linear(3, 4)})
    assert not isinstance(model["a"], nn.LSTM)
    found = [name for name, m in model.named_children()
             if isinstance(m, (nn.LSTM, rnnfast.LSTM))]
    assert found == ["a", "b"]
    for name in found:  # the typical use: a custom initialisation
        for pname, p in model[name].named_parameters():
            if pname.startswith("weight_hh"):
                nn.init.orthogonal_(p)
    w = model["a"].weight_hh_l0.detach()
    torch.testing.assert_close(w.T @ w, torch.eye(4), atol=1e-5, rtol=0)


def test_an_nn_lstm_subclass_would_cost_fullgraph_compile():
    """Why rnnfast.LSTM does not subclass nn.LSTM: Dynamo refuses any
    nn.LSTM instance (``isinstance(value, nn.LSTM)`` in its module wrapper)
    unless ``torch._dynamo.config.allow_rnn``, so the same layer as an
    nn.LSTM subclass fails ``torch.compile(fullgraph=True)``, which
    rnnfast.LSTM passes. Should torch lift this, this test fails and the
    decision can be revisited."""
    layer = rnnfast.LSTM(3, 4, batch_first=True)
    subclass = type("LSTMSubclass", (rnnfast.LSTM, nn.LSTM), {})
    as_subclass = subclass.__new__(subclass)  # the same state, nn.LSTM's type
    as_subclass.__dict__.update(layer.__dict__)
    assert isinstance(as_subclass, nn.LSTM)
    x = torch.randn(2, 5, 3)
    expected = layer(x)[0]
    torch._dynamo.reset()
    got = torch.compile(lambda x: layer(x)[0], fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="RNN, GRU, or LSTM"):
        torch.compile(lambda x: as_subclass(x)[0], fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------
# Parametrizations
# ---------------------------------------------------------------------------
class _Counting(nn.Module):
    """A parametrization that counts its evaluations (and scales by 0.9,
    so its result is really used)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, w):
        self.calls += 1
        return 0.9 * w


@pytest.mark.parametrize("cell", CELLS)
def test_each_parametrized_weight_is_evaluated_once_per_forward(cell):
    ours, ref = make_pair(cell, num_layers=2, bidirectional=True)
    names = ["weight_hh_l0", "weight_ih_l1_reverse", "bias_ih_l1"]
    counters = {}
    for model in (ours, ref):
        for name in names:
            counters[model, name] = _Counting()
            nn.utils.parametrize.register_parametrization(model, name, counters[model, name])
            counters[model, name].calls = 0  # registering evaluates it once, as a check
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    out, (h, c) = ours(x)
    expected_out, (expected_h, expected_c) = ref(x)
    assert [counters[ours, n].calls for n in names] == [1, 1, 1]
    torch.testing.assert_close((out, h, c), (expected_out, expected_h, expected_c))
    out.sum().backward()
    assert [counters[ours, n].calls for n in names] == [1, 1, 1]  # not again in backward
    with torch.no_grad():
        ours(x)
    assert [counters[ours, n].calls for n in names] == [2, 2, 2]
    if cell == "lstm":
        # what the README says of nn.LSTM: one forward (ref(x) above)
        # evaluates each of them at least twice (torch 2.14: 4, 2, 2)
        assert all(counters[ref, n].calls >= 2 for n in names)


def _parametrized_grads(model, x):
    out, (h, c) = model(x)
    loss = (out * out.sin()).sum() + h.sum() + c.square().sum()
    params = [p for _, p in sorted(model.named_parameters())]
    return (out, h, c), torch.autograd.grad(loss, [x, *params])


@pytest.mark.parametrize("kind", ["spectral_norm-eval", "weight_norm-eval", "weight_norm-train"])
def test_parametrized_lstm_matches_nn_lstm(kind):
    """Where evaluating a parametrization twice changes nothing (weight_norm;
    spectral_norm in eval mode, which does no power iteration) outputs and
    gradients equal nn.LSTM's, parametrized the same way."""
    ours, ref = make_lstm_pair(3, 5, num_layers=2, bidirectional=True)
    parametrize = getattr(nn.utils.parametrizations, kind.split("-")[0])
    for model in (ours, ref):
        torch.manual_seed(1)  # spectral_norm's random start vectors
        for name in ("weight_hh_l0", "weight_ih_l1", "weight_hh_l1_reverse"):
            parametrize(model, name)
        model.train(kind.endswith("train"))
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    got, expected = _parametrized_grads(ours, x), _parametrized_grads(ref, x)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kind", ["prune", "plain_tensor"])
def test_weights_replaced_outside_the_parameters_like_nn_lstm(kind):
    """Weights that live outside the module's registered parameters, pruning's
    masked tensor (its parameter is then ``weight_orig``) or a plain tensor
    put in place of a deleted parameter, are read where they live: the
    outputs and gradients of nn.LSTM treated the same way."""
    ours, ref = make_lstm_pair(3, 5, num_layers=2, bidirectional=True)
    for model in (ours, ref):
        if kind == "prune":
            nn.utils.prune.l1_unstructured(model, "weight_hh_l1_reverse", amount=0.5)
        else:
            scaled = model.weight_ih_l1.detach() * 0.5
            del model.weight_ih_l1
            model.weight_ih_l1 = scaled
    if kind == "prune":
        assert "weight_hh_l1_reverse" not in dict(ours.named_parameters())
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    got, expected = _parametrized_grads(ours, x), _parametrized_grads(ref, x)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("cell", CELLS)
def test_activation_checkpointing_recomputes_the_same_layer(cell, use_reentrant):
    """torch.utils.checkpoint around a layer in training mode, with dropout
    between layers and every regulariser's random masks: the recomputation
    in the backward draws the same masks (checkpoint restores the RNG), so
    the outputs and gradients are those of the plain call. (The reentrant
    variant's first forward runs under no_grad: the inference route.)"""
    model = make_pair(cell, 3, 5, num_layers=2, dropout=0.3)[0].train()
    model.zoneout_hidden, model.zoneout_cell, model.weight_dropout = 0.2, 0.1, 0.25
    model.variational_dropout = True
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for wrap in (False, True):
        torch.manual_seed(3)
        if wrap:
            out = torch.utils.checkpoint.checkpoint(lambda x: model(x)[0], x,
                                                    use_reentrant=use_reentrant)
        else:
            out = model(x)[0]
        x.grad = None
        model.zero_grad()
        (out * out.cos()).sum().backward()  # reentrant checkpoints refuse autograd.grad
        results.append((out, [x.grad, *(p.grad for p in model.parameters())]))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-12, rtol=1e-12)


def test_spectral_norm_training_advances_the_power_iteration_once():
    """In training mode spectral_norm runs one power-iteration step per
    evaluation: rnnfast's forward advances it once (as for any other
    layer), nn.LSTM's twice."""
    ours, ref = make_lstm_pair(3, 5)
    for model in (ours, ref):
        torch.manual_seed(1)
        nn.utils.parametrizations.spectral_norm(model, "weight_hh_l0")
    sn_ours = ours.parametrizations.weight_hh_l0[0]
    u0 = sn_ours._u.clone()
    ours(torch.randn(4, 2, 3, dtype=torch.float64))
    # one step by hand from the same start: u <- normalize(W v), v <- normalize(W^T u)
    w = ours.parametrizations.weight_hh_l0.original.detach()
    v = nn.functional.normalize(w.T @ u0, dim=0, eps=sn_ours.eps)
    u1 = nn.functional.normalize(w @ v, dim=0, eps=sn_ours.eps)
    torch.testing.assert_close(sn_ours._u, u1)
