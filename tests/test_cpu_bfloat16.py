"""bfloat16 LSTMs and LayerNorm-LSTMs on the CPU.

Where the CPU has AMX-BF16 (and AVX512-BF16) and torch's
BLAS is MKL, a bfloat16 op runs its GEMMs in bfloat16 with float
accumulation (MKL's cblas_gemm_bf16bf16f32, and rnnfast's AMX product for
the per-step ones) and keeps the hidden states and the gradients w.r.t. the
products in bfloat16, the gates, cell states, statistics and saved
activations in float; elsewhere it computes in float.
``RNNFAST_CPU_NATIVE_BF16`` (read at every call) forces either path, so
both run here on every x86 CPU: MKL's bfloat16 GEMM also runs where the CPU
lacks the instructions, only slower.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys

import pytest
import torch

import rnnfast
from rnnfast import _C
from rnnfast.reference import ReferenceLSTM
from test_lstm import NO_ONEDNN_BF16_LSTM
from test_regularisers import check_zoneout_in_bfloat16
from utils import CELLS, assert_error_within_twice, float64_twin, forward_backward

VARIABLE = "RNNFAST_CPU_NATIVE_BF16"


def _mkl_bfloat16_gemm() -> bool:
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        return hasattr(ctypes.CDLL(lib), "cblas_gemm_bf16bf16f32")
    except OSError:
        return False


HAS_MKL_BF16 = _mkl_bfloat16_gemm()
needs_mkl = pytest.mark.skipif(not HAS_MKL_BF16,
                               reason="torch's BLAS has no bfloat16 GEMM here (not MKL)")
# Both paths; "1" only where MKL's bfloat16 GEMM exists.
PATHS = pytest.mark.parametrize("native", ["0", pytest.param("1", marks=needs_mkl)],
                                ids=["float", "native"])


def _cpu_has(flag: str) -> bool:
    """Whether the CPU has ``flag`` (cpuinfo's name, as /proc/cpuinfo's)."""
    caps = getattr(torch._C._cpu, "_get_cpu_capability", None)
    if caps is not None:
        return bool(caps().get(flag, False))
    with open("/proc/cpuinfo") as f:
        return f" {flag}" in f.read()


def test_native_path_follows_the_cpu_and_the_variable(monkeypatch):
    """Native where the CPU has AVX512-BF16 and rnnfast's AMX-BF16 product
    runs (without AMX, MKL's bfloat16 GEMM ran no faster than its float one
    on an AMD EPYC Zen 5, half the float path's speed)."""
    monkeypatch.delenv(VARIABLE, raising=False)
    monkeypatch.delenv("RNNFAST_CPU_STEP_GEMM", raising=False)
    expected = (HAS_MKL_BF16 and torch.backends.cpu.get_cpu_capability() == "AVX512"
                and _cpu_has("avx512_bf16")
                and rnnfast.build_info()["cpu_bf16_step_gemm"] == "rnnfast-AMX-BF16")
    assert rnnfast.build_info()["cpu_native_bfloat16"] is expected
    monkeypatch.setenv(VARIABLE, "0")
    assert rnnfast.build_info()["cpu_native_bfloat16"] is False
    if HAS_MKL_BF16:
        monkeypatch.setenv(VARIABLE, "1")
        assert rnnfast.build_info()["cpu_native_bfloat16"] is True


def test_bad_setting_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv(VARIABLE, "yes")
    model = rnnfast.LSTM(4, 6).bfloat16()
    with pytest.raises(RuntimeError, match=f"{VARIABLE} must be 0 or 1, got 'yes'"):
        model(torch.randn(3, 2, 4, dtype=torch.bfloat16))


@needs_mkl
def test_paths_differ_only_for_bfloat16(monkeypatch):
    """The variable switches a bfloat16 model's path (its hidden states are
    rounded to bfloat16 between steps on one path only) and leaves float32
    and float16 alone."""
    torch.manual_seed(0)
    x = torch.randn(20, 4, 16)

    def run(model, dtype):
        out = {}
        for native in ("0", "1"):
            monkeypatch.setenv(VARIABLE, native)
            with torch.no_grad():
                out[native] = model.to(dtype)(x.to(dtype))[0]
        return out

    for model in (rnnfast.LSTM(16, 32, num_layers=2), rnnfast.LayerNormLSTM(16, 32)):
        bf16 = run(model, torch.bfloat16)
        assert not torch.equal(bf16["0"], bf16["1"]), type(model).__name__
        torch.testing.assert_close(bf16["0"].float(), bf16["1"].float(), atol=3e-2, rtol=0)
        for dtype in (torch.float32, torch.float16):
            out = run(model, dtype)
            assert torch.equal(out["0"], out["1"]), (type(model).__name__, dtype)


@needs_mkl
@pytest.mark.parametrize("cell", CELLS, ids=repr)
def test_native_rounds_the_hidden_state_to_nearest_even(monkeypatch, cell):
    """One step from a zero state with one input feature: every product is
    exact, so the two paths differ only in where h is rounded to bfloat16,
    in the step kernel (native) or by Tensor.to after it (float). They must
    agree bitwise: round to nearest even, full vectors and a tail (H=70),
    and a NaN input's row NaN."""
    torch.manual_seed(4)
    model = cell.module(1, 70).bfloat16()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)  # values across many binades
    x = torch.randn(1, 33, 1).bfloat16()
    x[0, 5] = float("nan")
    out = {}
    for native in ("0", "1"):
        monkeypatch.setenv(VARIABLE, native)
        with torch.no_grad():
            out[native] = model(x)[0]
    nan = out["1"].isnan()
    assert nan[0, 5].all() and not nan[0, 6].any()
    assert torch.equal(nan, out["0"].isnan())
    assert torch.equal(out["0"][~nan].view(torch.int16), out["1"][~nan].view(torch.int16))


