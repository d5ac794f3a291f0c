"""`python -m report <sweep dir or runs dir> [--out DIR]`: aggregate run directories into tables and plots.

Reads only the results contract of each job directory (found recursively): results.json and metrics.jsonl
(plus .hydra/config.yaml, only to name a job whose results.json is missing or unreadable). Writes to --out
(default: the directory given):

  report.md / report.csv / report.tex   two tables, best epoch and last epoch: one row per method (× budget when
                                        the runs have more than one budget; × model when more than one model;
                                        × the method options that differ between runs, e.g. `alpha=8`), one
                                        column per GLUE task in GLUE order plus the GLUE average; cells are the
                                        mean ± sample std (ddof=1) over seeds with the seed count "(n=K)"
                                        (runs sharing a seed in a cell: the newest counts, and a note says so);
                                        failed, interrupted, unreadable and missing jobs are listed under the
                                        tables. A job that failed before training (results.json "stage":
                                        "setup") or was interrupted adds no row or column to the tables.
  plots/ranks_<row>_<task>.png          final rank allocation (layer × matrix type) of rank-adaptive methods
  plots/eval_<task>.png                 the averaged metric vs optimizer step, one line per run
  plots/budget_<task>.png               total rank budget vs step (train/budget when the method logs it,
                                        else ranks/total, the Σ of effective ranks at each evaluation)
  plots/pareto.png                      GLUE average (or the one task's primary metric) of each row with its
                                        95% interval over seeds, against stored adapter size and against
                                        training seconds per step
  paired.csv + a report.md section      every row against the reference row (--reference, default lora, same
                                        budget and model): per-task differences paired by seed with a 95% t
                                        interval, ▲/▼ where it excludes 0, wins / ties / losses (paired.py)

Metric conventions (values are shown ×100, as in the papers): CoLA MCC; SST-2, QNLI, RTE, WNLI accuracy;
MRPC and QQP accuracy / F1; STS-B Pearson / Spearman; MNLI matched / mismatched accuracy. The GLUE average
takes one number per task, the first of each pair (MRPC and QQP accuracy, STS-B Pearson, MNLI matched
accuracy): the LoRA paper's Table 2 convention.

Exit status: 0 when every job found is ok, 1 when the report was written but some job failed or has no
readable results.json, 2 when there is nothing to report.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import paired, tuning
from .errors import ConfigError
from .rundir import ADAPTER_DIR, CHECKPOINTS_DIR, METRICS_FILE, RESULTS_FILE, flatten
from .validate import CONF_DIR

GLUE_ORDER = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
METRIC_TITLES = {"accuracy": "acc", "accuracy_mm": "mm", "f1": "F1", "mcc": "MCC", "pearson": "Pearson",
                 "spearman": "Spearman"}
METHOD_ORDER = ("lora", "dora", "dora_dynamic", "adalora", "xgblora", "dynamic_lora")
SELECTIONS = (("best", "Best epoch", "the best evaluation of each run (by its primary metric), then mean ± std "
               "over seeds"),
              ("last", "Last epoch", "the final evaluation of each run, then mean ± std over seeds"))
# Sub-directories of a job directory that never hold another job.
SKIP_DIRS = {".hydra", "wandb", "tensorboard", ADAPTER_DIR, "plots", ".submitit", CHECKPOINTS_DIR, "checkpoint",
             "__pycache__"}
# Module-name suffix (after `...layer.<i>.`) → matrix type, for BERT/RoBERTa and DeBERTa-v2/v3 names.
MATRIX_TYPES = {
    "attention.self.query": "query", "attention.self.query_proj": "query",
    "attention.self.key": "key", "attention.self.key_proj": "key",
    "attention.self.value": "value", "attention.self.value_proj": "value",
    "attention.output.dense": "attn_out", "intermediate.dense": "ffn_in", "output.dense": "ffn_out",
}
MATRIX_ORDER = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|block|blocks|h)\.(\d+)\.(.+)$")


# --- reading ------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One job directory: parsed results (None when unreadable) and its evaluations."""

    dir: Path
    rel: str
    results: dict[str, Any] | None = None
    problem: str | None = None  # why the job has no usable results
    evals: list[dict[str, Any]] = field(default_factory=list)
    hydra_cfg: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        if self.results is None:
            return "unreadable" if (self.dir / RESULTS_FILE).exists() else "missing"
        return str(self.results.get("status", "unknown"))

    @property
    def failed_before_training(self) -> bool:
        """A failed job that never trained: results.json says "stage": "setup"; a file written before that field
        existed has neither the ledger of a built model ("ledger_start") nor a training history."""
        if self.results is None or self.status != "failed":
            return False
        stage = self.results.get("stage")
        if stage is not None:
            return stage == "setup"
        return "ledger_start" not in self.results and "history" not in self.results

    def finished_at(self) -> float:
        """When results.json was written (its modification time): which of two runs of one seed is newer."""
        try:
            return (self.dir / RESULTS_FILE).stat().st_mtime
        except OSError:
            return float("-inf")

    def _cfg(self) -> dict[str, Any]:
        if self.results is not None and isinstance(self.results.get("config"), dict):
            return self.results["config"]
        return self.hydra_cfg or {}

    def field(self, name: str) -> Any:
        """task / method / budget / model / seed from results.json, else from the config it ran with."""
        if self.results is not None and self.results.get(name) is not None:
            return self.results[name]
        cfg = self._cfg()
        if name == "seed":
            return cfg.get("seed")
        sub = cfg.get(name)
        if isinstance(sub, dict):
            return sub.get("name", f"r{sub['rank']}" if name == "budget" and "rank" in sub else None)
        return None

    def describe(self) -> str:
        parts = [f"{k} {self.field(k)}" for k in ("method", "task", "budget", "seed") if self.field(k) is not None]
        return ", ".join(parts) if parts else "unknown configuration"


