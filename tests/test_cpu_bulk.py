"""The CPU's float32 products over many rows (the input projection, the
backward's input and weight gradients: csrc/cpu/blas.h, bulk_product): on
oneDNN or on the BLAS, chosen once per process by timing both, forced by
RNNFAST_CPU_BULK_GEMM, never chosen by timing under deterministic
algorithms or below float32 matmul precision "highest"."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rnnfast
from utils import (TOLERANCES, assert_results_close, forward_backward, make_layer_norm_lstm_pair,
                   make_lstm_pair, profiled_calls, upcast)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bulk() -> dict:
    return rnnfast.build_info()["cpu_bulk_gemm"]


def onednn_runs() -> tuple[bool, str]:
    """Whether oneDNN's float32 matmul runs here (forced, a tiny LSTM's
    projection goes through it unless it cannot), and why not."""
    old = os.environ.get("RNNFAST_CPU_BULK_GEMM")
    os.environ["RNNFAST_CPU_BULK_GEMM"] = "onednn"
    try:
        rnnfast.LSTM(3, 4)(torch.randn(40, 8, 3))  # past the one-use products
        info = bulk()
    finally:
        if old is None:
            del os.environ["RNNFAST_CPU_BULK_GEMM"]
        else:
            os.environ["RNNFAST_CPU_BULK_GEMM"] = old
    return info["chosen"] == "onednn", info["why"]


def each_path():
    """The settings to run: the BLAS, and oneDNN where it runs."""
    runs, _ = onednn_runs()
    return ["blas", "onednn"] if runs else ["blas"]


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.LayerNormLSTM])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("proj_size", [0, 5])
def test_products_on_each_path_match_float64(cls, packed, proj_size, monkeypatch):
    """Forward and backward of two bidirectional layers, padded or packed
    (whose weight gradients take the previous outputs in one or two
    products per block), against float64: every bulk product (x W_ih^T,
    dG W_ih, dG^T x, dG^T h) on the BLAS and on oneDNN."""
    if cls is rnnfast.LayerNormLSTM and proj_size:
        pytest.skip("the LayerNorm-LSTM has no proj_size")
    kwargs = dict(num_layers=2, bidirectional=True)
    if proj_size:
        kwargs["proj_size"] = proj_size
    pair = make_lstm_pair if cls is rnnfast.LSTM else make_layer_norm_lstm_pair
    ours, ref = pair(7, 12, dtype=torch.float32, seed=4, **kwargs)
    x = torch.randn(9, 6, 7)
    lengths = [9, 8, 8, 5, 3, 1] if packed else None
    exact = forward_backward(ref.double(), x.double(), lengths=lengths)
    for path in each_path():
        monkeypatch.setenv("RNNFAST_CPU_BULK_GEMM", path)
        got = forward_backward(ours, x, lengths=lengths)
        assert bulk()["chosen"] == ("onednn" if path == "onednn" else
                                    rnnfast.build_info()["cpu_gemm"])
        assert_results_close(upcast(got), exact, scaled=True, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("steps", [130, 330])
def test_blocked_input_projection_on_each_path_matches_nn_lstm(steps, monkeypatch):
    """Evaluating with a small input weight, the projection runs in blocks
    of about 1 MiB of gates (4096 rows at H=16), over two to six blocks;
    with oneDNN each block is its own product instead of a packed W_ih's."""
    ours, ref = make_lstm_pair(8, 16, bidirectional=True, dtype=torch.float32, seed=7)
    x = torch.randn(steps, 64, 8)
    with torch.no_grad():
        want = forward_backward(ref, x, backward=False)
        for path in each_path():
            monkeypatch.setenv("RNNFAST_CPU_BULK_GEMM", path)
            got = forward_backward(ours, x, backward=False)
            assert_results_close(got, want, **TOLERANCES[torch.float32])


def test_bad_setting_is_refused(monkeypatch):
    m = rnnfast.LSTM(3, 4)
    monkeypatch.setenv("RNNFAST_CPU_BULK_GEMM", "fastest")
    with pytest.raises(RuntimeError,
                       match="RNNFAST_CPU_BULK_GEMM must be auto, blas or onednn, not 'fastest'"):
        m(torch.randn(40, 8, 3))  # more rows than a one-use product takes


def test_forced_onednn_where_it_cannot_run_is_the_blas(monkeypatch):
    """Forced where oneDNN's float32 matmul cannot run (no AVX-512, or a
    torch without the function), the BLAS runs and build_info says why."""
    runs, why = onednn_runs()
    if runs:
        pytest.skip("oneDNN's float32 matmul runs on this CPU")
    assert why
    monkeypatch.setenv("RNNFAST_CPU_BULK_GEMM", "onednn")
    ours, ref = make_lstm_pair(5, 8, dtype=torch.float32, seed=2)
    x = torch.randn(4, 3, 5)
    assert_results_close(forward_backward(ours, x), forward_backward(ref, x),
                         **TOLERANCES[torch.float32])
    assert bulk()["chosen"] == rnnfast.build_info()["cpu_gemm"]


# The first bulk product of a fresh process: it measures, reports, and
# leaves the caller's random numbers alone.
FIRST_CALL = textwrap.dedent("""
    import json, os, torch, rnnfast
    os.environ.pop("RNNFAST_CPU_BULK_GEMM", None)
    before = rnnfast.build_info()["cpu_bulk_gemm"]
    torch.manual_seed(0)
    m = rnnfast.LSTM(6, 10)
    x = torch.randn(7, 3, 6)
    state = torch.get_rng_state()
    m(x)
    print(json.dumps({"before": before, "after": rnnfast.build_info()["cpu_bulk_gemm"],
                      "cpu_gemm": rnnfast.build_info()["cpu_gemm"],
                      "rng_unmoved": bool(torch.equal(torch.get_rng_state(), state))}))
""")


