"""Presenting records: tables (terminal via rich, markdown), plots
(matplotlib) and benchmarks/README.md.

One function, :func:`tables`, decides what a table holds; the terminal and
the markdown only render it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .cases import MODES
from .impls import BASELINES, FAMILIES
from .results import case_key, load

__all__ = ["Table", "tables", "print_tables", "markdown", "plot", "write_readme",
           "fmt_ms"]

_FLOOR = "gemm-floor"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    sections: list[int] = field(default_factory=list)  # rows that start a case


def fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_int(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _impl_order(name: str, family: str) -> tuple:
    return (name != BASELINES[family], not name.startswith("rnnfast."),
            name == _FLOOR, name)


def _group_key(r: dict) -> tuple:
    return (r["device"], r["dtype"], bool(r.get("tf32")), MODES.index(r["mode"]))


def _precision(dtype: str, tf32: bool) -> str:
    """float32, or float32 with TF32 matmuls allowed."""
    return f"{dtype} TF32" if tf32 else dtype


def tables(records: list[dict]) -> list[Table]:
    """One table per device, dtype, mode and family (LSTM, LayerNormLSTM),
    rows grouped by case; the gemm-floor row appears in both families'
    tables, with its speed-up against each family's baseline."""
    out: list[Table] = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(_group_key(r), []).append(r)
    for (device, dtype, tf32, mode_index), rows in sorted(groups.items()):
        mode = MODES[mode_index]
        cuda = any(r.get("peak_bytes") is not None for r in rows)
        for family in FAMILIES:
            members = [r for r in rows if r["family"] == family]
            if not members:
                continue
            baseline = BASELINES[family]
            columns = ["case", "implementation", "median ms", "IQR ms", "tokens/s",
                       "speed-up", "x floor", "saved B/token"]
            if cuda:
                columns.append("peak MiB")
            if family == "LayerNormLSTM":
                columns.append("nn.LSTM ms")
            columns.append("notes")
            table = Table(f"{family}, {mode}, {device} {_precision(dtype, tf32)} "
                          f"(speed-up vs {baseline}; "
                          f"x floor: time over gemm-floor's)", columns)
            cases: list[tuple] = []
            for r in rows:
                if case_key(r) not in cases:
                    cases.append(case_key(r))
            for key in cases:
                in_case = [r for r in rows if case_key(r) == key
                           and (r["family"] == family or r["impl"] == _FLOOR)]
                if not any(r["family"] == family for r in in_case):
                    continue
                in_case.sort(key=lambda r: _impl_order(r["impl"], family))
                base = next((r for r in rows if case_key(r) == key
                             and r["impl"] == baseline), None)
                table.sections.append(len(table.rows))
                for i, r in enumerate(in_case):
                    ratio = (base["median_ms"] / r["median_ms"]) if base else None
                    row = [_case_label(r) if i == 0 else "", r["impl"],
                           fmt_ms(r["median_ms"]), fmt_ms(r["iqr_ms"]),
                           _fmt_int(r["tokens_per_s"]), _fmt_ratio(ratio),
                           _fmt_ratio(r.get("floor_ratio")),
                           _fmt_int(r.get("saved_bytes_per_token"))]
                    if cuda:
                        peak = r.get("peak_bytes")
                        row.append("-" if peak is None else f"{peak / 2**20:,.1f}")
                    if family == "LayerNormLSTM":
                        lstm = next((x for x in rows if case_key(x) == key
                                     and x["impl"] == "torch.nn.LSTM"), None)
                        row.append(fmt_ms(lstm["median_ms"]) if lstm and i == 0 else "")
                    row.append(_notes(r))
                    table.rows.append(row)
            out.append(table)
    return out


def _case_label(r: dict) -> str:
    label = f"T={r['T']} B={r['B']} I={r['I']} H={r['H']}"
    if r["layers"] != 1:
        label += f" L={r['layers']}"
    if r["bidirectional"]:
        label += " bi"
    if r.get("decode"):
        label += " decode"
    return label


