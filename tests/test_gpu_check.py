"""The GPU check's machinery, on the CPU: scripts/gpu_check.py's stage
runner (budget, limits, skips, time-outs, parallel groups, the stage table
and archive), its pytest plugin (per-test results as they finish, Inductor
tests left out), the ncu summary, the sanitizer case list and the shell
entry point. Stages here are small Python commands that take a second or
less."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_check  # noqa: E402
from gpu_check import (  # noqa: E402
    FAILED, PASSED, SKIPPED, TIMED_OUT, Stage, arch_list, ncu_kernel_times, reserve_after,
    run_stages, stage_limit, units)

PY = sys.executable


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def run(stages, budget, tmp_path, **kw):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(exist_ok=True)
    lines: list[str] = []
    outcomes = run_stages(stages, budget, work, out, say=lines.append, **kw)
    return {o.name: o for o in outcomes}, out, work, lines


# -- budget arithmetic --------------------------------------------------------

def test_units_group_consecutive_stages():
    s = [Stage("a", None, 1), Stage("b", None, 1, group="g"), Stage("c", None, 1, group="g"),
         Stage("d", None, 1)]
    assert [[x.name for x in u] for u in units(s)] == [["a"], ["b", "c"], ["d"]]


def test_limit_keeps_the_later_minimums():
    later = units([Stage("x", ["x"], 100, min_s=30), Stage("y", ["y"], 100, min_s=40, group="g"),
                   Stage("z", ["z"], 100, min_s=20, group="g"),
                   Stage("w", ["w"], 100, min_s=50, skip="no tool")])
    assert reserve_after(later) == 30 + 40  # a group keeps its largest; skipped ones nothing
    assert reserve_after(later, left_s=35) == 30  # a minimum past what is left: skipped anyway
    build = Stage("build", ["b"], cap_s=300, min_s=60)
    assert stage_limit(build, left_s=530, reserved_s=70) == 300
    assert stage_limit(build, left_s=300, reserved_s=70) == 300 - 70 - gpu_check.MARGIN_S
    assert stage_limit(build, left_s=50, reserved_s=70) == 0


# -- the runner on fake stages ------------------------------------------------

def test_pass_fail_needs_and_table(tmp_path):
    stages = [Stage("ok", py("print('fine')"), cap_s=30, min_s=1),
              Stage("bad", py("import sys; print('broken'); sys.exit(3)"), cap_s=30, min_s=1),
              Stage("after_bad", py("print('never')"), cap_s=30, min_s=1, needs=("bad",)),
              Stage("after_ok", py("print('runs')"), cap_s=30, min_s=1, needs=("ok",)),
              Stage("no_tool", None, cap_s=30, min_s=1, skip="tool not found")]
    o, out, work, lines = run(stages, 60, tmp_path)
    assert o["ok"].status == PASSED and o["ok"].exit_code == 0
    assert o["bad"].status == FAILED and o["bad"].exit_code == 3
    assert o["after_bad"].status == SKIPPED and "needs bad" in o["after_bad"].note
    assert o["after_ok"].status == PASSED
    assert o["no_tool"].status == SKIPPED and o["no_tool"].note == "tool not found"
    assert (work / "ok.log").read_text().strip() == "fine"
    assert "broken" in (work / "bad.log").read_text()
    assert any("[bad] broken" in line for line in lines)  # a failed stage's log tail
    doc = json.loads((out / "stages.json").read_text())
    assert doc["ok"] is False
    assert [s["name"] for s in doc["stages"]] == [s.name for s in stages]
    table = (out / "stages.md").read_text()
    assert "SOME STAGES FAILED" in table
    assert "| bad | failed |" in table and "| no_tool | skipped |" in table
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu_check/ok.log" in names and "gpu_check/stages.md" in names
    assert len(list(out.iterdir())) <= 8  # a device machine returns at most 8 files


def test_time_out_and_lack_of_time(tmp_path):
    stages = [Stage("slow", py("import time; print('started', flush=True); time.sleep(60)"),
                    cap_s=1.5, min_s=1),
              Stage("last", py("print('done')"), cap_s=30, min_s=1),
              Stage("too_big", py("print('x')"), cap_s=30, min_s=1000)]
    start = time.monotonic()
    o, out, work, _ = run(stages, 60, tmp_path)
    assert time.monotonic() - start < 15
    assert o["slow"].status == TIMED_OUT and "limit" in o["slow"].note
    assert "started" in (work / "slow.log").read_text()
    assert o["last"].status == PASSED  # a time-out does not stop the later stages
    assert o["too_big"].status == SKIPPED and o["too_big"].note.startswith("lack of time")
    assert not gpu_check.ok(list(o.values()))
    # the verdict tells a stage stopped for time from a failure
    assert "# rnnfast GPU check: INCOMPLETE: no stage failed, slow stopped at its time limit" \
        in (out / "stages.md").read_text()


def test_a_stage_leaves_no_process_behind(tmp_path):
    """A stage's main process ends while a child it started runs on (a
    test's subprocess): the child is killed with the stage, so that it does
    not run into the later stages."""
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))")
    o, *_ = run([Stage("parent", py(code), cap_s=30, min_s=1)], 60, tmp_path)
    assert o["parent"].status == PASSED
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # a killed child stays a zombie of its (ended) parent until init reaps it
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    break
        except OSError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        raise AssertionError("the stage's child process outlived it")


def test_a_stage_leaves_the_later_minimums(tmp_path):
    # budget 7 s; the last stage needs 3, and a second goes to the margin:
    # the first may run 3 s at most
    stages = [Stage("first", py("import time; time.sleep(30)"), cap_s=100, min_s=1),
              Stage("second", py("print('kept')"), cap_s=100, min_s=2.5)]
    o, *_ = run(stages, 6.5, tmp_path)
    assert o["first"].status == TIMED_OUT and o["first"].limit_s == 3
    assert o["second"].status == PASSED


def test_group_runs_at_once(tmp_path):
    sleep = py("import time; time.sleep(1.0)")
    stages = [Stage(f"s{i}", sleep, cap_s=30, min_s=1, group="g") for i in range(3)]
    start = time.monotonic()
    o, *_ = run(stages, 60, tmp_path)
    assert time.monotonic() - start < 2.8
    assert all(x.status == PASSED for x in o.values())


def test_refused_tool_is_skipped_not_failed(tmp_path):
    stages = [Stage("sanitizer", py("import sys; print('Device not supported'); sys.exit(1)"),
                    cap_s=30, min_s=1, refused=gpu_check.TOOL_REFUSED),
              Stage("real_failure", py("import sys; print('an error'); sys.exit(1)"),
                    cap_s=30, min_s=1, refused=gpu_check.TOOL_REFUSED)]
    o, *_ = run(stages, 60, tmp_path)
    assert o["sanitizer"].status == SKIPPED and "cannot run" in o["sanitizer"].note
    assert o["real_failure"].status == FAILED


def test_before_hook_sees_the_limit(tmp_path):
    seen = {}

    def before(stage, outcomes, limit):
        seen[stage.name] = limit
        stage.command = py(f"print({limit:.0f})")

    o, _, work, _ = run([Stage("a", py("0"), cap_s=7, min_s=1)], 60, tmp_path, before=before)
    assert seen["a"] == 7 and (work / "a.log").read_text().strip() == "7"


# -- pytest stages ------------------------------------------------------------

_TESTS = """
import time


