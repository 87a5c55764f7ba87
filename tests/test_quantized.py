"""Int8 dynamic-quantized inference (rnnfast.quantized, rnnfast.quantize_dynamic).

Ground truth is a plain-PyTorch reference with the same quantization (per
output row int8 weights, per row int8 activations at each use), whose
integer products are exact in float64 and whose cell math runs in float64:
the kernels' only differences from it are float32 rounding, so the
comparison is tight. The accuracy against float32 is held against torch's
own dynamic-quantized nn.LSTM on the same weights.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import rnnfast
from rnnfast import quantized as Q
from utils import OLD_NN_LSTM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the reference ------------------------------------------------------------

def ref_quantize_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of float32 rows: (integers, scales) in float64,
    computed with the kernels' float32 operations."""
    a = a.float()
    absmax = a.abs().amax(-1, keepdim=True)
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    return torch.round(a * inv).clamp(-127, 127).double(), (absmax / 127).double()


def ref_qmm(a, weight_q, weight_scale):
    """dequantized(quantized(a) W_q^T), the integer products exact."""
    q, scale = ref_quantize_rows(a)
    return (q @ weight_q.double().t()) * (scale * weight_scale.double())


def ref_qmm_two_terms(a, weight_q, weight_scale):
    """dequantized(q1 W_q^T) + dequantized(q2 W_q^T): q1 a's per-row int8,
    q2 that of the float32 residual a - s1 q1 (computed in float64, where
    s1 q1 is exact, rounded once): the LayerNorm-LSTM's input product."""
    q1, s1 = ref_quantize_rows(a)
    residual = (a.double() - s1 * q1).float()
    q2, s2 = ref_quantize_rows(residual)
    w = weight_q.double().t()
    return (q1 @ w) * (s1 * weight_scale.double()) + (q2 @ w) * (s2 * weight_scale.double())


def ref_layer(qmod, idx, x, h0, c0, reverse, layer_norm):
    """One layer and direction of a quantized module over padded x [T, B, I]."""
    names = qmod._all_weights[idx]
    buf = qmod._buffers
    w = {n.split("_l")[0]: (buf[n], buf.get(n + "_scale")) for n in names}
    H = qmod.hidden_size
    z_h, z_c = qmod.zoneout_hidden, qmod.zoneout_cell  # evaluation formula
    bias = ((w["bias_ih"][0] + w["bias_hh"][0]).double() if qmod.bias
            else torch.zeros(4 * H, dtype=torch.float64))
    h, c = h0.double(), c0.double()
    outs = [None] * x.size(0)
    for t in (reversed(range(x.size(0))) if reverse else range(x.size(0))):
        ih = (ref_qmm_two_terms if layer_norm else ref_qmm)(x[t], *w["weight_ih"])
        hh = ref_qmm(h.float(), *w["weight_hh"])
        if layer_norm:
            ln = lambda v, n: F.layer_norm(v, v.shape[-1:], w[f"{n}_weight"][0].double(),
                                           w[f"{n}_bias"][0].double(), qmod.eps)
            gates = (ln(ih, "ln_ih") + ln(hh, "ln_hh") + bias)
        else:
            gates = ih + hh + bias
        i, f, g, o = gates.chunk(4, 1)
        c_cand = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        y = ln(c_cand, "ln_cell") if layer_norm else c_cand
        h_cand = torch.sigmoid(o) * torch.tanh(y)
        if "weight_hr" in w:
            h_cand = ref_qmm(h_cand.float(), *w["weight_hr"])
        c = z_c * c + (1 - z_c) * c_cand
        h = z_h * h + (1 - z_h) * h_cand
        outs[t] = h
    return torch.stack(outs), h, c


def ref_forward(qmod, x, hx=None):
    """The whole quantized module on padded time-major x [T, B, I]."""
    D = 2 if qmod.bidirectional else 1
    if hx is None:
        hx = qmod._zero_state(x, x.size(1))
    layer_norm = isinstance(qmod, Q.LayerNormLSTM)
    inp, hs, cs = x, [], []
    for layer in range(qmod.num_layers):
        outs = []
        for d in range(D):
            idx = layer * D + d
            out, h, c = ref_layer(qmod, idx, inp, hx[0][idx], hx[1][idx], d == 1, layer_norm)
            outs.append(out)
            hs.append(h)
            cs.append(c)
        inp = torch.cat(outs, -1).float()
    return inp.double(), torch.stack(hs), torch.stack(cs)


