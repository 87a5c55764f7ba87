"""Runs every implementation on every case, side by side, into records."""

from __future__ import annotations

import collections
import contextlib
import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

import torch

from .cases import Case
from .impls import BASELINES, Impl, Inputs, Runner, SkipCase, make_inputs
from .results import finalize
from .timing import (
    dispatched_backend,
    peak_cuda_bytes,
    saved_bytes,
    synchronize,
    time_runners,
    warm_up,
)

__all__ = ["Settings", "run_suite"]

# An output whose error against a float64 run of the same weights and inputs
# exceeds twice the family baseline's error, plus this floor in units of the
# dtype's eps times the largest output, gets a note: the figures of a wrong
# implementation mean nothing. (Against the baseline's output alone a fixed
# tolerance cannot work: over a few hundred steps a LayerNorm-LSTM with
# default weights amplifies rounding until the float32 reference is 0.01
# from float64, and its bfloat16 runs differ from it by more than 1.)
_FLOOR_EPS = 4.0

# The errors are judged where the recurrence has not yet amplified them: the
# root mean square over the first _JUDGED_STEPS steps. Over a whole sequence
# a LayerNorm-LSTM with default weights is chaotic, and two correct float32
# implementations' largest errors against float64 scatter from 0.1x to 20x
# each other's with the seed (T=200 B=4 H=128, 6 seeds; the AVX2 run of
# 2026-11-30 noted one such case). Over the first 16 steps, by root mean
# square, rnnfast's float32 LayerNorm-LSTM had 1.0x-1.8x the reference's
# error over 16 seeds, AVX2 and AVX-512 kernels alike.
_JUDGED_STEPS = 16


@dataclass
class Settings:
    min_run_time: float  # seconds of measurement per implementation and case
    warmup: int  # calls before measuring
    inputs: int = 3  # random input sets rotated between calls
    seed: int = 0
    threads: Optional[int] = None  # None: torch's current setting
    max_time: Optional[float] = None  # seconds: cases not started by then are left out

    def as_dict(self) -> dict:
        return asdict(self)


Progress = Callable[[int, str], None]  # (measurements done, what runs next)