def _notes(r: dict) -> str:
    notes = []
    if r.get("backend"):
        notes.append(r["backend"])
    if r.get("compile_s") is not None:
        notes.append(f"compile {r['compile_s']:.1f} s")
    return ", ".join(notes)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def print_tables(console, records: list[dict]) -> None:
    """The tables on a rich console."""
    from rich.table import Table as RichTable

    for t in tables(records):
        rich_table = RichTable(title=t.title, title_justify="left")
        for i, col in enumerate(t.columns):
            rich_table.add_column(col, justify="left" if i < 2 or col == "notes" else "right",
                                  no_wrap=i < 2)
        for i, row in enumerate(t.rows):
            rich_table.add_row(*row, end_section=(i + 1) in t.sections)
        console.print(rich_table)


def markdown(t: Table) -> str:
    """A markdown table."""
    lines = [f"**{t.title}**", "",
             "| " + " | ".join(t.columns) + " |",
             "|" + "|".join("---" if i < 2 or c == "notes" else "---:"
                            for i, c in enumerate(t.columns)) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in t.rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------

_MAX_BARS_CASES = 40


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    """PNG plots of the records into ``out_dir``: time against hidden size
    per implementation, and speed-up bars against each family's baseline,
    per device, dtype and mode. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(_group_key(r), []).append(r)
    for (device, dtype, tf32, mode_index), rows in sorted(groups.items()):
        mode = MODES[mode_index]
        tag = f"{device}_{dtype}{'_tf32' if tf32 else ''}_{mode}"
        precision = _precision(dtype, tf32)
        path = _plot_time_vs_hidden(plt, rows, out_dir / f"time_vs_hidden_{tag}.png",
                                    f"{mode}, {device} {precision}")
        if path:
            written.append(path)
        for family in FAMILIES:
            path = _plot_speedup(plt, rows, family,
                                 out_dir / f"speedup_{family}_{tag}.png",
                                 f"{family} {mode}, {device} {precision}")
            if path:
                written.append(path)
    return written


def _series_key(r: dict) -> tuple:
    """A case without its hidden size (the input size as 'H' when tied)."""
    return (r["T"], r["B"], "H" if r["I"] == r["H"] else r["I"], r["layers"],
            r["bidirectional"], bool(r.get("decode")))


def _plot_time_vs_hidden(plt, rows: list[dict], path: Path, title: str) -> Optional[Path]:
    series: dict[tuple, set] = {}
    for r in rows:
        series.setdefault(_series_key(r), set()).add(r["H"])
    best = max(series, key=lambda k: (len(series[k]), k[1]), default=None)
    if best is None or len(series[best]) < 2:
        return None
    T, B, I, L, bi, decode = best
    fig, ax = plt.subplots(figsize=(7, 4.5))
    impls = sorted({r["impl"] for r in rows if _series_key(r) == best},
                   key=lambda n: (n == _FLOOR, n))
    for name in impls:
        pts = sorted((r["H"], r["median_ms"], r["iqr_ms"]) for r in rows
                     if r["impl"] == name and _series_key(r) == best)
        hs, ms, iqr = zip(*pts)
        ax.errorbar(hs, ms, yerr=[i / 2 for i in iqr], marker="o", capsize=3, label=name,
                    linestyle="--" if name == _FLOOR else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("hidden size H")
    ax.set_ylabel("median time per call (ms)")
    shape = f"T={T} B={B} I={'H' if I == 'H' else I}" + (f" L={L}" if L != 1 else "") + \
        (" bi" if bi else "") + (" decode" if decode else "")
    ax.set_title(f"{title}: {shape}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_speedup(plt, rows: list[dict], family: str, path: Path,
                  title: str) -> Optional[Path]:
    baseline = BASELINES[family]
    base = {case_key(r): r["median_ms"] for r in rows if r["impl"] == baseline}
    members = [r for r in rows if (r["family"] == family or r["impl"] == _FLOOR)
               and r["impl"] != baseline and case_key(r) in base]
    if not any(r["family"] == family for r in members):
        return None
    cases: list[tuple] = []
    labels: dict[tuple, str] = {}
    for r in members:
        if case_key(r) not in cases:
            cases.append(case_key(r))
            labels[case_key(r)] = _case_label(r)
    shown = cases
    if len(cases) > _MAX_BARS_CASES:  # evenly spaced subset, said in the title
        step = len(cases) / _MAX_BARS_CASES
        shown = [cases[int(i * step)] for i in range(_MAX_BARS_CASES)]
        title += f" ({len(shown)} of {len(cases)} cases)"
    impls = sorted({r["impl"] for r in members}, key=lambda n: _impl_order(n, family))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(shown) * len(impls) + 2), 4.5))
    for j, name in enumerate(impls):
        xs, ys = [], []
        for i, key in enumerate(shown):
            r = next((r for r in members if r["impl"] == name and case_key(r) == key), None)
            if r is not None:
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(base[key] / r["median_ms"])
        ax.bar(xs, ys, width=width, label=name,
               hatch="//" if name == _FLOOR else None)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([labels[k] for k in shown], rotation=30, ha="right", fontsize="small")
    ax.set_ylabel(f"speed-up vs {baseline}")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# benchmarks/README.md
# ---------------------------------------------------------------------------

_README_HEAD = """\
# rnnfast benchmarks

<!-- Generated by `rnnfast-bench report`: edit rnnfast/bench/report.py, not this file. -->

Every figure below comes from a run of `rnnfast-bench` on the machine
described with it; the raw records are in each folder's results.json and
results.csv. Times are medians over repeated calls (torch.utils.benchmark,
after a warm-up, inputs rotated among random tensors), IQR the interquartile
range. From `cpu-amd-epyc-avx2-2threads-2026-12-01` on, the implementations
of a case take turns, one block of calls each, so that a change in the
shared machine's speed falls on all of them; earlier runs (its
`-before-tile-fix` run among them) timed them one after another. Speed-up
is the baseline's median over the row's (above 1 is faster):
torch.nn.LSTM for LSTM rows, the eager plain-PyTorch reference for
LayerNorm-LSTM rows (torch.nn.LSTM's time on the same case is shown beside
it). `x floor` is the row's median over gemm-floor's: the time of the same
GEMMs alone, each through the fastest product the machine offers for its
shape (torch.mm, F.linear, and on CPUs MKL's packed GEMM, oneDNN's packed
linear, rnnfast's own small-batch step product "rnnfast-step" (a
candidate since the last runs of 2026-11-29) and its product of a weight used
once, read as stored, "rnnfast-once" (at most 16 rows; a candidate since
2026-11-30's decode-stored run), chosen per GEMM by timing them; gemm-floor's notes
name the winners; a gemm-floor noted only "eager" or "cuda-graph" ran
torch.mm for every GEMM, as the harness did before 2026-11-28), CUDA-graph replayed on GPUs; on CPUs
each GEMM pays torch's per-call overhead, so small cases can beat it. Saved
B/token is the activation memory autograd keeps for the backward
(parameters and inputs left out), per token (T*B). "decode" cases are
streaming decode: one step per call with the state carried from the previous
call, timed per step. "float32 TF32" tables ran with TF32 matmuls allowed
(`torch.backends.cuda.matmul.allow_tf32` and `torch.backends.cudnn.allow_tf32`),
the plain float32 tables with both off, for every implementation alike.

