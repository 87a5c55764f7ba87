"""The int8 benchmark (``python -m rnnfast.bench int8``): rnnfast's int8
layers (rnnfast.quantized) against torch's dynamic-quantized nn.LSTM
(``torch.ao.quantization.quantize_dynamic``) and rnnfast's float32
inference, on the same float weights, CPU only.

Per case every implementation is timed in turn, for several rounds
(interleaved, so a change in the machine's load touches all of them
alike); a row's time is the median of its rounds' medians
(torch.utils.benchmark through :func:`~rnnfast.bench.timing.time_runner`).
Each row also gives the state_dict's bytes (``torch.save``) and the output
error relative to its float32 module. A ``decode`` case runs one step per
call with the state carried, as the main harness's.
"""

from __future__ import annotations

import io
import platform
import statistics
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .timing import time_runner

__all__ = ["Int8Case", "INT8_CASES", "Int8Row", "run_int8", "print_int8"]


@dataclass(frozen=True)
class Int8Case:
    T: int
    B: int
    H: int  # input size = hidden size
    layers: int = 1
    decode: bool = False

    def label(self) -> str:
        s = f"T={self.T} B={self.B} I=H={self.H}"
        s += f" L={self.layers}" if self.layers != 1 else ""
        return s + (" decode" if self.decode else "")


# issue 16's cases: a large batch, a small batch, streaming decode
INT8_CASES = [Int8Case(100, 64, 512, 2), Int8Case(200, 4, 256), Int8Case(1, 1, 512, 2, True)]

BASELINE = "torch.ao int8 nn.LSTM"


@dataclass
class Int8Row:
    case: str
    impl: str
    median_ms: float
    round_ms: list
    speedup_vs_torch_ao: float  # torch.ao's time / this one's
    speedup_vs_float: float  # the same layer's rnnfast float32 time / this one's
    state_dict_bytes: int
    rel_error: float  # ||out - float32 out|| / ||float32 out||, 0 for float32


def _state_dict_bytes(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


def _impls(case: Int8Case) -> dict[str, tuple[nn.Module, str]]:
    """name -> (module, the float32 module it approximates), same weights."""
    import rnnfast

    lstm = nn.LSTM(case.H, case.H, case.layers).eval()
    float_lstm = rnnfast.LSTM(case.H, case.H, case.layers).eval()
    float_lstm.load_state_dict(lstm.state_dict())
    float_ln = rnnfast.LayerNormLSTM(case.H, case.H, case.layers).eval()
    float_ln.load_state_dict(lstm.state_dict(), strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation
        ao = torch.ao.quantization.quantize_dynamic(nn.Sequential(lstm), {nn.LSTM},
                                                    dtype=torch.qint8)[0]
    return {BASELINE: (ao, "rnnfast.LSTM float32"),
            "rnnfast.LSTM float32": (float_lstm, "rnnfast.LSTM float32"),
            "rnnfast.quantized.LSTM int8": (rnnfast.quantize_dynamic(float_lstm),
                                            "rnnfast.LSTM float32"),
            "rnnfast.LayerNormLSTM float32": (float_ln, "rnnfast.LayerNormLSTM float32"),
            "rnnfast.quantized.LayerNormLSTM int8": (rnnfast.quantize_dynamic(float_ln),
                                                     "rnnfast.LayerNormLSTM float32")}


def _step(module: nn.Module, case: Int8Case, xs: list[Tensor],
          hx: tuple[Tensor, Tensor]) -> Callable[[int], None]:
    if case.decode:
        state = tuple(t.clone() for t in hx)

        def step(i: int) -> None:
            with torch.inference_mode():
                _, (h, c) = module(xs[i], state)
                state[0].copy_(h)
                state[1].copy_(c)
        return step

    def step(i: int) -> None:
        with torch.inference_mode():
            module(xs[i], hx)
    return step


def run_int8(cases: Sequence[Int8Case] = INT8_CASES, *, rounds: int = 3,
             min_run_time: float = 0.5, threads: Optional[int] = 2, seed: int = 0,
             progress: Optional[Callable[[str], None]] = None) -> list[Int8Row]:
    """Times every implementation on every case; see the module's doc."""
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows: list[Int8Row] = []
    try:
        for case in cases:
            torch.manual_seed(seed)
            impls = _impls(case)
            g = torch.Generator().manual_seed(seed)
            xs = [torch.randn(case.T, case.B, case.H, generator=g) for _ in range(3)]
            hx = (torch.randn(case.layers, case.B, case.H, generator=g),
                  torch.randn(case.layers, case.B, case.H, generator=g))
            steps = {name: _step(m, case, xs, hx) for name, (m, _) in impls.items()}
            with torch.inference_mode():
                outs = {name: m(xs[0], hx)[0] for name, (m, _) in impls.items()}
            times: dict[str, list[float]] = {name: [] for name in impls}
            for r in range(rounds):
                for name, step in steps.items():
                    if progress:
                        progress(f"{case.label()}: {name} (round {r + 1}/{rounds})")
                    step(0)  # warm-up
                    times[name].append(time_runner(step, len(xs), min_run_time).median_ms)
            medians = {name: statistics.median(t) for name, t in times.items()}
            for name, (module, float_name) in impls.items():
                ref = outs[float_name]
                rows.append(Int8Row(
                    case.label(), name, medians[name], times[name],
                    medians[BASELINE] / medians[name], medians[float_name] / medians[name],
                    _state_dict_bytes(module),
                    ((outs[name] - ref).norm() / ref.norm()).item()))
    finally:
        torch.set_num_threads(saved_threads)
    return rows


def environment() -> dict:
    """What the figures were measured on."""
    import rnnfast

    try:
        load = tuple(round(v, 2) for v in __import__("os").getloadavg())
    except OSError:
        load = None
    return dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, rnnfast=rnnfast.build_info(), load_average=load)


def print_int8(rows: Sequence[Int8Row], title: str = "int8 inference, CPU") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("case", "implementation", "median ms", f"vs {BASELINE}",
                "vs rnnfast float32", "state_dict", "rel. error"):
        table.add_column(col, justify="left" if col in ("case", "implementation") else "right",
                         no_wrap=col == "implementation")
    for r in rows:
        table.add_row(r.case, r.impl, f"{r.median_ms:.3f}", f"{r.speedup_vs_torch_ao:.2f}x",
                      f"{r.speedup_vs_float:.2f}x", f"{r.state_dict_bytes / 2**20:.2f} MiB",
                      f"{r.rel_error:.4f}")
    Console(width=160).print(table)


def as_records(rows: Sequence[Int8Row]) -> list[dict]:
    return [asdict(r) for r in rows]
