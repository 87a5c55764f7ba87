"""A pytest plugin for scripts/gpu_check.py (``-p gpu_check_pytest`` with
scripts/ on the path).

``--gpu-check-log=PATH`` appends one JSON line per test as soon as its
outcome is known (passed, failed, skipped, error), flushed at once: a
pytest stopped at its time limit, even killed, still tells what it ran.
Under pytest-xdist only the controller writes.

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_check import _uses_inductor  # noqa: E402


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
        if outcome is not None:
            self.write(nodeid=report.nodeid, outcome=outcome, when=report.when,
                       seconds=round(report.duration, 3))


def pytest_configure(config):
    path = config.getoption("gpu_check_log")
    if path and not hasattr(config, "workerinput"):  # xdist workers report to the controller
        config.pluginmanager.register(_Log(path), "gpu_check_log")