def find_job_dirs(root: Path) -> list[Path]:
    """Directories holding a job's contract files (results.json, metrics.jsonl or .hydra/), recursively."""
    found = []
    for path, dirs, files in _walk(root):
        if RESULTS_FILE in files or METRICS_FILE in files or ".hydra" in dirs:
            found.append(path)
            dirs[:] = []  # a job directory holds no other job
        else:
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
    return sorted(found, key=_natural_key)


def _walk(root: Path):
    import os

    for path, dirs, files in os.walk(root):
        yield Path(path), dirs, files


def _natural_key(p: Path | str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def read_job(job_dir: Path, root: Path) -> Job:
    rel = str(job_dir.relative_to(root)) if job_dir != root else "."
    job = Job(dir=job_dir, rel=rel)
    results_path = job_dir / RESULTS_FILE
    if results_path.exists():
        try:
            data = json.loads(results_path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"top level is {type(data).__name__}, not an object")
            job.results = data
        except (ValueError, OSError) as e:
            job.problem = f"results.json is unreadable (half-written?): {type(e).__name__}: {e}"
    else:
        job.problem = "no results.json (the job was killed, is still running, or never finished)"
    if job.results is not None and job.results.get("status") == "ok":
        best, last = job.results.get("best"), job.results.get("last")
        if not isinstance(best, dict) or not isinstance(last, dict):
            job.problem = "results.json has status ok but no best/last metrics"
            job.results = None
    job.evals = _read_jsonl(job_dir / METRICS_FILE)
    if job.results is None:
        job.hydra_cfg = _read_hydra_config(job_dir)
    return job


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parsed lines; a torn last line (a job killed mid-write) is skipped."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _read_hydra_config(job_dir: Path) -> dict[str, Any] | None:
    path = job_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
        return data if isinstance(data, dict) else None
    except Exception:  # a label is all we wanted; the job is reported as unreadable anyway
        return None


# --- aggregation --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowKey:
    method: str
    variant: str  # the method options that differ between runs of this method, e.g. "alpha=8"
    budget: str
    model: str


@dataclass
class Cell:
    runs: list[Job]

    def values(self, selection: str, metric: str) -> list[float]:
        out = []
        for j in self.runs:
            v = j.results[selection].get(f"eval/{metric}")
            if isinstance(v, (int, float)) and math.isfinite(v):
                out.append(float(v))
        return out

    def by_seed(self, selection: str, metric: str) -> dict[Any, float]:
        per_seed: dict[Any, list[float]] = {}
        for j in self.runs:
            v = j.results[selection].get(f"eval/{metric}")
            if isinstance(v, (int, float)) and math.isfinite(v):
                per_seed.setdefault(j.field("seed"), []).append(float(v))
        return {s: statistics.fmean(vs) for s, vs in per_seed.items()}


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def _task_config(task: str, runs: Iterable[Job]) -> dict[str, Any]:
    """The task's facts (title, table_metrics, eval_splits): the task group of the config the runs trained with;
    for runs from before the task configs named them, conf/task/<task>.yaml of this checkout."""
    for j in runs:
        cfg = ((j.results or {}).get("config") or {}).get("task")
        if isinstance(cfg, dict) and "table_metrics" in cfg:
            return cfg
    return _checkout_config("task", task)


@functools.lru_cache(maxsize=None)
def _checkout_config(group: str, name: str) -> dict[str, Any]:
    """conf/<group>/<name>.yaml of this checkout, read once per process (tables ask for a task's facts per cell);
    {} when there is none."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        return {}
    import yaml  # PyYAML comes with omegaconf

    return yaml.safe_load(path.read_text()) or {}


def task_title(task: str, runs: Iterable[Job]) -> str:
    return str(_task_config(task, runs).get("title") or task)


def task_metrics(task: str, runs: Iterable[Job]) -> tuple[str, ...]:
    """Metrics shown for a task, the first being its number in the GLUE average: the task config's
    `table_metrics` (the papers' convention) on each dev split (a split's suffix appended: MNLI's _mm), else the
    runs' primary metric."""
    runs = list(runs)
    cfg = _task_config(task, runs)
    shown = cfg.get("table_metrics")
    if shown:
        suffixes = [split.get("suffix", "") for split in (cfg.get("eval_splits") or {}).values()] or [""]
        return tuple(f"{m}{suffix}" for suffix in suffixes for m in shown)
    for j in runs:
        key = j.results.get("primary_metric") or ""
        if key.startswith("eval/"):
            return (key[len("eval/"):],)
    return ("accuracy",)


def task_order(tasks: Iterable[str]) -> list[str]:
    tasks = set(tasks)
    return [t for t in GLUE_ORDER if t in tasks] + sorted(tasks - set(GLUE_ORDER))


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _budget_rank(budget: str) -> tuple[int, str]:
    m = re.fullmatch(r"r(\d+)", budget)
    return (-int(m.group(1)) if m else 0, budget)


def job_lr(j: Job) -> float | None:
    lr = ((j.results or {}).get("config") or {}).get("trainer", {}).get("lr")
    return float(lr) if isinstance(lr, (int, float)) else None


def fmt_lr(lr: float | None) -> str:
    return "—" if lr is None else f"{lr:g}"


def _lr_grid_methods(jobs: list[Job]) -> set[str]:
    """Methods whose runs of one task, budget and model used several learning rates (a tuning grid): their rows
    split by lr. A per-task lr (the final sweep of the tuning protocol) does not split rows."""
    seen: dict[tuple, set] = {}
    for j in jobs:
        key = (str(j.field("method")), str(j.field("task")), str(j.field("budget")), str(j.field("model")))
        seen.setdefault(key, set()).add(job_lr(j))
    return {key[0] for key, lrs in seen.items() if len(lrs) > 1}


def _method_options(j: Job) -> dict[str, Any]:
    """The job's method options, each key its config lacks filled with the method's default from this checkout's
    conf/method/<name>.yaml: a run from before an option was documented trained with its default, and the absence
    alone should not make it another row."""
    defaults = _checkout_config("method", str(j.field("method")))
    return {**defaults, **((j.results.get("config") or {}).get("method") or {})}


def row_keys(jobs: list[Job]) -> dict[int, RowKey]:
    """RowKey per job (by id): method, the method options that vary between its runs (plus `lr=` when the method
    ran a learning-rate grid), budget, model."""
    lr_grid = _lr_grid_methods(jobs)
    options = {id(j): flatten(_method_options(j)) for j in jobs}
    method_cfgs: dict[str, list[dict[str, Any]]] = {}
    for j in jobs:
        method_cfgs.setdefault(str(j.field("method")), []).append(options[id(j)])
    varying: dict[str, list[str]] = {}
    for method, cfgs in method_cfgs.items():
        keys = sorted(set().union(*cfgs) - {"name"})
        varying[method] = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in cfgs}) > 1]
    out = {}
    for j in jobs:
        method = str(j.field("method"))
        cfg = options[id(j)]
        variant = ",".join([f"{k}={cfg.get(k)}" for k in varying[method]] +
                           ([f"lr={fmt_lr(job_lr(j))}"] if method in lr_grid else []))
        out[id(j)] = RowKey(method, variant, str(j.field("budget")), str(j.field("model")))
    return out


