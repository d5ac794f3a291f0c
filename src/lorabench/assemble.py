"""Model assembly: the pieces of a run that export, plan, benches and tests rebuild without running a job.

- `seed_everything`, `trainer_config` (the trainer group → TrainerConfig, rejecting unknown keys);
- `build_adapted_model`: backbone + fresh task head + the method attached, a pure function of its arguments
  (export.py rebuilds a finished run's model with it);
- `attach`: build a method from its config and attach it to the budget's targets (tests, benches, scripts);
- `make_evaluator`: evaluate(model) over a task's dev splits, on a device under a precision's autocast.

Nothing here writes a run directory (rundir.py) or orchestrates a job (run.py).
"""

from __future__ import annotations

import random
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from . import distributed, methods
from .backbone import ModelSpec, find_targets, freeze_backbone, load_model
from .budget import Budget
from .data import BatchLoader, DataLimits, TaskSpec
from .errors import ConfigError
from .methods.base import AdapterMethod
from .metrics import compute_metrics
from .training.trainer import TrainerConfig, autocast_for
from .validate import did_you_mean

# trainer-group keys that shape the data rather than the loop
DATA_KEYS = tuple(f.name for f in fields(DataLimits))
# trainer-group keys about the run directory rather than the loop
RUN_KEYS = ("resume",)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def trainer_config(d: dict[str, Any]) -> TrainerConfig:
    known = {f.name for f in fields(TrainerConfig)}
    extra = {k: v for k, v in d.items() if k not in known and k not in DATA_KEYS + RUN_KEYS and k != "name"}
    if extra:
        allowed = known | set(DATA_KEYS) | set(RUN_KEYS)
        first = sorted(extra)[0]
        raise ConfigError(f"unknown trainer option {first!r}{did_you_mean(first, allowed)}; known: "
                          f"{', '.join(sorted(allowed))}")
    return TrainerConfig(**{k: v for k, v in d.items() if k in known})


def attach(model, model_spec: ModelSpec, config: dict[str, Any], budget: Budget) -> AdapterMethod:
    """Build the method named by `config` and attach it to the budget's targets of `model`."""
    method = methods.build(config, budget)
    method.attach(model, find_targets(model, model_spec, budget.target_modules))
    return method


def build_adapted_model(model_spec: ModelSpec, spec: TaskSpec, method_cls, method_config: dict[str, Any],
                        budget: Budget, seed: int, vocab_size: int):
    """(model, head, method): the backbone with a fresh task head and the method attached, a pure function of
    its arguments (export.py rebuilds a run's model with it)."""
    seed_everything(seed)  # the head init (and a config-built backbone) depend on the seed only
    model = load_model(model_spec, spec.num_labels, spec.is_regression, vocab_size=vocab_size)
    head = freeze_backbone(model)
    targets = find_targets(model, model_spec, budget.target_modules)
    seed_everything(seed)  # the adapter init depends on the seed only, not on what loading consumed
    method = method_cls(method_config, budget)
    method.attach(model, targets)
    return model, head, method


def make_evaluator(spec: TaskSpec, eval_loaders: dict[str, BatchLoader], device: torch.device, precision: str,
                   method: AdapterMethod | None = None, processes: distributed.Processes = distributed.SINGLE):
    """evaluate(model) → {"eval/<metric><suffix>": value} over every eval split of the task, with the batches on
    `device` under the training precision's autocast.

    With a `method`, evaluation runs through merged weights where the method allows it (inference then costs
    what the backbone costs) and the training weights come back exactly afterwards. With several `processes`
    the loaders are each process's slice (distributed.EvalShard): predictions are gathered in order and every
    process computes the same metrics."""
    suffix = {s.name: s.suffix for s in spec.eval_splits}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        if method is None:
            return _evaluate(model)
        with method.merged_for_eval():
            return _evaluate(model)

    @torch.no_grad()
    def _evaluate(model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        out: dict[str, float] = {}
        for split, loader in eval_loaders.items():
            preds, labels = [], []
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                y = batch.pop("labels")
                with autocast_for(device, precision):
                    logits = model(**batch).logits.float()
                preds.append(logits.squeeze(-1) if spec.is_regression else logits.argmax(-1))
                labels.append(y)
            p = torch.cat(preds).cpu().numpy() if preds else np.empty(0)
            t = torch.cat(labels).cpu().numpy() if labels else np.empty(0)
            if processes.distributed:
                p = np.concatenate([a for a in processes.gather(p) if a.size])
                t = np.concatenate([a for a in processes.gather(t) if a.size])
            for k, v in compute_metrics(spec.metrics, p, t).items():
                out[f"eval/{k}{suffix[split]}"] = v
        return out

    return evaluate
