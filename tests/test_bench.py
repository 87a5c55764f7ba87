"""The benchmark harness's logic (rnnfast.bench): argument parsing, cases,
the GEMM floor's plan, activation-memory accounting, the result files'
schema, compare's regression flagging and the README report. Timings are
never asserted: the cases are tiny and measured for a few milliseconds."""

import csv
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rnnfast
from rnnfast.bench import cli
from rnnfast.bench.cases import PRESETS, Case, expand
from rnnfast.bench.compare import classify, compare
from rnnfast.bench import impls as impls_module
from rnnfast.bench.impls import (PRODUCTS, arithmetic_bound, discover, fastest_product,
                                 floor_gemms, make_inputs)
from rnnfast.bench.report import markdown, tables, write_readme
from rnnfast.bench.results import FIELDS, KEY, finalize, load
from rnnfast.bench.suite import _JUDGED_STEPS, Settings, _judged_error, run_suite, tf32_mode
from rnnfast.bench.timing import Timing, saved_bytes, time_runners
from rnnfast.reference import ReferenceLayerNormLSTM

TINY = ["--T", "3", "--B", "2", "--I", "4", "--H", "4", "--min-run-time", "0.001",
        "--warmup", "1", "--inputs", "2", "--device", "cpu"]


# -- parsing and cases --------------------------------------------------------

def test_parse_defaults_and_lists():
    args = cli.parse([])
    assert args.command == "run" and args.grid == "default" and args.out is None
    assert args.mode == ["inference", "training"]
    args = cli.parse(["--quick", "--T", "100", "200", "--B", "4", "64",
                      "--bidirectional", "true", "0", "--dtype", "float32", "bfloat16"])
    assert args.grid == "quick"
    assert args.T == [100, 200] and args.B == [4, 64]
    assert args.bidirectional == [True, False]
    assert args.dtype == ["float32", "bfloat16"]
    assert cli.parse(["run", "--grid", "full"]).grid == "full"
    # the allocator: steady unless asked (rnnfast/bench/allocator.py), int8 alike
    assert args.malloc == "steady" and cli.parse(["int8"]).malloc == "steady"
    assert cli.parse(["--malloc", "default"]).malloc == "default"


@pytest.mark.parametrize("bad", [["--T", "0"], ["--bidirectional", "maybe"],
                                 ["--dtype", "int8"], ["--quick", "--grid", "full"],
                                 ["--mode", "eval"], ["--malloc", "jemalloc"]])
def test_parse_rejects(bad, capsys):
    with pytest.raises(SystemExit):
        cli.parse(bad)


def test_parse_compare_and_report():
    args = cli.parse(["compare", "a.json", "b.json", "--threshold", "2"])
    assert (args.command, str(args.old), str(args.new), args.threshold) == \
        ("compare", "a.json", "b.json", 2.0)
    args = cli.parse(["report", "x", "y"])
    assert args.command == "report" and [str(d) for d in args.dirs] == ["x", "y"]
    assert str(args.output) == "benchmarks/README.md"


def test_default_preset_has_the_required_cases():
    cases = expand(PRESETS["default"], devices=["cpu"])
    for mode in ("inference", "training"):
        assert Case(100, 64, 256, 256, mode=mode) in cases
        assert Case(200, 4, 128, 128, mode=mode) in cases
    # streaming decode: 2 layers, B=1 H=256 and B=8 H=512, one step per call
    assert Case(1, 1, 256, 256, layers=2, decode=True) in cases
    assert Case(1, 8, 512, 512, layers=2, decode=True) in cases
    assert not any(c.decode and c.mode == "training" for c in cases)
    assert len(cases) == len(set(cases))
    # a decode override keeps one direction only: a reverse direction cannot stream
    decode = expand(PRESETS["default"], {"decode": [True]}, devices=["cpu"])
    assert decode and all(c.decode and not c.bidirectional and c.T == 1 for c in decode)


def test_old_results_load_with_the_new_axes():
    folder = (Path(__file__).resolve().parent.parent / "benchmarks" / "results"
              / "cpu-xeon-2threads-2026-11-26")
    if not folder.exists():  # a source distribution leaves the results out
        pytest.skip("the committed benchmark results are not in this tree")
    doc = load(folder)
    assert all(r["tf32"] is False and r["decode"] is False for r in doc["results"])
    assert tables(doc["results"])


