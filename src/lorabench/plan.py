"""`python -m train ... +plan=true` (or `-m ... +plan=true` for a sweep): what the jobs will cost, before any runs.

For each job, without training it:
- its optimizer steps, computed as the trainer computes them (examples after `max_train_samples`, global batch,
  gradient accumulation, epochs, `max_steps`), and its evaluations (`eval_every` as the trainer resolves it);
- the seconds per step of its configuration on this machine: a short timed calibration (WARMUP_STEPS untimed,
  then the median of TIMED_STEPS) of the real training step (`Trainer.train_step`: forward, backward, the
  method's regularizer and hooks, clipping, AdamW) on a batch of random tokens with the job's batch size and
  the padded length its batches will have (the mean over the first epoch's batches, rounded up to a multiple
  of LENGTH_STEP);
- the seconds per evaluation: the same for the evaluation forward (through merged weights, as run.py
  evaluates) over the dev examples;
- the set-up: loading the data and building the model.
The estimate is set-up + steps × s/step × gradient accumulation + evaluations × s/evaluation; a run also pays
the start of its Python process once (importing torch and transformers), shown apart.

Calibrations are cached in `<data.cache_dir>/calibration.json` (default ~/.cache/lorabench), one entry per
model × method (and its options) × budget × padded length × batch × precision × device × threads × host, so the
seeds of a configuration, and a second plan of the same sweep, calibrate nothing. Delete the file to
measure again (a busy machine measured slow steps).

The estimate is for one process on this machine: a sweep sent to SLURM runs elsewhere, and one job on several
processes (torchrun) takes roughly the time per step of its per-process share of the batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import methods
from .backbone import ModelSpec, load_tokenizer
from .budget import Budget
from .data import BatchLoader, Collator, DataLimits, TaskSpec, load_task_data, resolve_glue_dir

log = logging.getLogger("lorabench")

CALIBRATION_FILE = "calibration.json"
WARMUP_STEPS = 2  # untimed: the first steps pay one-off costs (allocator, lazily created optimizer state)
TIMED_STEPS = 4
EVAL_TIMED_BATCHES = 2
LENGTH_STEP = 8  # padded lengths are calibrated in steps of 8 tokens (rounded up: never an underestimate)
LONG_RUN_SECONDS = 3600  # a single run longer than this gets a warning
_WARM_DATA_SECONDS: dict[str, float] = {}  # loading a job's data from the tokenization cache, per data config


@dataclass
class JobPlan:
    """What one job will cost (seconds on this machine)."""

    name: str
    task: str
    method: str
    model: str
    train_examples: int
    batch_size: int
    grad_accum: int
    steps: int
    train_length: int  # the padded length the step time was calibrated at
    seconds_per_step: float
    evaluations: int
    eval_examples: int
    seconds_per_evaluation: float
    setup_seconds: float
    device: str
    calibrated_now: bool  # False: the step time came from the cache

    @property
    def train_seconds(self) -> float:
        return self.steps * self.seconds_per_step

    @property
    def eval_seconds(self) -> float:
        return self.evaluations * self.seconds_per_evaluation

    @property
    def estimate_seconds(self) -> float:
        return self.setup_seconds + self.train_seconds + self.eval_seconds


# --- what the trainer will do ----------------------------------------------------------------------------------

def count_evaluations(total_steps: int, steps_per_epoch: int, eval_every: int) -> int:
    """How many times Trainer.fit evaluates: every `eval_every` steps (0: at each epoch's end) and at the end."""
    period = eval_every or steps_per_epoch
    return total_steps // period + (1 if total_steps % period else 0)


def padded_lengths(loader: BatchLoader, epoch: int = 0) -> list[int]:
    """The padded length of each batch of `loader` in `epoch` (the collator pads to the longest sequence)."""
    order = loader.order(epoch)
    lengths = [len(s) for s in loader.split.input_ids]
    size = loader.batch_size
    return [max(lengths[i] for i in order[b:b + size]) for b in range(0, len(order), size)]


def _bucket(length: float) -> int:
    return max(LENGTH_STEP, int(math.ceil(length / LENGTH_STEP) * LENGTH_STEP))


# --- calibration -----------------------------------------------------------------------------------------------

def _synthetic_batch(batch_size: int, length: int, vocab: int, regression: bool, num_labels: int,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab - 1), min(vocab, 20000), (batch_size, length), generator=g)
    labels = (torch.rand(batch_size, generator=g) * 5 if regression
              else torch.randint(0, max(num_labels, 1), (batch_size,), generator=g))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": labels}