The allocator line says how the C allocator returned large blocks during
the run. "steady" (the harness's default from
`...-2026-11-30-steady` on): glibc's mmap and trim thresholds fixed at 1
GiB, so that large workspaces are reused from the heap (as under jemalloc
or tcmalloc) instead of being mapped afresh and page-faulted on every
call. "default": glibc as the process found it. Under glibc's own
adaptive thresholds torch.nn.LSTM's CPU training ran up to 1.4x slower
(float32, T=100 B=64 H=128: 31.5 against 22.6 ms) depending on which cases
had run before in the same process, while rnnfast (which keeps its large
buffers) barely moved: the runs whose allocator is "not recorded" (every
run before that one) left glibc as it was, and their LSTM training ratios
carry a varying share of that effect.

Every implementation that can load the family baseline's weights is checked
on the same inputs: a note says where its output error against a float64
copy of the baseline is over twice the baseline's own error (plus 4 eps of
the largest output); results.json keeps both errors. The errors are the
root mean square over the first 16 steps, before the recurrence amplifies
them: over a whole sequence a LayerNorm-LSTM with default weights is
chaotic, and two correct float32 implementations' largest errors scatter
from 0.1x to 20x each other's with the seed (the runs before 2026-12-01
judged the largest error over the whole output, and the AVX2 run of
2026-11-30 noted one T=200 LayerNorm-LSTM case so). Runs before
`...-2026-11-29-bf16-vector-convert` compared outputs with the baseline's
under a fixed tolerance instead, and so noted "output differs" for every
LayerNorm-LSTM case: with default weights it amplifies rounding over the
steps until the float32 reference itself is up to 0.015 from float64 and
its bfloat16 runs up to 1.9 (rnnfast's errors at most the reference's in
the runs since).

