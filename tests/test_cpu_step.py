"""The CPU LSTM's per-step work: rnnfast's own small-batch recurrent product
(csrc/cpu/step_gemm.h) against the BLAS and a float64 reference, on the
AVX-512 and the AVX2 kernels, the measured choice between them, and the
step split by batch rows over the threads (cpu_backend.cpp)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import rnnfast
from rnnfast import _C
from utils import (TOLERANCES, assert_results_close, forward_backward, make_lstm_pair,
                   random_states, randomize_layer_norm_, upcast)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = rnnfast.build_info()["cpu_step_gemm_kernels"]
needs_kernels = pytest.mark.skipif(KERNELS == "none", reason="this CPU has no AVX2")

# Products checked on each path: rows m up to the candidate's 32, columns n with
# and without a partial last panel (of 16), depths k of 1 and odd ones; the
# largest runs threaded (its weight is >= 512 KiB).
SHAPES = [(m, n, k) for m in (1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 17, 25, 32)
          for n, k in ((512, 128), (20, 5), (37, 33), (64, 1))] + \
         [(m, 1024, 256) for m in (1, 4, 9, 16, 32)]

# The check itself, run here and in a process whose ATen capability is AVX2:
# C = A op(B) + beta C through the step product, against float64.
CHECK = textwrap.dedent("""
    import torch
    from rnnfast import _C

    def check(path, shapes):
        g = torch.Generator().manual_seed(0)
        ran = set()
        for m, n, k in shapes:
            for trans_b in (True, False):
                for beta in (0.0, 1.0):
                    a = torch.randn(m, k + 3, generator=g)[:, :k]  # lda > k
                    b = torch.randn(n, k, generator=g) if trans_b else torch.randn(k, n, generator=g)
                    c = torch.randn(m, n + 5, generator=g)         # ldc > n
                    if beta == 0.0:
                        c[:, :n] = float("nan")  # beta 0 must not read C
                    expected = a.double() @ (b.t() if trans_b else b).double()
                    if beta:
                        expected += c[:, :n].double()
                    before = c.clone()
                    threaded = m * n * k >= 1 << 21 or n * k * 4 >= 512 << 10
                    product = _C._StepProduct(path, m, n, k, b.data_ptr(), b.stride(0), trans_b)
                    assert product.threaded == threaded, (m, n, k)
                    product.multiply(m, a.data_ptr(), a.stride(0), beta, c.data_ptr(),
                                     c.stride(0))
                    ran.add(product.path)
                    err = (c[:, :n].double() - expected).abs().max().item()
                    # float32 rounding of k products and sums of magnitude ~sqrt(k)
                    assert err <= 1e-6 * (k + 4), (path, m, n, k, trans_b, beta, err)
                    assert torch.equal(c[:, n:], before[:, n:]), "wrote past n"
        return sorted(ran)

    def check_once(path, shapes, dtype=torch.float32):
        # C = A B^T (+ bias) + beta C through the product of a weight used
        # once, B [n, k] as stored (row stride ldb > k); in bfloat16, A and
        # B are rounded and there is no bias (the products of bfloat16
        # values are exact in float, so float64 of the same values is the
        # reference either way)
        g = torch.Generator().manual_seed(1)
        ran = set()
        bf16 = dtype == torch.bfloat16
        for m, n, k in shapes:
            for beta in (0.0, 1.0):
                for with_bias in ((False,) if bf16 else (False, True)):
                    a = torch.randn(m, k + 3, generator=g).to(dtype)[:, :k]
                    b = torch.randn(n, k + 2, generator=g).to(dtype)[:, :k]
                    bias = torch.randn(n, generator=g)
                    c = torch.randn(m, n + 5, generator=g)
                    if beta == 0.0:
                        c[:, :n] = float("nan")
                    expected = a.double() @ b.double().t()
                    if with_bias:
                        expected += bias.double()
                    if beta:
                        expected += c[:, :n].double()
                    before = c.clone()
                    operands = (path, m, n, k, a.data_ptr(), a.stride(0), b.data_ptr(),
                                b.stride(0))
                    if bf16:
                        ran.add(_C._one_use_bf16_product(*operands, beta, c.data_ptr(),
                                                         c.stride(0)))
                    else:
                        ran.add(_C._one_use_product(*operands,
                                                    bias.data_ptr() if with_bias else 0,
                                                    beta, c.data_ptr(), c.stride(0)))
                    err = (c[:, :n].double() - expected).abs().max().item()
                    assert err <= 1e-6 * (k + 4), (path, m, n, k, beta, with_bias, err)
                    assert torch.equal(c[:, n:], before[:, n:]), "wrote past n"
        return sorted(ran)