# ---- models ---------------------------------------------------------------

def make_float(kind, input_size=13, hidden_size=20, **kw):
    """A float layer with non-trivial LayerNorm parameters."""
    if kind == "LSTM":
        return rnnfast.LSTM(input_size, hidden_size, **kw)
    m = rnnfast.LayerNormLSTM(input_size, hidden_size, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.2 * torch.randn_like(p))
    return m


ZONEOUT = dict(zoneout_hidden=0.2, zoneout_cell=0.3)  # kept: it changes eval output
LSTM_CONFIGS = [dict(), dict(num_layers=2, bidirectional=True),
                dict(num_layers=2, proj_size=7), dict(bidirectional=True, proj_size=5, bias=False),
                dict(num_layers=2, bidirectional=True, proj_size=7, **ZONEOUT)]
LN_CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(bias=False, eps=1e-3),
              dict(num_layers=2, bidirectional=True, **ZONEOUT)]
CONFIGS = ([("LSTM", c) for c in LSTM_CONFIGS] + [("LayerNormLSTM", c) for c in LN_CONFIGS])


def _id(case):
    kind, cfg = case
    return kind + "-" + "-".join(f"{k}={v}" for k, v in cfg.items())


@pytest.fixture(params=CONFIGS, ids=_id)
def case(request):
    kind, cfg = request.param
    return Q.quantize_dynamic(make_float(kind, **cfg))


# ---- parity with the reference -------------------------------------------------

@pytest.mark.parametrize("T", [6, 1])  # 1: a decode call, h_0's product fused
def test_matches_int8_reference(case, T):
    B = 3
    x = torch.randn(T, B, case.input_size)
    D, L = (2 if case.bidirectional else 1), case.num_layers
    P = case.proj_size or case.hidden_size
    hx = (torch.randn(L * D, B, P), torch.randn(L * D, B, case.hidden_size))
    with torch.no_grad():
        out, (h, c) = case(x, hx)
    ref_out, ref_h, ref_c = ref_forward(case, x, hx)
    assert out.dtype == torch.float32 and out.shape == (T, B, D * P)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(h.double(), ref_h, rtol=0, atol=2e-5)
    torch.testing.assert_close(c.double(), ref_c, rtol=0, atol=2e-5)


def test_input_forms(case):
    """batch_first, unbatched, PackedSequence (unsorted) and hx=None give the
    padded result: each row is quantized on its own, so a sequence's result
    does not depend on its batch mates."""
    lengths = [5, 2, 4]
    seqs = [torch.randn(n, case.input_size) for n in lengths]
    singles = [case(s.unsqueeze(1))[0].squeeze(1) for s in seqs]
    with torch.no_grad():
        for s, single in zip(seqs, singles):
            out, (h, c) = case(s)  # unbatched
            torch.testing.assert_close(out, single, rtol=0, atol=1e-6)
            assert h.dim() == 2 and c.dim() == 2
        packed_out, (h_n, c_n) = case(pack_sequence(seqs, enforce_sorted=False))
        padded, out_lengths = nn.utils.rnn.pad_packed_sequence(packed_out)
        assert out_lengths.tolist() == lengths
        for b, (n, single) in enumerate(zip(lengths, singles)):
            torch.testing.assert_close(padded[:n, b], single, rtol=0, atol=1e-6)
        # equal lengths: batch_first and an explicit zero state
        x = torch.randn(4, 3, case.input_size)
        expected, (eh, ec) = case(x)
        case.batch_first = True
        try:
            got, (gh, gc) = case(x.transpose(0, 1), case._zero_state(x, 3))
        finally:
            case.batch_first = False
        torch.testing.assert_close(got.transpose(0, 1), expected, rtol=0, atol=0)
        torch.testing.assert_close((gh, gc), (eh, ec), rtol=0, atol=0)


def test_nan_in_one_sequence_stays_there():
    q = Q.quantize_dynamic(rnnfast.LSTM(8, 16))
    x = torch.randn(3, 2, 8)
    x[1, 0, 3] = float("nan")
    with torch.no_grad():
        out, _ = q(x)
    assert out[1:, 0].isnan().all() and not out[0, 0].isnan().any()
    assert out[:, 1].isfinite().all()