@needs_mkl
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_other_simd_levels_convert_alike(capability):
    """The step kernels convert between float and bfloat16 in a form per
    SIMD level (AVX-512 and AVX2 registers, a scalar loop), and the other
    tests run only this CPU's best. Here the rounding test above and a
    native training run with tails at every vector width (H=40 with a
    projection of 6, zoneout's accumulating backward) run again under
    ATEN_CPU_CAPABILITY=<level>, in a subprocess."""
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2",
                                                                                "AVX512"):
        pytest.skip("this CPU has no AVX2")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(tests), env.get("PYTHONPATH")) if p)
    select = ("rounds_the_hidden_state or (zoneout_in_bfloat16 and native and H40)")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(tests, "test_cpu_bfloat16.py"), "-k", select],
                          env=env, cwd=os.path.dirname(tests), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout, proc.stdout[-1000:]


def _every_value(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 16-bit ``dtype``; for float32 the special
    values, each binade's boundaries, ties of both 16-bit roundings (the
    low 16 and low 13 bits exactly half way, with even and odd kept bits),
    subnormals, values past float16's range, and random bit patterns (NaN
    payloads among them)."""
    if dtype != torch.float32:
        return torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2 ** 31), 2 ** 31 - 1, (20000,), generator=g,
                                dtype=torch.int64).to(torch.int32)
    kept = torch.randint(0, 2 ** 15, (2000,), generator=g, dtype=torch.int32)
    ties = torch.cat([(kept << 16) | 0x8000, (kept << 13) | 0x1000])
    special = torch.tensor([0.0, 1.0, float("inf"), float("nan"), 1e-40, 1e-45, 3.4e38,
                            65504.0, 65519.99, 65520.0, 6e-8, 2.0 ** -24, 2.0 ** -25,
                            2.0 ** -14, 1.0 + 2.0 ** -8, 1.0 + 2.0 ** -11],
                           dtype=torch.float32)
    special = torch.cat([special, -special, 2.0 ** torch.arange(-149, 128).float()])
    return torch.cat([special, random_bits.view(torch.float32), ties.view(torch.float32),
                      -ties.view(torch.float32)])


@pytest.mark.parametrize("to", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_op_conversions_are_atens(source, to):
    """What an op reads or returns in another dtype (a bfloat16 op computing
    in float converts its input, states and biases and its results) is
    converted by the op's own loop up to 32768 elements and by ATen beyond:
    the same bits as ATen's conversion for every value (a NaN a NaN),
    rounding to nearest even where it narrows."""
    if source == to:
        pytest.skip("no conversion")
    values = _every_value(source)
    names = str(source)[6:], str(to)[6:]  # "float32", ...
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}[to]
    for start in range(0, values.numel(), 32768):
        chunk = values[start:start + 32768].contiguous()
        got = torch.empty(chunk.numel(), dtype=to)
        own = _C._op_conversion(chunk.data_ptr(), names[0], got.data_ptr(), names[1],
                                chunk.numel())
        assert own, chunk.numel()
        want = chunk.to(to)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), (source, to)
        assert torch.equal(got[~nan].view(bits), want[~nan].view(bits)), (source, to)
    beyond = torch.randn(32769).to(source)
    got = torch.empty(beyond.numel(), dtype=to)
    assert not _C._op_conversion(beyond.data_ptr(), names[0], got.data_ptr(), names[1],
                                 beyond.numel())
    assert torch.equal(got.view(bits), beyond.to(to).view(bits))


def _pytorch_bfloat16_results(ref, x, hx, run):
    """The reference module's results in bfloat16 (nn.LSTM, or for the
    LayerNorm-LSTM the plain-PyTorch reference), or the plain-PyTorch
    reference's where oneDNN has no bfloat16 LSTM for this CPU."""
    try:
        return forward_backward(ref, x, hx, **run)
    except RuntimeError as e:
        if NO_ONEDNN_BF16_LSTM not in str(e):
            raise
    plain = ReferenceLSTM(ref.input_size, ref.hidden_size, num_layers=ref.num_layers,
                          bidirectional=ref.bidirectional, proj_size=ref.proj_size)
    plain.load_state_dict(ref.state_dict())
    return forward_backward(plain.bfloat16(), x, hx, **run)


