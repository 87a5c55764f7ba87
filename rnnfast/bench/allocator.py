"""How the C allocator returns large blocks, fixed for a benchmark run.

Why: glibc's malloc maps every block above its mmap threshold freshly and
unmaps it when freed, and it adapts that threshold (and its trim threshold)
to what the process freed before. A call that allocates tens of MiB of
workspace (torch.nn.LSTM's oneDNN training on the CPU) then pays a page
fault per 4 KiB page on every call, or not, depending on which cases ran
earlier in the same process. Measured on the 2-core Xeon, T=100 B=64
I=H=128, nn.LSTM training: float32 31.5 against 22.6 ms, bfloat16 about 20
against 11 ms, only the allocator's state differing. rnnfast keeps its own
large buffers for reuse (csrc/cpu/activation_cache.h) and barely moves.

``steady`` (the default of ``rnnfast-bench run``): on glibc, both thresholds
are set to 1 GiB with ``mallopt`` before anything is measured, which also
stops their adaptation: large blocks come back from the heap as they would
under jemalloc or tcmalloc, so every implementation runs without those
faults, the baselines included. ``default``: glibc as the process found it
(what a user who sets nothing gets, history and all). Which one ran, and
the allocator variables set in the environment, are recorded with the
results.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

__all__ = ["MODES", "configure"]

MODES = ("steady", "default")

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
STEADY_BYTES = 1 << 30

# Variables that change the allocator: recorded where set.
VARIABLES = ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
             "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def configure(mode: str) -> dict[str, Any]:
    """Applies ``mode`` (one of :data:`MODES`) to this process's allocator
    and returns what to record: the mode, the C library, the thresholds set
    (steady on glibc), and :data:`VARIABLES` found in the environment."""
    if mode not in MODES:
        raise ValueError(f"allocator mode must be one of {MODES}, got {mode!r}")
    libc_name, libc_version = platform.libc_ver()
    info: dict[str, Any] = {"mode": mode, "libc": f"{libc_name} {libc_version}".strip()}
    env = {k: os.environ[k] for k in VARIABLES if k in os.environ}
    if env:
        info["environment"] = env
    if mode == "steady":
        if libc_name != "glibc":
            info["applied"] = False
            info["why"] = "not glibc: its malloc is left as it is"
            return info
        libc = ctypes.CDLL(None)
        applied = (libc.mallopt(_M_MMAP_THRESHOLD, STEADY_BYTES) == 1
                   and libc.mallopt(_M_TRIM_THRESHOLD, STEADY_BYTES) == 1)
        info["applied"] = applied
        if applied:
            info["mmap_threshold"] = info["trim_threshold"] = STEADY_BYTES
        else:
            info["why"] = "mallopt refused the thresholds"
    return info