def test_overrides_replace_an_axis_and_keep_input_tied():
    groups = [dict(T=[10], B=[2], I=["H"], H=[8, 16]), dict(T=[10], B=[2], I=[5], H=[8])]
    cases = expand(groups, {"H": [32]}, modes=["inference"])
    assert [(c.I, c.H) for c in cases] == [(32, 32), (5, 32)]
    cases = expand(groups, {"I": [3], "H": [32], "B": [1, 4]}, modes=["training"])
    assert [(c.B, c.I, c.H) for c in cases] == [(1, 3, 32), (4, 3, 32)]  # deduplicated
    assert all(c.mode == "training" for c in cases)


def test_full_grid_size():
    cases = expand(PRESETS["full"], modes=["inference"])
    assert len(cases) == 5 * 5 * 4 + 1
    assert Case(100, 64, 512, 512) in cases


def test_impl_selection_keeps_baselines_and_floor():
    args = cli.parse(TINY + ["--impls", "rnnfast.*"])
    _, impls, settings, _ = cli.plan(args)
    names = {i.name for i in impls}
    assert {"torch.nn.LSTM", "reference.LayerNormLSTM", "gemm-floor", "rnnfast.LSTM"} <= names
    assert "reference.LSTM" not in names
    assert settings.min_run_time == 0.001 and settings.warmup == 1 and settings.inputs == 2
    with pytest.raises(SystemExit, match="matches none"):
        cli.plan(cli.parse(TINY + ["--impls", "nope"]))


def test_discover_compile_and_graphs():
    """rnnfast.LayerNormLSTM is always benchmarked; --compile adds the
    compiled reference; CUDA-graph variants only with a CUDA device."""
    assert "torch.compile(reference.LayerNormLSTM)" not in [i.name for i in discover()[0]]
    impls, notes = discover(compile=True)
    names = [i.name for i in impls]
    assert "rnnfast.LayerNormLSTM" in names
    assert "torch.compile(reference.LayerNormLSTM)" in names
    if not torch.cuda.is_available():
        assert not any("cuda-graph" in n for n in names)
        assert any("(cuda-graph): skipped, no CUDA device" in n for n in notes)
        graphed = impls_module._graphed(impls_module._nn_style(rnnfast.LSTM))
        with pytest.raises(impls_module.SkipCase, match="CUDA graphs need a CUDA device"):
            graphed(Case(3, 2, 4, 4), make_inputs(Case(3, 2, 4, 4), 1))


def test_regularisers_add_the_zoneout_family():
    """--regularisers adds a Python loop over nn.LSTMCell with zoneout and
    rnnfast.LSTM with the same zoneout; both run a training case and skip
    what the loop does not cover; off by default."""
    assert not any(i.family == "Zoneout" for i in discover()[0])
    impls = [i for i in discover(regularisers=True)[0] if i.family == "Zoneout"]
    assert [i.name for i in impls] == ["nn.LSTMCell zoneout loop", "rnnfast.LSTM (zoneout)"]
    assert impls[0].is_baseline
    case = Case(4, 2, 3, 5, mode="training")
    inputs = make_inputs(case, 1)
    for impl in impls:
        runner = impl.build(case, inputs)
        assert runner.output is None  # random masks: no agreement check
        runner.step(0)
        assert all(p.grad is not None for p in runner.module.parameters())
        with pytest.raises(impls_module.SkipCase, match="one unidirectional layer"):
            impl.build(Case(4, 2, 3, 5, layers=2), make_inputs(Case(4, 2, 3, 5, layers=2), 1))
    # the loop's zoneout: evaluation is the expectation of training's formula
    loop = impls_module.LSTMCellZoneout(3, 5, 0.5).eval()
    x = torch.randn(1, 2, 3)
    hx = (torch.randn(1, 2, 5), torch.randn(1, 2, 5))
    out, (h, c) = loop(x, hx)
    h_new, c_new = loop.cell(x[0], (hx[0][0], hx[1][0]))
    torch.testing.assert_close(h[0], 0.5 * hx[0][0] + 0.5 * h_new)
    torch.testing.assert_close(c[0], 0.5 * hx[1][0] + 0.5 * c_new)
    args = cli.parse(TINY + ["--regularisers"])
    assert {"nn.LSTMCell zoneout loop", "rnnfast.LSTM (zoneout)"} <= {
        i.name for i in cli.plan(args)[1]}