""")
exec(CHECK)  # defines check() and check_once()

# Products of a weight used once: rows m up to the one-use product's 16
# (the AVX-512 tiles take up to 6, the AVX2 ones 4, in blocks), columns n
# below, at and past every tile's width (3 to 8), depths k below, at and past
# a vector (8 floats on AVX2, 16 on AVX-512); the last shapes run threaded
# (their weights are >= 512 KiB).
ONCE_SHAPES = [(m, n, k) for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16)
               for n, k in ((1, 1), (3, 7), (7, 8), (9, 17), (37, 33), (64, 16), (512, 128))] + \
              [(m, 2048, 72) for m in (1, 5, 16)]


@needs_kernels
def test_own_step_product_matches_float64():
    assert check("rnnfast", SHAPES) == [f"rnnfast-{KERNELS}"]  # noqa: F821


def test_blas_step_product_matches_float64():
    ran = check("blas", SHAPES)  # noqa: F821
    assert ran == [rnnfast.build_info()["cpu_gemm"]] or ran == ["unpacked"]


def test_avx2_step_product_matches_float64(tmp_path):
    """The AVX2 kernels of the step product and of the one-use product, in
    a process whose ATen capability is AVX2 (as ATEN_CPU_CAPABILITY=avx2
    caps the pointwise kernels)."""
    if KERNELS not in ("AVX512", "AVX2"):
        pytest.skip("this CPU has no AVX2")
    script = tmp_path / "avx2_check.py"
    script.write_text(CHECK + textwrap.dedent(f"""
        import rnnfast
        print(rnnfast.build_info()["cpu_step_gemm_kernels"], check("rnnfast", {SHAPES!r}),
              check_once("rnnfast", {ONCE_SHAPES!r}))
    """))
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["AVX2", "['rnnfast-AVX2']", "['rnnfast-AVX2']"]


def test_step_product_refuses_what_it_cannot_run():
    z = torch.zeros(32, 32)
    weight = (32, 32, z.data_ptr(), 32, True)
    with pytest.raises(RuntimeError, match="path must be 'auto', 'blas' or 'rnnfast'"):
        _C._StepProduct("mkl", 2, *weight)
    if KERNELS != "none":
        with pytest.raises(RuntimeError, match="at most 32 rows, got 33"):
            _C._StepProduct("rnnfast", 33, *weight)
    product = _C._StepProduct("auto", 4, *weight)
    with pytest.raises(RuntimeError, match="expected 1 to 4 rows, got 5"):
        product.multiply(5, z.data_ptr(), 32, 0.0, z.data_ptr(), 32)
    with pytest.raises(RuntimeError, match="beta must be 0 or 1, got 0.5"):
        product.multiply(2, z.data_ptr(), 32, 0.5, z.data_ptr(), 32)


def _lstm_results(monkeypatch, path, batch, proj_size=0, hidden=20, steps=6, dtype=torch.float32):
    if path is None:
        monkeypatch.delenv("RNNFAST_CPU_STEP_GEMM", raising=False)
    else:
        monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", path)
    torch.manual_seed(3)
    ours, ref = make_lstm_pair(7, hidden, num_layers=2, bidirectional=True, dtype=dtype,
                               proj_size=proj_size)
    x = torch.randn(steps, batch, 7, dtype=dtype)
    return forward_backward(ours, x), ref, x


@needs_kernels
@pytest.mark.parametrize("proj_size", [0, 6])
def test_lstm_on_each_step_product_matches_float64(monkeypatch, proj_size):
    """The whole LSTM, forward and backward (whose per-step products dh =
    dgates W_hh use the step product too), on either path."""
    for path in ("rnnfast", "blas"):
        ours, ref, x = _lstm_results(monkeypatch, path, batch=5, proj_size=proj_size)
        exact = forward_backward(ref.double(), x.double())
        assert_results_close(upcast(ours), exact, scaled=True, atol=2e-5, rtol=2e-5)


def test_bad_step_product_setting_is_refused(monkeypatch):
    m = rnnfast.LSTM(3, 4)
    monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "fastest")
    with pytest.raises(RuntimeError, match="RNNFAST_CPU_STEP_GEMM must be 'auto', 'blas' or "
                                           "'rnnfast', got 'fastest'"):
        m(torch.randn(2, 1, 3))


@needs_kernels
def test_choice_is_measured_once_per_shape_and_reported(monkeypatch):
    """Unforced, the first packed product of a shape times both paths and
    keeps the faster; build_info lists it, and the same shape again reuses
    the choice."""
    def entries():
        return [c for c in rnnfast.build_info()["cpu_step_gemm"]
                if (c["m"], c["n"], c["k"]) == (3, 4 * 23, 23)]

    assert entries() == []
    monkeypatch.delenv("RNNFAST_CPU_STEP_GEMM", raising=False)
    # the whole batch's product (groups would measure a thread's rows: below)
    monkeypatch.setenv("RNNFAST_CPU_ROW_GROUPS", "0")
    m = rnnfast.LSTM(4, 23).eval()
    with torch.inference_mode():
        m(torch.randn(5, 3, 4))
        m(torch.randn(5, 3, 4))
    (c,) = entries()
    assert c["threaded"] is False
    assert c["blas_us"] > 0 and c["rnnfast_us"] > 0
    faster = f"rnnfast-{KERNELS}" if c["rnnfast_us"] < c["blas_us"] else \
        rnnfast.build_info()["cpu_gemm"]
    assert c["chosen"] == faster


def test_deterministic_mode_runs_the_blas_unmeasured(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) no product is chosen
    by timing (a choice that could differ between runs): the BLAS's runs,
    and nothing is measured or listed."""
    monkeypatch.delenv("RNNFAST_CPU_STEP_GEMM", raising=False)
    monkeypatch.setenv("RNNFAST_CPU_ROW_GROUPS", "0")  # the whole batch's
    shape = (3, 4 * 27, 27)

    def entries():
        return [c for c in rnnfast.build_info()["cpu_step_gemm"]
                if (c["m"], c["n"], c["k"]) == shape]

    torch.manual_seed(0)
    m = rnnfast.LSTM(4, 27).eval()
    x = torch.randn(6, 3, 4)
    monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "blas")
    with torch.inference_mode():
        want = m(x)[0]
    monkeypatch.delenv("RNNFAST_CPU_STEP_GEMM")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.inference_mode():
            got = m(x)[0]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert entries() == []
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with torch.inference_mode():  # outside it, the shape is measured as before
        m(x)
    # (where rnnfast has no product of its own, nothing is ever measured)
    assert len(entries()) == (0 if KERNELS == "none" else 1)