def _amx_expected() -> bool:
    """Whether rnnfast's AMX product must run here: the CPU has AMX-BF16,
    Linux can grant the tiles (5.16+) and ATEN_CPU_CAPABILITY caps nothing."""
    release = tuple(int(p) for p in platform.release().split(".")[:2] if p.isdigit())
    return (_cpu_has("amx_bf16") and release >= (5, 16)
            and torch.backends.cpu.get_cpu_capability() == "AVX512"
            and os.environ.get("ATEN_CPU_CAPABILITY") != "avx512")


@needs_mkl
def test_step_product_follows_the_cpu_and_the_variable(monkeypatch):
    """rnnfast's AMX product where the CPU has AMX-BF16, MKL's bfloat16
    GEMM elsewhere or when the BLAS is forced."""
    monkeypatch.delenv("RNNFAST_CPU_STEP_GEMM", raising=False)
    expected = "rnnfast-AMX-BF16" if _amx_expected() else "mkl-bf16"
    assert rnnfast.build_info()["cpu_bf16_step_gemm"] == expected
    monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", "blas")
    assert rnnfast.build_info()["cpu_bf16_step_gemm"] == "mkl-bf16"


# (m, n, k, trans_b, max_rows): odd and even numbers of 16-column blocks,
# row tiles full, paired and with tails, one row; a product large enough to
# be split by column blocks over the threads (2M multiply-adds and up); a
# shape the AMX product does not take (MKL's, on either path).
PRODUCTS = [(37, 48, 64, True, 40), (33, 96, 32, False, 33), (16, 64, 128, True, 16),
            (1, 16, 32, True, 4), (32, 1024, 256, True, 32), (5, 40, 40, True, 8)]