class torch:  # the plugin reads the source; nothing needs to compile here
    compile = staticmethod(lambda f, **kwargs: f)

def test_one():
    pass

def test_two_fails():
    assert False

def test_compiled_with_inductor():
    torch.compile(lambda x: x)

def test_compiled_aot_eager():
    torch.compile(lambda x: x, backend="aot_eager")

def test_zz_hangs():
    time.sleep(60)
"""


def test_pytest_stage_interrupted_still_reports(tmp_path):
    (tmp_path / "test_fake.py").write_text(_TESTS)
    work = tmp_path / "work"
    work.mkdir()
    cmd = gpu_check.pytest_command(PY, [str(tmp_path / "test_fake.py")], str(work / "t"),
                                   ["--gpu-check-no-inductor"])
    env = {"PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(ROOT)])}
    stage = Stage("t", cmd, cap_s=8, min_s=1, interrupt=True, env=env, tests_log="t.jsonl",
                  junit="t.xml")
    o, *_ = run([stage], 60, tmp_path)
    t = o["t"]
    assert t.status == TIMED_OUT
    assert t.tests["passed"] == 2 and t.tests["failed"] == 1  # one, aot_eager; two_fails
    assert t.tests["failed_ids"] == [f"{tmp_path.name}/test_fake.py::test_two_fails"] or \
        t.tests["failed_ids"][0].endswith("test_fake.py::test_two_fails")
    log = (work / "t.jsonl").read_text()
    assert "test_compiled_with_inductor" not in log  # deselected
    xml = (work / "t.xml").read_text()  # SIGINT: pytest wrote its junit XML
    assert "test_two_fails" in xml and "test_compiled_aot_eager" in xml


_BREAKS_CUDA = """
def test_a_passes():
    pass


