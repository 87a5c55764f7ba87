"""Measuring one runner: time (torch.utils.benchmark), activation memory
saved for the backward, peak CUDA memory, and which kernels torch.nn.LSTM
dispatched to."""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Timing", "warm_up", "time_runner", "time_runners", "saved_bytes",
           "peak_cuda_bytes", "dispatched_backend", "synchronize"]


@dataclass
class Timing:
    median_ms: float  # per call
    iqr_ms: float  # interquartile range of the per-call times of the blocks
    runs: int  # measurements (blocks) behind the median
    number: int  # calls per block
    seconds: float = 0.0  # the timed calls' seconds in all (every block)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(step: Callable[[int], None], inputs: int, calls: int,
            device: str) -> tuple[float, float]:
    """Runs ``calls`` (at least one) steps, rotating the inputs; returns the
    seconds the first call took (compilation, for torch.compile) and the
    last."""
    seconds = []
    for i in range(max(calls, 1)):
        synchronize(device)
        start = time.perf_counter()
        step(i % inputs)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[-1]


def time_runner(step: Callable[[int], None], inputs: int, min_run_time: float,
                threads: Optional[int] = None, min_runs: int = 5,
                one_call: Optional[float] = None) -> Timing:
    """Median and interquartile range of one call of ``step``, each call
    taking the next input set: :func:`time_runners` of one step."""
    timing = time_runners([step], inputs, min_run_time, threads, min_runs,
                          [one_call])[0]
    if isinstance(timing, BaseException):
        raise timing
    return timing


def time_runners(steps: list[Callable[[int], None]], inputs: int, min_run_time: float,
                 threads: Optional[int] = None, min_runs: int = 5,
                 one_calls: Optional[list[Optional[float]]] = None
                 ) -> list[Union[Timing, BaseException]]:
    """Median and interquartile range of one call of each step, each call
    taking the next input set, the steps timed in turns.

    Measurements come from ``torch.utils.benchmark.Timer.timeit``, which
    synchronises the accelerator before and after (CUDA work is complete
    when a time is taken) and runs with the process's thread count (the
    Timer's default would be one thread). Each measurement times a block of
    calls long enough for the timer's own overhead not to count (about
    ``min_run_time / 50``, at least 1 ms), so each median and IQR is over
    many blocks: at least ``min_runs``, for at least ``min_run_time``
    seconds in all. ``one_calls`` (seconds per step, e.g. from the
    warm-up) size the blocks; without them one call is timed first.

    The steps take turns, one block each per round, each leaving the turns
    once it has its blocks: so a change in the machine's speed while a case
    runs (other tenants of a shared host, a clock that moves) falls on all
    the implementations that are compared, not on whichever ran then. On a
    2-vCPU cloud VM the speed moved by up to 1.5x between runs a minute
    apart, enough to turn a ratio over when the implementations ran one
    after another. A step that raises leaves the turns; its entry is the
    exception.
    """
    benchmark = _benchmark()
    one_calls = list(one_calls) if one_calls is not None else [None] * len(steps)
    block = max(min_run_time / 50, 1e-3)
    timers, numbers = [], []
    results: list[Union[Timing, BaseException, None]] = [None] * len(steps)
    for index, step in enumerate(steps):
        order = itertools.cycle(range(inputs))

        def rotated(step=step, order=order) -> None:
            step(next(order))

        timer = benchmark.Timer(stmt="rotated()", globals={"rotated": rotated},
                                num_threads=threads or torch.get_num_threads())
        try:
            one_call = one_calls[index]
            if one_call is None:
                one_call = timer.timeit(1).median
        except Exception as e:  # noqa: BLE001 - reported by the caller
            results[index] = e
        timers.append(timer)
        numbers.append(max(1, int(block / max(one_call or 0.0, 1e-9))))
    times: list[list[float]] = [[] for _ in steps]  # seconds per call, per block

    def needs(i: int) -> bool:
        return results[i] is None and (sum(times[i]) * numbers[i] < min_run_time
                                       or len(times[i]) < min_runs)

    while any(needs(i) for i in range(len(steps))):
        for i in range(len(steps)):
            if not needs(i):
                continue
            try:
                times[i].append(timers[i].timeit(numbers[i]).median)
            except Exception as e:  # noqa: BLE001 - reported by the caller
                results[i] = e
    for i, blocks in enumerate(times):
        if results[i] is None:
            q1, median, q3 = statistics.quantiles(blocks, n=4, method="inclusive")
            results[i] = Timing(median_ms=median * 1e3, iqr_ms=(q3 - q1) * 1e3,
                                runs=len(blocks), number=numbers[i],
                                seconds=sum(blocks) * numbers[i])
    return results  # type: ignore[return-value]


def _benchmark():
    """torch.utils.benchmark, imported without the warning that
    torch.utils.cpp_extension logs on machines with no CUDA runtime."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        log.setLevel(level)
    return benchmark


def _storage_key(t: Tensor) -> tuple[int, int]:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a storage
        return id(t), t.numel() * t.element_size()


def saved_bytes(run: Callable[[], None], keep: Iterable[Tensor] = ()) -> int:
    """Bytes of the unique storages autograd saves for the backward while
    ``run()`` executes, leaving out the storages of ``keep`` (parameters and
    inputs, which exist whatever the implementation). Works on any device:
    it reads the saved tensors through
    ``torch.autograd.graph.saved_tensors_hooks``."""
    kept = {_storage_key(t)[0] for t in keep}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr, nbytes = _storage_key(t)
        if ptr not in kept:
            seen[ptr] = max(seen.get(ptr, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def peak_cuda_bytes(run: Callable[[], None]) -> int:
    """Peak CUDA memory allocated by ``run()`` above what was allocated
    before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


_BACKENDS = (("_cudnn_rnn", "cudnn"), ("miopen_rnn", "miopen"),
             ("mkldnn_rnn_layer", "onednn"))


def dispatched_backend(run: Callable[[], None]) -> str:
    """Which RNN kernels ``run()`` dispatched to: cudnn, miopen, onednn, or
    native (torch's own per-step kernels)."""
    recorder = _OpRecorder()
    with recorder:
        run()
    for op, name in _BACKENDS:
        if op in recorder.ops:
            return name
    return "native"
