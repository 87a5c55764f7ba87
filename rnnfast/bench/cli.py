"""The ``rnnfast-bench`` command (also ``python -m rnnfast.bench``).

::

    rnnfast-bench [run] [--quick | --grid {quick,default,full}]
                  [--T N ...] [--B N ...] [--I N ...] [--H N ...] [--layers N ...]
                  [--bidirectional BOOL ...] [--dtype D ...] [--device D ...]
                  [--tf32 BOOL ...] [--decode BOOL ...]
                  [--mode inference|training ...] [--impls NAME ...] [--compile]
                  [--min-run-time S] [--warmup N] [--inputs N] [--threads N]
                  [--malloc steady|default]
                  [--max-time S] [--out DIR] [--list]
    rnnfast-bench compare OLD.json NEW.json [--threshold X] [--min-change F]
    rnnfast-bench report [RESULTS_DIR ...] [--output benchmarks/README.md]
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .cases import DTYPES, MODES, PRESET_SETTINGS, PRESETS, default_devices, expand

__all__ = ["main", "parser"]

_COMMANDS = ("run", "compare", "report", "int8")
_RESULTS_ROOT = Path("benchmarks") / "results"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on", "bi"):
        return True
    if value in ("0", "false", "no", "off", "uni"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="rnnfast-bench",
        description="Times rnnfast's LSTM and LayerNorm-LSTM against torch.nn.LSTM, "
                    "plain-PyTorch references, peers and the GEMM floor. "
                    "'run' is the default command.",
        epilog="'rnnfast-bench run --help' lists the axes, presets and timing options.")
    commands = top.add_subparsers(dest="command", metavar="{run,compare,report,int8}")

    run = commands.add_parser(
        "run", help="run a benchmark (the default command)",
        description="Runs a preset's cases; axes given here replace that axis in every "
                    "group of the preset (I follows H where the preset ties them).")
    preset = run.add_mutually_exclusive_group()
    preset.add_argument("--grid", choices=sorted(PRESETS), default="default",
                        help="preset: quick (a smoke test), default (make bench), "
                             "gpu (the GPU check's cases), "
                             "full (haste's grid + fastrnns, for GPUs)")
    preset.add_argument("--quick", action="store_const", dest="grid", const="quick",
                        help="same as --grid quick")
    axes = run.add_argument_group("axes (each a list)")
    for axis in ("T", "B", "I", "H"):
        axes.add_argument(f"--{axis}", type=_positive_int, nargs="+", metavar="N")
    axes.add_argument("--layers", type=_positive_int, nargs="+", metavar="N")
    axes.add_argument("--bidirectional", type=_bool, nargs="+", metavar="BOOL")
    axes.add_argument("--dtype", choices=sorted(DTYPES), nargs="+",
                      help="default: the preset's (float32 where it names none)")
    axes.add_argument("--device", choices=["cpu", "cuda"], nargs="+",
                      help="default: cpu, plus cuda when a GPU is visible "
                           "(--grid full: cuda when present)")
    axes.add_argument("--tf32", type=_bool, nargs="+", metavar="BOOL",
                      help="TF32 matmuls allowed (CUDA float32 cases only; every "
                           "implementation of a case runs under the same setting)")
    axes.add_argument("--decode", type=_bool, nargs="+", metavar="BOOL",
                      help="streaming decode: one step per call, the state carried")
    axes.add_argument("--mode", choices=MODES, nargs="+", default=list(MODES))
    impls = run.add_argument_group("implementations")
    impls.add_argument("--impls", nargs="+", metavar="NAME",
                       help="only these implementations (names or glob patterns); the "
                            "baselines and gemm-floor always run")
    impls.add_argument("--compile", action="store_true",
                       help="add torch.compile(reference.LayerNormLSTM); its compile time "
                            "is reported apart")
    impls.add_argument("--regularisers", action="store_true",
                       help="add the Zoneout family: a Python loop over nn.LSTMCell with "
                            "zoneout 0.1 on h and c against rnnfast.LSTM's (one "
                            "unidirectional layer)")
    timing = run.add_argument_group("timing")
    timing.add_argument("--min-run-time", type=float, metavar="S",
                        help="seconds of measurement per implementation and case "
                             "(preset: " + ", ".join(f"{k} {v['min_run_time']}"
                                                     for k, v in PRESET_SETTINGS.items()) + ")")
    timing.add_argument("--warmup", type=int, metavar="N", help="calls before measuring")
    timing.add_argument("--inputs", type=_positive_int, default=3, metavar="N",
                        help="random input sets rotated between calls (default 3)")
    timing.add_argument("--threads", type=_positive_int, metavar="N",
                        help="torch.set_num_threads (default: torch's)")
    timing.add_argument("--malloc", choices=["steady", "default"], default="steady",
                        help="steady (default): glibc's mmap and trim thresholds fixed "
                             "at 1 GiB, so large workspaces are reused instead of "
                             "page-faulted on every call; default: glibc as it is "
                             "(rnnfast/bench/allocator.py)")
    timing.add_argument("--seed", type=int, default=0)
    timing.add_argument("--max-time", type=float, metavar="S",
                        help="start no case after S seconds (the results so far are "
                             "written, with a note)")
    output = run.add_argument_group("output")
    output.add_argument("--out", type=Path, metavar="DIR",
                        help="write results.json, results.csv and PNG plots here")
    output.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    output.add_argument("--list", action="store_true",
                        help="list the cases and implementations, run nothing")

    cmp = commands.add_parser("compare", help="compare two results.json",
                              description="Per-case changes from OLD to NEW; a change is a "
                                          "regression only beyond the measured noise (IQRs). "
                                          "Exits 1 when there is a regression.")
    cmp.add_argument("old", type=Path, metavar="OLD.json")
    cmp.add_argument("new", type=Path, metavar="NEW.json")
    cmp.add_argument("--threshold", type=float, default=1.0,
                     help="noise band in units of the mean IQR (default 1)")
    cmp.add_argument("--min-change", type=float, default=0.02,
                     help="smallest relative change that counts (default 0.02)")
    cmp.add_argument("--only-changes", action="store_true",
                     help="list only regressions and improvements")

    int8 = commands.add_parser(
        "int8", help="int8 inference: rnnfast.quantized against torch.ao's quantized LSTM",
        description="rnnfast's int8 LSTM and LayerNorm-LSTM against torch.ao's "
                    "dynamic-quantized nn.LSTM and rnnfast's float32 inference, on the "
                    "same weights (CPU; T=100 B=64 I=H=512 2 layers, T=200 B=4 I=H=256, "
                    "decode B=1 I=H=512 2 layers), interleaved over rounds.")
    int8.add_argument("--rounds", type=_positive_int, default=3)
    int8.add_argument("--min-run-time", type=float, default=0.5, metavar="S",
                      help="seconds of measurement per implementation and round")
    int8.add_argument("--malloc", choices=["steady", "default"], default="steady",
                      help="as for run (rnnfast/bench/allocator.py)")
    int8.add_argument("--threads", type=_positive_int, default=2, metavar="N",
                      help="torch.set_num_threads (default 2)")
    int8.add_argument("--out", type=Path, metavar="DIR", help="write int8.json here")

    rep = commands.add_parser("report", help="regenerate benchmarks/README.md",
                              description="Regenerates the README with the tables and plot "
                                          "links of committed results.")
    rep.add_argument("dirs", type=Path, nargs="*", metavar="RESULTS_DIR",
                     help=f"folders with a results.json (default: every folder of "
                          f"{_RESULTS_ROOT}/)")
    rep.add_argument("--output", type=Path, default=Path("benchmarks") / "README.md")
    return top


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in _COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    args = parser().parse_args(argv)
    args.argv = argv
    return args


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the tables
        console = Console(width=max(console.width, 180))
    return console


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    if args.command == "compare":
        return _compare(args)
    if args.command == "report":
        return _report(args)
    if args.command == "int8":
        return _int8(args)
    return _run(args)


def _int8(args: argparse.Namespace) -> int:
    import json

    from . import allocator
    from .int8 import as_records, environment, print_int8, run_int8

    console = _console()
    malloc = allocator.configure(args.malloc)  # before anything is measured
    env = environment()
    env["malloc"] = malloc
    start = time.perf_counter()
    rows = run_int8(rounds=args.rounds, min_run_time=args.min_run_time, threads=args.threads,
                    progress=lambda what: console.print(f"[dim]{what}[/dim]"))
    env["threads"] = args.threads
    print_int8(rows, title=f"int8 inference on {env['cpu']}, {args.threads} threads, "
                           f"load average before the run {env['load_average']}")
    console.print(f"{time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "int8.json").write_text(json.dumps(
            dict(environment=env, rows=as_records(rows),
                 settings=dict(rounds=args.rounds, min_run_time=args.min_run_time)), indent=1))
    return 0


# ---------------------------------------------------------------------------

def _select(impls, patterns: Optional[list[str]]):
    if not patterns:
        return impls, []
    chosen = [i for i in impls
              if i.is_baseline or i.family == "floor"
              or any(fnmatch.fnmatchcase(i.name, p) for p in patterns)]
    unmatched = [p for p in patterns
                 if not any(fnmatch.fnmatchcase(i.name, p) for i in impls)]
    return chosen, unmatched


def plan(args: argparse.Namespace):
    """The cases, implementations, settings and notes of a run."""
    import torch

    from .impls import discover
    from .suite import Settings

    preset = args.grid
    devices = args.device or default_devices(preset)
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("rnnfast-bench: --device cuda, but torch sees no CUDA device")
    overrides = dict(T=args.T, B=args.B, I=args.I, H=args.H, layers=args.layers,
                     bidirectional=args.bidirectional, dtype=args.dtype, tf32=args.tf32,
                     decode=args.decode)
    cases = expand(PRESETS[preset], overrides, modes=args.mode, devices=devices)
    impls, notes = discover(compile=args.compile, regularisers=args.regularisers)
    impls, unmatched = _select(impls, args.impls)
    if unmatched:
        raise SystemExit(f"rnnfast-bench: --impls {' '.join(unmatched)} matches none of: "
                         + ", ".join(i.name for i in discover(compile=True, regularisers=True)[0]))
    defaults = PRESET_SETTINGS[preset]
    settings = Settings(
        min_run_time=args.min_run_time if args.min_run_time is not None
        else defaults["min_run_time"],
        warmup=args.warmup if args.warmup is not None else defaults["warmup"],
        inputs=args.inputs, seed=args.seed, threads=args.threads, max_time=args.max_time)
    return cases, impls, settings, notes


def _run(args: argparse.Namespace) -> int:
    import torch

    from . import allocator, report, results

    if args.threads:
        torch.set_num_threads(args.threads)
    cases, impls, settings, notes = plan(args)
    console = _console()
    if args.list:
        for case in cases:
            console.print(f"{case.mode:9} {case.device:4} {case.dtype:8}"
                          f"{' tf32' if case.tf32 else '     '} {case.shape_label()}")
        console.print("implementations: " + ", ".join(i.name for i in impls))
        for note in notes:
            console.print(f"note: {note}")
        console.print(f"{len(cases)} cases x {len(impls)} implementations")
        return 0

    # before anything is measured (the thresholds apply from here on)
    malloc = allocator.configure(args.malloc)
    env = results.environment({c.device for c in cases})
    env["malloc"] = malloc
    console.print(f"rnnfast-bench: preset {args.grid}, {len(cases)} cases x "
                  f"{len(impls)} implementations on {env['device_name']} "
                  f"({env['threads']} threads), torch {env['torch_version']}")
    start = time.perf_counter()
    records, run_notes = _run_with_progress(console, cases, impls, settings)
    elapsed = time.perf_counter() - start
    notes += run_notes
    # again after the run: it lists the CPU step products chosen during it
    env["rnnfast_build_info"] = results.build_info()
    report.print_tables(console, records)
    for note in notes:
        console.print(f"[yellow]note[/yellow] {note}")
    console.print(f"{len(records)} measurements in {elapsed:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        run_settings = dict(preset=args.grid, argv=args.argv, modes=args.mode,
                            compile=args.compile, elapsed_s=round(elapsed, 1),
                            **settings.as_dict())
        results.write_json(args.out / "results.json", env, run_settings, notes, records)
        results.write_csv(args.out / "results.csv", records)
        written = [] if args.no_plots else report.plot(records, args.out)
        console.print(f"wrote {args.out}/results.json, results.csv"
                      + (f" and {len(written)} plot(s)" if written else ""))
    return 0


def _run_with_progress(console, cases, impls, settings):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    from .suite import run_suite

    total = len(cases) * len(impls)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("starting", total=total)

        def progress(done: int, what: str) -> None:
            bar.update(task, completed=done, description=what)

        out = run_suite(cases, impls, settings, progress)
        bar.update(task, completed=total)
    return out


def _compare(args: argparse.Namespace) -> int:
    from .compare import print_comparison
    from .results import load

    regressions = print_comparison(_console(), load(args.old), load(args.new),
                                   args.threshold, args.min_change, args.only_changes)
    return 1 if regressions else 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_readme

    dirs = args.dirs or sorted(p.parent for p in _RESULTS_ROOT.glob("*/results.json"))
    if not dirs:
        raise SystemExit(f"rnnfast-bench report: no results given and none under "
                         f"{_RESULTS_ROOT}/")
    path = write_readme(dirs, args.output)
    _console().print(f"wrote {path} from {len(dirs)} result folder(s)")
    return 0
