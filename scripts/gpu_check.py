"""The GPU check of rnnfast: build, tests, sanitizers, benchmark and a
kernel profile, as one command that fits a fixed time budget.

    python scripts/gpu_check.py OUTDIR [--quick] [--budget S] [--work DIR] [--dry-run]

(``scripts/gpu_check.sh OUTDIR`` runs this with the system Python.)

Stages, in this order, each with its own log, exit code and time:

  env          GPU, driver, torch, toolkit, Python packages; fails fast when
               nvcc or ninja is missing or torch sees no GPU
  build        pip install --no-build-isolation --no-deps -e . for the visible
               GPU's arch only (TORCH_CUDA_ARCH_LIST from nvidia-smi's
               compute_cap), RNNFAST_FORCE_CUDA=1
  test_cuda    pytest tests/test_cuda.py (its own junit XML)
  tests_cuda   the other CUDA tests (pytest -k cuda), without the ones that
               compile with Inductor (minutes of compiling, no CUDA coverage
               that the aot_eager tests lack) and without test_simt.py (the
               CPU emulation of what the GPU runs here itself)
  memcheck, racecheck, synccheck, initcheck
               compute-sanitizer on scripts/sanitize_case.py, all four at
               once (one GPU, 16 cores: each is CPU-bound instrumentation)
  bench        python -m rnnfast.bench --grid gpu (stops itself in time)
  ncu          Nsight Compute of one training step of each layer
               (scripts/profile_step.py at T=50 B=64 I=H=512, a few hundred
               kernels each): time per kernel, in ncu_kernels.csv
  bench_zoneout  rnnfast.LSTM with zoneout against a Python loop over
               nn.LSTMCell (the bench's --regularisers), T=100 B=64 and B=4
               I=H=256, training
  bench_unfused  streaming decode (B=1 and 8, H=256 and 512, 2 layers) with
               the fused small-batch step turned off
               (RNNFAST_CUDA_FUSED_STEP_ROWS=0), to compare with bench's

``--quick`` runs build, test_cuda and bench only (under 5 minutes).

The budget (default 530 s, 280 s with --quick; GPU_CHECK_BUDGET_S) is
shared so that no stage starves a later one: a stage runs for at most the
smaller of its own cap and what is left once every later stage's minimum
is set aside. A stage left less than its minimum is recorded as skipped
(lack of time), as is one whose tool is missing or cannot run on this
machine (compute-sanitizer or ncu refusing the device), or whose
prerequisite (build) failed; skipped is not failed. A pytest stage that
hits its limit is interrupted (SIGINT: pytest writes its junit XML), then
killed; every test's outcome is also written as it finishes
(scripts/gpu_check_pytest.py), so a killed run still reports what it did.

OUTDIR receives few files (a device machine returns at most eight):
stages.md and stages.json (the stage table, rewritten after every stage),
gpu_check.tar.gz (every log, junit XML, bench and ncu output), and copies
of the bench's results.json and ncu_kernels.csv. The loose files are kept
in the work folder (--work; default a fresh folder under /tmp). The exit
code is 0 only when no stage failed or timed out; the table's verdict tells
the two apart ("SOME STAGES FAILED", or "INCOMPLETE" where stages only ran
out of time). A stage's leftover processes are killed when it ends.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

BUDGET_S = 530.0        # fits a 560 s device call with the summary's margin
QUICK_BUDGET_S = 280.0  # under 5 minutes

PASSED, FAILED, TIMED_OUT, SKIPPED = "passed", "failed", "timed out", "skipped"

# Log lines that mean a tool cannot run on this machine (not a defect of
# rnnfast): compute-sanitizer and ncu under some sandboxes.
TOOL_REFUSED = ("Device not supported", "LibraryNotLoaded", "ERR_NVGPUCTRPERM",
                "does not have permission to access NVIDIA GPU Performance Counters",
                "Failed to initialize the profiler")

SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
# The tools whose checks stay within one kernel (shared-memory races,
# barriers) and are run on rnnfast's kernels only, where the tool can
# filter by name: instrumenting torch's and cuBLAS's kernels too would spend
# the stage's minutes on code rnnfast does not own. memcheck instruments
# everything, so that a wrong size or leading dimension handed to cuBLAS is
# still an error, and initcheck too: rnnfast's kernels read what cuBLAS
# wrote, and writes by kernels left uninstrumented might not count as
# initialising that memory.
OWN_KERNEL_TOOLS = ("racecheck", "synccheck")
OWN_KERNELS = "rnnfast"  # every kernel is in namespace rnnfast::cuda

# The skip reason that scripts/gpu_check_pytest.py gives a test
# not run because an earlier test of its process broke the CUDA context.
NOT_RUN = "not run: the CUDA context of this process was broken by"


@dataclass
class Stage:
    """One step of the check. ``command`` runs with ``env`` added, its
    output in ``<name>.log``; ``cap_s`` is its own limit, ``min_s`` the
    least time worth starting it with. ``needs`` lists stages that must
    have passed first. Stages sharing a ``group`` run at the same time.
    ``interrupt``: on time-out send SIGINT first (pytest then writes its
    reports). ``skip`` (known before running) records it as skipped.
    ``after(outcome, work)`` post-processes its output (returns a note)."""

    name: str
    command: Optional[list[str]]
    cap_s: float
    min_s: float = 20.0
    needs: tuple[str, ...] = ()
    group: Optional[str] = None
    interrupt: bool = False
    env: dict[str, str] = field(default_factory=dict)
    skip: Optional[str] = None
    refused: tuple[str, ...] = ()
    tests_log: Optional[str] = None  # JSON lines, one per test (gpu_check_pytest)
    junit: Optional[str] = None
    after: Optional[Callable[["Outcome", Path], Optional[str]]] = None


@dataclass
class Outcome:
    name: str
    status: str
    seconds: float = 0.0
    limit_s: Optional[float] = None
    exit_code: Optional[int] = None
    note: str = ""
    log: Optional[str] = None
    tests: Optional[dict] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------

def units(stages: Sequence[Stage]) -> list[list[Stage]]:
    """Stages in order, those of one group (consecutive) together."""
    out: list[list[Stage]] = []
    for s in stages:
        if out and s.group is not None and out[-1][0].group == s.group:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def reserve_after(later: Sequence[list[Stage]], left_s: float = float("inf")) -> float:
    """Time set aside for later units: each unit's largest minimum, for
    units that will try to run and could (a minimum over ``left_s`` will be
    skipped anyway)."""
    mins = [max(s.min_s for s in unit if s.skip is None) for unit in later
            if any(s.skip is None for s in unit)]
    return sum(m for m in mins if m <= left_s)


# Seconds kept back from each stage's limit for killing it, polling and
# writing the table.
MARGIN_S = 1.0


def stage_limit(stage: Stage, left_s: float, reserved_s: float) -> float:
    """The seconds ``stage`` may run: its cap, cut so that the later
    stages keep their minimums."""
    return max(0.0, min(stage.cap_s, left_s - reserved_s - MARGIN_S))


def summarize_tests(path: Path) -> Optional[dict]:
    """Counts and failed test ids from a gpu_check_pytest JSON-lines log."""
    if not path.exists():
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0, "not_run": 0}
    failed: list[str] = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        outcome = rec.get("outcome")
        if outcome == "skipped" and NOT_RUN in str(rec.get("reason", "")):
            outcome = "not_run"  # after a test that broke the CUDA context
        if outcome in counts:
            counts[outcome] += 1
        if outcome in ("failed", "error"):
            failed.append(rec.get("nodeid", "?"))
    return dict(counts, total=sum(counts.values()), failed_ids=failed[:50])


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _default_sigint() -> None:
    """In a stage's process before it starts: SIGINT back to its default
    action. A shell starts background jobs (`gpu_check.sh ... &`, nohup)
    with SIGINT ignored and their children inherit that; Python then installs
    no KeyboardInterrupt handler, so an interrupted pytest was killed at its
    limit without writing its junit XML."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_unit(unit: Sequence[Stage], limits: dict[str, float], work: Path,
             base_env: dict[str, str], poll_s: float = 0.2) -> dict[str, Outcome]:
    """Runs the stages of one unit at the same time, each under its limit;
    returns their outcomes (not yet post-processed)."""
    procs = {}
    logs = {}
    t0 = time.monotonic()
    for s in unit:
        log = open(work / f"{s.name}.log", "wb")
        logs[s.name] = log
        env = dict(base_env, **s.env)
        procs[s.name] = subprocess.Popen(s.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=ROOT, env=env,
                                         start_new_session=True,
                                         preexec_fn=_default_sigint if s.interrupt else None)
    signalled: dict[str, int] = {}
    ended: dict[str, float] = {}
    while len(ended) < len(procs):
        now = time.monotonic() - t0
        for s in unit:
            p = procs[s.name]
            if s.name in ended:
                continue
            if p.poll() is not None:
                ended[s.name] = now
                # whatever it started and left running (a test's child
                # process) must not run on into the later stages
                _killpg(p, signal.SIGKILL)
                continue
            limit = limits[s.name]
            grace = min(20.0 if s.interrupt else 5.0, limit / 4)
            if now >= limit:
                _killpg(p, signal.SIGKILL)
                signalled[s.name] = signal.SIGKILL
            elif now >= limit - grace and s.name not in signalled:
                _killpg(p, signal.SIGINT if s.interrupt else signal.SIGTERM)
                signalled[s.name] = signal.SIGINT
        time.sleep(poll_s)
    out = {}
    for s in unit:
        p = procs[s.name]
        logs[s.name].close()
        rc = p.wait()
        timed_out = s.name in signalled
        status = TIMED_OUT if timed_out else (PASSED if rc == 0 else FAILED)
        note = f"stopped at its {limits[s.name]:.0f} s limit" if timed_out else ""
        if status == FAILED and s.refused:
            text = (work / f"{s.name}.log").read_text(errors="replace")
            hit = next((r for r in s.refused if r in text), None)
            if hit:
                status, note = SKIPPED, f"the tool cannot run on this machine ({hit!r})"
        out[s.name] = Outcome(s.name, status, round(ended[s.name], 1), round(limits[s.name]),
                              rc, note, f"{s.name}.log")
    return out


