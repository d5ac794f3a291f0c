"""Trackers: the JSONL log (always written) plus an optional dashboard (W&B or TensorBoard).

Dashboard back-ends are imported lazily, and `finish()` must run in a `finally` (run.py does): a second
`wandb.init` in the same process otherwise returns the previous run, so a sweep's jobs would log into one run.
W&B runs offline unless an API key is configured, so a run never blocks on the network;
`wandb sync <run dir>/wandb/offline-run-*` uploads later.

What each back-end gets (the reporter reads only the JSONL files and results.json):
  metrics.jsonl    one line per evaluation: step, epoch, eval/<metric>, train/<hook progress>, and the rank
                   totals at that evaluation (ranks/total = Σ effective ranks, ranks/mean, ranks/n_matrices)
  train_log.jsonl  train/loss, train/lr, train/epoch, train/<hook progress> every trainer.log_every steps
  W&B              the same scalars (train/…, eval/…) at their optimizer step; eval/* summaries hold both
                   the max and the last value ({"max": …, "last": …}); the rank pattern as a table
                   (ranks/table) and a histogram (ranks/hist) at every evaluation; best/<metric> at the end
  TensorBoard      the same scalars, a rank histogram and a markdown rank table per evaluation, and the
                   flattened resolved config as hparams with the best and last eval metrics
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .rundir import METRICS_FILE, TRAIN_LOG_FILE, flatten


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def rank_totals(pattern: dict[str, int]) -> dict[str, float]:
    """The rank pattern reduced to what a budget-vs-step curve needs."""
    ranks = [int(r) for r in pattern.values()]
    return {"ranks/total": sum(ranks), "ranks/mean": sum(ranks) / len(ranks) if ranks else 0.0,
            "ranks/n_matrices": len(ranks)}


class Tracker:
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_eval(self, record: dict[str, Any]) -> None:
        pass

    def log_rank_pattern(self, pattern: dict[str, int], step: int) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self, status: str = "ok") -> None:
        pass


class JsonlTracker(Tracker):
    """metrics.jsonl: one line per evaluation; train_log.jsonl: the periodic training scalars.

    run.py calls `log_eval(record)` and then `log_rank_pattern(pattern, step)` for the same evaluation; the eval
    line is held back until the rank pattern of its step arrives (or the next call / finish) so that the one
    line per evaluation also carries the rank totals.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.metrics_path = self.out_dir / METRICS_FILE
        self.train_path = self.out_dir / TRAIN_LOG_FILE
        self._pending_eval: dict[str, Any] | None = None

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        with path.open("a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

    def _flush_eval(self) -> None:
        if self._pending_eval is not None:
            record, self._pending_eval = self._pending_eval, None
            self._append(self.metrics_path, record)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self._flush_eval()
        self._append(self.train_path, {"step": step, **metrics})

    def log_eval(self, record: dict[str, Any]) -> None:
        self._flush_eval()
        self._pending_eval = dict(record)

    def log_rank_pattern(self, pattern: dict[str, int], step: int) -> None:
        if self._pending_eval is not None and self._pending_eval.get("step") == step:
            self._pending_eval.update(rank_totals(pattern))
        self._flush_eval()

    def finish(self, status: str = "ok") -> None:
        self._flush_eval()


def resolve_wandb_mode(mode: str | None) -> str:
    """Explicit mode > WANDB_MODE > online with an API key (env or ~/.netrc) > offline."""
    if mode:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    return "online" if has_key else "offline"


class WandbTracker(Tracker):
    def __init__(self, out_dir: Path, project: str, config: dict[str, Any], group: str | None, job_type: str,
                 name: str, tags: list[str], mode: str | None = None, entity: str | None = None) -> None:
        import wandb

        self._wandb = wandb
        # finish_previous: a sweep runs its jobs in one process; a run left open by a crashed job must not
        # swallow the next job's data (the default, return_previous, would hand back that old run).
        self.run = wandb.init(project=project, entity=entity, config=config, group=group, job_type=job_type,
                              name=name, tags=tags, dir=str(out_dir), mode=resolve_wandb_mode(mode),
                              reinit="finish_previous")
        # One define_metric with both ops: the summary of eval/x becomes {"max": …, "last": …}, so the run
        # table can sort by the best or the final value (verified on the offline .wandb records, wandb 0.31).
        self.run.define_metric("eval/*", summary="max,last")
        self.run.define_metric("train/*", summary="last")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: _jsonable(v) for k, v in metrics.items()}, step=step)

    def log_eval(self, record: dict[str, Any]) -> None:
        self.run.log({k: _jsonable(v) for k, v in record.items() if k != "step"}, step=record["step"])

    def log_rank_pattern(self, pattern: dict[str, int], step: int) -> None:
        table = self._wandb.Table(columns=["module", "rank"], data=[[k, int(v)] for k, v in pattern.items()])
        self.run.log({"ranks/table": table, "ranks/hist": self._wandb.Histogram([int(v) for v in pattern.values()]),
                      **rank_totals(pattern)}, step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            self.run.summary[k] = _jsonable(v)

    def finish(self, status: str = "ok") -> None:
        if getattr(self.run, "_is_finished", False):  # already finished by a later wandb.init (finish_previous)
            return
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "ok" else 1)