# ---- the accuracy bound -------------------------------------------------------

def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("hidden", [64, 128])
def test_lstm_error_no_larger_than_torch_quantized(hidden):
    """On the same float weights, the int8 LSTM's output error (relative,
    vs float32) is no larger than torch.ao's dynamic-quantized nn.LSTM's."""
    lstm = nn.LSTM(hidden, hidden, 2)
    x = torch.randn(20, 4, hidden)
    ao = _torch_quantized(lstm)
    ours = Q.quantize_dynamic(lstm)
    with torch.no_grad():
        expected = lstm(x)[0]
        ours_err = _relative_error(ours(x)[0], expected)
        ao_err = _relative_error(ao(x)[0], expected)
    assert 0 < ours_err <= ao_err, (ours_err, ao_err)


def _torch_quantized(lstm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(lstm), {nn.LSTM},
                                                      dtype=torch.qint8)


@pytest.mark.parametrize("steps", [1, 2])
def test_layer_norm_lstm_error_within_twice_the_lstm(steps):
    """On the same float weights, the int8 LayerNorm-LSTM's error is within
    2x of the int8 LSTM's: of rnnfast's own after one step, of torch's
    dynamic-quantized nn.LSTM's (the LSTM bound) after two.

    Each LayerNorm rescales its product to unit variance, so the rounding of
    a small product's input (the second layer's input h) becomes a large
    error in the gates; the LayerNorm-LSTM's input product therefore
    quantizes x in two int8 terms (about 15 bits; one term gave 2.1x
    rnnfast's LSTM error at one step, two give 1.2x). A randomly initialised
    LayerNorm-LSTM then amplifies any perturbation from step to step
    (rounding its float weights to int8, activations left in float, grows
    to 25% at step 50), so long runs measure its dynamics, not the kernels;
    the trained examples (test_examples.py) hold accuracy and perplexity
    over whole sequences."""
    hidden = 128
    lstm = nn.LSTM(hidden, hidden, 2)
    ln = rnnfast.LayerNormLSTM(hidden, hidden, 2)
    ln.load_state_dict(lstm.state_dict(), strict=False)
    x = torch.randn(steps, 8, hidden)
    with torch.no_grad():
        torch_err = _relative_error(_torch_quantized(lstm)(x)[0], lstm(x)[0])
        ours_err = _relative_error(Q.quantize_dynamic(lstm)(x)[0], lstm(x)[0])
        ln_err = _relative_error(Q.quantize_dynamic(ln)(x)[0], ln(x)[0])
    assert ln_err <= 2 * torch_err, (ln_err, torch_err)
    if steps == 1:
        assert ln_err <= 2 * ours_err, (ln_err, ours_err)


# ---- the AVX2 and portable kernels ------------------------------------------------------

_PORTABLE_SCRIPT = r"""
import sys, torch, rnnfast
cases = torch.load(sys.argv[1], weights_only=False)
outs = []
with torch.inference_mode():
    for model, x in cases:
        outs.append(model(x))
torch.save({"outs": outs, "info": rnnfast.build_info()}, sys.argv[2])
"""


@pytest.mark.parametrize("capability,kernels", [("default", "portable"), ("avx2", "AVX2"),
                                               ("avx512", "AVX512-VNNI")])
