"""Trackers: the JSONL log (always written) plus an optional dashboard (W&B or TensorBoard).

Dashboard back-ends are imported lazily, and `finish()` must run in a `finally`: a second `wandb.init` in the
same process otherwise returns the previous run. W&B runs offline unless an API key is configured, so a
run never blocks on the network; `wandb sync <run dir>/wandb/offline-run-*` uploads later.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):
        return v.item()
    return v


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
    """metrics.jsonl: one line per evaluation; train_log.jsonl: the periodic training scalars."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.train_path = self.out_dir / "train_log.jsonl"

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        with path.open("a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self._append(self.train_path, {"step": step, **metrics})

    def log_eval(self, record: dict[str, Any]) -> None:
        self._append(self.metrics_path, record)


class WandbTracker(Tracker):
    def __init__(self, out_dir: Path, project: str, config: dict[str, Any], group: str | None, job_type: str,
                 name: str, tags: list[str], mode: str | None = None, entity: str | None = None) -> None:
        import wandb

        if mode is None:
            has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
            mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
        self._wandb = wandb
        self.run = wandb.init(project=project, entity=entity, config=config, group=group, job_type=job_type,
                              name=name, tags=tags, dir=str(out_dir), mode=mode, reinit="finish_previous")
        # max and last summaries for every eval metric, so the run table can sort by either.
        self.run.define_metric("eval/*", summary="max")
        self.run.define_metric("eval/*", summary="last")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: _jsonable(v) for k, v in metrics.items()}, step=step)

    def log_eval(self, record: dict[str, Any]) -> None:
        self.run.log({k: _jsonable(v) for k, v in record.items() if k != "step"}, step=record["step"])

    def log_rank_pattern(self, pattern: dict[str, int], step: int) -> None:
        table = self._wandb.Table(columns=["module", "rank"], data=[[k, v] for k, v in pattern.items()])
        self.run.log({"ranks/table": table, "ranks/hist": self._wandb.Histogram(list(pattern.values()))},
                     step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            self.run.summary[k] = _jsonable(v)

    def finish(self, status: str = "ok") -> None:
        self.run.finish(exit_code=0 if status == "ok" else 1)


class TensorBoardTracker(Tracker):
    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        self.hparams = {k: v for k, v in _flatten(config).items() if isinstance(v, (int, float, str, bool))}
        self.last_eval: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def log_eval(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.last_eval = {k: float(v) for k, v in record.items() if k.startswith("eval/")}

    def log_rank_pattern(self, pattern: dict[str, int], step: int) -> None:
        import numpy as np

        self.writer.add_histogram("ranks", np.asarray(list(pattern.values()), dtype=float), step)

    def finish(self, status: str = "ok") -> None:
        self.writer.add_hparams(self.hparams, {f"hparam/{k}": v for k, v in self.last_eval.items()},
                                run_name=".")
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


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _netrc_has_wandb() -> bool:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in path.read_text()
    except OSError:
        return False


def build_tracker(logger_cfg: dict[str, Any], out_dir: Path, config: dict[str, Any], meta: dict[str, Any]) -> Tracker:
    """`logger_cfg['backend']` is wandb | tensorboard | none; the JSONL tracker is always included."""
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