@needs_mkl
@pytest.mark.parametrize("path", ["auto", "blas"])
@pytest.mark.parametrize("m,n,k,trans_b,max_rows", PRODUCTS)
def test_step_product_against_float64(path, m, n, k, trans_b, max_rows):
    """The per-step product on a bfloat16 weight, as a time loop runs it
    (first product unpacked, later ones packed), against float64 on the
    same bfloat16 values: A rows and C rows with strides wider than the
    product and at an offset, beta 0 and 1, rows fewer than the most."""
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    b = torch.randn((n, k + 3) if trans_b else (k, n + 5), generator=g).bfloat16()
    op_b = (b[:, :k].t() if trans_b else b[:, :n]).double()
    product = _C._Bf16StepProduct(path, max_rows, n, k, b.data_ptr(), b.stride(0), trans_b)
    a = torch.randn(m + 2, k + 32, generator=g).bfloat16()
    a_view = a[2:, 8:8 + k]  # lda = k + 32, offset
    c = torch.randn(m + 1, n + 16, generator=g)
    c_view = c[1:, 16:]  # ldc = n + 16, offset
    for use, beta in enumerate((0.0, 1.0, 0.0, 1.0)):
        before = c.clone()
        product.multiply(m, a_view.data_ptr(), a.stride(0), beta, c_view.data_ptr(),
                         c.stride(0))
        expected = a_view.double() @ op_b + beta * before[1:, 16:].double()
        torch.testing.assert_close(c_view.double(), expected, rtol=1e-5, atol=1e-5 * k ** 0.5,
                                   msg=lambda msg: f"use {use}, beta {beta}: {msg}")
        untouched = torch.ones_like(c, dtype=torch.bool)
        untouched[1:, 16:] = False
        assert torch.equal(c[untouched], before[untouched]), "wrote outside C"
    amx = path == "auto" and _amx_expected() and n % 16 == 0 and k % 32 == 0
    assert product.path == ("rnnfast-AMX-BF16" if amx else "mkl-bf16")


# (steps, batch, input = hidden size, lengths of a packed batch): H=96 takes
# the AMX product forward and backward (depth a multiple of 32, width of
# 16), an even number of column blocks, and its input projections (360 rows:
# 12 passes of 32, split by rows on up to 3 threads) too; H=48 only backward (depth 4H), with
# an odd number of blocks (3), 37 rows; H=64 at B=40 forward split by rows
# over the threads, and with the LSTM's projection of 32 its products too.
SHAPES = {"H96": (30, 12, 96, [(7 * i) % 30 + 1 for i in range(12)]),
          "H48-B37": (9, 37, 48, [(5 * i) % 9 + 1 for i in range(37)]),
          "H64-B40": (6, 40, 64, [(5 * i) % 6 + 1 for i in range(40)])}


# The LSTM with and without a projection, the LayerNorm-LSTM (none).
MODELS = pytest.mark.parametrize("cell,proj", [(CELLS[0], 0), (CELLS[0], 32), (CELLS[1], 0)],
                                 ids=["lstm", "lstm-proj", "layer_norm_lstm"])


@PATHS
@pytest.mark.parametrize("step_gemm", ["auto", "blas"])
@pytest.mark.parametrize("layout", ["padded", "packed_unsorted"])
@MODELS
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bfloat16_training_within_twice_pytorch(monkeypatch, native, step_gemm, layout, cell,
                                                proj, shape):
    """A bfloat16 model (two bidirectional layers) at sizes where the
    per-step products have many terms: every output and gradient is at most
    twice as far from a float64 run (same rounded weights and inputs) as
    PyTorch's own bfloat16 run (nn.LSTM, or the plain-PyTorch
    LayerNorm-LSTM), on either path and with either per-step product of the
    native path."""
    if native == "0" and step_gemm == "blas":
        pytest.skip("the float path's products are tested elsewhere")
    monkeypatch.setenv(VARIABLE, native)
    monkeypatch.setenv("RNNFAST_CPU_STEP_GEMM", step_gemm)
    T, B, n, packed_lengths = SHAPES[shape]
    ours, ref = cell.make_pair(n, n, num_layers=2, bidirectional=True, dtype=torch.bfloat16,
                               **cell.kwargs(proj_size=proj))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, n, generator=g).bfloat16()
    out = proj or n
    hx = (torch.randn(4, B, out, generator=g).bfloat16(),
          torch.randn(4, B, n, generator=g).bfloat16())
    lengths = None if layout == "padded" else packed_lengths
    run = dict(lengths=lengths, enforce_sorted=False)
    got = forward_backward(ours, x, hx, **run)
    pytorch = _pytorch_bfloat16_results(ref, x, hx, run)
    exact = forward_backward(float64_twin(ref), x.double(), tuple(h.double() for h in hx),
                             **run)
    assert_error_within_twice(got, pytorch, exact, torch.bfloat16)


