"""``rnnfast-bench compare OLD.json NEW.json``: per-case changes, with
regressions flagged only beyond the measured noise.

A case's noise band is half the sum of the two runs' interquartile ranges:
a change counts when the medians differ by more than ``threshold`` times
that (the two ``median +- IQR/2`` bands no longer overlap at threshold 1)
and by more than ``min_change`` of the old median.
"""

from __future__ import annotations

from dataclasses import dataclass
from .report import fmt_ms
from .results import KEY

__all__ = ["Change", "classify", "compare", "environment_differences", "print_comparison",
           "ENV_KEYS"]

# Environment fields that make two runs incomparable when they differ.
ENV_KEYS = ("device_name", "gpu_name", "threads", "torch_version", "cuda_version",
            "cudnn_version", "rnnfast_build_info", "malloc")


@dataclass
class Change:
    key: tuple  # KEY's fields
    old: dict
    new: dict
    verdict: str  # "regression", "improvement" or "within noise"

    @property
    def delta_ms(self) -> float:
        return self.new["median_ms"] - self.old["median_ms"]

    @property
    def relative(self) -> float:
        return self.delta_ms / self.old["median_ms"]

    @property
    def noise_ms(self) -> float:
        return (self.old["iqr_ms"] + self.new["iqr_ms"]) / 2


def _key(r: dict) -> tuple:
    return tuple(r[k] for k in KEY)


def classify(old: dict, new: dict, threshold: float = 1.0,
             min_change: float = 0.02) -> str:
    delta = new["median_ms"] - old["median_ms"]
    noise = threshold * (old["iqr_ms"] + new["iqr_ms"]) / 2
    if abs(delta) <= noise or abs(delta) <= min_change * old["median_ms"]:
        return "within noise"
    return "regression" if delta > 0 else "improvement"


def compare(old_doc: dict, new_doc: dict, threshold: float = 1.0,
            min_change: float = 0.02) -> tuple[list[Change], list[tuple], list[tuple]]:
    """Matches the records of two results.json documents by implementation
    and case. Returns the changes (in the new run's order) and the keys found
    only in the old and only in the new run."""
    old = {_key(r): r for r in old_doc["results"]}
    new = {_key(r): r for r in new_doc["results"]}
    changes = [Change(k, old[k], r, classify(old[k], r, threshold, min_change))
               for k, r in new.items() if k in old]
    only_old = [k for k in old if k not in new]
    only_new = [k for k in new if k not in old]
    return changes, only_old, only_new


def environment_differences(old_doc: dict, new_doc: dict) -> list[str]:
    a, b = old_doc.get("environment", {}), new_doc.get("environment", {})
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in ENV_KEYS if a.get(k) != b.get(k)]


def _label(key: tuple) -> str:
    r = dict(zip(KEY, key))
    label = f"{r['mode']} {r['device']} {r['dtype']} T={r['T']} B={r['B']} I={r['I']} H={r['H']}"
    if r["layers"] != 1:
        label += f" L={r['layers']}"
    if r["bidirectional"]:
        label += " bi"
    return label


def print_comparison(console, old_doc: dict, new_doc: dict, threshold: float = 1.0,
                     min_change: float = 0.02, only_changes: bool = False) -> int:
    """Prints the comparison; returns the number of regressions."""
    from rich.table import Table

    for line in environment_differences(old_doc, new_doc):
        console.print(f"[yellow]environment differs[/yellow] {line}")
    changes, only_old, only_new = compare(old_doc, new_doc, threshold, min_change)
    table = Table(title=f"changes (noise band: {threshold:g} x mean IQR, "
                        f"at least {min_change:.0%})", title_justify="left")
    for col, justify in (("case", "left"), ("implementation", "left"),
                         ("old ms", "right"), ("new ms", "right"),
                         ("change", "right"), ("noise ms", "right"), ("verdict", "left")):
        table.add_column(col, justify=justify)
    style = {"regression": "bold red", "improvement": "green", "within noise": "dim"}
    for c in changes:
        if only_changes and c.verdict == "within noise":
            continue
        table.add_row(_label(c.key), c.key[0],
                      f"{fmt_ms(c.old['median_ms'])} +- {fmt_ms(c.old['iqr_ms'])}",
                      f"{fmt_ms(c.new['median_ms'])} +- {fmt_ms(c.new['iqr_ms'])}",
                      f"{c.relative:+.1%}", fmt_ms(c.noise_ms),
                      f"[{style[c.verdict]}]{c.verdict}[/]")
    console.print(table)
    for what, keys in (("only in OLD", only_old), ("only in NEW", only_new)):
        for k in keys:
            console.print(f"{what}: {k[0]} {_label(k)}")
    regressions = sum(c.verdict == "regression" for c in changes)
    improvements = sum(c.verdict == "improvement" for c in changes)
    console.print(f"{len(changes)} cases compared: {regressions} regression(s), "
                  f"{improvements} improvement(s), "
                  f"{len(changes) - regressions - improvements} within noise")
    return regressions