def test_b_breaks_the_context(request):
    # as after an illegal address: every later CUDA call of the process fails
    guard = request.config.pluginmanager.get_plugin("gpu_check_cuda_context")
    guard.probe = lambda: "AcceleratorError: CUDA error: an illegal memory access"
    assert False, "CUDA error: an illegal memory access was encountered"


def test_c_after():
    pass


def test_d_after():
    pass
"""


def test_tests_after_a_broken_cuda_context_are_not_run(tmp_path):
    """After a test leaves the CUDA context broken (the plugin's probe says
    so), the process's later tests are skipped as "not run", naming the test
    that broke it, instead of failing one after the other."""
    (tmp_path / "test_fake.py").write_text(_BREAKS_CUDA)
    work = tmp_path / "work"
    work.mkdir()
    cmd = gpu_check.pytest_command(PY, [str(tmp_path / "test_fake.py")], str(work / "t"))
    env = {"PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(ROOT)])}
    stage = Stage("t", cmd, cap_s=60, min_s=1, interrupt=True, env=env, tests_log="t.jsonl")
    o, out, *_ = run([stage], 90, tmp_path)
    t = o["t"]
    assert t.status == FAILED
    assert (t.tests["passed"], t.tests["failed"], t.tests["not_run"], t.tests["skipped"]) \
        == (1, 1, 2, 0)
    assert t.tests["failed_ids"][0].endswith("test_b_breaks_the_context")
    records = [json.loads(line) for line in (work / "t.jsonl").read_text().splitlines()]
    after = [r for r in records if r["nodeid"].endswith(("test_c_after", "test_d_after"))]
    assert len(after) == 2
    assert all(r["outcome"] == "skipped" and "test_b_breaks_the_context" in r["reason"]
               and "illegal memory access" in r["reason"] for r in after)
    assert "2 not run after a test broke the CUDA context" in (out / "stages.md").read_text()


def test_a_failure_that_leaves_cuda_working_stops_nothing(tmp_path):
    """Without a broken context (the probe of a process that never made one
    says None), a failure is just a failure."""
    (tmp_path / "test_fake.py").write_text(_TESTS.replace("def test_zz_hangs", "def _unused"))
    work = tmp_path / "work"
    work.mkdir()
    cmd = gpu_check.pytest_command(PY, [str(tmp_path / "test_fake.py")], str(work / "t"))
    env = {"PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(ROOT)])}
    stage = Stage("t", cmd, cap_s=60, min_s=1, env=env, tests_log="t.jsonl")
    o, *_ = run([stage], 90, tmp_path)
    assert (o["t"].tests["passed"], o["t"].tests["failed"], o["t"].tests["not_run"]) == (3, 1, 0)


def test_archive_stays_under_the_device_file_limit(tmp_path):
    """An archive over the limit (a device machine returns no file over 16
    MiB) is written again with each large file cut to its end."""
    work = tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    (work / "memcheck.log").write_bytes(os.urandom(600_000) + b"ERROR SUMMARY: 7 errors\n")
    (work / "bench" / "results.json").write_text('{"ok": true}')
    small = tmp_path / "small.tar.gz"
    gpu_check.write_archive(work, small, limit_bytes=10**7, keep_bytes=50_000)
    with tarfile.open(small) as tar:  # under the limit: whole
        assert tar.getmember("gpu_check/memcheck.log").size == 600_024
    cut = tmp_path / "cut.tar.gz"
    gpu_check.write_archive(work, cut, limit_bytes=200_000, keep_bytes=50_000)
    assert cut.stat().st_size <= 200_000 and not (tmp_path / "cut.tar.gz.part").exists()
    with tarfile.open(cut) as tar:
        log = tar.extractfile("gpu_check/memcheck.log").read()
        assert log.startswith(b"[gpu_check: the first 550024 of 600024 bytes were cut")
        assert log.endswith(b"ERROR SUMMARY: 7 errors\n")
        assert tar.extractfile("gpu_check/bench/results.json").read() == b'{"ok": true}'


def test_a_test_whose_worker_died_is_logged_as_failed(tmp_path):
    """pytest-xdist reports a test whose worker died under it (a segfault,
    or pytest-timeout's thread method ending a hung CUDA call) with when
    "???": the log keeps it as failed, with xdist's words."""
    import gpu_check_pytest

    log = gpu_check_pytest._Log(str(tmp_path / "t.jsonl"))
    crash = pytest.TestReport(nodeid="tests/test_x.py::test_segfault", location=("x", None, "x"),
                              keywords={}, outcome="failed", when="???",
                              longrepr="worker 'gw1' crashed while running "
                                       "'tests/test_x.py::test_segfault'")
    log.pytest_runtest_logreport(crash)
    log.file.close()
    summary = gpu_check.summarize_tests(tmp_path / "t.jsonl")
    assert (summary["failed"], summary["failed_ids"]) == (1, ["tests/test_x.py::test_segfault"])
    record = json.loads((tmp_path / "t.jsonl").read_text())
    assert "crashed while running" in record["reason"]


def test_sanitizer_note_says_how_far_the_cases_got(tmp_path):
    (tmp_path / "racecheck.log").write_text(
        "ok   LSTM {'dtype': torch.float32}\n"
        "FAIL LSTM {'dtype': torch.float16}: RuntimeError: CUDA error\n"
        "ok   LayerNormLSTM {'dtype': torch.float32}\n"
        "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n")
    note = gpu_check.after_sanitizer(gpu_check.Outcome("racecheck", FAILED), tmp_path)
    assert note.startswith("2 cases ok, 1 failed; first failure: LSTM {'dtype': torch.float16}")
    assert note.endswith("RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)")
    assert gpu_check.after_sanitizer(gpu_check.Outcome("memcheck", FAILED), tmp_path) is None
    assert gpu_check.after_sanitizer(gpu_check.Outcome("racecheck", SKIPPED), tmp_path) is None
    stages = {s.name: s for s in gpu_check.build_stages(PY, tmp_path, workers=0)}
    assert all(stages[t].after is gpu_check.after_sanitizer for t in gpu_check.SANITIZER_TOOLS)


def test_build_never_reaches_for_the_network():
    cmd = gpu_check.pip_install_command(PY)
    for flag in ("--no-index", "--disable-pip-version-check", "--no-build-isolation",
                 "--no-deps", "-e"):
        assert flag in cmd


def test_per_test_time_limit_uses_the_thread_method():
    """A test blocked in a CUDA call never returns to Python, where the
    signal method's exception would be raised."""
    cmd = gpu_check.pytest_command(PY, ["t.py"], "t", per_test_timeout=120)
    assert "--timeout=120" in cmd
    assert cmd[cmd.index("-o") + 1] == "timeout_method=thread"
    assert not any(a.startswith("--timeout") for a in
                   gpu_check.pytest_command(PY, ["t.py"], "t"))


_SEGFAULT = """
import ctypes


def test_a_passes():
    pass


def test_b_segfaults():
    ctypes.string_at(0)


def test_c_passes():
    pass
"""


def test_a_segfault_under_xdist_keeps_every_other_result(tmp_path):
    """The GPU check's pytest stages run under pytest-xdist where it is
    installed (the GPU machine has it): a test that kills its worker is
    logged as failed and the others still run and are logged."""
    pytest.importorskip("xdist")
    (tmp_path / "test_fake.py").write_text(_SEGFAULT)
    work = tmp_path / "work"
    work.mkdir()
    cmd = gpu_check.pytest_command(PY, [str(tmp_path / "test_fake.py")], str(work / "t"),
                                   workers=2)
    env = {"PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(ROOT)])}
    stage = Stage("t", cmd, cap_s=120, min_s=1, env=env, tests_log="t.jsonl")
    o, *_ = run([stage], 150, tmp_path)
    t = o["t"].tests
    assert o["t"].status == FAILED
    assert (t["passed"], t["failed"]) == (2, 1)
    assert t["failed_ids"][0].endswith("test_b_segfaults")


@pytest.mark.parametrize("source, inductor", [
    ("torch.compile(m)", True),
    ("torch.compile(m, fullgraph=True)", True),
    ("torch.compile(m, backend='inductor')", True),
    ("torch.compile(m, mode='reduce-overhead')", True),
    ("torch.compile(m, backend='aot_eager', fullgraph=True)", False),
    ("torch.compile(m, backend=my_backend)", False),
    ("m.compile()", False),
])
def test_uses_inductor(source, inductor):
    assert gpu_check._uses_inductor(source) is inductor


def test_inductor_tests_of_the_suite_are_left_out():
    out = subprocess.run(
        [PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-p", "gpu_check_pytest", "--gpu-check-no-inductor", "-k", "cpu",
         str(ROOT / "tests" / "test_compile.py")],
        capture_output=True, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(SCRIPTS), str(ROOT)])))
    assert out.returncode == 0, out.stdout + out.stderr
    kept = [line for line in out.stdout.splitlines() if "::" in line]
    assert kept and all("inductor" not in line for line in kept)
    assert not any("test_compile_fullgraph_matches_eager" in line for line in kept)
    assert any("aot_eager" in line for line in kept)
    assert "deselected" in out.stdout