def test_one_step_call_measures_nothing(monkeypatch):
    """A one-step call (streaming decode) runs its product unpacked and
    never pays for packing or measuring."""
    monkeypatch.delenv("RNNFAST_CPU_STEP_GEMM", raising=False)
    before = len(rnnfast.build_info()["cpu_step_gemm"])
    m = rnnfast.LSTM(4, 29).eval()
    with torch.inference_mode():
        m(torch.randn(1, 2, 4))
    assert len(rnnfast.build_info()["cpu_step_gemm"]) == before


# ---- Products of a weight used once ------------------------------------------

@needs_kernels
def test_one_use_product_matches_float64():
    assert check_once("rnnfast", ONCE_SHAPES) == [f"rnnfast-{KERNELS}"]  # noqa: F821
    # what an op runs: rnnfast's for up to 16 rows, the BLAS's beyond
    assert check_once("auto", ONCE_SHAPES) == [f"rnnfast-{KERNELS}"]  # noqa: F821
    assert check_once("auto", [(17, 40, 9)]) == [rnnfast.build_info()["cpu_gemm"]]  # noqa: F821


def test_blas_one_use_product_matches_float64():
    ran = check_once("blas", ONCE_SHAPES[::5])  # noqa: F821
    assert ran == [rnnfast.build_info()["cpu_gemm"]]


def test_one_use_product_refuses_what_it_cannot_run():
    z = torch.zeros(32, 32)
    p = z.data_ptr()
    with pytest.raises(RuntimeError, match="path must be 'auto', 'blas' or 'rnnfast'"):
        _C._one_use_product("mkl", 2, 32, 32, p, 32, p, 32, 0, 0.0, p, 32)
    with pytest.raises(RuntimeError, match="at most 16 rows, got 17"):
        _C._one_use_product("rnnfast", 17, 32, 32, p, 32, p, 32, 0, 0.0, p, 32)
    with pytest.raises(RuntimeError, match="beta must be 0 or 1, got 0.5"):
        _C._one_use_product("auto", 2, 32, 32, p, 32, p, 32, 0, 0.5, p, 32)
    with pytest.raises(RuntimeError, match="positive sizes"):
        _C._one_use_product("auto", 2, 32, 0, p, 32, p, 32, 0, 0.0, p, 32)


@needs_kernels
def test_one_use_product_is_the_same_on_any_threads():
    """Split over the threads by columns, every element is the same sum in
    the same order as on one thread."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 72, generator=g), torch.randn(2048, 72, generator=g)
    outs = []
    previous = torch.get_num_threads()
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            c = torch.empty(5, 2048)
            _C._one_use_product("rnnfast", 5, 2048, 72, a.data_ptr(), 72, b.data_ptr(), 72, 0,
                                0.0, c.data_ptr(), 2048)
        finally:
            torch.set_num_threads(previous)
        outs.append(c)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def one_use_products() -> int:
    return rnnfast.build_info()["cpu_one_use_products"]


@needs_kernels
@pytest.mark.parametrize("cls,proj_size", [(rnnfast.LSTM, 0), (rnnfast.LSTM, 5),
                                           (rnnfast.LayerNormLSTM, 0)])
def test_one_step_call_runs_the_one_use_product(cls, proj_size, monkeypatch):
    """A one-step call with its state carried (streaming decode), forward
    and backward: each layer and direction runs its input projection, its
    recurrent product (and its projection's) on the one-use product, and
    the results match float64 as the BLAS's do."""
    monkeypatch.delenv("RNNFAST_CPU_STEP_GEMM", raising=False)
    torch.manual_seed(4)
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=proj_size)
    if cls is rnnfast.LayerNormLSTM:
        kwargs.pop("proj_size")
    ours = cls(7, 11, **kwargs)
    if cls is rnnfast.LayerNormLSTM:
        randomize_layer_norm_(ours)
    x = torch.randn(1, 3, 7)
    out_size = proj_size or 11
    state = random_states(2, 2, out_size, 11, dtype=torch.float32, batch=3)
    before = one_use_products()
    got = forward_backward(ours, x, state)
    per_layer = 3 if proj_size else 2
    assert one_use_products() - before == 2 * 2 * per_layer
    exact = forward_backward(copy.deepcopy(ours).double(), x.double(),
                             tuple(s.double() for s in state))
    assert_results_close(upcast(got), exact, scaled=True, atol=2e-5, rtol=2e-5)
    # the BLAS's products, forced
    monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "blas")
    before = one_use_products()
    blas = forward_backward(ours, x, state)
    assert one_use_products() == before
    assert_results_close(upcast(blas), exact, scaled=True, atol=2e-5, rtol=2e-5)


def _bf16_one_use_product_runs() -> bool:
    z = torch.zeros(4, dtype=torch.bfloat16)
    c = torch.zeros(4)
    try:
        _C._one_use_bf16_product("rnnfast", 1, 1, 1, z.data_ptr(), 1, z.data_ptr(), 1, 0.0,
                                 c.data_ptr(), 1)
    except RuntimeError as e:
        assert "needs AVX512-BF16" in str(e)
        return False
    return True


BF16_ONE_USE = _bf16_one_use_product_runs()
needs_bf16_one_use = pytest.mark.skipif(not BF16_ONE_USE,
                                        reason="this CPU has no AVX512-BF16 (or ATen's "
                                               "capability is below AVX512)")