@dataclass
class Table:
    """What the three writers render: rows × tasks with the cells' runs."""

    rows: list[RowKey]
    tasks: list[str]
    cells: dict[tuple[RowKey, str], Cell]
    show_budget: bool
    show_model: bool
    stored: dict[RowKey, tuple[float, float, bool]]  # mean adapter_stored, mean extra_stored, all equal?
    # (row, task) → (runs, distinct seeds) where several runs share a seed (only the newest per seed is used)
    shared_seeds: dict[tuple[RowKey, str], tuple[int, int]] = field(default_factory=dict)

    def row_label(self, row: RowKey) -> str:
        return row.method + (f" ({row.variant})" if row.variant else "")

    def full_label(self, row: RowKey) -> str:
        """The row label with the budget and model when the table shows them."""
        return self.row_label(row) + (f" {row.budget}" if self.show_budget else "") + \
            (f" {row.model}" if self.show_model else "")

    def seed_notes(self) -> list[str]:
        """One line per cell whose runs share seeds, in table order."""
        out = []
        for row in self.rows:
            for task in self.tasks:
                if (row, task) in self.shared_seeds:
                    runs, seeds = self.shared_seeds[row, task]
                    out.append(f"Note: {task}/{self.full_label(row)}: {runs} runs share {seeds} "
                               f"seed{'s' if seeds > 1 else ''}; the newest run per seed is used.")
        return out

    def metrics(self, task: str) -> tuple[str, ...]:
        return task_metrics(task, self.task_runs(task))

    def task_runs(self, task: str) -> list[Job]:
        return [j for r in self.rows for j in (self.cells.get((r, task)) or Cell([])).runs]

    def title(self, task: str) -> str:
        return task_title(task, self.task_runs(task))

    def header(self, task: str) -> str:
        return f"{self.title(task)} ({'/'.join(METRIC_TITLES.get(m, m) for m in self.metrics(task))})"

    def primary_by_seed(self, row: RowKey, task: str, selection: str) -> dict[Any, float] | None:
        """The task's first metric per seed of a cell (None when the cell has no ok run)."""
        cell = self.cells.get((row, task))
        return cell.by_seed(selection, self.metrics(task)[0]) if cell is not None else None

    def reference_row(self, row: RowKey, method: str) -> RowKey | None:
        """The row of `method` at `row`'s budget and model (its plain variant when it has several)."""
        matches = [r for r in self.rows if r.method == method and r.budget == row.budget and r.model == row.model]
        matches.sort(key=lambda r: (r.variant != "", r.variant))
        return matches[0] if matches else None

    def paired(self, selection: str, reference: str) -> list[paired.PairedRow]:
        return paired.compare_rows(self.rows, self.tasks, lambda r: self.reference_row(r, reference),
                                   lambda r, t: self.primary_by_seed(r, t, selection), self.full_label)

    def stats(self, row: RowKey, task: str, selection: str) -> list[tuple[str, float, float | None, int]] | None:
        """[(metric, mean, std, n)] for a cell, None when the cell has no ok run."""
        cell = self.cells.get((row, task))
        if cell is None:
            return None
        out = []
        for metric in self.metrics(task):
            vals = cell.values(selection, metric)
            if vals:
                m, s = mean_std(vals)
                out.append((metric, m, s, len(vals)))
        return out or None

    def average(self, row: RowKey, selection: str) -> tuple[float, float | None, int | None, int] | None:
        """GLUE average over the tasks this row has: (mean, std over seeds, n seeds, n tasks).

        The std is that of per-seed averages and is given only when every task of the row ran the same seeds.
        """
        means, per_seed = [], []
        for task in self.tasks:
            cell = self.cells.get((row, task))
            if cell is None:
                continue
            metric = self.metrics(task)[0]
            vals = cell.values(selection, metric)
            if not vals:
                continue
            means.append(statistics.fmean(vals))
            per_seed.append(cell.by_seed(selection, metric))
        if not means:
            return None
        seed_sets = {frozenset(d) for d in per_seed}
        std, n = None, None
        if len(seed_sets) == 1:
            seeds = sorted(next(iter(seed_sets)), key=str)
            n = len(seeds)
            if n > 1:
                std = statistics.stdev([statistics.fmean(d[s] for d in per_seed) for s in seeds])
        return statistics.fmean(means), std, n, len(means)