def test_other_kernels_match_the_fast_ones(tmp_path, capability, kernels):
    """ATEN_CPU_CAPABILITY=default selects the portable kernels (what a CPU
    without AVX2 runs), =avx2 the AVX2 ones (a CPU without AVX-512 VNNI),
    =avx512 the VNNI ones alone (a CPU without AMX): the same integers,
    rounded alike, so the same results up to the float step kernels'
    rounding (the rare activation whose rounding that flips); with the same
    step kernels (avx512 on an AMX CPU, VNNI for AMX's products) bitwise."""
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2",
                                                                                "AVX512"):
        pytest.skip("this CPU has no AVX2")
    if capability == "avx512" and not rnnfast.build_info()["cpu_int8_kernels"].startswith(
            ("AMX-INT8", "AVX512-VNNI")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    # batches of 3 to 70 rows: the recurrent products on either side of
    # AMX's threshold (4 rows), the input products (T * B rows) above it
    cases = [(Q.quantize_dynamic(rnnfast.LSTM(37, 48, 2, proj_size=20)), torch.randn(5, 3, 37)),
             (Q.quantize_dynamic(make_float("LayerNormLSTM", 24, 33)), torch.randn(1, 9, 24)),
             (Q.quantize_dynamic(rnnfast.LSTM(64, 64)), torch.randn(1, 70, 64)),
             (Q.quantize_dynamic(rnnfast.LSTM(70, 40, proj_size=21)), torch.randn(3, 19, 70)),
             (Q.quantize_dynamic(make_float("LayerNormLSTM", 24, 33)), torch.randn(2, 35, 24))]
    path = tmp_path / "cases.pt"
    torch.save(cases, path)
    script = tmp_path / "portable.py"
    script.write_text(_PORTABLE_SCRIPT)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability,
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "out.pt")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    assert result["info"]["cpu_int8_kernels"] == kernels
    same_step_kernels = result["info"]["cpu_kernels"] == rnnfast.build_info()["cpu_kernels"]
    atol = 0 if same_step_kernels and kernels != "portable" else 1e-5
    with torch.inference_mode():
        for (model, x), (out, (h, c)) in zip(cases, result["outs"]):
            ref_out, (ref_h, ref_c) = model(x)
            torch.testing.assert_close(out, ref_out, rtol=0, atol=atol)
            torch.testing.assert_close((h, c), (ref_h, ref_c), rtol=0, atol=atol)


INT8_FAMILIES = ["portable", "AVX2", "AVX512-VNNI", "AMX-INT8"]


def _runs_here(family):
    """Whether the int8 kernels `family` run on this CPU (those below the
    best one all do)."""
    best = rnnfast.build_info()["cpu_int8_kernels"].split("+")[0]
    return INT8_FAMILIES.index(family) <= INT8_FAMILIES.index(best)


# (M, N, K): M = 1..3 and around the 16-row tiles, N around the 16-column
# blocks, K around the 4-byte groups and 64-byte tile rows
PRODUCT_SHAPES = [(1, 1, 1), (2, 17, 5), (3, 33, 63), (16, 16, 64), (17, 48, 65),
                  (31, 20, 130), (33, 70, 200), (100, 40, 37), (250, 100, 300)]


@pytest.mark.parametrize("family", INT8_FAMILIES)
def test_every_int8_kernel_computes_the_exact_integers(family):
    """Each kernel family forced on the same product (quantized_linear):
    rows of integers whose largest magnitude is 127 quantize to themselves
    (scale 1), so with unit weight scales the output is the integer
    product, exact; with real scales and a bias, C = fma(acc, s, bias) in
    every family, so the floats equal the portable kernels' bitwise."""
    if not _runs_here(family):
        pytest.skip(f"this CPU does not run the {family} int8 kernels (best here: "
                    f"{rnnfast.build_info()['cpu_int8_kernels']})")
    ops = rnnfast._quantized_ops
    g = torch.Generator().manual_seed(1)
    for m, n, k in PRODUCT_SHAPES:
        a = torch.randint(-127, 128, (m, k), generator=g).float()
        a[:, 0] = torch.where(torch.arange(m) % 2 == 0, 127.0, -127.0)
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        packed = ops.quantized_pack_weight(w)
        exact = (a.long() @ w.long().t()).double()
        got = ops.quantized_linear(a, packed, torch.ones(n), None, family)
        assert torch.equal(got.double(), exact), (family, m, n, k)
        x = torch.randn(m, k, generator=g)
        scale, bias = torch.rand(n, generator=g) + 0.01, torch.randn(n, generator=g)
        for b in (None, bias):
            assert torch.equal(ops.quantized_linear(x, packed, scale, b, family),
                               ops.quantized_linear(x, packed, scale, b, "portable")), \
                (family, m, n, k)