# rows up to the bfloat16 product's 4; depths odd and around its 32-element
# vectors (pairs of k per float lane); the last shape runs threaded
BF16_ONCE_SHAPES = [(m, n, k) for m in (1, 2, 3, 4)
                    for n, k in ((1, 1), (5, 7), (7, 31), (9, 33), (37, 64), (64, 65),
                                 (512, 128))] + [(3, 2048, 130)]


@needs_bf16_one_use
def test_bf16_one_use_product_matches_float64():
    ours = ["rnnfast-AVX512-BF16"]
    assert check_once("rnnfast", BF16_ONCE_SHAPES, torch.bfloat16) == ours  # noqa: F821
    assert check_once("auto", BF16_ONCE_SHAPES, torch.bfloat16) == ours  # noqa: F821
    # more rows: MKL's bfloat16 GEMM
    assert check_once("auto", [(5, 40, 9)], torch.bfloat16) != ours  # noqa: F821
    with pytest.raises(RuntimeError, match="at most 4 rows, got 5"):
        check_once("rnnfast", [(5, 40, 9)], torch.bfloat16)  # noqa: F821


def test_bf16_blas_one_use_product_matches_float64():
    ran = check_once("blas", BF16_ONCE_SHAPES[::4], torch.bfloat16)  # noqa: F821
    assert "rnnfast-AVX512-BF16" not in ran


@needs_bf16_one_use
@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.LayerNormLSTM])
def test_bf16_one_step_call_runs_the_one_use_product(cls, monkeypatch):
    """A native-bfloat16 one-step call of at most 4 rows: its input and
    recurrent products per layer and direction run on the bfloat16 one-use
    product, and give what MKL's products give, to bfloat16's rounding."""
    monkeypatch.delenv("RNNFAST_CPU_STEP_GEMM", raising=False)
    monkeypatch.delenv("RNNFAST_CPU_NATIVE_BF16", raising=False)
    torch.manual_seed(5)
    m = cls(24, 32, num_layers=2, bidirectional=True).to(torch.bfloat16).eval()
    x = torch.randn(1, 3, 24, dtype=torch.bfloat16)
    state = random_states(2, 2, 32, 32, dtype=torch.bfloat16, batch=3)
    with torch.inference_mode():
        before = one_use_products()
        got = m(x, state)
        assert one_use_products() - before == 2 * 2 * 2
        monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "blas")
        before = one_use_products()
        want = m(x, state)
        assert one_use_products() == before
    for g, w in zip((got[0], *got[1]), (want[0], *want[1])):
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


@needs_kernels
@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.LayerNormLSTM])
@pytest.mark.parametrize("input_size,hidden,batch", [(7, 11, 3), (24, 40, 1), (33, 17, 16),
                                                     (5, 9, 17)])
def test_bf16_one_step_call_in_float_reads_its_weights_in_place(cls, input_size, hidden,
                                                                 batch, monkeypatch):
    """A bfloat16 op that computes in float (RNNFAST_CPU_NATIVE_BF16=0, as
    on a CPU without bfloat16 instructions) keeps the weights of a one-step
    evaluating call in bfloat16, read in place by the one-use products (the
    input projection and the recurrent product of each direction), instead
    of converting them at every call: what the float op gives on the same
    values, bit for bit (each weight element widened exactly as loaded, every
    sum in the same order), at depths and widths below and past a vector.
    Beyond the one-use product's 16 rows, and with the BLAS forced, the
    weights are converted as before: the same as the float op again."""
    monkeypatch.setenv("RNNFAST_CPU_NATIVE_BF16", "0")
    monkeypatch.delenv("RNNFAST_CPU_STEP_GEMM", raising=False)
    torch.manual_seed(6)
    ours = cls(input_size, hidden, bidirectional=True)
    if cls is rnnfast.LayerNormLSTM:
        randomize_layer_norm_(ours)
    ours = ours.to(torch.bfloat16).eval()
    in_float = copy.deepcopy(ours).float()
    x = torch.randn(1, batch, input_size).to(torch.bfloat16)
    state = tuple(torch.randn(2, batch, hidden).to(torch.bfloat16) for _ in range(2))
    weight_shapes = [list(p.shape) for p in ours.parameters() if p.dim() == 2]
    for path in ("auto", "blas"):
        if path == "blas":
            monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "blas")
        with torch.inference_mode():
            before = one_use_products()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        record_shapes=True) as prof:
                got = ours(x, state)
            ran = one_use_products() - before
            want = in_float(x.float(), tuple(s.float() for s in state))
        in_place = path == "auto" and batch <= 16
        assert ran == (2 * 2 if in_place else 0)
        # the weights converted to float (a copy each, by ATen or, small
        # as these are, by the op's own loop) or not
        converted = [e.input_shapes[0] for e in prof.events()
                     if e.name in ("aten::_to_copy", "rnnfast::convert") and e.input_shapes
                     and e.input_shapes[0] in weight_shapes]
        assert len(converted) == (0 if in_place else 4), (path, converted)
        for name, g, w in zip(("output", "h", "c"), (got[0], *got[1]), (want[0], *want[1])):
            assert g.dtype == torch.bfloat16
            assert torch.equal(g, w.to(torch.bfloat16)), (path, name)


def test_bf16_weights_read_in_place_by_the_avx2_kernels():
    """The same on the AVX2 kernels, in a process whose ATen capability is
    AVX2, on a CPU whose default kernels are AVX-512."""
    if KERNELS != "AVX512":
        pytest.skip("the kernels in use are already the AVX2 ones, or none")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{os.path.abspath(__file__)}::test_bf16_one_step_call_in_float_reads_its_weights_in_place"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b8 passed\b", proc.stdout.splitlines()[-1]), proc.stdout[-500:]


