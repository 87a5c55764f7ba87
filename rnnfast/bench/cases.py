"""Benchmark cases: the axes, the presets and how command-line axes
override them.

A preset is a list of groups; a group gives a list of values per axis and
stands for their cross product. ``I="H"`` in a group ties the input size to
the hidden size. Axes given on the command line replace that axis in every
group of the preset (``--H 512 1024`` with the default preset runs every
default shape at H=512 and H=1024).

Two axes change what is timed rather than the shape:

* ``tf32``: float32 on CUDA with TF32 matmuls allowed
  (``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32``), set the same way for every
  implementation of the case; False cases set both off. Only CUDA float32
  cases take ``tf32=True`` (others are dropped).
* ``decode``: streaming decode, one timestep per call with the state
  carried from call to call (an autoregressive decoder, a streaming
  recogniser): T is 1, inference only, one direction, and the time is per
  step.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

import torch

__all__ = ["Case", "AXES", "AXIS_DEFAULTS", "MODES", "DTYPES", "PRESETS", "PRESET_SETTINGS",
           "expand", "default_devices"]

MODES = ("inference", "training")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# The axes of a case besides the mode, in the order results are listed.
AXES = ("T", "B", "I", "H", "layers", "bidirectional", "dtype", "device", "tf32", "decode")
# What a result file written before an axis existed means by its absence.
AXIS_DEFAULTS = {"tf32": False, "decode": False}
TIED = "H"  # the value of "I" that ties the input size to the hidden size


@dataclass(frozen=True, order=True)
class Case:
    """One shape, dtype, device and mode to time every implementation on."""

    T: int
    B: int
    I: int  # noqa: E741  (the input size, as in the literature)
    H: int
    layers: int = 1
    bidirectional: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    tf32: bool = False  # TF32 matmuls allowed (CUDA float32 only)
    decode: bool = False  # one step per call, state carried (T == 1)
    mode: str = "inference"

    @property
    def tokens(self) -> int:
        return self.T * self.B

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def shape_label(self) -> str:
        label = f"T={self.T} B={self.B} I={self.I} H={self.H}"
        if self.layers != 1:
            label += f" L={self.layers}"
        if self.bidirectional:
            label += " bi"
        if self.decode:
            label += " decode"
        return label

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_devices(preset: str) -> list[str]:
    """CPU always, plus CUDA when a GPU is visible; the full grid is for GPUs
    and runs on the CPU only when there is none."""
    cuda = torch.cuda.is_available()
    if preset in ("full", "gpu"):
        return ["cuda"] if cuda else ["cpu"]
    return ["cpu", "cuda"] if cuda else ["cpu"]


_HASTE_GRID = dict(T=[50], B=[1, 16, 32, 64, 128], H=[128, 256, 512, 1024, 2048],
                   I=[64, 128, 256, 512])
_FASTRNNS = dict(T=[100], B=[64], I=[512], H=[512])
# Streaming decode (issue 13): two layers, one step per call.
_DECODE = [dict(T=[1], B=[1], I=[TIED], H=[256], layers=[2], decode=[True]),
           dict(T=[1], B=[8], I=[TIED], H=[512], layers=[2], decode=[True])]
_FP32_BOTH_WAYS = dict(dtype=["float32"], tf32=[False, True])

PRESETS: dict[str, list[dict[str, list]]] = {
    # a handful of small cases: a smoke test of everything, < 1 min on 2 cores
    "quick": [
        dict(T=[50], B=[16], I=[TIED], H=[64, 128]),
        dict(T=[20], B=[8], I=[TIED], H=[32], layers=[2], bidirectional=[True]),
    ],
    # what `make bench` runs: < 5 min on a 2-core CPU
    "default": [
        dict(T=[100], B=[64], I=[TIED], H=[128, 256]),
        dict(T=[200], B=[4], I=[TIED], H=[128]),
        dict(T=[100], B=[32], I=[TIED], H=[256], layers=[2], bidirectional=[True]),
        *_DECODE,
    ],
    # what scripts/gpu_check.py runs on a GPU (~2 min on an H100-class GPU):
    # fastrnns' shape in float32 (TF32 off and on) and bfloat16; FlashRNN's
    # published point (T=1024 B=16 H=768 bf16: cuDNN 2.0 ms forward, 5.2 ms
    # forward+backward on an H100); a small-batch shape; streaming decode
    "gpu": [
        dict(_FASTRNNS, **_FP32_BOTH_WAYS),
        dict(_FASTRNNS, dtype=["bfloat16"]),
        dict(T=[1024], B=[16], I=[TIED], H=[768], dtype=["bfloat16"]),
        dict(T=[256], B=[8], I=[TIED], H=[256], **_FP32_BOTH_WAYS),
        *[dict(d, **_FP32_BOTH_WAYS) for d in _DECODE],
    ],
    # for GPUs: haste's grid plus PyTorch's fastrnns default shape
    "full": [_HASTE_GRID, _FASTRNNS],
}

# Timing settings per preset (each overridable on the command line). The
# agreement check and the saved-memory call also run before the timing, so
# they warm up too.
PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    "quick": dict(min_run_time=0.1, warmup=1),
    "default": dict(min_run_time=0.5, warmup=1),
    "gpu": dict(min_run_time=0.2, warmup=2),
    "full": dict(min_run_time=0.5, warmup=2),
}


def expand(groups: Iterable[dict[str, list]], overrides: Optional[dict[str, list]] = None,
           modes: Iterable[str] = MODES, devices: Iterable[str] = ("cpu",),
           dtypes: Iterable[str] = ("float32",)) -> list[Case]:
    """The cases of ``groups`` with ``overrides`` (axis -> values, None or
    absent for "keep the preset's") applied, once each, in a stable order:
    by device and dtype (in the order given), mode, then the preset's
    order. A ``tf32`` case that is not CUDA float32 is dropped; a
    ``decode`` case has T=1, runs in inference only and is never
    bidirectional (a reverse direction cannot stream)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    base = dict(layers=[1], bidirectional=[False], dtype=list(dtypes), device=list(devices),
                tf32=[False], decode=[False])
    shapes: list[tuple] = []
    for group in groups:
        axes = {**base, **group, **overrides}
        if "I" not in overrides and "H" in overrides and group.get("I") == [TIED]:
            axes["I"] = [TIED]
        for values in itertools.product(*(axes[a] for a in AXES)):
            case = dict(zip(AXES, values))
            if case["I"] == TIED:
                case["I"] = case["H"]
            if case["tf32"] and not (case["device"].startswith("cuda")
                                     and case["dtype"] == "float32"):
                continue
            if case["decode"]:
                if case["bidirectional"]:  # the reverse direction needs the future
                    continue
                case["T"] = 1
            shape = tuple(case[a] for a in AXES)
            if shape not in shapes:
                shapes.append(shape)
    cases = [Case(**dict(zip(AXES, shape)), mode=mode)
             for shape in shapes for mode in modes
             if not (dict(zip(AXES, shape))["decode"] and mode == "training")]
    rank = {axis: {v: i for i, v in enumerate(dict.fromkeys(getattr(c, axis) for c in cases))}
            for axis in ("device", "dtype")}
    cases.sort(key=lambda c: (rank["device"][c.device], rank["dtype"][c.dtype],
                              MODES.index(c.mode)))  # stable: the preset's order within
    return cases