def test_quantized_linear_refuses_an_unknown_or_absent_kernel():
    ops = rnnfast._quantized_ops
    w = ops.quantized_pack_weight(torch.ones(4, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match='kernels must be "auto".*got "avx9"'):
        ops.quantized_linear(torch.randn(2, 8), w, torch.ones(4), None, "avx9")
    absent = [f for f in INT8_FAMILIES if not _runs_here(f)]
    if absent:
        with pytest.raises(RuntimeError, match=f"the {absent[0]} kernels do not run here"):
            ops.quantized_linear(torch.randn(2, 8), w, torch.ones(4), None, absent[0])
    # "auto" is what the layers use: the same floats as the portable kernels
    x = torch.randn(40, 8)
    torch.testing.assert_close(ops.quantized_linear(x, w, torch.ones(4)),
                               ops.quantized_linear(x, w, torch.ones(4), None, "portable"),
                               rtol=0, atol=0)


def test_build_info_names_the_int8_kernels():
    info = rnnfast.build_info()
    assert info["cpu_int8_kernels"] in ("AMX-INT8+AVX512-VNNI", "AVX512-VNNI", "AVX2",
                                        "portable")
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "default":
        assert info["cpu_int8_kernels"] == "portable"


# ---- API: quantize_dynamic, buffers, save and load ---------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.LSTM(6, 10)
        self.inner = nn.Sequential(rnnfast.LSTM(10, 12), rnnfast.LayerNormLSTM(12, 8))
        self.head = nn.Linear(8, 3)


class _MyLSTM(nn.LSTM):
    pass


def test_quantize_dynamic_replaces_every_float_layer():
    net = _Net()
    q = rnnfast.quantize_dynamic(net)
    assert type(q.a) is Q.LSTM and type(q.inner[0]) is Q.LSTM
    assert type(q.inner[1]) is Q.LayerNormLSTM and type(q.head) is nn.Linear
    assert type(net.a) is nn.LSTM, "the model itself is left as it was"
    assert type(rnnfast.quantize_dynamic(nn.LSTM(3, 4))) is Q.LSTM  # the root itself
    assert type(rnnfast.quantize_dynamic(_MyLSTM(3, 4))) is _MyLSTM  # subclasses left alone
    with pytest.raises(ValueError, match="qint8"):
        rnnfast.quantize_dynamic(net, dtype=torch.float16)
    with pytest.raises(TypeError, match="expected a torch.nn.LSTM"):
        Q.LSTM.from_float(nn.GRU(3, 4))
    assert "dtype=torch.qint8" in repr(q.a)


def test_weights_are_int8_per_row_and_four_times_smaller():
    lstm = rnnfast.LSTM(256, 256, 2)
    q = Q.quantize_dynamic(lstm)
    for name, w in lstm.named_parameters():
        if name.startswith("weight"):
            wq, scale = q._buffers[name], q._buffers[name + "_scale"]
            assert wq.dtype == torch.int8 and scale.shape == (w.shape[0],)
            assert torch.equal(scale, w.detach().abs().amax(1) / 127)
            err = (wq.float() * scale[:, None] - w.detach()).abs()
            assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    def size(module):
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        return buffer.tell()
    assert size(q) < size(lstm) / 3.8


@pytest.mark.parametrize("kind", ["LSTM", "LayerNormLSTM"])
def test_state_dict_round_trip(kind):
    q = Q.quantize_dynamic(make_float(kind, num_layers=2, bidirectional=True))
    fresh = getattr(Q, kind)(13, 20, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 13)
    with torch.no_grad():
        assert not torch.equal(fresh(x)[0], q(x)[0])
        fresh.load_state_dict(q.state_dict())
        assert torch.equal(fresh(x)[0], q(x)[0])
    assert not any(k.endswith("_packed") for k in q.state_dict())


def test_the_kept_op_arguments_follow_the_buffers():
    """The modules gather their ops' weight arguments once; a buffer
    assigned, loaded, or replaced by Module._apply (.to(), ...) is used from
    then on, and an in-place change of a float buffer is seen at once."""
    q = Q.quantize_dynamic(make_float("LSTM", num_layers=2))
    x = torch.randn(3, 2, 13)
    with torch.no_grad():
        first = q(x)[0]
        q.bias_ih_l1 = q.bias_ih_l1 + 1  # assigned
        second = q(x)[0]
        assert not torch.equal(first, second)
        q.bias_ih_l1.sub_(1)  # in place
        torch.testing.assert_close(q(x)[0], first, rtol=0, atol=1e-6)
        old = q.bias_hh_l0
        q._apply(lambda t: t.clone())  # replaced: the old tensor no longer counts
        old.add_(5)
        torch.testing.assert_close(q(x)[0], first, rtol=0, atol=1e-6)
        other = Q.quantize_dynamic(make_float("LSTM", num_layers=2))
        q.load_state_dict(other.state_dict())  # loaded (and repacked)
        assert torch.equal(q(x)[0], other(x)[0])


def test_a_float_state_dict_is_refused():
    lstm = rnnfast.LSTM(5, 6)
    with pytest.raises(RuntimeError, match="must be an int8 weight.*quantize_dynamic"):
        Q.LSTM(5, 6).load_state_dict(lstm.state_dict(), strict=False)


@pytest.mark.parametrize("cls", ["LSTM", "LayerNormLSTM"])
def test_zoneout_is_kept_and_training_only_regularisers_are_dropped(cls):
    """Zoneout changes the evaluation output (s_t = z s_{t-1} + (1 - z) s~_t):
    the int8 module keeps its rates and follows the float module in eval.
    DropConnect and variational dropout act only in training."""
    zoned = make_float(cls, num_layers=2, zoneout_hidden=0.4, zoneout_cell=0.5).eval()
    q = Q.quantize_dynamic(zoned)
    assert (q.zoneout_hidden, q.zoneout_cell) == (0.4, 0.5)
    assert "zoneout_hidden=0.4" in repr(q)
    unzoned = Q.quantize_dynamic(make_float(cls, num_layers=2).eval())
    unzoned.load_state_dict(q.state_dict())
    x = torch.randn(8, 3, 13)
    with torch.no_grad():
        expected, out, other = zoned(x)[0], q(x)[0], unzoned(x)[0]
    # int8 error against the float module, far below what dropping zoneout costs
    err = (out - expected).norm() / expected.norm()
    assert err < 0.05 and err < 0.25 * (other - expected).norm() / expected.norm()
    regularised = make_float(cls, num_layers=2, dropout=0.2, weight_dropout=0.3,
                             variational_dropout=True).eval()
    plain = make_float(cls, num_layers=2).eval()
    plain.load_state_dict(regularised.state_dict())
    with torch.no_grad():
        assert torch.equal(Q.quantize_dynamic(regularised)(x)[0],
                           Q.quantize_dynamic(plain)(x)[0])


def test_quantized_ops_refuse_a_zoneout_rate_out_of_range():
    q = Q.quantize_dynamic(nn.LSTM(5, 6))
    q.zoneout_cell = 1.0
    with pytest.raises(RuntimeError, match=r"zoneout_cell must be in \[0, 1\), got 1"):
        with torch.no_grad():
            q(torch.randn(3, 2, 5))


def test_whole_model_torch_save_load_weights_only():
    q = Q.quantize_dynamic(make_float("LayerNormLSTM", num_layers=2))
    x = torch.randn(3, 2, 13)
    buffer = io.BytesIO()
    torch.save(q, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only=True, torch's default
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], q(x)[0])
    assert type(loaded) is Q.LayerNormLSTM