class _StepsOnly:
    """A train loader that is only a length: the trainer derives the run's steps (and the hooks their
    schedules) from it; the calibration feeds the batches itself."""

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.epoch = 0
        self.skip_batches = 0

    def __len__(self) -> int:
        return self.batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(cfg: dict[str, Any], spec: TaskSpec, model_spec: ModelSpec, budget: Budget, tcfg, vocab: int,
              total_steps: int, length: int, eval_length: int) -> dict[str, float]:
    """Time the job's training step and evaluation forward on this machine: {seconds_per_step,
    seconds_per_eval_batch, build_seconds}."""
    from transformers.utils import logging as hf_logging

    from .assemble import build_adapted_model
    from .training.trainer import Trainer

    t0 = time.perf_counter()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the plan's lines
    try:
        model, head, method = build_adapted_model(model_spec, spec, methods.get(cfg["method"]["name"]),
                                                  cfg["method"], budget, int(cfg["seed"]), vocab)
    finally:
        hf_logging.enable_progress_bar()
    build_seconds = time.perf_counter() - t0
    calib_cfg = replace(tcfg, epochs=1, max_steps=None, progress_bar=False, grad_accum=1)
    trainer = Trainer(calib_cfg, model, list(method.named_trainable_parameters()) + head,
                      _StepsOnly(max(total_steps, 1)), lambda m: {}, spec.primary_metric, hooks=method.hooks(),
                      regularizer=method.regularizer, head_param_names=[n for n, _ in head])
    for h in trainer.hooks:
        h.on_train_begin(trainer.state)
    batch = _synthetic_batch(tcfg.batch_size, length, vocab, spec.is_regression, spec.num_labels)
    model.train()
    times = []
    for i in range(WARMUP_STEPS + TIMED_STEPS):
        _sync(trainer.device)
        t = time.perf_counter()
        trainer.train_step([batch])
        trainer.state.step = i + 1
        _sync(trainer.device)
        times.append(time.perf_counter() - t)
    seconds_per_step = statistics.median(times[WARMUP_STEPS:])

    eval_batch = _synthetic_batch(tcfg.eval_batch_size, eval_length, vocab, spec.is_regression, spec.num_labels, 1)
    eval_batch = trainer.to_device({k: v for k, v in eval_batch.items() if k != "labels"})
    model.eval()
    eval_times = []
    with method.merged_for_eval(), torch.no_grad():
        for _ in range(1 + EVAL_TIMED_BATCHES):
            _sync(trainer.device)
            t = time.perf_counter()
            with trainer.autocast():
                model(**eval_batch).logits.float().cpu()
            _sync(trainer.device)
            eval_times.append(time.perf_counter() - t)
    return {"seconds_per_step": seconds_per_step, "seconds_per_eval_batch": statistics.median(eval_times[1:]),
            "build_seconds": build_seconds}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu " + " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return "cpu " + (platform.processor() or platform.machine())


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def calibration_key(cfg: dict[str, Any], tcfg, device: torch.device, length: int, eval_length: int) -> str:
    """model × method × budget × padded length × batch × precision × device × threads × host, readable first,
    then a hash of everything else that shapes the cost (the method's options, the model's config)."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    shape = {"model": cfg["model"], "method": cfg["method"], "budget": cfg["budget"],
             "num_labels": cfg["task"].get("num_labels"), "max_grad_norm": tcfg.max_grad_norm,
             "eval_batch": tcfg.eval_batch_size, "eval_length": eval_length, "torch": torch.__version__}
    budget = Budget.from_dict(cfg["budget"]).name
    return (f"{cfg['model']['name']}|{cfg['method']['name']}|{budget}"
            f"|seq {length}|batch {tcfg.batch_size}|{tcfg.precision}|{device_name}"
            f"|{torch.get_num_threads()} threads|{socket.gethostname()}|{_short_hash(shape)}")


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = _read_cache(path)  # again: another plan may have added entries meanwhile
        cache[key] = entry
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs a recalibration next time, nothing else
        log.warning("could not write the calibration cache %s (%s)", path, e.strerror)


# --- one job ---------------------------------------------------------------------------------------------------

def plan_job(cfg: dict[str, Any], name: str) -> JobPlan:
    """The plan of the job `cfg` (a resolved config, as run_job gets it). Raises what run_job would raise on a
    config that cannot run (unknown method, bad option, missing data)."""
    from .assemble import trainer_config
    from .training.trainer import resolve_device, resolve_eval_every

    _note_start()
    methods.get(cfg["method"]["name"])
    spec = TaskSpec.from_dict(cfg["task"])
    model_spec = ModelSpec.from_dict(cfg["model"])
    budget = Budget.from_dict(cfg["budget"])
    tcfg_dict = dict(cfg["trainer"])
    tcfg = trainer_config(tcfg_dict)
    limits = DataLimits.from_dict(tcfg_dict)
    methods.check_options(cfg["method"])
    data_cfg = cfg.get("data") or {}
    glue_dir = resolve_glue_dir(data_cfg.get("glue_dir"))
    cache_dir = Path(data_cfg["cache_dir"]).expanduser() if data_cfg.get("cache_dir") else None
    device = resolve_device(tcfg.device)

    def load():
        tokenizer = load_tokenizer(model_spec)
        return tokenizer, load_task_data(spec, tokenizer, limits.max_seq_length, glue_dir, cache_dir,
                                         limits.max_train_samples, limits.max_eval_samples)

    tokenizer, data = load()
    data_key = json.dumps([cfg["model"], cfg["task"], limits.max_seq_length, limits.max_train_samples,
                           limits.max_eval_samples, str(glue_dir)], sort_keys=True, default=str)
    if data_key not in _WARM_DATA_SECONDS:
        # the first load may have tokenized into the cache, which the run will then only read: time a warm one
        t1 = time.perf_counter()
        load()
        _WARM_DATA_SECONDS[data_key] = time.perf_counter() - t1
    data_seconds = _WARM_DATA_SECONDS[data_key]

    collate = Collator(tokenizer.pad_token_id or 0)
    train_loader = BatchLoader(data.train, tcfg.batch_size, collate, shuffle=True, seed=int(cfg["seed"]),
                               group_by_length=limits.group_by_length)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / tcfg.grad_accum))
    total = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps:
        total = min(total, int(tcfg.max_steps))
    evaluations = count_evaluations(total, steps_per_epoch, resolve_eval_every(tcfg.eval_every, steps_per_epoch,
                                                                               total))
    # the padded length of a typical batch, from one fixed shuffle: the seeds of a configuration share it (and
    # their calibration)
    length = _bucket(float(np.mean(padded_lengths(replace(train_loader, seed=0)))))
    eval_lengths = [n for split in data.evals.values()
                    for n in padded_lengths(BatchLoader(split, tcfg.eval_batch_size, collate, shuffle=False))]
    eval_length = _bucket(float(np.mean(eval_lengths))) if eval_lengths else length
    eval_examples = sum(len(v) for v in data.evals.values())

    cache_path = (cache_dir or Path.home() / ".cache" / "lorabench") / CALIBRATION_FILE
    key = calibration_key(cfg, tcfg, device, length, eval_length)
    entry = _read_cache(cache_path).get(key)
    calibrated_now = entry is None
    if entry is None:
        log.info("plan %s: timing %d steps of %s on %s (batch %d, length %d)", name, WARMUP_STEPS + TIMED_STEPS,
                 cfg["method"]["name"], cfg["model"]["name"], tcfg.batch_size, length)
        entry = calibrate(cfg, spec, model_spec, budget, tcfg, len(tokenizer), total, length, eval_length)
        entry["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_cache(cache_path, key, entry)
    plan = JobPlan(
        name=name, task=spec.name, method=cfg["method"]["name"], model=model_spec.name,
        train_examples=len(data.train), batch_size=tcfg.batch_size, grad_accum=tcfg.grad_accum, steps=total,
        train_length=length, seconds_per_step=entry["seconds_per_step"] * tcfg.grad_accum,
        evaluations=evaluations, eval_examples=eval_examples,
        seconds_per_evaluation=entry["seconds_per_eval_batch"] * eval_examples / tcfg.eval_batch_size,
        setup_seconds=data_seconds + entry["build_seconds"], device=device.type, calibrated_now=calibrated_now)
    log.info("plan %s: %d steps x %.3f s + %d evaluations x %.1f s + %.0f s set-up = about %s",
             name, plan.steps, plan.seconds_per_step, plan.evaluations, plan.seconds_per_evaluation,
             plan.setup_seconds, duration(plan.estimate_seconds))
    return plan


# --- the printed plan ------------------------------------------------------------------------------------------

def duration(seconds: float) -> str:
    """`4812 s (1 h 20 min)`: seconds first (what a script reads), then for a person."""
    s = int(round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 3600:
        return f"{s} s ({s / 60:.0f} min)"
    return f"{s} s ({s // 3600} h {round(s % 3600 / 60):02d} min)"


def process_start_seconds() -> float:
    """Seconds since this process started (Linux), the start-up a run pays before its first job."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _varying_names(plans: list[JobPlan]) -> tuple[list[str], str]:
    """Each job's name without the overrides every job shares (listed once instead)."""
    tokens = [p.name.split() for p in plans]
    common = [t for t in tokens[0] if all(t in other for other in tokens[1:])] if len(plans) > 1 else []
    return [" ".join(t for t in ts if t not in common) or p.name for ts, p in zip(tokens, plans)], " ".join(common)


