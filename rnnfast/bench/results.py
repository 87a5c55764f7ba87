"""Result records, the environment they were measured in, and their JSON and
CSV files.

results.json::

    {"schema": 1,
     "environment": {device_name, cpu_model, threads, gpu_name, torch_version,
                     cuda_version, cudnn_version, cuda_driver, rnnfast_version,
                     rnnfast_build_info, tf32_default, date, ...},
     "settings": {preset, min_run_time, warmup, inputs, argv, ...},
     "notes": [what was skipped and why, ...],
     "results": [one record per implementation and case, FIELDS below]}

results.csv holds the same records, one row each, columns FIELDS.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from .cases import AXES, AXIS_DEFAULTS
from .impls import BASELINES

__all__ = ["FIELDS", "KEY", "environment", "finalize", "write_json", "write_csv",
           "load", "case_key"]

SCHEMA = 1

# The columns of a record, in order.
FIELDS = [
    "impl", "family", "baseline", "mode", *AXES,
    "median_ms", "iqr_ms", "runs", "tokens_per_s",
    "ratio",            # baseline median / this median: > 1 is faster
    "floor_ratio",      # this median / gemm-floor median: how far above the floor
    "lstm_ms",          # torch.nn.LSTM's median on the same case (LayerNormLSTM rows)
    "saved_bytes_per_token",  # activation memory saved for the backward
    "peak_bytes",       # peak CUDA memory of one call above what was allocated (GPU)
    "max_abs_diff",     # output against the family baseline with the same weights
    "float64_error",    # output against a float64 copy of the baseline (same weights):
                        # root mean square over the first 16 steps (before 2026-12-01:
                        # the largest difference over the whole output)
    "baseline_float64_error",  # the baseline's own error against that copy, alike
    "compile_s",        # first call, compilation included (torch.compile rows)
    "wall_s",           # seconds this measurement took, set-up and warm-up included
    "backend",          # how it ran: torch.nn.LSTM's kernels (cudnn, onednn, native),
                        # gemm-floor's calls (cuda-graph or eager) and the GEMM
                        # product that won for each of its GEMMs
]
# What identifies a case and implementation across runs.
KEY = ("impl", "mode", *AXES)


def case_key(record: dict) -> tuple:
    """The case of a record, without the implementation."""
    return tuple(record[k] for k in ("mode", *AXES))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> Optional[str]:
    """The NVIDIA driver's version (nvidia-smi), None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def tf32_settings() -> dict[str, Any]:
    """torch's TF32 switches as they are now."""
    out: dict[str, Any] = {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                           "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    return out


def environment(devices: Iterable[str]) -> dict[str, Any]:
    """Where the results were measured. ``tf32_default`` is torch's TF32
    setting before the run; each record's ``tf32`` field is the setting it
    ran under (every implementation of a case runs under the same)."""
    import rnnfast

    cuda = any(d.startswith("cuda") for d in devices)
    cudnn = None
    try:
        cudnn = torch.backends.cudnn.version()
    except Exception:  # no usable cuDNN library
        pass
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name() if cuda else None,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn,
        "cuda_driver": _driver_version() if cuda else None,
        "tf32_default": tf32_settings(),
        "onednn": torch.backends.mkldnn.is_available(),
        "rnnfast_version": rnnfast.__version__,
        "rnnfast_build_info": build_info(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "isa_settings": isa_settings(),
    }
    env["device_name"] = env["gpu_name"] if cuda else env["cpu_model"]
    return env


# Environment variables that change which instructions or kernels the
# libraries run (a run with AVX2 forced on an AVX-512 CPU, for one), or
# rnnfast's own kernel choices: recorded with the results where they are set.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA",
                 "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS",
                 "RNNFAST_CPU_STEP_GEMM", "RNNFAST_CPU_ROW_SPLIT",
                 "RNNFAST_CPU_ROW_GROUPS", "RNNFAST_CPU_STEP_TEAM",
                 "RNNFAST_CPU_NATIVE_BF16", "RNNFAST_CPU_GRAD_BLOCK_ROWS",
                 "RNNFAST_CUDA_FUSED_STEP_ROWS")


def isa_settings() -> dict[str, str]:
    """The :data:`ISA_VARIABLES` set in this process's environment."""
    return {name: os.environ[name] for name in ISA_VARIABLES if name in os.environ}


def build_info() -> dict[str, Any]:
    """``rnnfast.build_info()``: how rnnfast was built and, for the CPU, the
    kernels in use and the per-step products chosen so far in this process
    (``cpu_step_gemm``)."""
    import rnnfast

    return rnnfast.build_info()


def finalize(records: list[dict]) -> list[dict]:
    """Fills the fields computed from other records of the same case:
    ``baseline``, ``ratio``, ``floor_ratio`` and ``lstm_ms``."""
    medians = {(r["impl"], case_key(r)): r["median_ms"] for r in records}
    for r in records:
        key = case_key(r)
        r["baseline"] = BASELINES[r["family"]]
        base = medians.get((r["baseline"], key))
        floor = medians.get(("gemm-floor", key))
        r["ratio"] = base / r["median_ms"] if base else None
        r["floor_ratio"] = r["median_ms"] / floor if floor else None
        r["lstm_ms"] = (medians.get(("torch.nn.LSTM", key))
                        if r["family"] == "LayerNormLSTM" else None)
    return records


def write_json(path: Path, env: dict, settings: dict, notes: list[str],
               records: list[dict]) -> None:
    doc = {"schema": SCHEMA, "environment": env, "settings": settings,
           "notes": notes, "results": [{k: r.get(k) for k in FIELDS} for r in records]}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def write_csv(path: Path, records: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})


def load(path: os.PathLike) -> dict:
    """A results.json (or the results.json inside a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or "results" not in doc:
        raise ValueError(f"{path}: not an rnnfast-bench results.json (no 'results')")
    for r in doc["results"]:  # written before an axis existed
        for axis, value in AXIS_DEFAULTS.items():
            r.setdefault(axis, value)
    return doc