# ---- training is refused; inference works in every mode -------------------------

def test_training_is_refused_with_what_to_do():
    q = Q.quantize_dynamic(rnnfast.LSTM(4, 5))
    x = torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match=r"inference only.*rnnfast.LSTM.*quantize_dynamic"):
        q(x.requires_grad_())
    with pytest.raises(RuntimeError, match="inference only"):
        q(x.detach(), (torch.zeros(1, 2, 5, requires_grad=True), torch.zeros(1, 2, 5)))
    x = x.detach()
    expected = q(x)[0]  # plain inputs in grad mode
    assert not expected.requires_grad
    with torch.no_grad():
        assert torch.equal(q(x.requires_grad_())[0], expected)
    with torch.inference_mode():
        assert torch.equal(q(x)[0], expected)


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


@pytest.mark.parametrize("bad", ["dtype", "input_size", "dims", "hidden_size", "hx_dims"])
def test_bad_input_raises_as_nn_lstm(bad):
    lstm = nn.LSTM(4, 5)
    q = Q.quantize_dynamic(lstm)
    x, hx = torch.randn(3, 2, 4), None
    if bad == "dtype":
        x = x.double()
    elif bad == "input_size":
        x = torch.randn(3, 2, 7)
    elif bad == "dims":
        x = torch.randn(3, 2, 4, 1)
    elif bad == "hidden_size":
        hx = (torch.zeros(1, 3, 5), torch.zeros(1, 3, 5))
    elif bad == "hx_dims":
        hx = (torch.zeros(2, 5), torch.zeros(2, 5))
    with torch.no_grad():
        expected = _error_of(lambda: lstm(x, hx))
        got = _error_of(lambda: q(x, hx))
    assert expected is not None and got is not None
    assert got[0] is expected[0]
    # "dims": nn.LSTM names itself "LSTM" there, as rnnfast does; "dtype":
    # an nn.LSTM older than torch 2.13 words it differently (utils.OLD_NN_LSTM)
    if bad != "dims" and not (bad == "dtype" and OLD_NN_LSTM):
        assert got[1] == expected[1]


