"""A pytest plugin for scripts/gpu_check.py (``-p gpu_check_pytest`` with
scripts/ on the path).

``--gpu-check-log=PATH`` appends one JSON line per test as soon as its
outcome is known (passed, failed, skipped, error), flushed at once: a
pytest stopped at its time limit, even killed, still tells what it ran.
Under pytest-xdist only the controller writes.

After a test fails, the plugin asks whether this process's CUDA context
still works (``torch.cuda.synchronize()``): an illegal address, a
misaligned access or a device-side assert leaves it broken for good, so
every later CUDA call of the process would fail too and bury the one test
that caused it. The later tests of that process (of that xdist worker) are
then skipped, each saying which test broke the context; the other workers
go on. The log counts them as "not run".

``--gpu-check-no-inductor`` deselects the tests that compile with
Inductor: a test whose name says "inductor", or whose source calls
``torch.compile`` with no backend or ``backend="inductor"``. (Minutes of
compiling on the GPU check's clock; the aot_eager tests cover the same
fake kernels and autograd registration.)
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from typing import Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_check import NOT_RUN, _uses_inductor  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("gpu_check")
    group.addoption("--gpu-check-log", default=None, metavar="PATH",
                    help="append one JSON line per test outcome to PATH")
    group.addoption("--gpu-check-no-inductor", action="store_true", default=False,
                    help="deselect the tests that compile with Inductor")


def uses_inductor(item) -> bool:
    if "inductor" in item.name.lower():
        return True
    function = getattr(item, "function", None)
    if function is None:
        return False
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    import textwrap
    return _uses_inductor(textwrap.dedent(source))


def pytest_collection_modifyitems(config, items):
    if not config.getoption("gpu_check_no_inductor"):
        return
    keep, dropped = [], []
    for item in items:
        (dropped if uses_inductor(item) else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def cuda_context_error() -> Optional[str]:
    """None while this process's CUDA context works (or none was made), else
    the error that a device synchronisation raises."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
    except Exception as e:  # RuntimeError, or torch.AcceleratorError
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0] if lines else ''}"
    return None


class _CudaContext:
    """Skips the tests that follow one after which the CUDA context is
    broken (see the top of this file)."""

    def __init__(self) -> None:
        self.broken_by: Optional[str] = None
        self.error = ""
        self.probe = cuda_context_error  # replaced by the plugin's own tests

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if self.broken_by is None and report.failed:
            error = self.probe()
            if error:
                self.broken_by, self.error = item.nodeid, error

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        if self.broken_by is not None:
            pytest.skip(f"{NOT_RUN} {self.broken_by} ({self.error})")


class _Log:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1)

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def pytest_runtest_logreport(self, report):
        outcome = None
        if report.when == "call":
            outcome = "skipped" if report.skipped else report.outcome
            if getattr(report, "wasxfail", None) is not None:
                outcome = "skipped"
        elif report.when == "setup" and not report.passed:
            outcome = "skipped" if report.skipped else "error"
        elif report.when == "teardown" and report.failed:
            outcome = "error"
        elif report.when not in ("setup", "call", "teardown") and report.failed:
            # pytest-xdist's report of a test whose worker died under it
            # (a segfault, or pytest-timeout's thread method ending a hung
            # test): when is "???"
            outcome = "failed"
        if outcome is not None:
            record = dict(nodeid=report.nodeid, outcome=outcome, when=report.when,
                          seconds=round(report.duration, 3))
            if outcome == "skipped" and isinstance(report.longrepr, tuple):
                record["reason"] = str(report.longrepr[2])[:300]
            elif report.when not in ("setup", "call", "teardown"):
                record["reason"] = str(report.longrepr)[:300]
            self.write(**record)


def pytest_configure(config):
    config.pluginmanager.register(_CudaContext(), "gpu_check_cuda_context")
    path = config.getoption("gpu_check_log")
    if path and not hasattr(config, "workerinput"):  # xdist workers report to the controller
        config.pluginmanager.register(_Log(path), "gpu_check_log")