def test_gpu_preset_has_the_issues_cases():
    cases = expand(PRESETS["gpu"], devices=["cuda"])
    f32 = dict(device="cuda", dtype="float32")
    for mode in ("inference", "training"):
        for tf32 in (False, True):  # float32 both ways
            assert Case(100, 64, 512, 512, **f32, tf32=tf32, mode=mode) in cases
            assert Case(256, 8, 256, 256, **f32, tf32=tf32, mode=mode) in cases
        assert Case(100, 64, 512, 512, device="cuda", dtype="bfloat16", mode=mode) in cases
        assert Case(1024, 16, 768, 768, device="cuda", dtype="bfloat16", mode=mode) in cases
    decode = [c for c in cases if c.decode]
    assert {(c.B, c.H, c.layers, c.T) for c in decode} == {(1, 256, 2, 1), (8, 512, 2, 1)}
    assert all(c.mode == "inference" for c in decode)
    assert not any(c.tf32 and c.dtype != "float32" for c in cases)
    assert len(cases) == len(set(cases))
    # on a CPU the TF32 cases are dropped, not run as something else
    assert not any(c.tf32 for c in expand(PRESETS["gpu"], devices=["cpu"]))


def test_cli_axes_override_the_preset():
    args = cli.parse(["--grid", "gpu", "--device", "cpu", "--dtype", "float64",
                      "--decode", "true", "--H", "8", "--max-time", "5"])
    cases, _, settings, _ = cli.plan(args)
    assert cases and all(c.decode and c.dtype == "float64" and c.H == 8 and c.T == 1
                         for c in cases)
    assert settings.max_time == 5


def test_tf32_mode_sets_both_switches_and_restores():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for allow in (True, False):
        with tf32_mode(allow):
            assert torch.backends.cuda.matmul.allow_tf32 is allow
            assert torch.backends.cudnn.allow_tf32 is allow
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


def test_max_time_stops_before_the_next_case():
    cases = expand(PRESETS["quick"], {"T": [2], "B": [2], "H": [4]}, modes=["inference"])
    impls = [i for i in discover()[0] if i.name == "torch.nn.LSTM"]
    settings = Settings(min_run_time=0.001, warmup=1, inputs=1, max_time=1e-9)
    records, notes = run_suite(cases, impls, settings)
    assert records == []
    assert f"stopped at --max-time 1e-09 s: {len(cases)} of {len(cases)} cases not run" in notes


class _OffLSTM(torch.nn.LSTM):
    """nn.LSTM whose output is off by 1e-3: a wrong implementation."""

    def forward(self, x, hx=None):
        out, state = super().forward(x, hx)
        return out + 1e-3, state


def test_agreement_is_judged_against_float64():
    """Each implementation's output is compared with a float64 copy of the
    family baseline (same weights, same inputs): within twice the baseline's
    own error no note, further off a note with both errors; both errors are
    in the records."""
    cases = expand(PRESETS["quick"], {"T": [30], "B": [3], "H": [8]}, modes=["inference"])
    nn_style = impls_module._nn_style
    impls = [i for i in discover()[0] if i.name in ("torch.nn.LSTM", "rnnfast.LSTM")]
    impls.append(impls_module.Impl("off.LSTM", "LSTM", nn_style(_OffLSTM)))
    records, notes = run_suite(cases, impls, Settings(min_run_time=0.001, warmup=1, inputs=1))
    by = {r["impl"]: r for r in records}
    assert by["rnnfast.LSTM"]["float64_error"] <= 2 * by["rnnfast.LSTM"]["baseline_float64_error"] + 1e-6
    assert by["off.LSTM"]["float64_error"] == pytest.approx(1e-3, rel=1e-2)
    assert by["off.LSTM"]["baseline_float64_error"] < 1e-6
    flagged = [n for n in notes if "against float64" in n]
    assert len(flagged) == len(cases) and all(n.startswith("off.LSTM on") for n in flagged)


def test_judged_error_is_the_rms_of_the_first_steps():
    """The float64 agreement is judged before a chaotic recurrence has
    amplified rounding: late steps do not count, early ones by root mean
    square."""
    exact = torch.randn(40, 3, 8, dtype=torch.float64)
    late = exact.clone()
    late[_JUDGED_STEPS:] += 0.5
    assert _judged_error(late, exact) == 0.0
    one_step = exact.clone()
    one_step[:1] += 1e-3
    assert _judged_error(one_step, exact) == pytest.approx(1e-3 / _JUDGED_STEPS ** 0.5, rel=1e-6)
    decode = exact[:1]
    assert _judged_error(decode + 2e-3, decode) == pytest.approx(2e-3, rel=1e-6)


# -- streaming decode ----------------------------------------------------------