def test_the_op_refuses_a_weight_that_is_not_packed():
    q = Q.quantize_dynamic(rnnfast.LSTM(70, 5))
    b = q._buffers
    args = [torch.randn(2, 1, 70), torch.zeros(1, 5), torch.zeros(1, 5),
            b["weight_hh_l0_packed"], b["weight_ih_l0_scale"],  # wrong weight: depth 5
            b["weight_hh_l0_packed"], b["weight_hh_l0_scale"], None, None, None, None, None,
            False]
    with pytest.raises(RuntimeError, match="packed_ih must be the packed int8 CPU weight"):
        rnnfast._quantized_ops.quantized_lstm_forward(*args)


# ---- custom-op machinery ------------------------------------------------------

def test_opcheck():
    q = Q.quantize_dynamic(rnnfast.LSTM(6, 8, proj_size=3))
    b = q._buffers
    args = (torch.randn(3, 2, 6), torch.zeros(2, 3), torch.randn(2, 8),
            b["weight_ih_l0_packed"], b["weight_ih_l0_scale"], b["weight_hh_l0_packed"],
            b["weight_hh_l0_scale"], b["bias_ih_l0"], b["bias_hh_l0"],
            b["weight_hr_l0_packed"], b["weight_hr_l0_scale"], None, True)
    torch.library.opcheck(torch.ops.rnnfast.quantized_lstm_forward.default, args)
    torch.library.opcheck(torch.ops.rnnfast.quantized_pack_weight.default,
                          (torch.randint(-127, 128, (9, 5), dtype=torch.int8),))
    torch.library.opcheck(torch.ops.rnnfast.quantized_linear.default,
                          (torch.randn(20, 6), b["weight_ih_l0_packed"], b["weight_ih_l0_scale"],
                           b["bias_ih_l0"]))
    ln = Q.quantize_dynamic(make_float("LayerNormLSTM", 6, 8))
    b = ln._buffers
    args = (torch.randn(3, 2, 6), torch.zeros(2, 8), torch.randn(2, 8),
            b["weight_ih_l0_packed"], b["weight_ih_l0_scale"], b["weight_hh_l0_packed"],
            b["weight_hh_l0_scale"], b["bias_ih_l0"], b["bias_hh_l0"],
            *[b[f"{n}_l0"] for n in rnnfast.functional._LN_NAMES], None, False, 1e-5)
    torch.library.opcheck(torch.ops.rnnfast.quantized_layer_norm_lstm_forward.default, args)


def test_opcheck_stacked_ops():
    for kind, cfg in [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=5)),
                      ("LayerNormLSTM", dict(num_layers=2, bidirectional=True))]:
        q = Q.quantize_dynamic(make_float(kind, 6, 8, **cfg))
        P = q.proj_size or 8
        args = (torch.randn(3, 2, 6), torch.randn(4, 2, P), torch.randn(4, 2, 8),
                q._op_arguments(), 2, True, None)
        if kind == "LSTM":
            torch.library.opcheck(torch.ops.rnnfast.quantized_lstm_stack.default, args)
        else:
            torch.library.opcheck(torch.ops.rnnfast.quantized_layer_norm_lstm_stack.default,
                                  args + (1e-5,))