# -- helpers ------------------------------------------------------------------

def test_arch_list():
    assert arch_list("9.0\n") == "9.0"
    assert arch_list("9.0\n8.0\n9.0\n") == "8.0;9.0"
    assert arch_list("10.0\n9.0\n") == "9.0;10.0"
    assert arch_list("[N/A]\n\n") == ""


_NCU = '''==PROF== Connected to process 123
==PROF== Profiling "lstm_forward_step": 0%....50%....100% - 1 pass
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","123","python3","127.0.0.1","lstm_forward_step<float>","1","7","(256, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","3.20"
"1","123","python3","127.0.0.1","sm90_gemm","1","7","(384, 1, 1)","(8, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","5,100"
"2","123","python3","127.0.0.1","lstm_forward_step<float>","1","7","(256, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","2.80"
'''


def test_ncu_kernel_times(tmp_path):
    rows = ncu_kernel_times(_NCU)
    assert [r["kernel"] for r in rows] == ["lstm_forward_step<float>", "sm90_gemm"]
    assert rows[0]["calls"] == 2 and rows[0]["total_us"] == pytest.approx(6.0)
    assert rows[0]["mean_us"] == pytest.approx(3.0)
    assert rows[1]["total_us"] == pytest.approx(5.1)
    assert ncu_kernel_times("no csv here") == []
    assert gpu_check.after_ncu(None, tmp_path) == "no kernel times in ncu's output"
    (tmp_path / "ncu.log").write_text(_NCU)  # the CSV in ncu's log when not in --log-file
    note = gpu_check.after_ncu(None, tmp_path)
    assert note.startswith("2 kernels, 3 launches")
    assert (tmp_path / "ncu_kernels.csv").read_text().splitlines()[0] == \
        "kernel,calls,total_us,mean_us"


