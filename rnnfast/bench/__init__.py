"""rnnfast.bench: the benchmark harness behind ``rnnfast-bench`` and
``python -m rnnfast.bench``.

Modules, one role each: :mod:`.cases` (axes and presets), :mod:`.impls`
(the implementations and the GEMM floor), :mod:`.timing` (measuring one
implementation), :mod:`.suite` (running them side by side),
:mod:`.results` (records, environment, JSON and CSV), :mod:`.report`
(tables, plots, benchmarks/README.md), :mod:`.compare` (regressions between
two runs) and :mod:`.cli` (the command line).
"""

from .cli import main

__all__ = ["main"]