def run_stages(stages: Sequence[Stage], budget_s: float, work: Path, outdir: Path,
               base_env: Optional[dict[str, str]] = None,
               before: Optional[Callable[[Stage, dict[str, Outcome], float], None]] = None,
               say: Callable[[str], None] = print) -> list[Outcome]:
    """Runs ``stages`` within ``budget_s`` seconds; writes the stage table
    (and the archive) into ``outdir`` after each unit. ``before(stage,
    outcomes, limit_s)`` runs just before a stage starts (it may fill its
    command or environment from earlier stages and its time limit)."""
    base_env = dict(os.environ if base_env is None else base_env)
    start = time.monotonic()
    outcomes: dict[str, Outcome] = {}
    plan = units(stages)
    for i, unit in enumerate(plan):
        left = budget_s - (time.monotonic() - start)
        reserved = reserve_after(plan[i + 1:], left)
        limits: dict[str, float] = {}
        runnable = []
        for s in unit:
            missing = [n for n in s.needs if outcomes.get(n) is None
                       or outcomes[n].status != PASSED]
            if s.skip is not None:
                outcomes[s.name] = Outcome(s.name, SKIPPED, note=s.skip)
            elif missing:
                outcomes[s.name] = Outcome(s.name, SKIPPED,
                                           note=f"needs {', '.join(missing)}, which did not pass")
            elif s.command is None:
                outcomes[s.name] = Outcome(s.name, SKIPPED, note="nothing to run")
            else:
                limit = stage_limit(s, left, reserved)
                if limit < s.min_s:
                    outcomes[s.name] = Outcome(
                        s.name, SKIPPED, limit_s=round(limit),
                        note=f"lack of time: {limit:.0f} s left for it, needs {s.min_s:.0f} s")
                else:
                    limits[s.name] = limit
                    runnable.append(s)
                    if before is not None:
                        before(s, outcomes, limit)
        for s in unit:
            if s.name in outcomes and s not in runnable:
                say(f"{s.name}: {outcomes[s.name].status}: {outcomes[s.name].note}")
        if runnable:
            say(", ".join(f"{s.name} (limit {limits[s.name]:.0f} s)" for s in runnable)
                + f": running, {left:.0f} s of the budget left")
            done = run_unit(runnable, limits, work, base_env)
            for s in runnable:
                o = done[s.name]
                if s.tests_log:
                    o.tests = summarize_tests(work / s.tests_log)
                if s.after is not None:
                    try:
                        extra = s.after(o, work)
                    except Exception as e:  # post-processing must not lose the table
                        extra = f"post-processing failed: {type(e).__name__}: {e}"
                    if extra:
                        o.note = "; ".join(x for x in (o.note, extra) if x)
                outcomes[s.name] = o
                say(f"{s.name}: {o.status} in {o.seconds:.0f} s"
                    + (f" ({o.note})" if o.note else ""))
                if o.status in (FAILED, TIMED_OUT):
                    _print_tail(work / f"{s.name}.log", s.name, say)
        write_report([outcomes[s.name] for s in stages if s.name in outcomes], outdir, work,
                     elapsed_s=time.monotonic() - start, budget_s=budget_s)
    return [outcomes[s.name] for s in stages]


