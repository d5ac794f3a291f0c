"""Paired comparison of report rows against a reference row (default: LoRA at the same budget and model).

Runs of two methods with the same seed share the seed's data order, head init and training subset, so their
difference is less noisy than the difference of two independent means. Per task, on the task's primary (first)
metric ×100:

  d_s = row_s − reference_s for every seed s that both have;  Δ = mean(d);
  95% interval = Δ ± t(0.975, n−1) · sd(d) / √n  (Student t over the n paired seeds; none for n = 1).

The interval "excludes 0" marks a difference that the seeds support (▲ better, ▼ worse); otherwise the row ties
the reference on that task. The GLUE-average line does the same with per-seed averages over the tasks both rows
have, using only seeds present in every one of those tasks for both rows. Seeds that only one side has are left
out of the pairing and counted in the table. Wins / ties / losses count the tasks by that marker.

Why t and not a bootstrap: with the 3–5 seeds a GLUE table has, a bootstrap over seeds has only 10–126 distinct
resamples and gives intervals that are too narrow; the t interval is the standard small-sample choice and
assumes roughly normal per-seed differences.

Knows nothing of the report's types: it takes per-seed values (dicts seed → value) and row labels.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class PairedDiff:
    mean: float  # Δ, in the values' units ×scale
    low: float | None  # 95% interval; None with one pair
    high: float | None
    n: int  # paired seeds
    unpaired: int  # seeds that only one side has

    @property
    def sign(self) -> int:
        """+1 / −1 when the interval excludes 0 above / below, else 0."""
        if self.low is None or self.high is None:
            return 0
        return 1 if self.low > 0 else (-1 if self.high < 0 else 0)


def t_quantile(q: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, dof))


def paired_difference(row: dict[Any, float], reference: dict[Any, float], scale: float = 100.0) -> PairedDiff | None:
    """Δ and its 95% t interval over the seeds both dicts have; None when they share no seed."""
    common = sorted(set(row) & set(reference), key=str)
    unpaired = len(set(row) ^ set(reference))
    if not common:
        return None
    diffs = [scale * (row[s] - reference[s]) for s in common]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDiff(mean, None, None, 1, unpaired)
    half = t_quantile(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDiff(mean, mean - half, mean + half, len(diffs), unpaired)


def average_by_seed(per_task: Sequence[dict[Any, float]], seeds: set) -> dict[Any, float]:
    """Per seed, the mean over tasks (each dict: seed → value) of the seeds in `seeds`."""
    return {s: statistics.fmean(d[s] for d in per_task) for s in seeds}


def paired_average(row_tasks: Sequence[dict[Any, float]], ref_tasks: Sequence[dict[Any, float]],
                   scale: float = 100.0) -> PairedDiff | None:
    """Δ of the GLUE average: per-seed averages over the given tasks (same order in both), on the seeds that every
    task of both rows has."""
    if not row_tasks:
        return None
    row_seeds = set.intersection(*(set(d) for d in row_tasks))
    ref_seeds = set.intersection(*(set(d) for d in ref_tasks))
    common = row_seeds & ref_seeds
    if not common:
        return None
    diff = paired_difference(average_by_seed(row_tasks, common), average_by_seed(ref_tasks, common), scale)
    return PairedDiff(diff.mean, diff.low, diff.high, diff.n, len(row_seeds ^ ref_seeds))


def fmt_diff(d: PairedDiff | None) -> str:
    if d is None:
        return "—"
    marker = {1: " ▲", -1: " ▼", 0: ""}[d.sign]
    text = f"{d.mean:+.2f}"
    if d.low is not None:
        text += f" [{d.low:+.2f}, {d.high:+.2f}]"
    text += f"{marker} (n={d.n}"
    if d.unpaired:
        text += f", {d.unpaired} unpaired"
    return text + ")"


def wins_ties_losses(diffs: Sequence[PairedDiff | None]) -> tuple[int, int, int]:
    signs = [d.sign for d in diffs if d is not None]
    return signs.count(1), signs.count(0), signs.count(-1)


@dataclass
class PairedRow:
    label: str
    reference_label: str
    per_task: list[PairedDiff | None]
    average: PairedDiff | None

    @property
    def record(self) -> tuple[int, int, int]:
        return wins_ties_losses(self.per_task)


def compare_rows(rows: Sequence[Any], tasks: Sequence[str], reference_of: Callable[[Any], Any | None],
                 by_seed: Callable[[Any, str], dict[Any, float] | None], label: Callable[[Any], str]) -> list[PairedRow]:
    """One PairedRow per row that has a reference (`reference_of(row)`, not itself). `by_seed(row, task)` gives the
    primary metric per seed (None when the cell is empty)."""
    out = []
    for row in rows:
        ref = reference_of(row)
        if ref is None or ref == row:
            continue
        per_task, row_avg, ref_avg = [], [], []
        for task in tasks:
            mine, theirs = by_seed(row, task), by_seed(ref, task)
            if not mine or not theirs:
                per_task.append(None)
                continue
            per_task.append(paired_difference(mine, theirs))
            row_avg.append(mine)
            ref_avg.append(theirs)
        out.append(PairedRow(label(row), label(ref), per_task, paired_average(row_avg, ref_avg)))
    return out


def markdown_paired(paired: Sequence[PairedRow], task_headers: Sequence[str]) -> str:
    head = ["row", "vs", *task_headers, "GLUE avg", "W/T/L"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in paired:
        w, t, l = p.record
        cells = [p.label, p.reference_label, *(fmt_diff(d) for d in p.per_task), fmt_diff(p.average), f"{w}/{t}/{l}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_paired(paired: Sequence[PairedRow], tasks: Sequence[str], selection: str) -> list[list[Any]]:
    """Long form: selection, row, reference, task (or "glue_avg"), delta, low, high, n, unpaired, sign."""
    out = []
    for p in paired:
        for task, d in [*zip(tasks, p.per_task), ("glue_avg", p.average)]:
            if d is not None:
                out.append([selection, p.label, p.reference_label, task, round(d.mean, 4),
                            None if d.low is None else round(d.low, 4), None if d.high is None else round(d.high, 4),
                            d.n, d.unpaired, d.sign])
    return out


CSV_HEADER = ["selection", "row", "reference", "task", "delta", "ci_low", "ci_high", "n_pairs", "unpaired", "sign"]
