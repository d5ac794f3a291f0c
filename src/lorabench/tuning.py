"""Learning-rate selection from a tuning sweep, written as configs that a final sweep composes.

The protocol (README "Tuned learning rates"): a sweep over `trainer.lr` on tuning seeds (conf/experiment/tune_lr.yaml
uses seeds 101, 102, never the final seeds), then one selected lr per method × task, then the final sweep on
other seeds with the selection composed in, so the final scores never took part in choosing.

Selection rule (the default, `--select-lr-by task`): for each method × task, the lr with the highest mean over
tuning seeds of the best-epoch primary dev metric (ties: the smaller lr). Per task rather than one lr per method
over all tasks, because that is what the papers do (LoRA Table 9, AdaLoRA's scripts and DoRA-dynamic's Table 8 give
per-task learning rates) and because the best lr moves with the data set size (small RTE vs large SST-2) more than
between methods.

`--select-lr-by method`: one lr per method, the one with the highest unweighted mean over the tuned tasks of the
per-task means above (the GLUE-average way of pooling tasks), written for every task of `--select-for` (default:
the tuned tasks). For a protocol whose tasks train on equal-size subsets, where the data-size reason for a per-task
lr is gone and one tuning seed per task would make a per-task choice noisy (bench/glue_minilm.py's cpu protocol).

Output, under the selection directory:
  task_method/<task>_<method>.yaml   `trainer.lr: <selected>` (package _global_); conf/config.yaml's defaults
                                     list composes `task_method: ${task}_${method}` when such a file exists, and
                                     `hydra.searchpath=[file://<selection dir>]` makes Hydra look there
  selected_lr.md / selected_lr.json  the grid, the mean score of every lr, and the choice
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError


@dataclass
class LrChoice:
    method: str
    task: str
    metric: str
    scores: dict[float, list[float]] = field(default_factory=dict)  # lr → best primary metric per seed
    # pooled choices (select by method): the tasks whose per-task means `scores` holds, and the tasks it is for
    pooled_tasks: list[str] = field(default_factory=list)
    applies_to: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return self.applies_to or [self.task]

    @property
    def means(self) -> dict[float, float]:
        return {lr: statistics.fmean(v) for lr, v in sorted(self.scores.items())}

    @property
    def selected(self) -> float:
        means = self.means
        top = max(means.values())  # a tie within rounding (a mean of the same numbers in another order) is a tie
        return min(lr for lr, m in means.items() if math.isclose(m, top, rel_tol=1e-9, abs_tol=1e-12))


def collect(jobs: list[Any], method_options: Callable[[Any], dict[str, Any]] | None = None) -> list[LrChoice]:
    """Group ok jobs (report.Job) by method × task and lr. Refuses a sweep whose rows another option splits (two
    budgets, models or method variants), since one selection file per method × task could not hold both.
    `method_options(job)`: the job's method options as compared (the report fills in documented defaults);
    default: its config's method group."""
    choices: dict[tuple[str, str], LrChoice] = {}
    split: dict[tuple[str, str], set] = {}
    for j in jobs:
        if j.results is None or j.status != "ok":
            continue
        cfg = j.results.get("config") or {}
        lr = (cfg.get("trainer") or {}).get("lr")
        metric = j.results.get("primary_metric")
        value = (j.results.get("best") or {}).get(metric)
        metric = str(metric).removeprefix("eval/")
        if not isinstance(lr, (int, float)) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        key = (str(j.field("method")), str(j.field("task")))
        options = method_options(j) if method_options is not None else cfg.get("method") or {}
        method_cfg = {k: v for k, v in options.items() if k != "name"}
        split.setdefault(key, set()).add(json.dumps([j.field("budget"), j.field("model"), method_cfg],
                                                    sort_keys=True))
        choice = choices.setdefault(key, LrChoice(key[0], key[1], metric))
        choice.scores.setdefault(float(lr), []).append(float(value))
    mixed = sorted(f"{m}/{t}" for (m, t), kinds in split.items() if len(kinds) > 1)
    if mixed:
        raise ConfigError(f"the tuning sweep mixes budgets, models or method options within {', '.join(mixed)}; "
                          f"select learning rates from a sweep that varies only trainer.lr and seed per "
                          f"method × task")
    return sorted(choices.values(), key=lambda c: (c.method, c.task))