def _print_tail(path: Path, name: str, say: Callable[[str], None], lines: int = 25) -> None:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    for line in tail:
        say(f"  [{name}] {line}")


def ok(outcomes: Sequence[Outcome]) -> bool:
    return not any(o.status in (FAILED, TIMED_OUT) for o in outcomes)


def _tests_cell(o: Outcome) -> str:
    t = o.tests
    if not t:
        return ""
    cell = f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
    if t["error"]:
        cell += f", {t['error']} errors"
    if t.get("not_run"):
        cell += f", {t['not_run']} not run after a test broke the CUDA context"
    return cell


def markdown_table(outcomes: Sequence[Outcome], elapsed_s: float, budget_s: float) -> str:
    lines = ["| stage | status | seconds | limit s | exit | tests | note |",
             "|---|---|---:|---:|---:|---|---|"]
    for o in outcomes:
        lines.append("| " + " | ".join([
            o.name, o.status, f"{o.seconds:.0f}",
            "-" if o.limit_s is None else f"{o.limit_s:.0f}",
            "-" if o.exit_code is None else str(o.exit_code),
            _tests_cell(o), o.note.replace("|", "\\|")]) + " |")
    failed = [t for o in outcomes if o.tests for t in o.tests["failed_ids"]]
    stopped = [o.name for o in outcomes if o.status == TIMED_OUT]
    if any(o.status == FAILED for o in outcomes):
        verdict = "SOME STAGES FAILED"
    elif stopped:  # not a failure of rnnfast, but not a pass either
        verdict = (f"INCOMPLETE: no stage failed, {', '.join(stopped)} stopped at "
                   f"{'its' if len(stopped) == 1 else 'their'} time limit")
    else:
        verdict = "all stages that ran passed"
    text = (f"# rnnfast GPU check: {verdict}\n\n{elapsed_s:.0f} s of a {budget_s:.0f} s "
            f"budget.\n\n" + "\n".join(lines) + "\n")
    if failed:
        text += "\nFailed tests:\n\n" + "\n".join(f"- `{t}`" for t in failed) + "\n"
    return text


