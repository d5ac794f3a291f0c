"""The one training loop. It knows parameters, losses and hooks, never a method's name.

One optimizer step, in order (nanoGPT-style, AMP explicit):
  lr from the schedule → for each micro-batch: forward under autocast, loss (+ method regularizer) / accum,
  scaled backward → unscale → skip if the fp16 scaler found inf/NaN → after_backward hooks → clip →
  optimizer step → after_optimizer_step hooks → zero_grad → log → eval / checkpoint.
Parameters stay fp32 (master weights); autocast lowers precision per op.

With several processes (lorabench.distributed: torchrun, or submitit tasks) each one runs this same loop on its
share of every global batch; one all-reduce after the micro-batches' backward averages the gradients (and
carries the step's loss, a non-finite loss and a stop request), so that everything after it (unscale, hooks,
clipping, the optimizer step, the stop decision) is identical in every process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..distributed import LOSS_WEIGHT_KEY, SINGLE, Processes
from ..errors import ConfigError, TrainingError
from .hooks import TrainerHook, TrainState

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ESTIMATE_AFTER_STEPS = 5  # the time estimate is logged after this many steps (the first ones include warm-up)

log = logging.getLogger("lorabench")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class TrainerConfig:
    epochs: int = 3
    max_steps: int | None = None  # when set, training stops after this many optimizer steps
    lr: float = 5e-4
    head_lr: float | None = None  # defaults to lr
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None  # overrides warmup_ratio
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    device: str = "auto"
    # optimizer steps between evaluations; 0 = at the end of every epoch; "auto" = every epoch, or every tenth of
    # the run when an epoch is longer than that and than 200 steps (a first metric early on large tasks)
    eval_every: int | str = "auto"
    log_every: int = 10
    progress_bar: bool = True
    checkpoint_every: int = 0  # optimizer steps between checkpoints (training/checkpoint.py); 0 = none
    keep_checkpoints: int = 2  # complete checkpoints kept; older ones are deleted after each save

    def __post_init__(self) -> None:
        from ..validate import check_field_types

        check_field_types(self, "trainer")  # types first: the range checks below compare numbers
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for key in ("batch_size", "grad_accum", "epochs"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "head_lr", "max_grad_norm"):  # `not > 0` also refuses NaN
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"trainer.{key} must be > 0{'' if key == 'lr' else ' or null'}, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"trainer.max_steps must be >= 1, or null to train trainer.epochs epochs; got "
                              f"{self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"trainer.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if isinstance(self.eval_every, str) and self.eval_every != "auto":
            raise ConfigError(f"trainer.eval_every must be a number of steps, 0 (every epoch) or auto; got "
                              f"{self.eval_every!r}")
        for key in ("warmup_steps",) + (() if isinstance(self.eval_every, str) else ("eval_every",)):
            if (getattr(self, key) or 0) < 0:
                raise ConfigError(f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"trainer.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        if int(self.checkpoint_every) < 0:
            raise ConfigError(f"trainer.checkpoint_every must be >= 0 (0 = no checkpoints), got {self.checkpoint_every}")
        if int(self.keep_checkpoints) < 1:
            raise ConfigError(f"trainer.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


def autocast_for(device: torch.device, precision: str):
    """The autocast context of `precision` (fp32 | bf16 | fp16) on `device`: training steps and evaluation alike."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available; use trainer.device=auto or cpu")
    return torch.device(name)


def resolve_eval_every(eval_every: int | str, steps_per_epoch: int, total_steps: int) -> int:
    """trainer.eval_every as steps (0 = at every epoch's end). "auto": every epoch, unless an epoch is longer
    than a tenth of the run and than 200 steps; then every tenth of the run (SST-2's 2105-step epochs: every
    632 steps, so the first metric comes after 10% of the run instead of 33%)."""
    if eval_every != "auto":
        return int(eval_every)
    tenth = math.ceil(total_steps / 10)
    return 0 if steps_per_epoch <= max(tenth, 200) else tenth