def _fake_sanitizer(tmp_path, help_text):
    tool = tmp_path / "compute-sanitizer"
    tool.write_text(f"#!/bin/sh\ncat <<'EOF'\n{help_text}\nEOF\n")
    tool.chmod(0o755)
    return str(tool)


def test_sanitizers_of_one_kernels_code_check_only_rnnfasts_kernels(tmp_path, monkeypatch):
    """racecheck and synccheck are restricted to rnnfast's kernels where the
    tool can filter by name; memcheck and initcheck check every kernel
    (cuBLAS handed a wrong size is rnnfast's error too, and rnnfast's kernels
    read what cuBLAS's wrote); a tool without the option checks everything
    rather than refusing to start."""
    with_filter = _fake_sanitizer(tmp_path, "  --kernel-name arg  Filter the kernels")
    monkeypatch.setattr(gpu_check, "find_tool",
                        lambda name: with_filter if name == "compute-sanitizer" else None)
    by = {s.name: s for s in gpu_check.build_stages(PY, Path("/tmp/w"), workers=0)}
    for tool in ("racecheck", "synccheck"):
        cmd = by[tool].command
        assert cmd[cmd.index("--kernel-name") + 1] == "kns=rnnfast", cmd
        assert cmd.index("--kernel-name") < cmd.index(PY)
    for tool in ("memcheck", "initcheck"):
        assert "--kernel-name" not in by[tool].command
    old_tool = tmp_path / "old"
    old_tool.mkdir()
    without = _fake_sanitizer(old_tool, "  --tool arg  memcheck racecheck")
    monkeypatch.setattr(gpu_check, "find_tool",
                        lambda name: without if name == "compute-sanitizer" else None)
    by = {s.name: s for s in gpu_check.build_stages(PY, Path("/tmp/w"), workers=0)}
    assert all("--kernel-name" not in by[t].command for t in gpu_check.SANITIZER_TOOLS)
    assert by["racecheck"].command[:3] == [without, "--tool", "racecheck"]