Reproduce with `make bench` (the default preset, into bench-out/) or
`rnnfast-bench --out benchmarks/results/NAME [--grid full]`, then
`rnnfast-bench report` to regenerate this file.

The runs follow, newest first; the table lists them, each with the range of
rnnfast.LSTM's speed-up over torch.nn.LSTM across the run's cases, per mode.
"""


def _env_lines(env: dict) -> list[str]:
    build = env.get("rnnfast_build_info") or {}
    lines = [
        f"- device: {env.get('device_name')}",
        f"- CPU: {env.get('cpu_model')}, {env.get('threads')} torch threads "
        f"({env.get('cpu_count')} logical CPUs)",
    ]
    if env.get("gpu_name"):
        lines.append(f"- GPU: {env['gpu_name']}")
    lines += [
        f"- torch {env.get('torch_version')}, CUDA {env.get('cuda_version')}, "
        f"cuDNN {env.get('cudnn_version')}",
        f"- rnnfast {env.get('rnnfast_version')}: "
        + ", ".join(f"{k}={v}" for k, v in build.items()
                    if k not in ("rnnfast_version", "cpu_step_gemm", "cpu_bulk_gemm")),
        f"- date: {env.get('date')}",
    ]
    if env.get("isa_settings"):
        lines.insert(-1, "- set in the environment: " + ", ".join(
            f"{k}={v}" for k, v in env["isa_settings"].items()))
    lines.insert(-1, "- allocator: " + _malloc_line(env.get("malloc")))
    bulk = build.get("cpu_bulk_gemm")
    if bulk and bulk.get("chosen"):
        times = (f", BLAS {bulk['blas_us']:.0f} us / oneDNN {bulk['onednn_us']:.0f} us"
                 if bulk.get("onednn_us") else "")
        lines.insert(-1, f"- CPU products over many rows: {bulk['chosen']} ({bulk['why']}{times})")
    if build.get("cpu_step_gemm"):
        lines.insert(-1, "- CPU per-step products chosen (best of 9 runs, us, the BLAS's "
                     "/ rnnfast's): " + "; ".join(
                         f"{c['m']}x{c['n']}x{c['k']}{' threaded' if c['threaded'] else ''} "
                         f"{c['chosen']} ({c['blas_us']:.1f} / {c['rnnfast_us']:.1f})"
                         for c in build["cpu_step_gemm"]))
    return lines


def _malloc_line(malloc: Optional[dict]) -> str:
    if not malloc:  # runs before 2026-11-30's allocator setting
        return "not recorded (glibc as the process found it; see the note at the top)"
    line = f"{malloc.get('mode')} ({malloc.get('libc') or 'unknown C library'}"
    if malloc.get("mode") == "steady":
        line += (f": mmap and trim thresholds {malloc['mmap_threshold'] >> 20} MiB"
                 if malloc.get("applied") else f": not applied, {malloc.get('why')}")
    line += ")"
    if malloc.get("environment"):
        line += ", " + ", ".join(f"{k}={v}" for k, v in malloc["environment"].items())
    return line


def _anchor(title: str) -> str:
    """The link target GitHub gives a heading: lower case, spaces to
    hyphens, other punctuation but hyphens and underscores dropped."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in "-_ ")
    return "#" + kept.replace(" ", "-")