def format_plan(plans: list[JobPlan], failed: int = 0, start_seconds: float = 0.0) -> str:
    header = ["#", "job", "train ex.", "batch", "steps", "length", "s/step", "evals", "s/eval", "estimate (s)"]
    names, common = _varying_names(plans)
    rows = [[str(i), names[i], str(p.train_examples), f"{p.batch_size}x{p.grad_accum}" if p.grad_accum > 1
             else str(p.batch_size), str(p.steps), str(p.train_length), f"{p.seconds_per_step:.3f}",
             str(p.evaluations), f"{p.seconds_per_evaluation:.1f}", f"{p.estimate_seconds:.0f}"]
            for i, p in enumerate(plans)]
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    right = {0, 2, 3, 4, 5, 6, 7, 8, 9}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    devices = sorted({p.device for p in plans})
    threads = torch.get_num_threads()
    out = [f"plan: {len(plans)} job{'s' if len(plans) != 1 else ''}, nothing trained; times from steps timed on "
           f"this machine ({', '.join(devices) or '?'}, {threads} torch thread{'s' if threads != 1 else ''})"]
    if common:
        out.append(f"every job: {common}")
    out += ["", line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    total = sum(p.estimate_seconds for p in plans)
    steps = sum(p.steps for p in plans)
    out += ["", f"total: {len(plans)} job{'s' if len(plans) != 1 else ''}, {steps} optimizer steps, about {duration(total)} one after the other"
                f" (a parallel launcher divides it by the jobs it runs at once); each process also takes about "
                f"{start_seconds:.0f} s to start"]
    long_jobs = [(i, p) for i, p in enumerate(plans) if p.estimate_seconds > LONG_RUN_SECONDS]
    if long_jobs:
        i, longest = max(long_jobs, key=lambda ip: ip[1].estimate_seconds)
        out.append(f"warning: {len(long_jobs)} job{'s' if len(long_jobs) != 1 else ''} will take over an hour "
                   f"each; the longest, #{i} {longest.name}, about {duration(longest.estimate_seconds)} "
                   f"(trainer.max_train_samples, trainer.epochs or trainer.max_steps shorten a run)")
    if failed:
        out.append(f"warning: {failed} job{'s' if failed != 1 else ''} could not be planned (see the errors above)")
    return "\n".join(out)


def print_plan(plans: list[JobPlan], failed: int = 0) -> None:
    """Print the plan of the jobs planned in this process; with `failed` jobs that could not be planned (a sweep's),
    exit 1."""
    print(format_plan(plans, failed, _START_SECONDS[0] or 0.0), flush=True)
    if failed:
        sys.exit(1)


_START_SECONDS: list[float | None] = [None]  # how long this process took to reach its first job


def _note_start() -> None:
    if _START_SECONDS[0] is None:
        _START_SECONDS[0] = process_start_seconds()