class TensorBoardTracker(Tracker):
    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        # hparams accept scalars and strings only: lists (target modules) become their string form
        self.hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                        for k, v in flatten(config).items() if v is not None}
        self.best: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)

    def log_eval(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
        self.last_eval = {k: float(v) for k, v in record.items() if k.startswith("eval/")}

    def log_rank_pattern(self, pattern: dict[str, int], step: int) -> None:
        import numpy as np

        self.writer.add_histogram("ranks/hist", np.asarray(list(pattern.values()), dtype=float), step)
        for k, v in rank_totals(pattern).items():
            self.writer.add_scalar(k, v, step)
        rows = "\n".join(f"| {name} | {int(r)} |" for name, r in pattern.items())
        self.writer.add_text("ranks/table", "| module | rank |\n|---|---|\n" + rows, step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.best.update({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})

    def finish(self, status: str = "ok") -> None:
        metrics = {f"hparam/last/{k.split('/', 1)[1]}": v for k, v in self.last_eval.items()}
        metrics.update({f"hparam/{k}": v for k, v in self.best.items()})
        if metrics:  # a run that failed before its first evaluation has nothing to compare
            self.writer.add_hparams(self.hparams, metrics, run_name=".")
        self.writer.close()


class MultiTracker(Tracker):
    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_metrics(self, metrics, step):
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_eval(self, record):
        for t in self.trackers:
            t.log_eval(record)

    def log_rank_pattern(self, pattern, step):
        for t in self.trackers:
            t.log_rank_pattern(pattern, step)

    def log_summary(self, summary):
        for t in self.trackers:
            t.log_summary(summary)

    def finish(self, status: str = "ok") -> None:
        errors = []
        for t in self.trackers:
            try:
                t.finish(status)
            except Exception as e:  # one broken dashboard must not hide the others' data
                errors.append(e)
        if errors:
            raise errors[0]


def _netrc_has_wandb() -> bool:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in path.read_text()
    except OSError:
        return False


def build_tracker(logger_cfg: dict[str, Any], out_dir: Path, config: dict[str, Any], meta: dict[str, Any]) -> Tracker:
    """`logger_cfg['backend']` is wandb | tensorboard | none; the JSONL tracker is always included.

    `meta`: task (W&B job_type), name (display name), group (sweep id) and tags.
    """
    trackers: list[Tracker] = [JsonlTracker(out_dir)]
    backend = logger_cfg.get("backend", "none")
    if backend == "wandb":
        trackers.append(WandbTracker(out_dir, project=logger_cfg.get("project", "lorabench"), config=config,
                                     group=meta.get("group"), job_type=meta["task"], name=meta["name"],
                                     tags=meta["tags"], mode=logger_cfg.get("mode"),
                                     entity=logger_cfg.get("entity")))
    elif backend == "tensorboard":
        trackers.append(TensorBoardTracker(out_dir, config))
    elif backend != "none":
        from .errors import ConfigError

        raise ConfigError(f"logger.backend must be wandb, tensorboard or none; got {backend!r}")
    return MultiTracker(trackers)