def test_stage_plan_follows_the_issue():
    stages = gpu_check.build_stages(PY, Path("/tmp/w"), workers=0)
    assert [s.name for s in stages] == ["env", "build", "test_cuda", "tests_cuda", "memcheck",
                                        "racecheck", "synccheck", "initcheck", "bench", "ncu",
                                        "bench_zoneout", "bench_unfused"]
    quick = gpu_check.build_stages(PY, Path("/tmp/w"), quick=True, workers=0)
    assert [s.name for s in quick] == ["env", "build", "test_cuda", "bench"]
    by = {s.name: s for s in stages}
    assert "--gpu-check-no-inductor" in by["tests_cuda"].command
    assert str(ROOT / "tests" / "test_cuda.py") in by["tests_cuda"].command  # --ignore'd
    # the CPU emulation of the CUDA backend (minutes) is not run on the GPU
    assert str(ROOT / "tests" / "test_simt.py") in by["tests_cuda"].command
    assert by["bench"].command[by["bench"].command.index("--grid") + 1] == "gpu"
    # the fused small-batch step turned off, for comparison with bench's
    assert by["bench_unfused"].env["RNNFAST_CUDA_FUSED_STEP_ROWS"] == "0"
    assert "--decode" in by["bench_unfused"].command
    assert all(by[t].group == "sanitizers" for t in gpu_check.SANITIZER_TOOLS)
    # the caps' minimums after the build fit the budget with room for a build
    after_build = gpu_check.reserve_after(units(stages[2:]))
    assert after_build + by["build"].min_s + by["env"].cap_s < gpu_check.BUDGET_S
    assert gpu_check.reserve_after(units(quick[2:])) + 120 < gpu_check.QUICK_BUDGET_S
    s = by["bench"]
    gpu_check.before_stage(s, {}, 100.0)
    assert s.command[-2:] == ["--max-time", "80"]


# -- the shell entry point ----------------------------------------------------

def test_shell_script_is_valid():
    assert subprocess.run(["bash", "-n", str(SCRIPTS / "gpu_check.sh")]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(SCRIPTS / "gpu_check.sh")], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_no_gpu_fails_fast_in_env(tmp_path):
    r = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), str(tmp_path / "out"),
                        "--work", str(tmp_path / "work"), "--workers", "0"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHON=PY))
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads((tmp_path / "out" / "stages.json").read_text())
    status = {s["name"]: s for s in doc["stages"]}
    assert status["env"]["status"] == FAILED
    assert "torch sees no GPU" in status["env"]["note"]
    assert all(s["status"] == SKIPPED for name, s in status.items() if name != "env")
    assert doc["seconds"] < 60
    assert "| env | failed |" in r.stdout