# ---- The step split by batch rows -------------------------------------------

def split_case(cls, hidden, batch, steps, training, zoneout, packed):
    """A float32 layer of `hidden` units over 6 inputs (bidirectional when
    packed, with zoneout when asked, random LayerNorm parameters), its input
    [steps, batch, 6] and initial states."""
    kwargs = dict(zoneout_cell=0.3, zoneout_hidden=0.2) if zoneout else {}
    torch.manual_seed(5)
    m = cls(6, hidden, bidirectional=packed, **kwargs).train(training)
    if cls is rnnfast.LayerNormLSTM:
        randomize_layer_norm_(m)
    x = torch.randn(steps, batch, 6)
    hx = random_states(1, 2 if packed else 1, hidden, hidden, dtype=torch.float32,
                       batch=batch)
    return m, x, hx


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.LayerNormLSTM])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("zoneout", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_row_split_step_matches_one_thread(cls, training, zoneout, packed, monkeypatch):
    """At 64 rows and two threads the forward and backward steps of either
    cell run split by batch rows (each thread its rows' product and cell, or
    its rows' pointwise backward and dh product); on one thread they are
    not split.
    Both give the same outputs, states and gradients to float32 rounding, with
    zoneout's masks (training: the same draw, which does not depend on the
    threads) or rates (evaluation) applied to the right rows. Packed, the
    steps shrink from 64 to 16 rows, and the reverse direction reads some
    rows' previous state from c_0 (rows_from_previous)."""
    m, x, hx = split_case(cls, 16, 64, 4, training, zoneout, packed)
    monkeypatch.setenv("RNNFAST_CPU_ROW_SPLIT", "16")  # from 2 x 16 rows on
    monkeypatch.setenv("RNNFAST_CPU_ROW_GROUPS", "0")  # which groups replace
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            torch.manual_seed(11)
            lengths = [4] * 16 + [3] * 16 + [2] * 16 + [1] * 16 if packed else None
            results.append(forward_backward(m, x, hx, lengths=lengths, backward=training))
    finally:
        torch.set_num_threads(threads)
    assert_results_close(*results, scaled=True, **TOLERANCES[torch.float32])


# ---- The input projection in blocks of steps ------------------------------------

@pytest.mark.parametrize("steps", [130, 330])
@pytest.mark.parametrize("packed", [False, True])
def test_blocked_input_projection_matches_nn_lstm(packed, steps):
    """Evaluating with a small input weight, the CPU projects the input about
    1 MiB of gates at a time, just before those steps (4096 rows at H=16):
    130 steps of 64 rows span two or three blocks, 330 steps four to six,
    where the input weight is packed once for all blocks (at the second),
    in both directions, padded or packed (whose blocks hold different
    numbers of steps)."""
    ours, ref = make_lstm_pair(8, 16, bidirectional=True, dtype=torch.float32, seed=7)
    x = torch.randn(steps, 64, 8)
    lengths = None
    if packed:
        lengths = sorted(torch.randint(steps * 4 // 5, steps + 1, (64,)).tolist(), reverse=True)
        lengths[0] = steps
    with torch.no_grad():
        got = forward_backward(ours, x, lengths=lengths, backward=False)
        want = forward_backward(ref, x, lengths=lengths, backward=False)
    assert_results_close(got, want, **TOLERANCES[torch.float32])


# ---- Small batches: the steps split over a team of threads ----------------------

def team_runs() -> int:
    return sum(rnnfast.build_info()["cpu_step_teams"].values())


@pytest.mark.skipif(KERNELS == "none", reason="the team splits rnnfast's own product (AVX2)")
@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.LayerNormLSTM])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("zoneout", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_team_step_matches_no_team(cls, training, zoneout, packed, monkeypatch):
    """At 4 rows and H=128 on two threads, each step's recurrent product is
    split by columns and its pointwise kernel by rows over a team of threads
    held for the whole time loop (cpu/step_team.h); RNNFAST_CPU_STEP_TEAM=0
    runs the same steps on one thread. Both give the same outputs, states
    and gradients to float32 rounding (the team's run uses rnnfast's own
    product from the first step, and the bias and LayerNorm parameter
    gradient sums are kept per part), with zoneout's masks or rates on the right rows; packed, the
    steps shrink from 4 rows to 1 and the reverse direction starts some rows
    from the initial state. A time loop held a team on each call."""
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no team")
    # a team splits rnnfast's own product where it is the shape's choice;
    # row groups would take all but the LSTM's forward
    monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "rnnfast")
    monkeypatch.setenv("RNNFAST_CPU_ROW_GROUPS", "0")
    m, x, hx = split_case(cls, 128, 4, 7, training, zoneout, packed)
    lengths = [7, 5, 3, 1] if packed else None
    results = []
    for team in ("1", "0"):
        monkeypatch.setenv("RNNFAST_CPU_STEP_TEAM", team)
        before = team_runs()
        torch.manual_seed(11)
        results.append(forward_backward(m, x, hx, lengths=lengths, backward=training))
        ran = team_runs() - before
        directions = 2 if packed else 1
        assert ran == (directions * (2 if training else 1) if team == "1" else 0)
    assert_results_close(*results, scaled=True, **TOLERANCES[torch.float32])


@pytest.mark.skipif(KERNELS == "none", reason="the team splits rnnfast's own product (AVX2)")
def test_team_over_blocks_of_input_projection_matches_nn_lstm(monkeypatch):
    """Evaluating at 4 rows and H=128, the input is projected 512 rows (about
    1 MiB of gates) at a time: 300 steps are three blocks, each block's
    steps one time loop with a team of its own, between the projections."""
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no team")
    monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "rnnfast")
    ours, ref = make_lstm_pair(8, 128, bidirectional=True, dtype=torch.float32, seed=7)
    x = torch.randn(300, 4, 8)
    before = team_runs()
    with torch.no_grad():
        got = forward_backward(ours, x, backward=False)
        want = forward_backward(ref, x, backward=False)
    assert team_runs() - before == 2 * 3
    assert_results_close(got, want, **TOLERANCES[torch.float32])