def pool_by_method(choices: list[LrChoice], for_tasks: list[str] | None = None) -> list[LrChoice]:
    """One choice per method from its per-task choices: each lr scored by the unweighted mean over the tasks of
    the task's mean over seeds. Every task of a method must have been tuned on the same grid."""
    by_method: dict[str, list[LrChoice]] = {}
    for c in choices:
        by_method.setdefault(c.method, []).append(c)
    pooled = []
    for method, parts in sorted(by_method.items()):
        grids = {tuple(sorted(c.scores)) for c in parts}
        if len(grids) > 1:
            detail = "; ".join(f"{c.task}: {', '.join(f'{lr:g}' for lr in sorted(c.scores))}" for c in parts)
            raise ConfigError(f"{method}'s tasks were tuned on different lr grids ({detail}); one lr per method "
                              f"needs the same grid on every task (or select per task)")
        tasks = [c.task for c in parts]
        pooled.append(LrChoice(method, "+".join(tasks), "mean over tasks of " + "/".join(c.metric for c in parts),
                               {lr: [c.means[lr] for c in parts] for lr in sorted(parts[0].scores)},
                               pooled_tasks=tasks, applies_to=list(for_tasks) if for_tasks else tasks))
    return pooled


def _rule(pooled: bool) -> str:
    if pooled:
        return ("per method, the lr with the highest unweighted mean over the tuned tasks of each task's mean "
                "best-epoch primary dev metric over the tuning seeds (ties: the smaller lr)")
    return ("per method × task, the lr with the highest mean best-epoch primary dev metric over the tuning seeds "
            "(ties: the smaller lr)")


def write_selection(choices: list[LrChoice], out_dir: Path, source: str) -> list[Path]:
    """The task_method/ configs and the summary; returns the files written."""
    if not choices:
        raise ConfigError("no finished tuning job with a trainer.lr and a primary metric: nothing to select")
    group = out_dir / "task_method"
    group.mkdir(parents=True, exist_ok=True)
    pooled = any(c.pooled_tasks for c in choices)
    written = []
    for c in choices:
        grid = ", ".join(f"{lr:g}: {100 * m:.2f}" for lr, m in c.means.items())
        for task in c.targets:
            path = group / f"{task}_{c.method}.yaml"
            path.write_text("# @package _global_\n"
                            f"# selected by `python -m report {source} --select-lr`: {_rule(pooled)}\n"
                            f"# tuned on: {c.task}; grid (lr: mean ×100): {grid}\n"
                            f"trainer:\n  lr: {c.selected!r}\n")
            written.append(path)
    count = "tasks" if pooled else "seeds"
    rows = [f"| method | tuned on | metric | lr: mean ×100 ({count}) | selected | used for |", "|---|---|---|---|---|---|"]
    for c in choices:
        grid = "; ".join(f"{lr:g}: {100 * m:.2f} ({len(c.scores[lr])})" for lr, m in c.means.items())
        rows.append(f"| {c.method} | {c.task} | {c.metric} | {grid} | **{c.selected:g}** | {', '.join(c.targets)} |")
    if pooled:
        rows += ["", "Per task (mean ×100 over the tuning seeds):", ""]
        rows += [f"- {c.method}: " + "; ".join(
            f"{t} " + ", ".join(f"{lr:g}: {100 * c.scores[lr][i]:.2f}" for lr in sorted(c.scores))
            for i, t in enumerate(c.pooled_tasks)) for c in choices]
    md = (f"# Selected learning rates\n\nFrom `{source}`: {_rule(pooled)}.\n\n" + "\n".join(rows) +
          f"\n\nUse: `python -m train -m ... hydra.searchpath=[file://{out_dir.resolve()}]`\n")
    (out_dir / "selected_lr.md").write_text(md)
    (out_dir / "selected_lr.json").write_text(json.dumps(
        [{"method": c.method, "task": c.task, "metric": c.metric, "selected": c.selected, "used_for": c.targets,
          "means": {f"{lr:g}": m for lr, m in c.means.items()},
          f"n_{count}": {f"{lr:g}": len(v) for lr, v in sorted(c.scores.items())},
          **({"per_task": {t: {f"{lr:g}": c.scores[lr][i] for lr in sorted(c.scores)}
                           for i, t in enumerate(c.pooled_tasks)}} if c.pooled_tasks else {})}
         for c in choices], indent=2))
    return written + [out_dir / "selected_lr.md", out_dir / "selected_lr.json"]


def objective_value(results: dict[str, Any] | None) -> float:
    """A job's primary dev metric at its best evaluation, NaN when it did not finish ok (Optuna then records a
    failed trial). Every GLUE metric is higher-is-better, so an optimizing sweeper maximizes it."""
    if not results or results.get("status") != "ok":
        return float("nan")
    value = (results.get("best") or {}).get(results.get("primary_metric"))
    return float(value) if isinstance(value, (int, float)) else float("nan")