# Files copied loose into OUTDIR besides the table and the archive.
LOOSE = ("bench/results.json", "ncu_kernels.csv", "build_info.json")


def write_report(outcomes: Sequence[Outcome], outdir: Path, work: Path,
                 elapsed_s: float, budget_s: float) -> None:
    """stages.md, stages.json, gpu_check.tar.gz (the work folder) and the
    LOOSE files into ``outdir``: at most 6 files."""
    outdir.mkdir(parents=True, exist_ok=True)
    doc = dict(ok=ok(outcomes), seconds=round(elapsed_s), budget_s=budget_s,
               stages=[o.as_dict() for o in outcomes])
    env = work / "env.json"
    if env.exists():
        try:
            doc["environment"] = json.loads(env.read_text())
        except json.JSONDecodeError:
            pass
    text = markdown_table(outcomes, elapsed_s, budget_s)
    (outdir / "stages.json").write_text(json.dumps(doc, indent=1) + "\n")
    (outdir / "stages.md").write_text(text)
    shutil.copy(outdir / "stages.md", work / "stages.md")
    for rel in LOOSE:
        src = work / rel
        if src.exists():
            shutil.copy(src, outdir / rel.replace("/", "_"))
    if work.resolve() != outdir.resolve():
        write_archive(work, outdir / "gpu_check.tar.gz")


# A device machine returns no file over 16 MiB: the archive must stay under
# this, or every log in it is lost (a sanitizer reporting an error in every
# thread of every launch can write hundreds of megabytes).
ARCHIVE_LIMIT_BYTES = 15 * 2**20
# What is kept of each file over this size when the archive must shrink:
# its end, where the summaries and the last errors are.
KEEP_BYTES = 2 * 2**20


def write_archive(work: Path, dest: Path, limit_bytes: int = ARCHIVE_LIMIT_BYTES,
                  keep_bytes: int = KEEP_BYTES) -> None:
    """``work`` as ``dest`` (tar.gz, under the folder name gpu_check); if
    that is over ``limit_bytes``, again with each file over ``keep_bytes``
    cut to its last ``keep_bytes``, marked at its start."""
    tmp = dest.with_name(dest.name + ".part")

    def write(cut: bool) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(work.rglob("*")):
                if not path.is_file():
                    continue
                name = f"gpu_check/{path.relative_to(work).as_posix()}"
                size = path.stat().st_size
                if not cut or size <= keep_bytes:
                    tar.add(path, arcname=name, recursive=False)
                    continue
                with path.open("rb") as f:
                    f.seek(size - keep_bytes)
                    data = (f"[gpu_check: the first {size - keep_bytes} of {size} bytes were "
                            f"cut to keep the archive under {limit_bytes} bytes]\n"
                            ).encode() + f.read()
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), int(path.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))

    write(cut=False)
    if tmp.stat().st_size > limit_bytes:
        write(cut=True)
    tmp.replace(dest)


