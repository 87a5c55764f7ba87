"""Builds and loads the CPU emulation of rnnfast's CUDA backend
(tests/simt/*.cpp over csrc/cuda/simt_emulation.h; see test_simt.py).

``load()`` builds it once per process (ninja, under build/rnnfast_simt*)
and defines its ops, ``torch.ops.rnnfast_simt.*``, with rnnfast's own
schemas. With RNNFAST_SIMT_ASAN set it is built with AddressSanitizer (the
process must have libasan preloaded). With RNNFAST_TEST_CUDA_BACKEND_ON_CPU
set, conftest.py routes rnnfast's CPU ops through it, so that a whole test
file runs the CUDA backend's code on the CPU.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["module", "kernels_lstm", "kernels_layer_norm", "selftest"]
OPS = ["lstm_forward", "lstm_backward", "layer_norm_lstm_forward", "layer_norm_lstm_backward"]
ASAN_ENV = "RNNFAST_SIMT_ASAN"
ROUTE_ENV = "RNNFAST_TEST_CUDA_BACKEND_ON_CPU"

_loaded = None


def load():
    """The emulation's Python module (configure, counters, self-tests), its
    ops defined under ``torch.ops.rnnfast_simt``."""
    global _loaded
    if _loaded is not None:
        return _loaded
    import torch.utils.cpp_extension as cpp_extension

    import rnnfast  # noqa: F401  (defines torch.ops.rnnfast.*)

    flags = ["-O1", "-DRNNFAST_SIMT_EMULATION", "-Wno-unknown-pragmas"]
    name = "rnnfast_simt"
    sanitize = bool(os.environ.get(ASAN_ENV))
    if sanitize:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        name += "_asan"
    build = ROOT / "build" / name
    build.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(
        name=name, sources=[str(ROOT / "tests" / "simt" / f"{s}.cpp") for s in SOURCES],
        extra_cflags=flags, extra_ldflags=flags[-2:] if sanitize else [],
        build_directory=str(build), verbose=bool(os.environ.get("RNNFAST_VERBOSE_BUILD")))
    library = torch.library.Library("rnnfast_simt", "DEF")
    for op in OPS:
        schema = str(getattr(torch.ops.rnnfast, op).default._schema)
        library.define(schema.split("::", 1)[1])
    module.library = library  # kept alive with the module
    _loaded = module
    return module


def route_cpu_ops_through_emulation():
    """Replaces the CPU kernels of rnnfast's four ops by the emulated CUDA
    backend's for the rest of the process (their autograd, fake kernels and
    everything above them stay rnnfast's own)."""
    load()
    library = torch.library.Library("rnnfast", "IMPL")
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    # An older torch has no allow_override (it overrides with a warning).
    override = ({"allow_override": True}
                if "allow_override" in inspect.signature(library.impl).parameters else {})
    for op in OPS:
        emulated = getattr(torch.ops.rnnfast_simt, op).default
        # Straight to the emulated op's CPU kernel, whatever devices its
        # arguments claim (as the dispatcher reached this CPU kernel).
        library.impl(op, lambda *args, _op=emulated: _op.redispatch(cpu, *args), "CPU",
                     **override)
    _loaded.route_library = library