def test_decode_runner_carries_the_state():
    case = Case(1, 2, 3, 4, layers=2, decode=True)
    inputs = make_inputs(case, 2)
    model = torch.nn.LSTM(3, 4, num_layers=2)
    runner = impls_module.decode_runner(model, model, case, inputs)
    runner.step(0)
    runner.step(1)
    with torch.no_grad():
        _, state = model(inputs.x[0], inputs.hx[0])
        _, (h, c) = model(inputs.x[1], state)
    state_tensors = runner.keep[-2:]
    torch.testing.assert_close(state_tensors[0], h)
    torch.testing.assert_close(state_tensors[1], c)
    torch.testing.assert_close(runner.output(0), model(inputs.x[0], inputs.hx[0])[0].detach())


def test_decode_run_end_to_end(tmp_path):
    out = tmp_path / "decode"
    assert cli.main(["--quick", "--decode", "true", "--layers", "2", "--B", "2", "--H", "4",
                     "--min-run-time", "0.001", "--warmup", "1", "--inputs", "2",
                     "--device", "cpu", "--no-plots", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    records = doc["results"]
    assert records and all(r["decode"] and r["T"] == 1 and r["mode"] == "inference"
                           for r in records)
    by = {r["impl"]: r for r in records}
    assert by["rnnfast.LSTM"]["max_abs_diff"] < 1e-5  # one step, nn.LSTM's weights
    assert by["rnnfast.LayerNormLSTM"]["max_abs_diff"] < 1e-5
    assert by["rnnfast.LSTM"]["tokens_per_s"] == pytest.approx(
        2 / (by["rnnfast.LSTM"]["median_ms"] / 1e3))  # B tokens per step
    assert " decode" in tables(records)[0].rows[0][0]


# -- the GEMM floor's products ---------------------------------------------------

def test_fastest_product_is_measured_and_right():
    a, w = torch.randn(4, 16), torch.randn(64, 16)
    out = torch.empty(4, 64)
    product, prepared, seconds = fastest_product(a, w.t(), out, weight=True, device="cpu")
    assert {"mm", "linear"} <= set(seconds)
    if torch._C.has_mkl:
        assert "mkl-packed" in seconds
    if rnnfast.build_info()["cpu_step_gemm_kernels"] != "none":
        assert "rnnfast-step" in seconds  # 4 rows: rnnfast's own product runs them
        assert "rnnfast-once" in seconds  # and its product of a weight used once
    assert product.name == min(seconds, key=seconds.get)
    got = product.run(a, prepared, out)
    torch.testing.assert_close(out if got is None else got, a @ w.t())
    # an activation operand: only products that pack nothing
    _, _, seconds = fastest_product(a, w.t(), out, weight=False, device="cpu")
    assert set(seconds) == {"mm"}


# -- GEMM floor and memory accounting -------------------------------------------

def test_floor_gemms():
    case = Case(T=7, B=3, I=5, H=4, layers=2, bidirectional=True, mode="inference")
    gemms = floor_gemms(case)
    assert len(gemms) == 2 * 2 * 2
    recurrent = [g for g in gemms if g.what == "h_t @ W_hh^T"]
    assert all((g.m, g.k, g.n, g.count) == (3, 4, 16, 7) for g in recurrent)
    inputs = {g.layer: g for g in gemms if g.what == "x @ W_ih^T"}
    assert (inputs[0].m, inputs[0].k) == (21, 5) and inputs[1].k == 8  # D*H
    training = floor_gemms(Case(T=7, B=3, I=5, H=4, mode="training"))
    assert len(training) == 6
    flops = sum(g.flops for g in training)
    assert flops == 2 * (21 * 5 * 16 + 7 * 3 * 4 * 16        # forward
                         + 7 * 3 * 16 * 4 + 16 * 21 * 4      # dh, dW_hh
                         + 16 * 21 * 5 + 21 * 16 * 5)        # dW_ih, dx


def test_arithmetic_bound_uses_the_best_rate_of_the_timed_products():
    case = Case(T=7, B=3, I=5, H=4, mode="training")
    mm, linear = PRODUCTS[0], PRODUCTS[1]
    # the recurrent product at 2*3*4*16 flops in 1 us, the input one at
    # 2*21*5*16 flops in 2 us: the latter's 1.68 GFLOP/s is the best rate
    chosen = {("h_t @ W_hh^T", 3, 4, 16): (mm, {"mm": 1e-6, "linear": 5e-7}),
              ("x @ W_ih^T", 21, 5, 16): (linear, {"mm": 9e-6, "linear": 2e-6})}
    flops = sum(g.flops for g in floor_gemms(case))
    rate = 2 * 21 * 5 * 16 / 2e-6
    got = arithmetic_bound(case, chosen)
    assert got == (f"arithmetic bound {flops / rate * 1e3:.3g} ms ({flops / 1e9:.3g} GFLOP "
                   f"at {rate / 1e9:.0f} GFLOP/s, the best rate of these products here)")
    assert arithmetic_bound(case, {}) is None


def test_saved_bytes_counts_unique_storages_and_leaves_out_kept():
    x = torch.randn(10, 8, requires_grad=True)
    holder = {}

    def run():
        a = x * 2          # saves nothing (a scalar factor)
        b = a.sin()        # saves a: 320 bytes
        c = a[:2].cos()    # saves a view of a: the same storage
        d = x * x          # saves x (kept: an input)
        holder["out"] = (b, c, d)

    assert saved_bytes(run, keep=[x]) == 10 * 8 * 4
    assert saved_bytes(run) == 2 * 10 * 8 * 4
    with torch.inference_mode():
        assert saved_bytes(lambda: x.sin()) == 0


# -- a tiny run end to end --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    # the harness, not the kernel: the reference stands in for rnnfast's LN-LSTM
    mp.setattr(rnnfast, "LayerNormLSTM", ReferenceLayerNormLSTM, raising=False)
    try:
        assert cli.main(["--quick", *TINY, "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out


def test_results_json_schema(tiny_run):
    doc = json.loads((tiny_run / "results.json").read_text())
    env = doc["environment"]
    for key in ("device_name", "cpu_model", "threads", "torch_version", "cuda_version",
                "cudnn_version", "cuda_driver", "rnnfast_version", "rnnfast_build_info",
                "date", "tf32_default", "isa_settings"):
        assert key in env
    from rnnfast.bench.results import ISA_VARIABLES
    assert env["isa_settings"] == {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ}
    assert set(env["tf32_default"]) >= {"cuda.matmul.allow_tf32", "cudnn.allow_tf32"}
    assert env["malloc"]["mode"] == "steady"  # the default
    if env["malloc"]["libc"].startswith("glibc"):
        assert env["malloc"]["applied"]
        assert env["malloc"]["mmap_threshold"] == env["malloc"]["trim_threshold"] == 1 << 30
    assert env["rnnfast_build_info"]["rnnfast_version"] == rnnfast.__version__
    # collected after the run: the CPU step products chosen during it (rnnfast.LSTM's
    # T=3 B=2 H=4 loop packs its [2,4]x[4,16] product and measures it; in row groups,
    # on two threads or more, each thread's [1,4]x[4,16])
    build = env["rnnfast_build_info"]
    if build["cpu_step_gemm_kernels"] != "none" and "RNNFAST_CPU_STEP_GEMM" not in os.environ:
        grouped = env["threads"] >= 2 and os.environ.get("RNNFAST_CPU_ROW_GROUPS") != "0"
        rows = 1 if grouped else 2
        assert {(c["m"], c["n"], c["k"]) for c in build["cpu_step_gemm"]} >= {(rows, 16, 4)}
    assert doc["settings"]["preset"] == "quick"
    assert doc["settings"]["argv"][:2] == ["run", "--quick"]
    records = doc["results"]
    impls = {"torch.nn.LSTM", "rnnfast.LSTM", "reference.LSTM", "gemm-floor",
             "reference.LayerNormLSTM", "rnnfast.LayerNormLSTM"}
    assert {r["impl"] for r in records} == impls
    # quick with T, B, I, H overridden: one-layer and two-layer bidirectional shapes
    assert {(r["layers"], r["bidirectional"]) for r in records} == {(1, False), (2, True)}
    assert len(records) == 2 * 2 * len(impls)
    for r in records:
        assert list(r) == FIELDS
        assert r["mode"] in ("inference", "training")
        assert (r["T"], r["B"], r["I"], r["H"], r["dtype"], r["device"], r["tf32"],
                r["decode"]) == (3, 2, 4, 4, "float32", "cpu", False, False)
        assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["runs"] >= 5
        assert r["tokens_per_s"] == pytest.approx(6 / (r["median_ms"] / 1e3))
        if r["impl"] != "gemm-floor" and r["mode"] == "training":
            assert r["saved_bytes_per_token"] > 0
        if r["mode"] == "inference":
            assert r["saved_bytes_per_token"] == 0
    by = {(r["impl"], r["mode"], r["layers"]): r for r in records}
    for mode in ("inference", "training"):
        for layers in (1, 2):
            base = by[("torch.nn.LSTM", mode, layers)]
            ln_base = by[("reference.LayerNormLSTM", mode, layers)]
            floor = by[("gemm-floor", mode, layers)]
            assert base["ratio"] == 1.0 and base["backend"] in ("onednn", "native")
            fast = by[("rnnfast.LSTM", mode, layers)]
            assert fast["ratio"] == pytest.approx(base["median_ms"] / fast["median_ms"])
            assert fast["floor_ratio"] == pytest.approx(fast["median_ms"] / floor["median_ms"])
            assert fast["max_abs_diff"] < 1e-4  # same weights as torch.nn.LSTM
            assert by[("reference.LSTM", mode, layers)]["max_abs_diff"] < 1e-4
            ln = by[("rnnfast.LayerNormLSTM", mode, layers)]
            assert ln["baseline"] == "reference.LayerNormLSTM"
            assert ln["ratio"] == pytest.approx(ln_base["median_ms"] / ln["median_ms"])
            assert ln["lstm_ms"] == base["median_ms"]
            assert ln["max_abs_diff"] == 0.0
            assert floor["max_abs_diff"] is None
            assert floor["backend"].startswith("eager; ")  # and the products that won
            assert "h_t @ W_hh^T" in floor["backend"] and "x @ W_ih^T" in floor["backend"]
            assert "arithmetic bound" in floor["backend"]


# Whether a 64 MiB block is mapped on its own (mallinfo2's hblkhd) after
# allocator.configure(mode): the module loaded from its file, without torch.
_LARGE_BLOCK_MAPPED = textwrap.dedent('''
    import ctypes, importlib.util, sys
    spec = importlib.util.spec_from_file_location("allocator", sys.argv[1])
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    info = allocator.configure(sys.argv[2])
    block = bytearray(64 << 20)
    print(libc.mallinfo2().hblkhd >= 64 << 20, info.get("applied"))
''')


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize("mode", ["steady", "default"])
def test_steady_allocator_serves_large_blocks_from_the_heap(mode):
    """glibc maps a block of 64 MiB on its own (and unmaps it when freed, so
    that the next one is faulted in page by page): above its mmap threshold,
    128 KiB at first and at most 32 MiB as it adapts. Under the bench's
    steady setting the threshold is 1 GiB and the block comes from the heap,
    where a freed block is reused."""
    path = os.path.join(os.path.dirname(rnnfast.__file__), "bench", "allocator.py")
    out = subprocess.run([sys.executable, "-c", _LARGE_BLOCK_MAPPED, path, mode],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == (["False", "True"] if mode == "steady" else ["True", "None"])


def test_allocator_mode_is_checked():
    from rnnfast.bench import allocator
    with pytest.raises(ValueError, match="steady"):
        allocator.configure("fast")


def test_results_csv_has_the_same_rows(tiny_run):
    doc = json.loads((tiny_run / "results.json").read_text())
    with (tiny_run / "results.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert reader.fieldnames == FIELDS
    assert len(rows) == len(doc["results"])
    for row, r in zip(rows, doc["results"]):
        assert row["impl"] == r["impl"] and row["mode"] == r["mode"]
        assert float(row["median_ms"]) == pytest.approx(r["median_ms"])


def test_plots_written(tiny_run):
    pngs = sorted(p.name for p in tiny_run.glob("*.png"))
    assert "speedup_LSTM_cpu_float32_training.png" in pngs
    assert "speedup_LayerNormLSTM_cpu_float32_inference.png" in pngs
    for name in pngs:
        assert (tiny_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- tables, compare, report on synthetic records --------------------------------

def _record(impl, family, median, iqr=0.1, mode="inference", H=4, **kw):
    r = {k: None for k in FIELDS}
    r.update(impl=impl, family=family, mode=mode, T=3, B=2, I=4, H=H, layers=1,
             bidirectional=False, dtype="float32", device="cpu", tf32=False, decode=False,
             median_ms=median,
             iqr_ms=iqr, runs=5, tokens_per_s=6e3 / median, saved_bytes_per_token=0.0)
    r.update(kw)
    return r


def _doc(records):
    return {"schema": 1, "environment": {"device_name": "cpu", "threads": 2},
            "settings": {"preset": "quick"}, "notes": ["a note"],
            "results": finalize(records)}


def test_tables_per_family_with_floor_and_plain_lstm_time():
    records = finalize([_record("torch.nn.LSTM", "LSTM", 2.0),
                        _record("rnnfast.LSTM", "LSTM", 1.0),
                        _record("reference.LayerNormLSTM", "LayerNormLSTM", 8.0),
                        _record("rnnfast.LayerNormLSTM", "LayerNormLSTM", 2.0),
                        _record("gemm-floor", "floor", 0.5)])
    lstm, ln = tables(records)
    assert lstm.title.startswith("LSTM, inference") and ln.title.startswith("LayerNormLSTM")
    assert [row[1] for row in lstm.rows] == ["torch.nn.LSTM", "rnnfast.LSTM", "gemm-floor"]
    assert [row[1] for row in ln.rows] == ["reference.LayerNormLSTM",
                                           "rnnfast.LayerNormLSTM", "gemm-floor"]
    speed = ln.columns.index("speed-up")
    assert [row[speed] for row in ln.rows] == ["1.00x", "4.00x", "16.00x"]
    assert ln.rows[0][ln.columns.index("nn.LSTM ms")] == "2.00"
    assert lstm.rows[1][lstm.columns.index("x floor")] == "2.00x"
    text = markdown(lstm)
    assert "| case | implementation | median ms |" in text and "|---|---|---:|" in text


def test_tf32_and_decode_records_get_their_own_tables():
    records = finalize([_record("torch.nn.LSTM", "LSTM", 2.0, device="cuda"),
                        _record("torch.nn.LSTM", "LSTM", 1.0, device="cuda", tf32=True),
                        _record("rnnfast.LSTM", "LSTM", 0.5, device="cuda", tf32=True),
                        _record("torch.nn.LSTM", "LSTM", 0.1, device="cuda", T=1,
                                decode=True)])
    titles = [t.title for t in tables(records)]
    assert len(titles) == 2
    assert titles[0].startswith("LSTM, inference, cuda float32 (")
    assert titles[1].startswith("LSTM, inference, cuda float32 TF32 (")
    plain, tf32 = tables(records)
    assert [row[0] for row in plain.rows if row[0]] == ["T=3 B=2 I=4 H=4",
                                                       "T=1 B=2 I=4 H=4 decode"]
    assert tf32.rows[1][tf32.columns.index("speed-up")] == "2.00x"  # TF32 vs TF32 only


def test_classify_uses_the_iqrs():
    old = dict(median_ms=10.0, iqr_ms=1.0)
    assert classify(old, dict(median_ms=10.9, iqr_ms=1.0)) == "within noise"
    assert classify(old, dict(median_ms=11.5, iqr_ms=1.0)) == "regression"
    assert classify(old, dict(median_ms=8.5, iqr_ms=1.0)) == "improvement"
    assert classify(old, dict(median_ms=11.5, iqr_ms=1.0), threshold=2) == "within noise"
    tight = dict(median_ms=10.0, iqr_ms=0.0)  # tiny noise: the relative floor applies
    assert classify(tight, dict(median_ms=10.1, iqr_ms=0.0)) == "within noise"
    assert classify(tight, dict(median_ms=10.1, iqr_ms=0.0), min_change=0) == "regression"


def test_compare_flags_regressions(tmp_path, capsys):
    old = _doc([_record("torch.nn.LSTM", "LSTM", 10.0, 1.0),
                _record("rnnfast.LSTM", "LSTM", 5.0, 0.2),
                _record("reference.LSTM", "LSTM", 30.0, 1.0),
                _record("gemm-floor", "floor", 2.0, 0.1)])
    new = _doc([_record("torch.nn.LSTM", "LSTM", 10.3, 1.0),   # within noise
                _record("rnnfast.LSTM", "LSTM", 6.0, 0.2),     # regression
                _record("reference.LSTM", "LSTM", 20.0, 1.0),  # improvement
                _record("rnnfast.LSTM", "LSTM", 5.0, 0.2, H=8)])  # only in new
    changes, only_old, only_new = compare(old, new)
    verdicts = {c.key[0]: c.verdict for c in changes}
    assert verdicts == {"torch.nn.LSTM": "within noise", "rnnfast.LSTM": "regression",
                        "reference.LSTM": "improvement"}
    assert [k[0] for k in only_old] == ["gemm-floor"]
    assert len(only_new) == 1 and dict(zip(KEY, only_new[0]))["H"] == 8
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert cli.main(["compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1
    out = capsys.readouterr().out
    assert "regression" in out and "1 regression(s), 1 improvement(s)" in out
    assert cli.main(["compare", str(tmp_path / "old.json"), str(tmp_path / "old.json")]) == 0


def test_report_writes_readme(tmp_path, tiny_run):
    results = tmp_path / "benchmarks" / "results"
    folder = results / "cpu-tiny"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text((tiny_run / "results.json").read_text())
    (folder / "time_vs_hidden_cpu_float32_inference.png").write_bytes(b"png")
    readme = tmp_path / "benchmarks" / "README.md"
    assert cli.main(["report", str(folder), "--output", str(readme)]) == 0
    text = readme.read_text()
    assert "## cpu-tiny" in text
    assert "**LSTM, inference, cpu float32" in text
    assert "**LayerNormLSTM, training, cpu float32" in text
    assert "| T=3 B=2 I=4 H=4 | torch.nn.LSTM |" in text
    assert "![time_vs_hidden_cpu_float32_inference]" \
           "(results/cpu-tiny/time_vs_hidden_cpu_float32_inference.png)" in text
    assert f"torch {torch.__version__}" in text
    if json.loads((folder / "results.json").read_text())["environment"][
            "rnnfast_build_info"].get("cpu_step_gemm"):
        assert "- CPU per-step products chosen (best of 9 runs" in text
    # the same README from write_readme directly: deterministic
    again = write_readme([folder], tmp_path / "benchmarks" / "again.md")
    assert again.read_text() == text


def test_report_lists_runs_newest_first(tmp_path, tiny_run):
    """The README opens with a table of the runs, newest first by the date
    each recorded, linking each run's section (in the same order), with the
    range of rnnfast.LSTM's speed-ups per mode."""
    doc = json.loads((tiny_run / "results.json").read_text())
    folders = []
    for name, date in (("cpu-b-older", "2026-01-01T00:00:00+00:00"),
                       ("cpu-a-newer", "2026-06-01T12:30:00+00:00")):
        doc["environment"]["date"] = date
        folder = tmp_path / "results" / name
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(doc))
        folders.append(folder)
    text = write_readme(folders, tmp_path / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| [cpu-")]
    assert [r.split("]")[0] for r in rows] == ["| [cpu-a-newer", "| [cpu-b-older"]
    assert rows[0].startswith("| [cpu-a-newer](#cpu-a-newer) | 2026-06-01 12:30 |")
    assert text.index("\n## cpu-a-newer\n") < text.index("\n## cpu-b-older\n")
    ratios = sorted(r["ratio"] for r in doc["results"] if r["impl"] == "rnnfast.LSTM"
                    and r["mode"] == "training" and not r["decode"])
    cells = [c.strip() for c in rows[0].split("|")]
    assert cells[5] == (f"{ratios[0]:.2f}x" if f"{ratios[0]:.2f}" == f"{ratios[-1]:.2f}"
                        else f"{ratios[0]:.2f}x-{ratios[-1]:.2f}x")


def test_list_runs_nothing(capsys):
    assert cli.main(["--quick", "--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "T=50 B=16 I=64 H=64" in out and "cases x" in out


def test_runners_take_turns_and_a_failure_leaves_the_others_timed():
    """time_runners times the steps in turns (a slow spell of the machine
    falls on every implementation of a case), keeps each in the turns
    until it has its blocks, and reports a step that raises as its
    exception without stopping the others."""
    import time as _time

    calls: list[str] = []

    def step(name, seconds):
        def run(i):
            calls.append(name)
            _time.sleep(seconds)
        return run

    def broken(i):
        calls.append("broken")
        if calls.count("broken") > 2:
            raise ValueError("broke on its third call")

    fast, slow = step("fast", 1e-4), step("slow", 2e-3)
    got = time_runners([fast, slow, broken], inputs=2, min_run_time=0.05, min_runs=5,
                       one_calls=[1e-4, 2e-3, 1e-4])
    assert isinstance(got[0], Timing) and isinstance(got[1], Timing)
    assert isinstance(got[2], ValueError)
    assert got[0].runs >= 5 and got[1].runs >= 5
    assert got[0].median_ms < got[1].median_ms
    # each step's own timed seconds (a record's wall_s), at least min_run_time
    assert got[0].seconds >= 0.05 and got[1].seconds >= 0.05
    # the first rounds hold one block of each step, in order
    firsts = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]
    assert firsts[:3] == ["fast", "slow", "broken"]
    assert firsts[3:5] == ["fast", "slow"]
    # the slow step's blocks are spread between the fast one's, not after them
    last_slow = max(i for i, c in enumerate(calls) if c == "slow")
    first_fast, last_fast = calls.index("fast"), max(i for i, c in enumerate(calls) if c == "fast")
    assert first_fast < last_slow and calls.index("slow") < last_fast