@pytest.mark.skipif(KERNELS == "none", reason="the team splits rnnfast's own product (AVX2)")
@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.LayerNormLSTM])
def test_team_of_more_threads_than_cores_matches_no_team(cls, monkeypatch):
    """With 8 torch threads (more than this machine's cores, as when other
    processes hold them) a team of 8 splits each step of B=4 H=256: its
    helpers are often not running when their parts are posted, so the lead
    takes those parts back, and lets go of a helper that missed 32 in a
    row. The results are those of the steps on one thread, to float32
    rounding, and the run ends. With 12 threads at B=16 H=144 the team
    has 9 threads: as many as the units' and the backward's column panels
    (144 / 16), though the product's multiply-adds would have kept 10
    busy."""
    monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "rnnfast")
    monkeypatch.setenv("RNNFAST_CPU_ROW_GROUPS", "0")
    torch.manual_seed(3)
    m = cls(8, 256)
    if cls is rnnfast.LayerNormLSTM:
        randomize_layer_norm_(m)
    x = torch.randn(40, 4, 8)
    threads = torch.get_num_threads()
    results = []
    try:
        torch.set_num_threads(8)
        for team in ("1", "0"):
            monkeypatch.setenv("RNNFAST_CPU_STEP_TEAM", team)
            before = rnnfast.build_info()["cpu_step_teams"].get(8, 0)
            results.append(forward_backward(m, x, backward=True))
            ran = rnnfast.build_info()["cpu_step_teams"].get(8, 0) - before
            assert ran == (2 if team == "1" else 0)
        monkeypatch.setenv("RNNFAST_CPU_STEP_TEAM", "1")
        torch.set_num_threads(12)
        before = rnnfast.build_info()["cpu_step_teams"].get(9, 0)
        forward_backward(cls(8, 144), torch.randn(3, 16, 8), backward=True)
        assert rnnfast.build_info()["cpu_step_teams"].get(9, 0) - before == 2
    finally:
        torch.set_num_threads(threads)
    assert_results_close(*results, scaled=True, **TOLERANCES[torch.float32])


@pytest.mark.skipif(KERNELS == "none", reason="the team splits rnnfast's own product (AVX2)")
@pytest.mark.parametrize("setting", ["blas", "deterministic"])
def test_no_team_where_the_blas_runs_the_steps(setting, monkeypatch):
    """A team splits rnnfast's own product only: with the BLAS's forced
    (RNNFAST_CPU_STEP_GEMM=blas), or under deterministic algorithms (where
    the BLAS runs unmeasured), the same B=4 H=128 loop holds no team."""
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no team")
    monkeypatch.setenv("RNNFAST_CPU_ROW_GROUPS", "0")  # the backward's
    m = rnnfast.LSTM(8, 128)
    x = torch.randn(6, 4, 8)
    before = team_runs()
    if setting == "blas":
        monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "blas")
        forward_backward(m, x, backward=True)
    else:
        monkeypatch.delenv("RNNFAST_CPU_STEP_GEMM", raising=False)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            forward_backward(m, x, backward=True)
        finally:
            torch.use_deterministic_algorithms(deterministic)
    assert team_runs() == before
    monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "rnnfast")
    forward_backward(m, x, backward=True)
    assert team_runs() == before + 2


# ---- The batch's rows in groups, each group's time loop on its own thread --------

def group_runs(groups: int) -> int:
    return rnnfast.build_info()["cpu_row_groups"].get(groups, 0)


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.LayerNormLSTM])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("zoneout", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_row_groups_match_one_thread(cls, training, zoneout, packed, monkeypatch):
    """With three threads, a batch of 5 rows runs in three groups of rows
    ([0, 1), [1, 3), [3, 5)), each group's whole time loop on its own thread
    with no exchange between them; on one thread the same steps run whole.
    Both give the same outputs, states and gradients to float32 rounding,
    with zoneout's masks or rates on the right rows and the bias and
    LayerNorm parameter gradient sums kept per group. Packed, the steps shrink from 5 rows to
    1, so that a group has fewer rows or none at some steps, and the
    reverse direction starts some rows from the initial state. Three
    threads on fewer cores only share them: no group waits for another."""
    m, x, hx = split_case(cls, 32, 5, 7, training, zoneout, packed)
    lengths = [7, 6, 4, 2, 1] if packed else None
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (3, 1):
            torch.set_num_threads(n)
            before = group_runs(3)
            torch.manual_seed(11)
            results.append(forward_backward(m, x, hx, lengths=lengths, backward=training))
            directions = 2 if packed else 1
            assert group_runs(3) - before == (directions * (2 if training else 1) if n == 3
                                              else 0)
    finally:
        torch.set_num_threads(threads)
    assert_results_close(*results, scaled=True, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.LayerNormLSTM])
