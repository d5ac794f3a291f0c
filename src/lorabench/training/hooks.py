"""The hook protocol: how methods (and generic helpers) take part in training without the trainer naming them.

Call points, in step order (see Trainer.train_step):
  on_train_begin(state)          once, with state.total_steps known (schedules need T)
  after_backward(state)          gradients are complete and unscaled; skipped on steps the fp16 scaler skips
  after_optimizer_step(state)    parameters are post-update, gradients still present (pruning, allocation,
                                 boosting); skipped on steps the fp16 scaler skips
  on_eval(state, metrics)        after each evaluation
  progress()                     small dict shown in the progress bar and logged under train/
  state_dict() / load_state_dict()   everything needed for an exact resume
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch


@dataclass
class TrainState:
    """What hooks may read (and the one thing they may ask of the trainer: fresh optimizer state)."""

    step: int = 0  # optimizer steps done, counted from 1 once the first step is taken
    total_steps: int = 0
    epoch: int = 0
    micro_step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    reset_optimizer_state: Callable[[Iterable[torch.nn.Parameter]], None] = field(default=lambda params: None)
    last_metrics: dict[str, float] = field(default_factory=dict)


class TrainerHook:
    def on_train_begin(self, state: TrainState) -> None:
        pass

    def after_backward(self, state: TrainState) -> None:
        pass

    def after_optimizer_step(self, state: TrainState) -> None:
        pass

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        pass

    def progress(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ScheduleHook(TrainerHook):
    """The hook of a method with a training-time schedule (pruning, boosting, allocation): forwards the trainer's
    call points to the method's `on_train_begin(state)` / `after_optimizer_step(state)` and shows its
    `progress()`. It holds no state of its own: the schedule's state is the method's, which a checkpoint saves
    once (methods' `state_dict()`)."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule

    def on_train_begin(self, state: TrainState) -> None:
        self.schedule.on_train_begin(state)

    def after_optimizer_step(self, state: TrainState) -> None:
        self.schedule.after_optimizer_step(state)

    def progress(self) -> dict[str, Any]:
        return self.schedule.progress()