def _speedup_range(records: list[dict], mode: str, decode: bool) -> str:
    """rnnfast.LSTM's speed-ups over its baseline in ``mode`` (decode cases
    apart), as ``low-high``; an en dash where the run has none."""
    ratios = sorted(r["ratio"] for r in records
                    if r["impl"] == "rnnfast.LSTM" and r["mode"] == mode
                    and bool(r.get("decode")) == decode and r.get("ratio"))
    if not ratios:
        return "\u2013"
    low, high = _fmt_ratio(ratios[0]), _fmt_ratio(ratios[-1])
    return low if low == high else f"{low}-{high}"


def _run_row(name: str, doc: dict) -> list[str]:
    env = doc.get("environment", {})
    build = env.get("rnnfast_build_info") or {}
    machine = env.get("gpu_name") or env.get("cpu_model") or "unknown"
    if not env.get("gpu_name") and build.get("cpu_kernels"):
        machine += f" ({build['cpu_kernels']} kernels)"
    if env.get("isa_settings"):
        machine += ", " + ", ".join(f"{k}={v}" for k, v in env["isa_settings"].items())
    dtypes = sorted({r["dtype"] for r in doc["results"]})
    records = doc["results"]
    return [f"[{name}]({_anchor(name)})", str(env.get("date", ""))[:16].replace("T", " "),
            machine, ", ".join(dtypes), _speedup_range(records, "training", False),
            _speedup_range(records, "inference", False),
            _speedup_range(records, "inference", True)]


def write_readme(result_dirs: Iterable[os.PathLike], output: os.PathLike) -> Path:
    """Regenerates ``output`` (benchmarks/README.md) from the results.json
    and PNG plots of each folder in ``result_dirs``: a table of the runs,
    then each run, newest first (by the date it recorded, then name)."""
    output = Path(output)
    runs = [(Path(d), load(d)) for d in result_dirs]
    runs.sort(key=lambda run: (str(run[1].get("environment", {}).get("date", "")),
                               run[0].name), reverse=True)
    parts = [_README_HEAD]
    parts += ["| run | date (UTC) | machine | dtypes | rnnfast.LSTM speed-up: training "
              "| inference | decode |", "|---|---|---|---|---:|---:|---:|"]
    parts += ["| " + " | ".join(_run_row(folder.name, doc)) + " |" for folder, doc in runs]
    for folder, doc in runs:
        settings = doc.get("settings", {})
        parts.append(f"\n## {folder.name}\n")
        parts.append("\n".join(_env_lines(doc.get("environment", {}))))
        if settings:
            parts.append(
                f"\n- settings: preset {settings.get('preset')}, "
                f"min_run_time {settings.get('min_run_time')} s, "
                f"warm-up calls {settings.get('warmup')}, "
                f"{settings.get('inputs')} input sets")
        parts.append("")
        for t in tables(doc["results"]):
            parts.append(markdown(t))
        images = sorted(folder.glob("*.png"))
        if images:
            parts.append("Plots:\n")
            for image in images:
                rel = os.path.relpath(image, output.parent).replace(os.sep, "/")
                parts.append(f"![{image.stem}]({rel})\n")
        if doc.get("notes"):
            parts.append("Notes:\n")
            parts += [f"- {n}" for n in doc["notes"]]
            parts.append("")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(parts).rstrip() + "\n")
    return output