def test_row_groups_of_every_dtype_match_no_groups(dtype, cls, monkeypatch):
    """Groups run every weight type's product on their own threads: float64
    through the BLAS, bfloat16 through rnnfast's AMX product or MKL's
    bfloat16 GEMM (on CPUs with bfloat16 instructions) or in float32. Two
    threads, B=6, H=32, training: the same results as with
    RNNFAST_CPU_ROW_GROUPS=0, which runs no group (bfloat16: to a few of
    its rounding steps, as the parameter gradient sums add up per group)."""
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no groups")
    m, x, hx = split_case(cls, 32, 6, 9, True, False, False)
    m = m.to(dtype)
    x = x.to(dtype)
    hx = tuple(h.to(dtype) for h in hx)
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("RNNFAST_CPU_ROW_GROUPS", setting)
        before = group_runs(2)
        results.append(forward_backward(m, x, hx, backward=True))
        assert group_runs(2) - before == (2 if setting == "1" else 0)
    tolerance = (TOLERANCES[dtype] if dtype == torch.float64
                 else dict(atol=2e-2, rtol=2e-2))
    assert_results_close(*results, scaled=True, **tolerance)


def test_row_groups_over_blocks_of_steps(monkeypatch):
    """An evaluating LSTM at B=8 and H=128 projects its input 512 rows at a
    time (64 steps), and the LayerNorm-LSTM's backward here keeps blocks of
    1024 rows (128 steps, RNNFAST_CPU_GRAD_BLOCK_ROWS): 300 steps are five
    blocks of the first and three of the second, each block's steps one
    time loop in groups, between the blocks' products. The LSTM matches
    nn.LSTM; the LayerNorm-LSTM its run without groups."""
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no groups")
    monkeypatch.setenv("RNNFAST_CPU_GRAD_BLOCK_ROWS", "1024")
    ours, ref = make_lstm_pair(8, 128, dtype=torch.float32, seed=7)
    x = torch.randn(300, 8, 8)
    before = group_runs(2)
    with torch.no_grad():
        got = forward_backward(ours, x, backward=False)
        want = forward_backward(ref, x, backward=False)
    assert group_runs(2) - before == 5
    assert_results_close(got, want, **TOLERANCES[torch.float32])
    m = randomize_layer_norm_(rnnfast.LayerNormLSTM(8, 128))
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("RNNFAST_CPU_ROW_GROUPS", setting)
        before = group_runs(2)
        results.append(forward_backward(m, x, backward=True))
        assert group_runs(2) - before == (1 + 3 if setting == "1" else 0)
    assert_results_close(*results, scaled=True, **TOLERANCES[torch.float32])


def test_no_row_groups_where_each_thread_would_read_too_much(monkeypatch):
    """A group's thread reads all of W_hh at every step, so below the row
    split's batch groups run only where that fits half the L2 cache (at
    most 1 MiB on the Xeon) and each group has a row for every 256 KiB of
    it: not at B=2 with H=256 (a 1 MiB weight, one row a group), nor with a
    projection (whose product the driver runs for each whole step); at B=8
    with H=32 they do."""
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no groups")
    monkeypatch.setenv("RNNFAST_CPU_STEP_TEAM", "0")
    before = sum(rnnfast.build_info()["cpu_row_groups"].values())
    forward_backward(rnnfast.LSTM(8, 256), torch.randn(5, 2, 8), backward=True)
    forward_backward(rnnfast.LSTM(8, 32, proj_size=16), torch.randn(5, 8, 8),
                     backward=True)
    assert sum(rnnfast.build_info()["cpu_row_groups"].values()) == before
    forward_backward(rnnfast.LSTM(8, 32), torch.randn(5, 8, 8), backward=True)
    assert sum(rnnfast.build_info()["cpu_row_groups"].values()) == before + 2


def test_row_groups_replace_the_row_split_whatever_the_weight(monkeypatch):
    """Where the row split would run a loop's steps (B=32: 16 rows a thread
    of two), each of its threads reads the whole W_hh at every step, so
    groups run there whatever the weight's size (H=512: 4 MiB, more than
    half of any L2 here), with the results of the split
    (RNNFAST_CPU_ROW_GROUPS=0); with the split off (RNNFAST_CPU_ROW_SPLIT=0)
    the cache bound refuses them."""
    if torch.get_num_threads() != 2:
        pytest.skip("two torch threads: a group of 16 rows each")
    monkeypatch.setenv("RNNFAST_CPU_STEP_TEAM", "0")
    torch.manual_seed(5)
    m = rnnfast.LSTM(8, 512)
    x = torch.randn(3, 32, 8)
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("RNNFAST_CPU_ROW_GROUPS", setting)
        before = group_runs(2)
        results.append(forward_backward(m, x, backward=True))
        assert group_runs(2) - before == (2 if setting == "1" else 0)
    assert_results_close(*results, scaled=True, **TOLERANCES[torch.float32])
    monkeypatch.setenv("RNNFAST_CPU_ROW_GROUPS", "1")
    monkeypatch.setenv("RNNFAST_CPU_ROW_SPLIT", "0")
    before = group_runs(2)
    forward_backward(m, x, backward=True)
    assert group_runs(2) == before