def linear_warmup_decay(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier for optimizer step `step` (1-based): linear ramp to 1, then linear decay to 0."""
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    return max(0.0, (total_steps - step) / (total_steps - warmup_steps))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux: VmHWM, the peak RSS of this process image. ru_maxrss is not: the kernel carries it across execve,
    # so a subprocess started by a big parent reports the parent's peak (every bench child read the same).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class TrainingStopped(Exception):
    """Raised by `Trainer.fit` between two optimizer steps when `stop_requested()` said so (a signal): the
    trainer's state is that of a finished step, so it can be checkpointed and resumed exactly."""

    def __init__(self, step: int, total_steps: int) -> None:
        super().__init__(f"stopped at step {step}/{total_steps}")
        self.step = step
        self.total_steps = total_steps


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluation
    best: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    steps: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    data_seconds: float = 0.0
    skipped_steps: int = 0


class Trainer:
    """Fine-tunes `model` on `train_loader`, evaluating with `evaluate(model) -> {"eval/<metric>": value}`.

    `param_groups` come from the caller (adapter and head parameters); `regularizer()` returns the method's
    extra loss term or None; `hooks` are called at the points listed in hooks.py. A batch may carry
    `loss_weight` (distributed.LOSS_WEIGHT_KEY), a factor on its loss: a process's share of a global batch.
    `processes` (distributed.Processes) are the processes that train this job together; one by default.
    """

    def __init__(
        self,
        config: TrainerConfig,
        model: nn.Module,
        train_params: list[tuple[str, nn.Parameter]],
        train_loader,
        evaluate: Callable[[nn.Module], dict[str, float]],
        primary_metric: str,
        hooks: list[TrainerHook] | None = None,
        regularizer: Callable[[], torch.Tensor | None] | None = None,
        log: Callable[[dict[str, Any], int], None] | None = None,
        on_eval: Callable[[dict[str, Any]], None] | None = None,
        head_param_names: Iterable[str] = (),
        checkpointer=None,
        stop_requested: Callable[[], bool] | None = None,
        processes: Processes | None = None,
    ) -> None:
        self.cfg = config
        self.processes = processes or SINGLE
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.evaluate = evaluate
        self.primary_metric = primary_metric
        self.hooks = list(hooks or [])
        self.regularizer = regularizer
        self.log = log or (lambda metrics, step: None)
        self.on_eval_cb = on_eval
        self.amp_dtype = PRECISIONS[config.precision]  # CPU fp16 too: torch >= 2.3 (with a GradScaler("cpu"))
        self.params = [p for _, p in train_params]
        head_names = set(head_param_names)
        # No weight decay on 1-D tensors (biases, DoRA magnitudes, gates, singular values): decaying a gate
        # or a magnitude towards 0 is not a regularizer of the update but a change of the function.
        decay = [p for n, p in train_params if p.ndim >= 2 and n not in head_names]
        no_decay = [p for n, p in train_params if p.ndim < 2 and n not in head_names]
        head_decay = [p for n, p in train_params if p.ndim >= 2 and n in head_names]
        head_no_decay = [p for n, p in train_params if p.ndim < 2 and n in head_names]
        head_lr = config.head_lr or config.lr
        groups = [
            {"params": decay, "weight_decay": config.weight_decay, "lr": config.lr, "base_lr": config.lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": config.lr, "base_lr": config.lr},
            {"params": head_decay, "weight_decay": config.weight_decay, "lr": head_lr, "base_lr": head_lr},
            {"params": head_no_decay, "weight_decay": 0.0, "lr": head_lr, "base_lr": head_lr},
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError("nothing to train: the method attached no trainable parameters and the model has no head")
        # Fused AdamW (one kernel for every tensor) on CUDA and CPU: on CPU it steps the 74 adapter tensors of
        # MiniLM r8 in 0.6 ms against 2.1 ms for foreach and 8 ms for the per-tensor loop (1 thread).
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        self.steps_per_epoch = max(1, math.ceil(len(train_loader) / config.grad_accum))
        total = self.steps_per_epoch * config.epochs
        if config.max_steps:
            total = min(total, int(config.max_steps)) if config.max_steps > 0 else total
        self.total_steps = total
        self.epochs = math.ceil(total / self.steps_per_epoch)
        self.warmup_steps = (config.warmup_steps if config.warmup_steps is not None
                             else int(config.warmup_ratio * total))
        self.eval_every = resolve_eval_every(config.eval_every, self.steps_per_epoch, total)
        self.state = TrainState(total_steps=total, optimizer=self.optimizer,
                                reset_optimizer_state=self.reset_optimizer_state)
        self.result = FitResult()
        self._start_epoch = 0
        self._skip_batches = 0
        # The running mean of train/loss between log lines; fields, not locals, so a checkpoint can carry them.
        self._running_loss = 0.0
        self._running_n = 0
        # Saves at after_step() and, when resuming, restores everything in fit() right after on_train_begin
        # (so a hook's begin-of-training setup cannot overwrite the restored state). See checkpoint.py.
        self.checkpointer = checkpointer
        # Polled after every optimizer step; True ends fit() with TrainingStopped (run.py: SIGINT / SIGTERM).
        self.stop_requested = stop_requested or (lambda: False)
        # With several processes: whether any of them asked to stop by the last gradient all-reduce (a signal
        # reaches the processes at different moments; all of them stop after the same step).
        self._stop_agreed = False

    # --- helpers hooks may use -------------------------------------------------------------------------------
    def reset_optimizer_state(self, params: Iterable[nn.Parameter]) -> None:
        """Forget Adam moments of re-created parameters: they restart as if new (XGBLoRA boosters)."""
        for p in params:
            self.optimizer.state.pop(p, None)

    def autocast(self):
        return autocast_for(self.device, self.cfg.precision)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # --- the loop's position, for checkpoints (checkpoint.py) ------------------------------------------------
    def loop_state(self) -> dict[str, Any]:
        """Where the loop stands after the current optimizer step: the step, where the data order continues (the
        next epoch, or this one after the batches consumed), the running train loss and the evaluations so far."""
        st = self.state
        epoch_done = st.micro_step >= len(self.train_loader)
        return {
            "step": st.step,
            "resume_epoch": st.epoch + 1 if epoch_done else st.epoch,
            "resume_skip_batches": 0 if epoch_done else st.micro_step,
            "train_state": {"epoch": st.epoch, "micro_step": st.micro_step, "last_metrics": st.last_metrics},
            "running_loss": (self._running_loss, self._running_n),
            "result": {"history": self.result.history, "best": self.result.best, "last": self.result.last,
                       "skipped_steps": self.result.skipped_steps},
        }

    def load_loop_state(self, saved: dict[str, Any]) -> None:
        """Continue from `loop_state()`'s record: fit() then starts at the saved epoch, after its consumed batches."""
        st = self.state
        st.step = saved["step"]
        st.epoch = saved["train_state"]["epoch"]
        st.micro_step = saved["train_state"]["micro_step"]
        st.last_metrics = saved["train_state"]["last_metrics"]
        self._start_epoch = saved["resume_epoch"]
        self._skip_batches = saved["resume_skip_batches"]
        self._running_loss, self._running_n = saved["running_loss"]
        res = saved["result"]
        self.result.history = list(res["history"])
        self.result.best, self.result.last = res["best"], res["last"]
        self.result.skipped_steps = res["skipped_steps"]

    # --- the loop ----------------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        cfg, st = self.cfg, self.state
        for h in self.hooks:
            h.on_train_begin(st)
        if self.checkpointer is not None:
            self.checkpointer.restore(self)
        bar, redirect = self._progress_bar()
        t_start = time.perf_counter()
        t_eval = 0.0
        first_step = st.step
        try:
            for epoch in range(self._start_epoch, self.epochs):
                if st.step >= self.total_steps:  # resumed from the checkpoint of the last step
                    break
                st.epoch = epoch
                self.model.train()
                self.train_loader.epoch = epoch
                self.train_loader.skip_batches = self._skip_batches if epoch == self._start_epoch else 0
                micro = self.train_loader.skip_batches
                batches_left = len(self.train_loader) - micro
                t_data = time.perf_counter()
                accum_batches: list = []
                for batch in self.train_loader:
                    self.result.data_seconds += time.perf_counter() - t_data
                    accum_batches.append(batch)
                    micro += 1
                    batches_left -= 1
                    if len(accum_batches) < cfg.grad_accum and batches_left > 0:
                        t_data = time.perf_counter()
                        continue
                    loss = self.train_step(accum_batches)
                    accum_batches = []
                    st.micro_step = micro
                    self._report_step(loss, epoch, bar)
                    t_eval += self._evaluate_if_due(epoch, end_of_epoch=batches_left == 0)
                    self.after_step()
                    if st.step - first_step == ESTIMATE_AFTER_STEPS and st.step < self.total_steps:
                        self._announce_estimate((time.perf_counter() - t_start - t_eval) / ESTIMATE_AFTER_STEPS)
                    if st.step >= self.total_steps:
                        break
                    if self._stop_agreed if self.processes.distributed else self.stop_requested():
                        raise TrainingStopped(st.step, self.total_steps)
                    t_data = time.perf_counter()
                if st.step >= self.total_steps:
                    break
        finally:
            redirect.close()
            if bar is not None:
                bar.close()
            # also when stopped or failed: the partial result's timings are those of the steps done
            self.result.steps = st.step
            self.result.eval_seconds = t_eval
            self.result.train_seconds = time.perf_counter() - t_start - t_eval
        return self.result

    def _progress_bar(self):
        """(tqdm bar or None, the context that routes log lines above it: close it when training ends)."""
        redirect = contextlib.ExitStack()
        if not (self.cfg.progress_bar and self.processes.is_main):
            return None, redirect
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0)
        redirect.enter_context(logging_redirect_tqdm())  # log lines go above the bar, not glued onto it
        return bar, redirect

    def _report_step(self, loss: float | None, epoch: int, bar) -> None:
        """The running train loss, the bar, and a train/ log line every log_every steps."""
        st = self.state
        if loss is not None:
            self._running_loss += loss
            self._running_n += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(self._postfix(loss), refresh=False)
        if st.step % self.cfg.log_every == 0 and self._running_n:
            self.log({"train/loss": self._running_loss / self._running_n,
                      "train/lr": self.optimizer.param_groups[0]["lr"], "train/epoch": epoch,
                      **{f"train/{k}": v for h in self.hooks for k, v in h.progress().items()}}, st.step)
            self._running_loss, self._running_n = 0.0, 0

    def _evaluate_if_due(self, epoch: int, end_of_epoch: bool) -> float:
        """Evaluate when eval_every says so (or at an epoch's end, or the last step); returns the seconds it took."""
        st = self.state
        due = (self.eval_every and st.step % self.eval_every == 0) or (not self.eval_every and end_of_epoch) \
            or st.step == self.total_steps
        if not due:
            return 0.0
        t0 = time.perf_counter()
        self._evaluate(epoch, final=st.step == self.total_steps)
        self.model.train()
        return time.perf_counter() - t0

    def _announce_estimate(self, seconds_per_step: float) -> None:
        """After the first few steps: how long the run will take and when the first metric comes."""
        st = self.state
        left = self.total_steps - st.step
        if self.eval_every:
            next_eval = (st.step // self.eval_every + 1) * self.eval_every
        else:  # the end of the current epoch
            next_eval = (st.epoch + 1) * self.steps_per_epoch
        next_eval = min(next_eval, self.total_steps)
        log.info("%.2f s/step over the first %d steps: about %s for the %d steps left; next evaluation at step %d "
                 "(in about %s)", seconds_per_step, ESTIMATE_AFTER_STEPS, _duration(left * seconds_per_step), left,
                 next_eval, _duration((next_eval - st.step) * seconds_per_step))

    def after_step(self) -> None:
        """Called after every optimizer step's bookkeeping (log, eval); checkpointing plugs in here."""
        if self.checkpointer is not None:
            self.checkpointer.after_step(self)

    def _postfix(self, loss: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {"loss": f"{loss:.4f}" if loss is not None else "skip"}
        for h in self.hooks:
            out.update(h.progress())
        if self.state.last_metrics:
            out[self.primary_metric] = f"{self.state.last_metrics.get('eval/' + self.primary_metric, float('nan')):.4f}"
        return out

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> float | None:
        """One optimizer step over `batches` (the step's micro-batches), exactly as fit() takes it: the mean loss,
        or None when the fp16 scaler skipped the step. Benches and the planner time it."""
        cfg, st = self.cfg, self.state
        step = st.step + 1
        lr_mult = linear_warmup_decay(step, self.total_steps, self.warmup_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_mult

        total_loss = 0.0
        n = len(batches)
        nonfinite: float | None = None
        for batch in batches:
            batch = self.to_device(batch)
            weight = batch.pop(LOSS_WEIGHT_KEY, None)
            with self.autocast():
                out = self.model(**batch)
                loss = out.loss if weight is None else out.loss * weight
                reg = self.regularizer() if self.regularizer is not None else None
                if reg is not None:
                    loss = loss + reg
            if not torch.isfinite(loss.detach()):
                nonfinite = loss.item()
                if not self.processes.distributed:
                    self._raise_nonfinite(nonfinite, step)
                continue  # told to every process by the all-reduce below; all of them stop there
            self.scaler.scale(loss / n).backward()
            total_loss += loss.item() / n

        if self.processes.distributed:
            world = self.processes.world_size
            loss_sum, nonfinite_count, stop_count = self.processes.average_gradients(
                self.params, [total_loss, float(nonfinite is not None), float(self.stop_requested())])
            if nonfinite_count:
                self._raise_nonfinite(nonfinite if nonfinite is not None else float("nan"), step)
            # weighted shares sum to the global batch's mean loss (the regularizer, the same everywhere, N times)
            total_loss = loss_sum / world
            self._stop_agreed = stop_count > 0

        self.scaler.unscale_(self.optimizer)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        grads_finite = True
        if self.scaler.is_enabled():
            # The scaler will skip this step if any gradient overflowed; hooks must then not see those grads.
            grads_finite = all(torch.isfinite(p.grad).all() for p in self.params if p.grad is not None)
        if grads_finite:
            for h in self.hooks:
                h.after_backward(st)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = scale_before is not None and self.scaler.get_scale() < scale_before
        st.step = step
        if not skipped:
            for h in self.hooks:
                h.after_optimizer_step(st)
        else:
            self.result.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return None if skipped else total_loss

    def _raise_nonfinite(self, value: float, step: int) -> None:
        raise TrainingError(
            f"non-finite loss ({value}) at optimizer step {step} (epoch {self.state.epoch}); training "
            f"stopped. Lower trainer.lr, use trainer.precision=fp32, or check the data.")

    def _evaluate(self, epoch: int, final: bool) -> None:
        st = self.state
        metrics = self.evaluate(self.model)
        st.last_metrics = metrics
        record = {"step": st.step, "epoch": epoch + 1, **metrics}
        for h in self.hooks:
            h.on_eval(st, metrics)
            record.update({f"train/{k}": v for k, v in h.progress().items()})
        self.result.history.append(record)
        self.result.last = record
        key = f"eval/{self.primary_metric}"
        if self.result.best is None or record[key] > self.result.best[key]:
            self.result.best = record
        if self.on_eval_cb is not None:
            self.on_eval_cb(record)