# ---------------------------------------------------------------------------
# What the stages run
# ---------------------------------------------------------------------------

def find_tool(name: str) -> Optional[str]:
    """A CUDA tool on PATH or in a toolkit folder."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    dirs += sorted((str(p) for p in Path("/usr/local").glob("cuda-*")), reverse=True)
    for d in dirs:
        for sub in ("bin", "compute-sanitizer"):
            p = Path(d) / sub / name
            if d and p.is_file() and os.access(p, os.X_OK):
                return str(p)
    for p in sorted(Path("/opt/nvidia").glob(f"nsight-compute/*/{name}"), reverse=True):
        return str(p)
    return None


def kernel_filter(sanitizer: str) -> list[str]:
    """compute-sanitizer's arguments that restrict its checks to rnnfast's
    kernels (a name substring), where its --help lists --kernel-name; none
    where it does not (an older tool: every kernel is then checked)."""
    try:
        shown = subprocess.run([sanitizer, "--help"], capture_output=True, text=True,
                               timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    if "--kernel-name" not in shown.stdout + shown.stderr:
        return []
    return ["--kernel-name", f"kns={OWN_KERNELS}"]


def arch_list(compute_caps: str) -> str:
    """TORCH_CUDA_ARCH_LIST from ``nvidia-smi --query-gpu=compute_cap
    --format=csv,noheader`` (one line per GPU): each arch once, sorted."""
    caps = {line.strip() for line in compute_caps.splitlines() if line.strip()}
    caps = {c for c in caps if c.replace(".", "", 1).isdigit()}
    return ";".join(sorted(caps, key=lambda c: tuple(int(x) for x in c.split("."))))


def visible_arch_list() -> str:
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return arch_list(text)


def _uses_inductor(source: str) -> bool:
    """Whether test source calls torch.compile with Inductor (no backend,
    or backend="inductor")."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "compile" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"):
            backend = next((k.value for k in node.keywords if k.arg == "backend"), None)
            if backend is None:
                return True
            if isinstance(backend, ast.Constant) and backend.value == "inductor":
                return True
    return False


def pytest_command(py: str, targets: list[str], name: str, extra: Sequence[str] = (),
                   workers: int = 0, per_test_timeout: Optional[int] = None) -> list[str]:
    cmd = [py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
           "-p", "gpu_check_pytest", f"--gpu-check-log={name}.jsonl",
           f"--junitxml={name}.xml", *targets, *extra]
    if workers > 1:
        cmd += ["-n", str(workers)]
    if per_test_timeout:
        # The thread method: a test blocked in a CUDA call (a hung kernel)
        # never returns to Python, so the signal method could not stop it;
        # the thread method ends the process (under pytest-xdist a fresh
        # worker takes the remaining tests, and the test is reported as
        # crashed). -o: the ini name, which every pytest-timeout knows.
        cmd += [f"--timeout={per_test_timeout}", "-o", "timeout_method=thread"]
    return cmd