@needs_kernels
def test_split_loops_choose_the_product_by_a_threads_rows(monkeypatch):
    """In a loop split by rows (row groups here: B=64 on two threads) each
    product has 32 rows and runs on its thread, so the one-time choice
    between the BLAS's product and rnnfast's own is measured at that shape
    ([32, k] x [k, n], not threaded), for the forward's and the backward's
    weight alike, and the own product is a candidate though the batch has
    64 rows (more than its 32). Forced, the own product then runs there,
    and the LSTM matches nn.LSTM."""
    if torch.get_num_threads() != 2:
        pytest.skip("the split's rows are those of two threads")
    hidden = 72  # a shape no other test measures: its choice is made here
    ours, ref = make_lstm_pair(8, hidden, dtype=torch.float32, seed=2)
    x = torch.randn(6, 64, 8)
    forward_backward(ours, x, backward=True)
    measured = {(c["m"], c["n"], c["k"], c["threaded"])
                for c in rnnfast.build_info()["cpu_step_gemm"]}
    assert (32, 4 * hidden, hidden, False) in measured
    assert (32, hidden, 4 * hidden, False) in measured
    monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "rnnfast")
    got = forward_backward(ours, x, backward=True)
    want = forward_backward(ref, x, backward=True)
    assert_results_close(got, want, scaled=True, **TOLERANCES[torch.float32])


# ---- The bias gradient, summed by the backward steps ---------------------------

@pytest.mark.parametrize("path", ["one thread", "row groups", "row split", "team",
                                  "projection"])
def test_bias_gradient_is_the_sum_of_the_gate_gradients(path, monkeypatch):
    """The CPU's backward steps add their rows' gate gradients to per-task
    sums (as the LayerNorm-LSTM's steps add its parameter sums), in place of
    a reduction over every step's gradients afterwards. With an input whose
    first feature is 1 at every step, the gradient of W_ih's first column is
    the same sum computed by the weight-gradient GEMM instead: the two must
    agree whichever way the steps ran (a row group, a thread of the per-step
    row split, a team's part, or the whole step on the calling thread), in
    both directions of a packed batch whose steps lose rows."""
    monkeypatch.setenv("RNNFAST_CPU_ROW_GROUPS", "1" if path == "row groups" else "0")
    monkeypatch.setenv("RNNFAST_CPU_STEP_TEAM", "1" if path == "team" else "0")
    monkeypatch.setenv("RNNFAST_CPU_ROW_SPLIT", "16" if path == "row split" else "0")
    threads = torch.get_num_threads()
    if path in ("row groups", "row split", "team") and threads < 2:
        pytest.skip("one torch thread: the steps are not split")
    if path == "team":
        if KERNELS == "none":
            pytest.skip("the team splits rnnfast's own product (AVX2)")
        monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "rnnfast")
    # teams take float weights only; the other paths are checked in float64
    dtype = torch.float32 if path == "team" else torch.float64
    hidden, batch = {"row groups": (32, 5), "row split": (16, 64), "team": (128, 4)}.get(
        path, (24, 6))
    torch.manual_seed(3)
    m = rnnfast.LSTM(6, hidden, bidirectional=True,
                     proj_size=8 if path == "projection" else 0).to(dtype)
    x = torch.randn(7, batch, 6, dtype=dtype)
    x[..., 0] = 1.0
    lengths = sorted(torch.randint(1, 8, (batch,)).tolist(), reverse=True)
    lengths[0] = 7
    before_groups = sum(rnnfast.build_info()["cpu_row_groups"].values())
    before_teams = team_runs()
    try:
        if path == "one thread":
            torch.set_num_threads(1)
        res = forward_backward(m, x, lengths=lengths, backward=True)
    finally:
        torch.set_num_threads(threads)
    ran_groups = sum(rnnfast.build_info()["cpu_row_groups"].values()) - before_groups
    ran_teams = team_runs() - before_teams
    assert (ran_groups > 0) == (path == "row groups")
    assert (ran_teams > 0) == (path == "team")
    for suffix in ("", "_reverse"):
        column = res[f"grad.weight_ih_l0{suffix}"][:, 0]
        for bias in ("bias_ih", "bias_hh"):
            got = res[f"grad.{bias}_l0{suffix}"]
            scale = res[f"grad.weight_ih_l0{suffix}"].abs().max().item()
            tolerance = 1e-12 if dtype == torch.float64 else 2e-6
            assert (got - column).abs().max().item() <= tolerance * scale * batch * 7, \
                (path, suffix, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_backward_blocks_hold_about_8_mib(dtype, monkeypatch):
    """The LayerNorm-LSTM's CPU backward keeps its gradients w.r.t. both
    products (2 x 4H values a row, in the GEMMs' dtype) for blocks of about
    8 MiB, 1024-4096 rows: at H=128, 2048 rows in float32 and 4096 in
    bfloat16 where its GEMMs run in bfloat16 (else in float32). B=8 over
    300 steps (2400 rows) is then two blocks or one, each block's steps one
    time loop in row groups (counted); RNNFAST_CPU_GRAD_BLOCK_ROWS=1024
    makes it three, 0 is refused."""
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no groups")
    m = randomize_layer_norm_(rnnfast.LayerNormLSTM(8, 128)).to(dtype)
    x = torch.randn(300, 8, 8, dtype=dtype)
    native = dtype == torch.bfloat16 and rnnfast.build_info()["cpu_native_bfloat16"]

    def backward_loops():
        before = group_runs(2)
        forward_backward(m, x, backward=True)
        return group_runs(2) - before - 1  # the forward is one loop
    assert backward_loops() == (1 if native else 2)
    monkeypatch.setenv("RNNFAST_CPU_GRAD_BLOCK_ROWS", "1024")
    assert backward_loops() == 3
    monkeypatch.setenv("RNNFAST_CPU_GRAD_BLOCK_ROWS", "0")
    with pytest.raises(RuntimeError, match="RNNFAST_CPU_GRAD_BLOCK_ROWS"):
        forward_backward(m, x, backward=True)