@PATHS
@pytest.mark.parametrize("cell", CELLS, ids=repr)
def test_bfloat16_inference_and_streaming_agree_with_training(monkeypatch, native, cell):
    """Evaluation gives the training forward's values exactly; one step per
    call with the state carried (streaming decode, one-row products) agrees
    to bfloat16's precision (the carried h and c are rounded to bfloat16
    between calls, as nn.LSTM's are)."""
    monkeypatch.setenv(VARIABLE, native)
    torch.manual_seed(3)
    model = cell.module(32, 64, num_layers=2).bfloat16()
    x = torch.randn(12, 1, 32).bfloat16()
    train_out, (h_t, c_t) = model(x)
    with torch.no_grad():
        eval_out, (h_e, c_e) = model.eval()(x)
        state, steps = None, []
        for t in range(x.shape[0]):
            y, state = model(x[t:t + 1], state)
            steps.append(y)
    assert torch.equal(eval_out, train_out.detach())
    assert torch.equal(h_e, h_t.detach()) and torch.equal(c_e, c_t.detach())
    # a few bfloat16 ulps of the largest values (about 1)
    torch.testing.assert_close(torch.cat(steps).float(), eval_out.float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(state[1].float(), c_e.float(), atol=3e-2, rtol=0)


@PATHS
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_blocked_inference_within_twice_pytorch(monkeypatch, native, packed):
    """An evaluating LSTM with a small input weight projects its input a
    block of steps at a time, and over four blocks or more packs that weight
    once for all of them (on the native path, for the AMX product here: I=32,
    4H=64): 330 steps of 64 rows at H=16 are five blocks of 4096 rows and a
    part (packed, at least four). Every output within twice PyTorch's own
    bfloat16 error."""
    monkeypatch.setenv(VARIABLE, native)
    ours, ref = CELLS[0].make_pair(32, 16, bidirectional=True, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(330, 64, 32, generator=g).bfloat16()
    lengths = None
    if packed:
        lengths = sorted(torch.randint(264, 331, (64,), generator=g).tolist(), reverse=True)
        lengths[0] = 330
    run = dict(lengths=lengths, backward=False)
    with torch.no_grad():
        got = forward_backward(ours, x, **run)
        pytorch = forward_backward(ref, x, **run)
        exact = forward_backward(float64_twin(ref), x.double(), **run)
    assert_error_within_twice(got, pytorch, exact, torch.bfloat16)


@PATHS
@pytest.mark.parametrize("cell", CELLS, ids=repr)
@pytest.mark.parametrize("hidden,proj", [(40, 6), (64, 32)], ids=["H40", "H64"])
def test_zoneout_in_bfloat16_within_twice_the_reference(monkeypatch, native, cell, hidden,
                                                        proj):
    """(test_regularisers.check_zoneout_in_bfloat16) H=64 with a projection
    of 32 takes the AMX product where it runs, whose backward adds to the
    zoneout share of dh_{t-1} (beta 1)."""
    monkeypatch.setenv(VARIABLE, native)
    check_zoneout_in_bfloat16(cell, "cpu", hidden=hidden, proj=proj)