def _importable(py: str, module: str) -> bool:
    try:
        return subprocess.run([py, "-c", f"import {module}"], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def after_env(outcome: Outcome, work: Path) -> Optional[str]:
    try:
        info = json.loads((work / "env.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    missing = [p for p, found in info.get("packages", {}).items() if not found]
    notes = list(info.get("problems", []))
    if missing:
        notes.append("not installed: " + ", ".join(missing))
    return "; ".join(notes) or None


def after_sanitizer(outcome: Outcome, work: Path) -> Optional[str]:
    """What a sanitizer stage's log says: how many of sanitize_case.py's
    cases ran (so a stage stopped at its limit still tells how far it got)
    and the tool's own summary line. Nothing for a tool that could not run."""
    if outcome.status == SKIPPED:
        return None
    try:
        text = (work / f"{outcome.name}.log").read_text(errors="replace")
    except OSError:
        return None
    lines = text.splitlines()
    ok_cases = sum(line.startswith("ok ") for line in lines)
    failed = [line for line in lines if line.startswith("FAIL ")]
    summary = [line.strip("= ").strip() for line in lines
               if "ERROR SUMMARY:" in line or "RACECHECK SUMMARY:" in line]
    notes = [f"{ok_cases} cases ok, {len(failed)} failed"]
    if failed:
        notes.append("first failure: " + failed[0][5:][:200])
    if summary:
        notes.append(summary[-1])
    return "; ".join(notes)


def after_ncu(outcome: Optional[Outcome], work: Path) -> Optional[str]:
    """ncu_kernels.csv from ncu's CSV (its --log-file, else its log)."""
    rows: list[dict] = []
    for name in ("ncu_raw.csv", "ncu.log"):
        if (work / name).exists():
            rows = ncu_kernel_times((work / name).read_text(errors="replace"))
            if rows:
                break
    if not rows:
        return "no kernel times in ncu's output"
    write_kernel_table(rows, work / "ncu_kernels.csv")
    total = sum(r["total_us"] for r in rows)
    return f"{len(rows)} kernels, {sum(r['calls'] for r in rows)} launches, {total:.0f} us"


_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
          "second": 1e6, "s": 1e6}


def ncu_kernel_times(text: str) -> list[dict]:
    """Time per kernel from ``ncu --csv --metrics gpu__time_duration.sum``
    output (lines before the CSV header are ncu's own messages): calls,
    total and mean microseconds per kernel name, slowest total first."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    per: dict[str, list[float]] = {}
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        try:
            value = float(row["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        scale = _UNITS.get(row.get("Metric Unit", "").strip(), None)
        if scale is None:
            continue
        per.setdefault(row.get("Kernel Name", "?"), []).append(value * scale)
    rows = [dict(kernel=k, calls=len(v), total_us=sum(v), mean_us=sum(v) / len(v))
            for k, v in per.items()]
    rows.sort(key=lambda r: -r["total_us"])
    return rows


def write_kernel_table(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kernel", "calls", "total_us", "mean_us"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, total_us=f"{r['total_us']:.2f}", mean_us=f"{r['mean_us']:.2f}"))


def build_stages(py: str, work: Path, quick: bool = False,
                 workers: Optional[int] = None) -> list[Stage]:
    """The stages of the check, in order."""
    sanitizer = find_tool("compute-sanitizer")
    ncu = find_tool("ncu")
    here = [py, str(SCRIPTS / "gpu_check.py")]
    pyenv = {"PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(SCRIPTS)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        "PYTHONUNBUFFERED": "1"}
    if workers is None:  # pytest-xdist when present: half the cores (16 on
        # the H200 machine), at most 8 processes sharing the one GPU
        workers = min(8, max(2, (os.cpu_count() or 4) // 2)) if _importable(py, "xdist") else 0
    per_test = 120 if _importable(py, "pytest_timeout") else None
    stages = [
        Stage("env", here + ["_env", str(work / "env.json")], cap_s=60, min_s=10, env=pyenv,
              after=after_env),
        Stage("build", here + ["_build", str(work / "build_info.json")], cap_s=300, min_s=60,
              needs=("env",), env=dict(pyenv, RNNFAST_FORCE_CUDA="1",
                                       MAX_JOBS=str(os.cpu_count() or 4))),
        Stage("test_cuda", pytest_command(py, [str(ROOT / "tests" / "test_cuda.py")],
                                          str(work / "test_cuda"), workers=workers,
                                          per_test_timeout=per_test),
              cap_s=180, min_s=30, needs=("build",), interrupt=True, env=pyenv,
              tests_log="test_cuda.jsonl", junit="test_cuda.xml"),
    ]
    if not quick:
        stages.append(Stage(
            "tests_cuda", pytest_command(
                py, [str(ROOT / "tests")], str(work / "tests_cuda"),
                # test_simt.py: the CPU emulation of the CUDA backend, whose
                # name matches -k cuda; on a GPU the device itself runs
                # what it emulates, and its suite alone takes minutes.
                ["-k", "cuda", "--ignore", str(ROOT / "tests" / "test_cuda.py"),
                 "--ignore", str(ROOT / "tests" / "test_simt.py"),
                 "--gpu-check-no-inductor"], workers=workers, per_test_timeout=per_test),
            cap_s=150, min_s=30, needs=("build",), interrupt=True, env=pyenv,
            tests_log="tests_cuda.jsonl", junit="tests_cuda.xml"))
        own = kernel_filter(sanitizer) if sanitizer else []
        for tool in SANITIZER_TOOLS:
            cmd = None if sanitizer is None else [
                sanitizer, "--tool", tool, "--error-exitcode", "1",
                "--report-api-errors", "no", *(own if tool in OWN_KERNEL_TOOLS else []),
                py, str(SCRIPTS / "sanitize_case.py")]
            stages.append(Stage(
                tool, cmd, cap_s=150, min_s=45, needs=("build",), group="sanitizers",
                env=dict(pyenv, PYTORCH_NO_CUDA_MEMORY_CACHING="1"), refused=TOOL_REFUSED,
                skip=None if sanitizer else "compute-sanitizer not found",
                after=after_sanitizer))
    stages.append(Stage(
        "bench", [py, "-m", "rnnfast.bench", "--grid", "gpu", "--impls", "rnnfast.*",
                  "--out", str(work / "bench")],
        cap_s=150, min_s=45, needs=("build",), env=pyenv))
    if not quick:
        stages.append(Stage(
            "ncu", None if ncu is None else [
                ncu, "--profile-from-start", "off", "--clock-control", "none",
                "--target-processes", "all", "--csv", "--metrics", "gpu__time_duration.sum",
                "--log-file", str(work / "ncu_raw.csv"), py, str(SCRIPTS / "profile_step.py"),
                "--T", "50"],
            cap_s=90, min_s=30, needs=("build",), env=pyenv, refused=TOOL_REFUSED,
            skip=None if ncu else "ncu not found", after=after_ncu))
        # issue 15's comparison on the GPU, where a Python loop pays a launch
        # per op: rnnfast.LSTM with zoneout against a loop over nn.LSTMCell
        stages.append(Stage(
            "bench_zoneout", [py, "-m", "rnnfast.bench", "--device", "cuda", "--T", "100",
                              "--B", "64", "4", "--H", "256", "--layers", "1",
                              "--bidirectional", "false", "--decode", "false",
                              "--mode", "training", "--regularisers",
                              "--impls", "rnnfast.LSTM (zoneout)", "--no-plots",
                              "--out", str(work / "bench_zoneout")],
            cap_s=60, min_s=25, needs=("build",), env=pyenv))
        # the small-batch forward steps without the fused product-and-cell
        # launch (lstm_fused_forward_step, H/8 blocks of 256 threads),
        # against the bench stage's decode cases with it: whether the fused
        # step pays on this GPU (rnnfast-bench compare bench/results.json
        # bench_unfused/results.json). Last and short: 20 s of the budget
        # are set aside for it, as every stage's minimum is.
        stages.append(Stage(
            "bench_unfused", [py, "-m", "rnnfast.bench", "--device", "cuda", "--T", "1",
                              "--B", "1", "8", "--H", "256", "512", "--layers", "2",
                              "--bidirectional", "false", "--decode", "true",
                              "--mode", "inference", "--tf32", "false",
                              "--impls", "rnnfast.LSTM", "--no-plots",
                              "--out", str(work / "bench_unfused")],
            cap_s=45, min_s=20, needs=("build",),
            env=dict(pyenv, RNNFAST_CUDA_FUSED_STEP_ROWS="0")))
    return stages


def before_stage(stage: Stage, outcomes: dict[str, Outcome], limit_s: float) -> None:
    """Fills what is known only when a stage starts: the build targets the
    visible GPUs' arch; the bench stops itself inside its limit (and writes
    its results) rather than being killed."""
    if stage.name.startswith("bench") and stage.command and "--max-time" not in stage.command:
        stage.command += ["--max-time", f"{max(limit_s - 20, 10):.0f}"]
    if stage.name == "build" and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        archs = visible_arch_list()
        if archs:
            stage.env["TORCH_CUDA_ARCH_LIST"] = archs


# ---------------------------------------------------------------------------
# Helper commands run as stages (python scripts/gpu_check.py _env / _build)
# ---------------------------------------------------------------------------

# pyproject.toml's SPDX license string needs setuptools >= 77 (PEP 639).
SETUPTOOLS_MIN = 77


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


PACKAGES = ("pytest", "xdist", "pytest_timeout", "expecttest", "rich", "matplotlib", "numpy",
            "setuptools")


def env_stage(out_json: Path) -> int:
    import importlib.util
    import platform

    info: dict = {"python": sys.version.split()[0], "executable": sys.executable,
                  "cpus": os.cpu_count(), "platform": platform.platform()}
    problems = []
    for tool in ("nvidia-smi", "nvcc", "ninja", "compute-sanitizer", "ncu"):
        info[tool] = find_tool(tool)
    if info["nvidia-smi"]:
        smi = subprocess.run([info["nvidia-smi"], "--query-gpu=name,driver_version,compute_cap,"
                              "memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["gpus"] = smi.stdout.strip().splitlines()
        print(smi.stdout + smi.stderr)
    if info["nvcc"]:
        v = subprocess.run([info["nvcc"], "--version"], capture_output=True, text=True)
        info["nvcc_version"] = v.stdout.strip().splitlines()[-1:] if v.stdout else None
    for tool in ("nvcc", "ninja"):
        if not info[tool]:
            problems.append(f"{tool} not found: the CUDA kernels cannot be built")
    info["packages"] = {p: importlib.util.find_spec(p) is not None for p in PACKAGES}
    if info["packages"]["setuptools"]:
        import setuptools

        info["setuptools_version"] = setuptools.__version__
        if _major(setuptools.__version__) < SETUPTOOLS_MIN:
            problems.append(f"setuptools {setuptools.__version__} is older than "
                            f"{SETUPTOOLS_MIN}, which pyproject.toml's license field needs: "
                            "the build would stop")
    else:
        problems.append("setuptools is not installed: the build needs it")
    try:
        git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        info["commit"] = git.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cudnn"] = (torch.backends.cudnn.version()
                         if torch.backends.cudnn.is_available() else None)
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["devices"] = [dict(name=torch.cuda.get_device_name(i),
                                    capability=list(torch.cuda.get_device_capability(i)))
                               for i in range(torch.cuda.device_count())]
        else:
            problems.append("torch sees no GPU: every CUDA check would only be skipped")
    except Exception as e:  # torch missing or broken
        problems.append(f"import torch failed: {type(e).__name__}: {e}")
    # (pytest missing stops only the test stages, which say so: the build,
    # the sanitizers and the bench still run; after_env notes it)
    info["problems"] = problems
    out_json.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    for p in problems:
        print(f"env: {p}", file=sys.stderr)
    return 1 if problems else 0


def pip_install_command(py: str) -> list[str]:
    """The build's pip command: the editable install with the machine's own
    torch and setuptools. --no-index (and no version check): the GPU machine
    has no internet, where pip's check for a newer pip could wait out its
    connection time-outs and retries before the build starts."""
    return [py, "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
            "--no-build-isolation", "--no-deps", "-v", "-e", "."]


def build_stage(out_json: Path) -> int:
    print(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<setup.py default>')} "
          f"MAX_JOBS={os.environ.get('MAX_JOBS')}", flush=True)
    rc = subprocess.run(pip_install_command(sys.executable), cwd=ROOT).returncode
    if rc != 0:
        print("pip install -e . failed; building in place with setup.py instead", flush=True)
        rc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"],
                            cwd=ROOT).returncode
        if rc != 0:
            return rc
    check = ("import json, sys, rnnfast; info = rnnfast.build_info(); "
             "json.dump(info, open(sys.argv[1], 'w'), indent=1); print(info); "
             "sys.exit(0 if info['with_cuda'] else 'rnnfast was built without CUDA kernels')")
    return subprocess.run([sys.executable, "-c", check, str(out_json)], cwd=ROOT).returncode


# ---------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--quick", action="store_true",
                   help="build, tests/test_cuda.py and the bench only (under 5 minutes)")
    p.add_argument("--budget", type=float, help="seconds for the whole check "
                   f"(default {BUDGET_S:.0f}, {QUICK_BUDGET_S:.0f} with --quick; "
                   "or GPU_CHECK_BUDGET_S)")
    p.add_argument("--work", type=Path, help="folder for the logs (default: a new /tmp folder)")
    p.add_argument("--workers", type=int,
                   help="pytest-xdist workers (default: half the cores, 2 to 8, when installed)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the stages, their caps and commands; run nothing")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    began = time.monotonic()  # the budget counts from here
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_env":
        return env_stage(Path(argv[1]))
    if argv and argv[0] == "_build":
        return build_stage(Path(argv[1]))
    args = parse_args(argv)
    budget = args.budget or float(os.environ.get("GPU_CHECK_BUDGET_S", 0) or 0) or (
        QUICK_BUDGET_S if args.quick else BUDGET_S)
    outdir = args.outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="rnnfast-gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = os.environ.get("PYTHON") or sys.executable
    stages = build_stages(py, work, quick=args.quick, workers=args.workers)
    start = time.monotonic()

    def say(text: str) -> None:
        print(f"[gpu_check {time.monotonic() - start:4.0f}s] {text}", flush=True)

    if args.dry_run:
        say(f"dry run: {len(stages)} stages, budget {budget:.0f} s, work {work}")
        for s in stages:
            what = s.skip and f"skipped: {s.skip}" or " ".join(s.command or [])
            say(f"{s.name:<10} cap {s.cap_s:>4.0f} s  min {s.min_s:>3.0f} s"
                f"{'  group ' + s.group if s.group else ''}  {what}")
        return 0
    say(f"rnnfast GPU check of {ROOT}: budget {budget:.0f} s, logs in {work}, table in {outdir}")
    outcomes = run_stages(stages, budget - (time.monotonic() - began), work, outdir,
                          before=before_stage, say=say)
    print()
    print((outdir / "stages.md").read_text())
    return 0 if ok(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