def test_choice_is_measured_once_and_reported():
    """In a fresh process nothing is chosen before the first bulk product;
    that product times both (unless oneDNN cannot run), keeps oneDNN only if
    10% faster, reports both times, and draws no random numbers."""
    env = {k: v for k, v in os.environ.items() if k != "RNNFAST_CPU_BULK_GEMM"}
    out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"]["chosen"] is None
    after = r["after"]
    assert r["rng_unmoved"]
    if after["onednn_us"] > 0:
        assert after["blas_us"] > 0
        faster = after["onednn_us"] < 0.9 * after["blas_us"]
        assert after["chosen"] == ("onednn" if faster else r["cpu_gemm"])
        assert after["why"] == ("measured faster" if faster else "not measured 10% faster")
    else:
        assert after["chosen"] == r["cpu_gemm"] and after["why"]


def test_deterministic_mode_and_lower_precision_run_the_blas(monkeypatch):
    """No choice by timing under deterministic algorithms, and no oneDNN
    product below float32 matmul precision "highest" (ATen's would round to
    bfloat16 there): unforced, the BLAS's products run, the same bits as
    with the BLAS forced in the same mode."""
    torch.manual_seed(0)
    m = rnnfast.LSTM(6, 10)
    x = torch.randn(7, 3, 6, requires_grad=True)

    def both():
        monkeypatch.setenv("RNNFAST_CPU_BULK_GEMM", "blas")
        want = forward_backward(m, x)
        monkeypatch.delenv("RNNFAST_CPU_BULK_GEMM")
        return forward_backward(m, x), want

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got, want = both()
        assert bulk()["why"] == "deterministic algorithms"
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_results_close(got, want, atol=0, rtol=0)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        got, want = both()
        assert bulk()["why"] == "float32 matmul precision below highest"
        assert bulk()["chosen"] == rnnfast.build_info()["cpu_gemm"]
    finally:
        torch.set_float32_matmul_precision(precision)
    assert_results_close(got, want, atol=0, rtol=0)


def _onednn_products(fn) -> int:
    return profiled_calls(fn, ("rnnfast::onednn_matmul",))


def test_small_products_of_packed_batches_stay_on_the_blas(monkeypatch):
    """oneDNN builds a kernel for each new shape of product, and a packed
    batch's products change shape with the sum of its lengths: unforced,
    its products under 2e8 FLOPs stay on the BLAS, call after call, and
    larger ones run on oneDNN; a padded batch's (whose shapes depend on its
    steps and batch only) run on oneDNN whatever their size. Forced, every
    product runs on oneDNN."""
    from torch.nn.utils.rnn import pack_padded_sequence

    monkeypatch.delenv("RNNFAST_CPU_BULK_GEMM", raising=False)
    rnnfast.LSTM(3, 4)(torch.randn(40, 8, 3))  # the choice, made once
    if bulk()["chosen"] != "onednn":
        pytest.skip(f"the BLAS runs the bulk products here ({bulk()['why']})")
    torch.manual_seed(0)
    small = rnnfast.LSTM(9, 13)   # x W_ih^T: [<= 150, 9] x [9, 52]
    x = torch.randn(50, 3, 9)
    packed = pack_padded_sequence(x, [50, 47, 30])
    assert _onednn_products(lambda: small(packed)) == 0
    assert _onednn_products(lambda: small(packed)) == 0
    assert _onednn_products(lambda: small(x)) == 1
    monkeypatch.setenv("RNNFAST_CPU_BULK_GEMM", "onednn")
    assert _onednn_products(lambda: small(packed)) == 1
    monkeypatch.delenv("RNNFAST_CPU_BULK_GEMM")
    large = rnnfast.LSTM(512, 512)  # [1601, 512] x [512, 2048]: 3.4e9 FLOPs
    big = pack_padded_sequence(torch.randn(2, 801, 512), [2] * 800 + [1])
    assert _onednn_products(lambda: large(big)) == 1


def test_identical_calls_give_identical_bits(monkeypatch):
    """Unforced, the same call twice in a fresh process (products of new
    shapes, padded and packed) gives the same bits, forward and backward."""
    monkeypatch.delenv("RNNFAST_CPU_BULK_GEMM", raising=False)
    code = textwrap.dedent("""
        import torch, rnnfast
        torch.manual_seed(0)
        from torch.nn.utils.rnn import pack_padded_sequence
        for cls, (i, h, t, b) in [(rnnfast.LSTM, (9, 13, 50, 3)),
                                  (rnnfast.LayerNormLSTM, (64, 96, 40, 64))]:
          for packed in (False, True):
            m = cls(i, h, bidirectional=True)
            x = torch.randn(t, b, i)
            runs = []
            for _ in range(2):
                xx = x.clone().requires_grad_()
                inp = pack_padded_sequence(xx, [t] + [t - 1] * (b - 1)) if packed else xx
                y = m(inp)[0]
                y = y.data if packed else y
                y.backward(torch.ones_like(y))
                runs.append([y.detach().clone(), xx.grad] +
                            [p.grad.clone() for p in m.parameters()])
                m.zero_grad()
            assert all(torch.equal(p, q) for p, q in zip(*runs)), (cls, packed)
        print("same")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "same", out.stderr[-2000:]