def test_stacked_op_refuses_a_wrong_number_of_weights_or_states():
    q = Q.quantize_dynamic(rnnfast.LSTM(6, 8, 2))
    args = q._op_arguments()
    x, h = torch.randn(3, 2, 6), torch.zeros(2, 2, 8)
    with pytest.raises(RuntimeError, match=r"expected 16 weights \(8 per layer and direction\), "
                                           r"got 15"):
        rnnfast._quantized_ops.quantized_lstm_stack(x, h, h, args[:-1], 2, False, None)
    with pytest.raises(RuntimeError, match="with 4 states"):
        rnnfast._quantized_ops.quantized_lstm_stack(x, h, h, args + args, 2, True, None)
    with pytest.raises(RuntimeError, match="packed_ih must be a tensor, got None"):
        rnnfast._quantized_ops.quantized_lstm_stack(x, h, h, [None] + args[1:], 2, False, None)


@pytest.mark.parametrize("width", [5, 7, 64])
def test_ops_refuse_an_input_of_another_width_than_the_weight_was_packed_for(width):
    """A packed weight pads its inputs to a multiple of 64, so its size
    alone fits any width up to that: the ops check the width it was packed
    for (6 here), where a narrower input was read past its rows and a wider
    one's extra features silently multiplied by the padding's zeros."""
    ops = rnnfast._quantized_ops
    w = ops.quantized_pack_weight(torch.ones(4, 6, dtype=torch.int8))
    assert ops.quantized_linear(torch.randn(2, 6), w, torch.ones(4)).shape == (2, 4)
    with pytest.raises(RuntimeError, match=rf"packed was packed for 6 inputs, but its input "
                                           rf"has {width}"):
        ops.quantized_linear(torch.randn(2, width), w, torch.ones(4))
    q = Q.quantize_dynamic(rnnfast.LSTM(6, 8, 2))
    h = torch.zeros(2, 2, 8)
    with pytest.raises(RuntimeError, match=rf"rnnfast.quantized_lstm_\w+: packed_ih was "
                                           rf"packed for 6 inputs, but its input has {width}"):
        ops.quantized_lstm_stack(torch.randn(3, 2, width), h, h, q._op_arguments(), 2, False,
                                 None)


def test_torch_compile_fullgraph_inference():
    q = Q.quantize_dynamic(make_float("LayerNormLSTM", num_layers=2, bidirectional=True))
    x = torch.randn(5, 3, 13)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], q(x)[0], rtol=0, atol=0)


# ---- the int8 benchmark -------------------------------------------------------

def test_int8_benchmark_rows():
    """The harness's int8 comparison on tiny cases: every implementation
    timed on the same weights, ratios against torch.ao and float32, the
    weights about 4x smaller."""
    from rnnfast.bench.int8 import BASELINE, Int8Case, run_int8

    cases = [Int8Case(3, 2, 32), Int8Case(1, 1, 32, 2, decode=True)]
    rows = run_int8(cases, rounds=1, min_run_time=0.01, threads=1)
    assert len(rows) == 2 * 5
    for case in ("T=3 B=2 I=H=32", "T=1 B=1 I=H=32 L=2 decode"):
        by = {r.impl: r for r in rows if r.case == case}
        assert by[BASELINE].speedup_vs_torch_ao == 1.0
        assert by["rnnfast.LSTM float32"].rel_error == 0.0
        for name in ("rnnfast.quantized.LSTM int8", "rnnfast.quantized.LayerNormLSTM int8"):
            assert by[name].median_ms > 0 and 0 < by[name].rel_error < 0.1
        ratio = by["rnnfast.LSTM float32"].state_dict_bytes / by[
            "rnnfast.quantized.LSTM int8"].state_dict_bytes
        assert ratio > 2.5  # 4x for large layers; headers and biases weigh at 32


def test_packing_refuses_a_depth_whose_sums_would_overflow():
    rnnfast._quantized_ops.quantized_pack_weight(torch.ones(1, 65536, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="at most 65536 inputs"):
        rnnfast._quantized_ops.quantized_pack_weight(torch.ones(1, 65537, dtype=torch.int8))


def test_an_input_off_the_cpu_is_refused_clearly():
    """The int8 kernels are CPU kernels: any other device (a CUDA tensor, or
    here a meta tensor, which takes the same path) gets an error that says so."""
    q = Q.quantize_dynamic(nn.LSTM(5, 6))
    with pytest.raises(RuntimeError, match="runs on the CPU only"):
        q(torch.empty(4, 3, 5, device="meta"))