def newest_per_seed(runs: Sequence[Job]) -> list[Job]:
    """One run per seed, the newest (a rerun replaces the run it repeats; averaging both would count that seed
    twice), in the order given."""
    newest: dict[str, Job] = {}
    for j in runs:  # on equal times the later directory wins
        seed = str(j.field("seed"))
        if seed not in newest or j.finished_at() >= newest[seed].finished_at():
            newest[seed] = j
    kept = {id(j) for j in newest.values()}
    return [j for j in runs if id(j) in kept]


def build_table(ok_jobs: list[Job], failed_jobs: Sequence[Job] = ()) -> Table:
    """Cells from the ok jobs, one run per seed (the newest; Table.shared_seeds notes the cells where runs shared a
    seed); failed jobs (with a readable results.json) still add their row and task, so a configuration that failed
    everywhere shows up as a row of "—". Pass only jobs that failed in training: one that never started training
    says nothing about the configuration's scores."""
    failed_jobs = [j for j in failed_jobs if j.field("method") is not None and j.field("task") is not None]
    keys = row_keys(list(ok_jobs) + failed_jobs)
    grouped: dict[tuple[RowKey, str], list[Job]] = {}
    for j in ok_jobs:
        grouped.setdefault((keys[id(j)], str(j.field("task"))), []).append(j)
    cells: dict[tuple[RowKey, str], Cell] = {}
    shared_seeds: dict[tuple[RowKey, str], tuple[int, int]] = {}
    for key, runs in grouped.items():
        cells[key] = Cell(newest_per_seed(runs))
        if len(cells[key].runs) < len(runs):
            shared_seeds[key] = (len(runs), len(cells[key].runs))
    ok_jobs = [j for cell in cells.values() for j in cell.runs]
    rows = sorted(set(keys.values()), key=lambda r: (_method_rank(r.method), r.variant, _budget_rank(r.budget),
                                                   r.model))
    tasks = {str(j.field("task")) for j in list(ok_jobs) + failed_jobs}
    stored = {}
    for row in rows:
        runs = [j for j in ok_jobs if keys[id(j)] == row]
        adapter = [float((j.results.get("ledger") or {}).get("adapter_stored", float("nan"))) for j in runs]
        extra = [float((j.results.get("ledger") or {}).get("extra_stored", 0) or 0) for j in runs]
        adapter = [a for a in adapter if math.isfinite(a)]
        stored[row] = (statistics.fmean(adapter) if adapter else float("nan"), statistics.fmean(extra) if extra else 0.0,
                       len(set(adapter)) <= 1)
    return Table(rows=rows, tasks=task_order(tasks), cells=cells,
                 show_budget=len({r.budget for r in rows}) > 1, show_model=len({r.model for r in rows}) > 1,
                 stored=stored, shared_seeds=shared_seeds)


# --- formatting ---------------------------------------------------------------------------------------------

def fmt_params(n: float) -> str:
    if not math.isfinite(n):
        return "—"
    if n >= 1e5:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{n:.0f}"


def fmt_stat(mean: float, std: float | None, tex: bool = False) -> str:
    if tex:
        return f"${100 * mean:.2f}_{{\\pm {100 * std:.2f}}}$" if std is not None else f"${100 * mean:.2f}$"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def fmt_cell(stats: list[tuple[str, float, float | None, int]] | None, tex: bool = False) -> str:
    if not stats:
        return "—"
    body = " / ".join(fmt_stat(m, s, tex) for _, m, s, _ in stats)
    ns = {n for *_, n in stats}
    n = f"(n={ns.pop()})" if len(ns) == 1 else "(n=" + "/".join(str(n) for *_, n in stats) + ")"
    return f"{body} {n}" if not tex else f"{body}\\,{{\\scriptsize {n}}}"


def fmt_average(avg, n_tasks: int, tex: bool = False) -> str:
    if avg is None:
        return "—"
    mean, std, n, k = avg
    text = fmt_stat(mean, std, tex)
    if n is not None:
        text += f" (n={n})" if not tex else f"\\,{{\\scriptsize (n={n})}}"
    if k < n_tasks:
        text += f" [{k}/{n_tasks} tasks]" if not tex else f"\\,{{\\scriptsize [{k}/{n_tasks}]}}"
    return text


def _row_prefix(table: Table, row: RowKey, tex: bool = False) -> list[str]:
    label = table.row_label(row)
    cells = [_tex_escape(label) if tex else label]
    if table.show_budget:
        cells.append(_tex_escape(row.budget) if tex else row.budget)
    if table.show_model:
        cells.append(_tex_escape(row.model) if tex else row.model)
    adapter, extra, equal = table.stored[row]
    text = ("" if equal else "≈" if not tex else "$\\approx$") + fmt_params(adapter)
    if extra:
        text += f" (+{fmt_params(extra)})"
    cells.append(text)
    return cells


def _header_prefix(table: Table) -> list[str]:
    return ["method"] + (["budget"] if table.show_budget else []) + (["model"] if table.show_model else []) + \
        ["stored params"]