def test_env_refuses_a_setuptools_too_old_to_build(tmp_path):
    """pyproject.toml's license string needs setuptools >= 77: the env stage
    says so before the build would stop on it."""
    fake = tmp_path / "old" / "setuptools"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '70.3.0'\n")
    r = subprocess.run([PY, str(SCRIPTS / "gpu_check.py"), "_env", str(tmp_path / "env.json")],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path / "old")))
    assert r.returncode == 1
    info = json.loads((tmp_path / "env.json").read_text())
    assert info["setuptools_version"] == "70.3.0"
    assert any(p.startswith("setuptools 70.3.0 is older than 77") for p in info["problems"])
    assert "setuptools 70.3.0 is older than 77" in r.stderr


def test_dry_run_lists_the_stages(tmp_path):
    r = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), str(tmp_path / "o"), "--quick",
                        "--dry-run", "--work", str(tmp_path / "w"), "--workers", "0"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHON=PY))
    assert r.returncode == 0, r.stderr
    names = [line.split("]")[1].split()[0] for line in r.stdout.splitlines()[1:]]
    assert names == ["env", "build", "test_cuda", "bench"]


# -- the sanitizer cases -------------------------------------------------------

def _sanitize_case():
    spec = importlib.util.spec_from_file_location("sanitize_case", SCRIPTS / "sanitize_case.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sanitizer_cases_cover_the_issue():
    sc = _sanitize_case()
    cases = sc.CASES
    assert any(c.get("hidden_size", 0) >= 600 for c in cases)  # LayerNorm's 512-thread path
    assert any(c.get("packed") for c in cases)
    assert any(c.get("proj_size") for c in cases)
    assert any(c["dtype"] == torch.bfloat16 and c.get("packed") for c in cases)
    assert any(c["dtype"] == torch.bfloat16 and c.get("hidden_size", 0) >= 600 for c in cases)
    # Both large-row LayerNorm paths on a 132-SM Hopper: fewer rows than SMs
    # (a row over a thread-block cluster) and more (a 512-thread block a row)
    assert any(c.get("hidden_size", 0) >= 481 and c.get("batch", sc.B) < 132 for c in cases)
    assert any(c.get("hidden_size", 0) >= 481 and c.get("batch", sc.B) >= 132
               and not c.get("packed") for c in cases)
    # zoneout's kernels on both states, in a half type with a projection too
    assert any(c.get("zoneout_hidden") and c.get("zoneout_cell") and c.get("proj_size")
               and c["dtype"] in (torch.bfloat16, torch.float16) for c in cases)
    assert any(c.get("weight_dropout") and c.get("variational_dropout") and c.get("packed")
               for c in cases)


def test_sanitizer_large_cases_run_on_cpu():
    import rnnfast

    sc = _sanitize_case()
    for case in sc.CASES:
        if case.get("hidden_size", 0) >= 600 and case.get("packed") or case.get("proj_size") \
                and case["dtype"] == torch.bfloat16:
            sc.run_case(rnnfast.LSTM, case, device="cpu")
    sc.run_case(rnnfast.LayerNormLSTM,
                next(c for c in sc.CASES if c.get("hidden_size", 0) >= 600), device="cpu")
    sc.run_case(rnnfast.LayerNormLSTM,
                next(c for c in sc.CASES if c.get("batch", sc.B) >= 132), device="cpu")


def test_decode_overhead_script_runs():
    r = subprocess.run([PY, str(SCRIPTS / "decode_overhead.py"), "--H", "8", "--no-profile",
                        "--min-s", "0.01"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    for layer in ("module", "forward", "functional", "ops", "dispatcher", "gemm", "nn.LSTM"):
        assert any(line.startswith(layer + " ") for line in r.stdout.splitlines()), layer
    assert "b_ih + b_hh" in r.stdout