@contextlib.contextmanager
def tf32_mode(allow: bool) -> Iterator[None]:
    """torch's TF32 switches for cuBLAS and cuDNN both set to ``allow``
    (rnnfast's CUDA GEMMs follow torch's matmul switch), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run_suite(cases: list[Case], impls: list[Impl], settings: Settings,
              progress: Optional[Progress] = None) -> tuple[list[dict], list[str]]:
    """Times every implementation on every case; returns the records (see
    :data:`rnnfast.bench.results.FIELDS`) and notes on what was skipped or
    failed. Implementations run case by case, baselines first, every one
    of a case under the case's TF32 setting. Past ``settings.max_time``
    seconds no further case starts (a note says how many were left out)."""
    order = sorted(impls, key=lambda i: not i.is_baseline)
    records: list[dict] = []
    notes: list[str] = []
    skipped: dict[tuple[str, str], int] = collections.Counter()
    done = 0
    began = time.perf_counter()
    for index, case in enumerate(cases):
        if settings.max_time is not None and time.perf_counter() - began > settings.max_time:
            notes.append(f"stopped at --max-time {settings.max_time:g} s: "
                         f"{len(cases) - index} of {len(cases)} cases not run")
            break
        with tf32_mode(case.tf32):
            done = _run_case(case, order, settings, records, notes, skipped, done, progress)
    notes += [f"{name}: skipped on {n} case(s): {why}" for (name, why), n in skipped.items()]
    return finalize(records), notes


def _run_case(case: Case, order: list[Impl], settings: Settings, records: list[dict],
              notes: list[str], skipped: dict, done: int,
              progress: Optional[Progress]) -> int:
    """Every implementation on one case, into ``records``; returns the
    count of measurements done so far. Each is built, warmed up and checked
    in turn, then all are timed together, taking turns
    (:func:`~rnnfast.bench.timing.time_runners`)."""
    inputs = make_inputs(case, settings.inputs, settings.seed)
    # family -> (baseline's weights, its output, the float64 copy's output,
    # the baseline's error against it, the largest float64 output)
    baseline_outputs: dict[str, tuple[dict, torch.Tensor, torch.Tensor, float, float]] = {}
    # (impl, runner, record without its times, its warm-up's last call in s,
    # the seconds its set-up took)
    ready: list[tuple[Impl, Runner, dict, float, float]] = []
    for impl in order:
        if progress:
            progress(done, f"{case.mode} {case.device} {_dtype_label(case)} "
                     f"{case.shape_label()}: {impl.name}")
        done += 1
        start = time.perf_counter()
        try:
            torch.manual_seed(settings.seed)
            runner = impl.build(case, inputs)
            record, last_s = _prepare(impl, case, runner, inputs, settings,
                                      baseline_outputs, notes)
        except SkipCase as e:
            skipped[(impl.name, str(e))] += 1
            continue
        except Exception as e:  # a failure is reported, never a figure
            _note_failure(notes, impl, case, e)
            continue
        ready.append((impl, runner, record, last_s, time.perf_counter() - start))
    timings = time_runners([runner.step for _, runner, _, _, _ in ready], len(inputs),
                           settings.min_run_time, settings.threads,
                           one_calls=[last_s for _, _, _, last_s, _ in ready])
    for (impl, _, record, _, setup_s), timing in zip(ready, timings):
        if isinstance(timing, BaseException):
            _note_failure(notes, impl, case, timing)
            continue
        record.update(median_ms=timing.median_ms, iqr_ms=timing.iqr_ms, runs=timing.runs,
                      tokens_per_s=case.tokens / (timing.median_ms / 1e3),
                      wall_s=setup_s + timing.seconds)
        records.append(record)
    return done


def _note_failure(notes: list[str], impl: Impl, case: Case, e: BaseException) -> None:
    notes.append(f"{impl.name} on {case.mode} {case.device} {_dtype_label(case)} "
                 f"{case.shape_label()}: failed: {type(e).__name__}: "
                 f"{str(e).splitlines()[0] if str(e) else ''}")


def _dtype_label(case: Case) -> str:
    return case.dtype + (" (TF32)" if case.tf32 else "")


def _prepare(impl: Impl, case: Case, runner: Runner, inputs: Inputs, settings: Settings,
             baseline_outputs: dict, notes: list[str]) -> tuple[dict, float]:
    """Warms ``runner`` up and measures all but its time: its record
    without the time fields, and the seconds of the warm-up's last call."""
    n = len(inputs)
    first_s, last_s = warm_up(runner.step, n, settings.warmup, case.device)
    agreement = _agreement(impl, runner, inputs, baseline_outputs)
    max_abs_diff = error = baseline_error = None
    if agreement is not None:
        max_abs_diff, error, baseline_error, largest = agreement
        # TF32 keeps 10 mantissa bits, as float16 does
        eps = torch.finfo(torch.float16 if case.tf32 else case.torch_dtype).eps
        if error > 2 * baseline_error + _FLOOR_EPS * eps * max(largest, 1e-3):
            notes.append(f"{impl.name} on {case.mode} {case.device} {_dtype_label(case)} "
                         f"{case.shape_label()}: output error {error:.3g} against float64, "
                         f"over twice {impl.baseline}'s {baseline_error:.3g} "
                         f"(outputs differ by {max_abs_diff:.3g})")
    eager = runner.eager_step or runner.step  # a graph replay allocates and saves nothing
    saved = saved_bytes(lambda: eager(0), runner.keep)
    synchronize(case.device)
    peak = peak_cuda_bytes(lambda: eager(0)) if case.device.startswith("cuda") else None
    backend = runner.backend
    if impl.name == "torch.nn.LSTM" and runner.module is not None:
        with torch.set_grad_enabled(case.mode == "training"):
            backend = dispatched_backend(
                lambda: runner.module(inputs.x[0], inputs.hx[0]))
    return dict(
        impl=impl.name, family=impl.family, baseline=BASELINES[impl.family],
        **case.as_dict(),
        saved_bytes_per_token=saved / case.tokens,
        peak_bytes=peak, max_abs_diff=max_abs_diff, float64_error=error,
        baseline_float64_error=baseline_error,
        compile_s=first_s if impl.compiled else None, backend=backend,
    ), last_s


def _agreement(impl: Impl, runner: Runner, inputs: Inputs,
               baseline_outputs: dict) -> Optional[tuple[float, float, float, float]]:
    """The baseline of a family keeps its weights, its output on input set
    0, that of a float64 copy of itself and its own error against it; every
    other implementation of the family that can load those weights is
    compared with both: ``(largest difference from the baseline's output,
    its error against float64, the baseline's error, the largest float64
    output)``. None where no comparison is possible."""
    if runner.output is None or runner.module is None:
        return None
    if impl.is_baseline:
        state = {k: v.detach().clone() for k, v in runner.module.state_dict().items()}
        want = runner.output(0)
        twin = copy.deepcopy(runner.module).double()
        with torch.inference_mode():
            exact = twin(inputs.x[0].double(), tuple(h.double() for h in inputs.hx[0]))[0]
        want = want.double()
        baseline_outputs[impl.family] = (state, want, exact, _judged_error(want, exact),
                                         exact.abs().max().item())
        return None
    if impl.family not in baseline_outputs:
        return None
    state, want, exact, baseline_error, largest = baseline_outputs[impl.family]
    try:
        runner.module.load_state_dict(state)
    except (RuntimeError, KeyError):  # another parameter layout (peers)
        return None
    got = runner.output(0).double()
    return ((got - want).abs().max().item(), _judged_error(got, exact), baseline_error, largest)


def _judged_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Root mean square of ``got - exact`` over the first
    :data:`_JUDGED_STEPS` steps of time-major outputs."""
    return (got[:_JUDGED_STEPS] - exact[:_JUDGED_STEPS]).pow(2).mean().sqrt().item()