def markdown_table(table: Table, selection: str) -> str:
    head = _header_prefix(table) + [table.header(t) for t in table.tasks] + ["GLUE avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for row in table.rows:
        cells = _row_prefix(table, row) + [fmt_cell(table.stats(row, t, selection)) for t in table.tasks]
        cells.append(fmt_average(table.average(row, selection), len(table.tasks)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tex_escape(s: str) -> str:
    return re.sub(r"([_&%#$])", r"\\\1", s)


def tex_table(table: Table, selection: str, title: str) -> str:
    head = _header_prefix(table) + [table.header(t) for t in table.tasks] + ["Avg"]
    cols = "l" * (len(_header_prefix(table)) - 1) + "r" + "c" * (len(table.tasks) + 1)
    lines = ["\\begin{table}[t]", "\\centering", "\\small",
             f"\\caption{{{title}: mean $\\pm$ std over seeds (n = number of seeds), metrics $\\times 100$.}}",
             f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
             " & ".join(_tex_escape(h) for h in head) + " \\\\", "\\midrule"]
    for row in table.rows:
        cells = _row_prefix(table, row, tex=True) + [fmt_cell(table.stats(row, t, selection), tex=True)
                                                     for t in table.tasks]
        cells.append(fmt_average(table.average(row, selection), len(table.tasks), tex=True))
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines)


def csv_rows(table: Table) -> tuple[list[str], list[list[Any]]]:
    header = ["selection", "method", "variant", "budget", "model", "adapter_stored", "extra_stored"]
    for t in table.tasks:
        for m in table.metrics(t):
            header += [f"{t}/{m}/mean", f"{t}/{m}/std", f"{t}/{m}/n"]
    header += ["glue_avg/mean", "glue_avg/std", "glue_avg/n_seeds", "glue_avg/n_tasks"]
    rows = []
    for selection, _, _ in SELECTIONS:
        for row in table.rows:
            adapter, extra, _ = table.stored[row]
            line: list[Any] = [selection, row.method, row.variant, row.budget, row.model, adapter, extra]
            for t in table.tasks:
                stats = {m: (mean, std, n) for m, mean, std, n in (table.stats(row, t, selection) or [])}
                for m in table.metrics(t):
                    mean, std, n = stats.get(m, (None, None, 0))
                    line += [_num(mean), _num(std), n]
            avg = table.average(row, selection)
            line += [_num(avg[0]), _num(avg[1]), avg[2] or "", avg[3]] if avg else ["", "", "", 0]
            rows.append(line)
    return header, rows


def _num(v: float | None) -> Any:
    return "" if v is None else round(v, 6)


# --- plots --------------------------------------------------------------------------------------------------

def _new_figure(width: float, height: float):
    # The object-oriented API with the Agg canvas: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def split_module_name(name: str) -> tuple[int | None, str]:
    """'bert.encoder.layer.3.attention.self.query' → (3, 'query'); unknown layouts keep their suffix."""
    m = _LAYER_RE.search(name)
    if not m:
        return None, name
    return int(m.group(1)), MATRIX_TYPES.get(m.group(2), m.group(2))


def rank_matrix(patterns: Sequence[dict[str, float]]) -> tuple["Any", list[int | None], list[str]]:
    """Mean over `patterns` of the rank per (layer, matrix type); NaN where a layer lacks that matrix."""
    import numpy as np

    cells: dict[tuple[int | None, str], list[float]] = {}
    for pattern in patterns:
        for name, rank in pattern.items():
            cells.setdefault(split_module_name(name), []).append(float(rank))
    layers = sorted({layer for layer, _ in cells}, key=lambda x: (x is None, x if x is not None else 0))
    kinds = {kind for _, kind in cells}
    types = [t for t in MATRIX_ORDER if t in kinds] + sorted(kinds - set(MATRIX_ORDER))
    mat = np.full((len(layers), len(types)), np.nan)
    for (layer, kind), vals in cells.items():
        mat[layers.index(layer), types.index(kind)] = sum(vals) / len(vals)
    return mat, layers, types


def plot_rank_heatmap(patterns: Sequence[dict[str, float]], path: Path, title: str):
    """Heatmap of the final rank allocation; returns (matrix, layers, matrix types) exactly as plotted."""
    import numpy as np

    mat, layers, types = rank_matrix(patterns)
    fig = _new_figure(1.2 + 0.9 * len(types), 1.2 + 0.45 * len(layers))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(mat), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), ["?" if x is None else str(x) for x in layers])
    ax.set_xlabel("matrix")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    finite = mat[np.isfinite(mat)]
    mid = (finite.max() + finite.min()) / 2 if finite.size else 0
    for (i, k), v in np.ndenumerate(mat):
        if np.isfinite(v):
            ax.text(k, i, f"{v:g}" if float(v).is_integer() else f"{v:.1f}", ha="center", va="center",
                    fontsize=7, color="black" if v > mid else "white")
    fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return mat, layers, types


def plot_curves(series: dict[str, list[tuple[list[float], list[float]]]], path: Path, title: str, ylabel: str,
                scale: float = 1.0) -> None:
    """One colour per row label; one line per run."""
    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    for i, (label, runs) in enumerate(series.items()):
        color = f"C{i % 10}"  # matplotlib's default colour cycle
        for k, (xs, ys) in enumerate(runs):
            ax.plot(xs, [scale * y for y in ys], marker="o", markersize=3, color=color, alpha=0.8,
                    label=label if k == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def pareto_points(table: Table, selection: str = "best") -> list[tuple[str, float, float, float, float | None]]:
    """(row label, stored params, seconds per step, score ×100, 95% half-interval) per row with a score: the GLUE
    average over the tasks the row has (one task: its primary metric); the interval is the t interval of the
    per-seed averages (None with one seed or seeds that differ between tasks)."""
    points = []
    for row in table.rows:
        per_task = [d for t in table.tasks if (d := table.primary_by_seed(row, t, selection))]
        if not per_task:
            continue
        seeds = set.intersection(*(set(d) for d in per_task))
        per_seed = list(paired.average_by_seed(per_task, seeds).values()) if seeds else []
        score = 100 * statistics.fmean(statistics.fmean(d.values()) for d in per_task)
        half = None
        if len(per_seed) > 1:
            half = 100 * paired.t_quantile(0.975, len(per_seed) - 1) * statistics.stdev(per_seed) / math.sqrt(
                len(per_seed))
        runs = [j for t in table.tasks for j in (table.cells.get((row, t)) or Cell([])).runs]
        sps = [float(j.results.get("timings", {}).get("seconds_per_step", float("nan"))) for j in runs]
        sps = [v for v in sps if math.isfinite(v)]
        points.append((table.full_label(row), table.stored[row][0], statistics.fmean(sps) if sps else float("nan"),
                       score, half))
    return points


def size_axis(ax, sizes: Sequence[float]) -> None:
    """A log axis when the stored sizes span budgets (r2 ... r32 differ by multiples); a linear one when they are
    equal-budget rows a few per cent apart, where log ticks would print as a pile of overlapping 3.31e5 labels.
    Tick labels in K / M either way."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    sizes = [s for s in sizes if math.isfinite(s) and s > 0]
    if sizes and max(sizes) >= 4 * min(sizes):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    elif sizes:
        pad = max(0.005 * max(sizes), (max(sizes) - min(sizes)) * 0.15)
        ax.set_xlim(min(sizes) - pad, max(sizes) + pad)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _size_tick(v)))


def _size_tick(n: float) -> str:
    # finer than fmt_params: on an equal-budget axis the ticks are 0.5K apart and must read apart
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    if n >= 1e3:
        return f"{n / 1e3:.4g}K"
    return f"{n:.0f}"


def plot_pareto(points: list[tuple[str, float, float, float, float | None]], path: Path, ylabel: str) -> None:
    """Score against stored size (left) and against s/step (right), one point per row with its interval."""
    fig = _new_figure(10.0, 4.2)
    axes = fig.subplots(1, 2)
    for ax, index, xlabel in ((axes[0], 1, "stored adapter params"), (axes[1], 2, "training s/step (mean of runs)")):
        for i, point in enumerate(points):
            x, y, half = point[index], point[3], point[4]
            if not math.isfinite(x):
                continue
            ax.errorbar([x], [y], yerr=None if half is None else [[half], [half]], fmt="o", color=f"C{i % 10}",
                        capsize=3, label=point[0])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    size_axis(axes[0], [p[1] for p in points])
    for ax in axes:  # the legend on whichever panel has points (s/step can be missing in old results)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
            break
    fig.suptitle(f"{ylabel} vs cost (error bars: 95% t interval over seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def is_rank_adaptive(runs: Sequence[Job]) -> bool:
    """Ranks that differ between matrices or change during training, or a logged budget schedule."""
    for j in runs:
        pattern = j.results.get("rank_pattern") or {}
        if len(set(pattern.values())) > 1:
            return True
        start = {r.get("name"): r.get("rank") for r in (j.results.get("ledger_start") or {}).get("rows", [])}
        if start and any(start.get(k, v) != v for k, v in pattern.items()):
            return True
        if any("train/budget" in e for e in j.evals):
            return True
    return False


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_")


def make_plots(table: Table, out_dir: Path) -> list[Path]:
    plots_dir = out_dir / "plots"
    written: list[Path] = []
    points = pareto_points(table)
    if points:
        ylabel = ("GLUE average ×100" if len(table.tasks) > 1
                  else f"{table.title(table.tasks[0])} ×100")
        plot_pareto(points, plots_dir / "pareto.png", ylabel)
        written.append(plots_dir / "pareto.png")
    for row in table.rows:
        row_runs = [j for t in table.tasks for j in (table.cells.get((row, t)) or Cell([])).runs]
        if not is_rank_adaptive(row_runs):
            continue
        for task in table.tasks:
            runs = [j for j in (table.cells.get((row, task)) or Cell([])).runs if j.results.get("rank_pattern")]
            if not runs:
                continue
            label = table.row_label(row) + (f" {row.budget}" if table.show_budget else "")
            path = plots_dir / f"ranks_{_slug(label)}_{task}.png"
            seeds = "seed " + str(runs[0].field("seed")) if len(runs) == 1 else f"mean of {len(runs)} runs"
            plot_rank_heatmap([j.results["rank_pattern"] for j in runs], path,
                              f"final ranks: {label}, {table.title(task)} ({seeds})")
            written.append(path)
    for task in table.tasks:
        metric = table.metrics(task)[0]
        evals: dict[str, list] = {}
        budgets: dict[str, list] = {}
        for row in table.rows:
            label = table.full_label(row)
            for j in (table.cells.get((row, task)) or Cell([])).runs:
                lines = j.evals or [h for h in (j.results.get("history") or []) if isinstance(h, dict)]
                pts = [(e["step"], e[f"eval/{metric}"]) for e in lines
                       if isinstance(e.get(f"eval/{metric}"), (int, float)) and "step" in e]
                if pts:
                    evals.setdefault(label, []).append(([p[0] for p in pts], [p[1] for p in pts]))
                key = "train/budget" if any("train/budget" in e for e in j.evals) else "ranks/total"
                pts = [(e["step"], e[key]) for e in j.evals if isinstance(e.get(key), (int, float)) and "step" in e]
                if pts:
                    budgets.setdefault(label, []).append(([p[0] for p in pts], [p[1] for p in pts]))
        title = table.title(task)
        if evals:
            path = plots_dir / f"eval_{task}.png"
            plot_curves(evals, path, f"{title}: eval {METRIC_TITLES.get(metric, metric)} vs step",
                        f"{METRIC_TITLES.get(metric, metric)} ×100", scale=100.0)
            written.append(path)
        if budgets:
            path = plots_dir / f"budget_{task}.png"
            plot_curves(budgets, path, f"{title}: rank budget vs step",
                        "total rank (train/budget, else Σ effective ranks)")
            written.append(path)
    return written


# --- the report ---------------------------------------------------------------------------------------------

@dataclass
class Report:
    root: Path
    out_dir: Path
    jobs: list[Job]
    ok: list[Job]
    failed: list[Job]  # failed while training (or at an unknown stage): their configurations stay in the tables
    broken: list[Job]  # no results.json, or one that cannot be read
    not_found: list[str]
    table: Table | None
    paths: list[Path]
    failed_setup: list[Job] = field(default_factory=list)  # failed before training: listed, not tabulated
    interrupted: list[Job] = field(default_factory=list)  # stopped by Ctrl-C / SIGTERM: listed, not tabulated
    reference: str = "lora"  # the method every row is compared with (paired differences)

    @property
    def not_ok(self) -> list[Job]:
        """Every job that did not finish ok."""
        return self.failed + self.failed_setup + self.interrupted + self.broken

    @property
    def clean(self) -> bool:
        return not self.not_ok and not self.not_found

    def counts(self) -> str:
        """Like "3 ok, 2 failed (1 before training), 0 without readable results.json, 1 interrupted"."""
        n_failed = len(self.failed) + len(self.failed_setup)
        text = f"{len(self.ok)} ok, {n_failed} failed"
        if self.failed_setup:
            text += f" ({len(self.failed_setup)} before training)"
        text += f", {len(self.broken)} without readable results.json"
        if self.interrupted:
            text += f", {len(self.interrupted)} interrupted"
        return text


def grid_gaps(jobs: list[Job]) -> list[str]:
    """Combinations of (method, budget, task, seed) seen separately but never together in one job directory."""
    seen = {(j.field("method"), j.field("budget"), j.field("task"), j.field("seed")) for j in jobs}
    seen = {k for k in seen if None not in k}
    if not seen:
        return []
    axes = [sorted({k[i] for k in seen}, key=str) for i in range(4)]
    return [f"{m}, {b}, {t}, seed {s}" for m, b, t, s in itertools.product(*axes) if (m, b, t, s) not in seen]


def build_report(root: str | Path, out_dir: str | Path | None = None, plots: bool = True,
                 reference: str = "lora") -> Report:
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root
    jobs = [read_job(d, root) for d in find_job_dirs(root)]
    ok = [j for j in jobs if j.results is not None and j.status == "ok"]
    interrupted = [j for j in jobs if j.results is not None and j.status == "interrupted"]
    failed_setup = [j for j in jobs if j.failed_before_training]
    failed = [j for j in jobs if j.results is not None and j.status not in ("ok", "interrupted")
              and not j.failed_before_training]
    broken = [j for j in jobs if j.results is None]
    # A sweep (Hydra writes multirun.yaml at its root) is a grid: list the combinations that left no trace.
    not_found = grid_gaps(jobs) if (root / "multirun.yaml").exists() else []
    table = build_table(ok, failed) if ok else None
    out.mkdir(parents=True, exist_ok=True)
    report = Report(root, out, jobs, ok, failed, broken, not_found, table, [], failed_setup, interrupted, reference)
    report.paths += [out / "report.md", out / "report.csv", out / "report.tex", out / "paired.csv"]
    plot_paths = make_plots(table, out) if (plots and table is not None) else []
    (out / "report.md").write_text(render_markdown(report, plot_paths))
    _write_csv(out / "report.csv", table)
    _write_paired_csv(out / "paired.csv", table, reference)
    (out / "report.tex").write_text(render_tex(report))
    report.paths += plot_paths
    return report


def select_learning_rates(root: str | Path, out_dir: str | Path | None = None, by: str = "task",
                          for_tasks: Sequence[str] | None = None) -> list[Path]:
    """Read the tuning sweep under `root` and write its learning-rate selection (default `<root>/selected`; `by`
    "task" or "method", `for_tasks` only with "method"; the rules and the files: lorabench/tuning.py). Returns the
    files written."""
    if by not in ("task", "method"):
        raise ConfigError(f"unknown selection {by!r}: choose task (one lr per method × task) or method (one lr per "
                          f"method over the tuned tasks)")
    if for_tasks and by != "method":
        raise ConfigError("--select-for applies to --select-lr-by method (a per-task choice is for its own task)")
    known = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
    unknown = [t for t in for_tasks or [] if t not in known]
    if unknown:
        raise ConfigError(f"--select-for names unknown task(s) {', '.join(unknown)}; tasks: {', '.join(known)}")
    root = Path(root)
    jobs = [read_job(d, root) for d in find_job_dirs(root)]
    choices = tuning.collect(jobs, method_options=_method_options)  # the rows' notion of "the same options"
    if by == "method":
        choices = tuning.pool_by_method(choices, list(for_tasks) if for_tasks else None)
    return tuning.write_selection(choices, Path(out_dir) if out_dir is not None else root / "selected", str(root))


def _first_error_line(j: Job) -> str:
    err = str(j.results.get("error") or j.results.get("status")).strip().splitlines()
    return err[0] if err else "failed"


def _interrupted_line(j: Job) -> str:
    step = j.results.get("step")
    return "interrupted" + (f" at step {step}" if step is not None else "")


def _problem_lines(report: Report) -> list[str]:
    """The sections of report.md (and of the command's stderr) for jobs not in the tables."""
    sections = [  # (title, intro, jobs, what to say of each)
        ("Failed jobs", None, report.failed, _first_error_line),
        ("Failed before training", "Jobs that stopped before their first training step (an option, the data or "
         "the model); they are not in the tables:", report.failed_setup, _first_error_line),
        ("Interrupted jobs", "Jobs stopped by Ctrl-C or a signal; they are not in the tables:", report.interrupted,
         _interrupted_line),
        ("Missing or unreadable results", None, report.broken, lambda j: j.problem),
    ]
    lines = []
    for title, intro, jobs, detail in sections:
        if jobs:
            lines += ["", f"## {title} ({len(jobs)})", ""] + ([intro, ""] if intro else [])
            lines += [f"- `{j.rel}` ({j.describe()}): {detail(j)}" for j in jobs]
    if report.not_found:
        lines += ["", f"## Not found ({len(report.not_found)})", "",
                  "Combinations of the sweep's methods, budgets, tasks and seeds with no job directory:", ""]
        lines += [f"- {g}" for g in report.not_found[:50]]
        if len(report.not_found) > 50:
            lines.append(f"- ... and {len(report.not_found) - 50} more")
    return lines


def render_markdown(report: Report, plot_paths: list[Path]) -> str:
    n = len(report.jobs)
    lines = [f"# lorabench report: `{report.root}`", "",
             f"{n} job(s): {report.counts()}.", ""]
    if report.table is None:
        lines.append("No finished job to tabulate.")
    else:
        lines += ["Cells: mean ± sample std over seeds (n = number of seeds; of runs sharing a seed the newest is "
                  "used), metrics ×100. MRPC/QQP acc/F1, STS-B "
                  "Pearson/Spearman, MNLI matched/mismatched accuracy; the GLUE average takes the first number of "
                  "each task (CoLA MCC, MRPC/QQP accuracy, STS-B Pearson, MNLI matched) and its std is that of the "
                  "per-seed averages; [k/N tasks] marks a row that lacks some tasks. Stored params: the "
                  "adapter's stored size at the end (`ledger.adapter_stored`, ≈ when it differs between runs; "
                  "+extra such as DoRA magnitudes in parentheses), task heads excluded."]
        for selection, title, what in SELECTIONS:
            lines += ["", f"## {title}", "", f"Per run: {what}.", "", markdown_table(report.table, selection)]
            for note in report.table.seed_notes():
                lines += ["", note]
        lines += lr_section(report.table)
        lines += paired_section(report.table, report.reference)
    lines += _problem_lines(report)
    if plot_paths:
        lines += ["", "## Plots", ""]
        for p in plot_paths:
            rel = p.relative_to(report.out_dir) if p.is_relative_to(report.out_dir) else p
            lines.append(f"![{p.stem}]({rel})")
    return "\n".join(lines) + "\n"


def lr_section(table: Table) -> list[str]:
    """Which learning rate each row trained with: one line when every run shares one, else a row × task table."""
    lrs = {(row, task): sorted({job_lr(j) for j in cell.runs}, key=lambda v: (v is None, v or 0))
           for (row, task), cell in table.cells.items()}
    distinct = {v for vs in lrs.values() for v in vs}
    if len(distinct) <= 1:
        return ["", f"Learning rate: every run trained with trainer.lr = {fmt_lr(next(iter(distinct), None))}."]
    head = ["row", *(table.title(t) for t in table.tasks)]
    lines = ["", "## Learning rates", "", "trainer.lr of each cell's runs (per-task values come from a learning-rate "
             "selection: README, \"Tuned learning rates\").", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        cells = [", ".join(fmt_lr(v) for v in lrs.get((row, t), [])) or "—" for t in table.tasks]
        lines.append("| " + " | ".join([table.full_label(row), *cells]) + " |")
    return lines


def paired_section(table: Table, reference: str) -> list[str]:
    """The paired-differences section of report.md (empty when no row has a `reference` row to pair with)."""
    lines = []
    headers = [table.title(t) for t in table.tasks]
    for selection, title, _ in SELECTIONS:
        rows = table.paired(selection, reference)
        if not rows:
            continue
        if not lines:
            lines += ["", f"## Paired differences vs {reference}", "",
                      f"Δ = row − {reference} (same budget and model) on each task's first metric ×100, paired by "
                      "seed; [95% t interval over the paired seeds] (none for one pair); ▲ / ▼: the interval "
                      "excludes 0 (the seeds support a difference), else a tie; n = paired seeds, \"unpaired\" = "
                      "seeds only one side has (left out). GLUE avg: the same on per-seed averages over the tasks "
                      "both rows have, seeds present in all of them. W/T/L: tasks won / tied / lost."]
        lines += ["", f"### {title}", "", paired.markdown_paired(rows, headers)]
    return lines


def _write_paired_csv(path: Path, table: Table | None, reference: str) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(paired.CSV_HEADER)
        if table is not None:
            for selection, _, _ in SELECTIONS:
                writer.writerows(paired.csv_paired(table.paired(selection, reference), table.tasks, selection))


def render_tex(report: Report) -> str:
    head = ["% generated by `python -m report`; needs \\usepackage{booktabs}",
            f"% source: {_tex_escape(str(report.root))}"]
    if report.table is None:
        return "\n".join(head + ["% no finished job to tabulate"]) + "\n"
    body = [tex_table(report.table, sel, title) for sel, title, _ in SELECTIONS]
    return "\n".join(head) + "\n" + "\n\n".join(body) + "\n"


def _write_csv(path: Path, table: Table | None) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        if table is None:
            writer.writerow(["selection", "method", "variant", "budget", "model"])
            return
        header, rows = csv_rows(table)
        writer.writerow(header)
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m report", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a sweep directory (runs/multirun/<time>) or any directory of runs")
    parser.add_argument("--out", default=None, help="where to write report.md/.csv/.tex and plots/ "
                                                    "(default: the directory given)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--select-lr", nargs="?", const="", default=None, metavar="DIR",
                        help="a tuning sweep: write the selected learning rate per method × task as configs for "
                             "the final sweep (default DIR: <root>/selected)")
    parser.add_argument("--select-lr-by", choices=["task", "method"], default="task",
                        help="with --select-lr: one lr per method × task (default), or one per method over the "
                             "tuned tasks (lorabench/tuning.py says when each fits)")
    parser.add_argument("--select-for", default=None, metavar="TASKS",
                        help="with --select-lr-by method: the comma-separated tasks to write the method's lr for "
                             "(default: the tuned tasks)")
    parser.add_argument("--reference", default="lora",
                        help="the method every row is compared with, paired by seed (default: lora)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        return 2
    if not find_job_dirs(root):
        print(f"error: no job directory (results.json, metrics.jsonl or .hydra/) under {root}", file=sys.stderr)
        return 2
    report = build_report(root, args.out, plots=not args.no_plots, reference=args.reference)
    if report.table is not None:
        print(markdown_table(report.table, "best"))
        for note in report.table.seed_notes():
            print(note)
    for line in _problem_lines(report):
        print(line, file=sys.stderr)
    print(f"report: {report.out_dir / 'report.md'} ({report.counts()})")
    if args.select_lr is not None:
        try:
            paths = select_learning_rates(root, Path(args.select_lr) if args.select_lr else None, args.select_lr_by,
                                          args.select_for.split(",") if args.select_for else None)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(paths[-2].read_text())
    return 0 if report.clean else 1
