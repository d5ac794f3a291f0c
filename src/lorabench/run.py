"""One job end to end: seed → data → backbone → method.attach → Trainer.fit → adapter → results.json.

Takes a plain (resolved) config dict and an explicit output directory; Hydra stays in src/train.py. The run
directory always ends with a results.json: status "ok" with the metrics, or status "failed" with the error
and traceback (nothing claims success that did not finish). results.json is written atomically.

Resume (`trainer.resume=true` or `=<run dir>`) continues a run from its newest complete checkpoint
(training/checkpoint.py) in that run's directory; a refused resume leaves the earlier run's files untouched.

A job holds the lock of its run directory (rundir.py) while it runs: a second job into a directory that a live
run holds fails with one error line and leaves that run's files alone.

Several processes can train one job (torchrun, submitit tasks; lorabench/distributed.py): each runs run_job with
the same config and directory; rank 0 alone locks, decides and writes the run directory, the others follow its
decisions and write nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import distributed, methods, rundir
from .assemble import DATA_KEYS, build_adapted_model, make_evaluator, seed_everything, trainer_config
from .backbone import ModelSpec, load_tokenizer
from .budget import Budget
from .data import BatchLoader, Collator, DataLimits, TaskSpec, load_task_data, resolve_glue_dir
from .errors import ConfigError, RunInterrupted, TrainingError
from .rundir import write_json_atomic
from .tracking import Tracker, build_tracker
from .validate import did_you_mean
from .training import checkpoint as ckpt
from .training.trainer import Trainer, TrainingStopped, peak_memory_mb, resolve_device

log = logging.getLogger("lorabench")

def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("lorabench", "torch", "transformers", "peft", "hydra-core", "wandb"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run_job(cfg: dict[str, Any], out_dir: str | Path, signals=None,
            processes: distributed.Processes | None = None) -> dict[str, Any]:
    """Run one fine-tuning job described by `cfg` (the resolved Hydra config as a dict) into `out_dir`.

    Returns the results dict. Raises on failure after writing results.json with status "failed", and
    RunInterrupted after writing it with status "interrupted" when `signals` (an installed
    interrupt.StopSignals) caught SIGINT / SIGTERM. `processes`: the processes training this job together
    (default: those the launcher started, distributed.current()); only rank 0 writes.
    """
    processes = processes or distributed.current()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    # stage: "setup" until the first training step is about to run, then "training" (the reporter lists jobs
    # that failed in setup apart from the table; the entry removes a single run's directory in that case)
    results: dict[str, Any] = {"status": "running", "stage": "setup", "config": cfg}
    tracker_box: list = []  # filled by _run once the tracker exists, so `finally` can finish it
    record_dir: Path | None = None  # where a failure is recorded; None: a directory we must not touch (yet)
    locked: list[Path] = []  # run directories this call locked (rundir.py), released at the end

    def claim_run_dir() -> tuple[Path, ckpt.ResumePoint | None]:
        nonlocal record_dir
        _lock(out_dir, locked)  # from here no other live run writes to out_dir
        _check_writable(out_dir)
        record_dir = out_dir
        note = rundir.renamed_note(out_dir)
        if note:
            log.info(note)
        results.update(_describe(cfg))
        if _holds_run(out_dir):
            record_dir = None  # until it is clear we may continue (or replace) the run that is there
        run_dir, resume = prepare_run_dir(cfg, out_dir)
        if run_dir != out_dir:
            _lock(run_dir, locked)  # the run to resume: not while it is still running
            _check_writable(run_dir)
        record_dir = run_dir
        return run_dir, resume

    try:
        # rank 0 locks and decides (a fresh run, or the checkpoint to resume); the others take its answer
        run_dir, resume = processes.main_decides(claim_run_dir)
        if not processes.is_main:
            results.update(_describe(cfg))
        return _run(cfg, run_dir, results, t0, tracker_box, resume, signals, processes)
    except RunInterrupted as e:
        results["status"] = "interrupted"
        results.update({"signal": e.signal_name, "step": e.step, "total_steps": e.total_steps,
                        "wall_seconds": time.perf_counter() - t0})
        _record(record_dir, results)
        raise
    except BaseException as e:
        results.update(rundir.failed_record(e))
        results["wall_seconds"] = time.perf_counter() - t0
        _record(record_dir, results)
        raise
    finally:
        if tracker_box:
            tracker_box[0].finish(results.get("status", "failed"))
        for d in locked:
            rundir.release(d)


def _record(record_dir: Path | None, results: dict[str, Any]) -> None:
    """results.json of a run that did not finish, where we may write it (None: a directory not ours to touch;
    always None outside rank 0)."""
    if record_dir is not None and record_dir.is_dir() and os.access(record_dir, os.W_OK):
        write_json_atomic(record_dir / rundir.RESULTS_FILE, results)


def _lock(run_dir: Path, locked: list[Path]) -> None:
    """Lock `run_dir` for this job (ConfigError when a live run holds it); remember it when this call took it."""
    try:
        taken = rundir.hold(run_dir)
    except OSError:
        _check_writable(run_dir)  # words why the directory cannot be used
        raise
    if taken:
        locked.append(run_dir)


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output directory {out_dir} is not writable ({e.strerror}); choose another with "
                          f"hydra.run.dir=<dir> or paths.runs_dir=<dir>") from None


def _holds_run(d: Path) -> bool:
    return (d / ckpt.CHECKPOINT_DIR).is_dir() or (d / rundir.RESULTS_FILE).exists()


def _resume_target(value: Any) -> str | None:
    """trainer.resume → None (fresh run), "" (this run dir) or a run directory path."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "no")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes")):
        return ""
    if isinstance(value, str):
        return value
    raise ConfigError(f"trainer.resume must be true, false or a run directory, got {value!r}")


def prepare_run_dir(cfg: dict[str, Any], out_dir: Path) -> tuple[Path, ckpt.ResumePoint | None]:
    """The directory this job writes to and the checkpoint it continues from (None: a fresh run).

    Every refusal is a ConfigError raised before anything in an existing run directory is changed.
    """
    target = _resume_target((cfg.get("trainer") or {}).get("resume"))
    if target is None and _requeued_after_interrupt(out_dir):
        log.info("requeued job: continuing the interrupted run in %s from its newest checkpoint", out_dir)
        target = ""
    if target is None:
        if (out_dir / ckpt.CHECKPOINT_DIR).is_dir() and ckpt.complete_checkpoints(out_dir):
            raise ConfigError(f"{out_dir} already holds checkpoints of an earlier run: continue it with "
                              f"trainer.resume=true, or choose another hydra.run.dir (or delete "
                              f"{out_dir / ckpt.CHECKPOINT_DIR})")
        # a finished or failed earlier run without checkpoints: start over, its logs must not mix with ours
        for name in (rundir.METRICS_FILE, rundir.TRAIN_LOG_FILE):
            ckpt.truncate_jsonl(out_dir / name, 0)
        return out_dir, None

    run_dir = out_dir if target == "" else Path(target).expanduser()
    how = "trainer.resume=true" if target == "" else f"trainer.resume={target}"
    if not run_dir.is_dir():
        raise ConfigError(f"nothing to resume: {run_dir} is not a directory ({how}). Pass the run directory "
                          f"to continue: trainer.resume=<run dir>")
    run_dir = run_dir.resolve()
    found = ckpt.latest_checkpoint(run_dir)
    if found is None and target == "":
        # `trainer.resume=true` with the default time-stamped directory: this process just created a fresh one,
        # so continue the newest resumable run of the same configuration beside it (the command that was
        # killed, run again with trainer.resume=true)
        sibling = _newest_resumable_sibling(run_dir, cfg)
        if sibling is not None:
            log.info("trainer.resume=true: continuing %s, the newest resumable run of this configuration", sibling)
            _remove_if_fresh(run_dir)
            run_dir, found = sibling, ckpt.latest_checkpoint(sibling)
    if found is None:
        hint = ("; with the default time-stamped run directory pass the run to continue: trainer.resume=<run dir>"
                if target == "" else "")
        raise ConfigError(f"nothing to resume: {run_dir} has no complete checkpoint (checkpoints/step-*/"
                          f"{ckpt.MANIFEST}); runs save them with trainer.checkpoint_every=<steps>{hint}")
    previous = run_dir / rundir.RESULTS_FILE
    if previous.exists():
        try:
            status = json.loads(previous.read_text()).get("status")
        except ValueError:
            status = None
        if status == "ok":
            raise ConfigError(f"nothing to resume: the run in {run_dir} already finished (results.json status ok)")
    manifest = ckpt.check_resumable(found, cfg)
    return run_dir, ckpt.ResumePoint(run_dir=run_dir, ckpt_dir=found, step=int(manifest["step"]))


def _newest_resumable_sibling(run_dir: Path, cfg: dict[str, Any]) -> Path | None:
    """The run beside a fresh `run_dir` (same runs/<task>/<method>/ folder) with the newest complete checkpoint
    written by this same configuration and not finished; None when there is none."""
    if not run_dir.parent.is_dir() or not {p.name for p in run_dir.iterdir()} <= rundir.FRESH_DIR_FILES:
        return None
    candidates = []
    for d in run_dir.parent.iterdir():
        found = ckpt.latest_checkpoint(d) if d.is_dir() and d != run_dir else None
        if found is None:
            continue
        try:
            if json.loads((d / rundir.RESULTS_FILE).read_text()).get("status") == "ok":
                continue
        except (OSError, ValueError):
            pass  # killed before it wrote results.json: resumable
        try:
            ckpt.check_resumable(found, cfg)
        except ConfigError:
            continue  # another configuration's run
        candidates.append(((found / ckpt.MANIFEST).stat().st_mtime, d.resolve()))
    return max(candidates)[1] if candidates else None


def _remove_if_fresh(run_dir: Path) -> None:
    """Drop the directory Hydra made for this process when the job goes to another one (nothing written yet)."""
    import shutil

    if {p.name for p in run_dir.iterdir()} <= rundir.FRESH_DIR_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)


def _requeued_after_interrupt(run_dir: Path) -> bool:
    """A submitit job (SLURM requeue after preemption or its time limit) whose directory holds the interrupted
    run it continues: same job, same directory, a checkpoint the interrupt saved."""
    from .interrupt import under_submitit

    if not under_submitit() or not ckpt.complete_checkpoints(run_dir):
        return False
    try:
        return json.loads((run_dir / rundir.RESULTS_FILE).read_text()).get("status") == "interrupted"
    except (OSError, ValueError):
        return False


def _describe(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"task": cfg["task"]["name"], "method": cfg["method"]["name"], "model": cfg["model"]["name"],
            "budget": cfg["budget"].get("name", f"r{cfg['budget']['rank']}"), "seed": cfg["seed"]}


@dataclass
class _Plan:
    """A job's config, resolved and checked before anything heavy is loaded."""

    seed: int
    method_cls: type
    spec: TaskSpec
    model_spec: ModelSpec
    budget: Budget
    tcfg: Any  # TrainerConfig
    limits: DataLimits
    glue_dir: Path | None
    cache_dir: Path | None


@dataclass
class _Job:
    """What a job trains with, once built."""

    data: Any  # data.TaskData
    model: torch.nn.Module
    head: list
    method: Any  # AdapterMethod
    train_params: list
    tracker: Tracker
    checkpointer: ckpt.Checkpointer
    trainer: Trainer


def _run(cfg: dict[str, Any], out_dir: Path, results: dict[str, Any], t0: float, tracker_box: list,
         resume: ckpt.ResumePoint | None = None, signals=None,
         processes: distributed.Processes = distributed.SINGLE) -> dict[str, Any]:
    """prepare → build → train → finish (each below)."""
    plan = _prepare(cfg, processes)
    log.info("run directory: %s", out_dir)
    job = _build(cfg, plan, out_dir, results, resume, signals, processes)
    tracker_box.append(job.tracker)
    results["stage"] = "training"
    fit = _train(job, plan, results, signals, processes)
    return _finish(cfg, plan, job, fit, out_dir, results, t0, processes)


def _prepare(cfg: dict[str, Any], processes: distributed.Processes) -> _Plan:
    """Every spec of the job from its config: an unknown method, option or value fails here, before loading."""
    method_cls = methods.get(cfg["method"]["name"])
    tcfg_dict = dict(cfg["trainer"])
    tcfg = trainer_config(tcfg_dict)
    if processes.distributed:
        tcfg = replace(tcfg, device=processes.device_name(tcfg.device))  # this process's GPU
    methods.check_options(cfg["method"])
    data_cfg = cfg.get("data") or {}
    return _Plan(seed=int(cfg["seed"]), method_cls=method_cls, spec=TaskSpec.from_dict(cfg["task"]),
                 model_spec=ModelSpec.from_dict(cfg["model"]), budget=Budget.from_dict(cfg["budget"]), tcfg=tcfg,
                 limits=DataLimits.from_dict(tcfg_dict), glue_dir=resolve_glue_dir(data_cfg.get("glue_dir")),
                 cache_dir=Path(data_cfg["cache_dir"]).expanduser() if data_cfg.get("cache_dir") else None)


def _build(cfg: dict[str, Any], plan: _Plan, out_dir: Path, results: dict[str, Any],
           resume: ckpt.ResumePoint | None, signals, processes: distributed.Processes) -> _Job:
    """Data, the adapted model, loaders, evaluator, tracker, checkpointer and trainer."""
    spec, tcfg, limits = plan.spec, plan.tcfg, plan.limits
    seed_everything(plan.seed)

    def load_data():
        tokenizer = load_tokenizer(plan.model_spec)
        return tokenizer, load_task_data(spec, tokenizer, limits.max_seq_length, plan.glue_dir, plan.cache_dir,
                                         limits.max_train_samples, limits.max_eval_samples)

    # rank 0 first: it fills the tokenization cache (or downloads) once, the other processes then read it
    tokenizer, data = processes.main_first(load_data)
    log.info("data: train %d examples (%s); eval %s", len(data.train), data.sources["train"],
             ", ".join(f"{k} {len(v)}" for k, v in data.evals.items()))

    model, head, method = processes.main_first(lambda: build_adapted_model(
        plan.model_spec, spec, plan.method_cls, cfg["method"], plan.budget, plan.seed, len(tokenizer)))
    processes.fork_rng(plan.seed)  # the same init everywhere; from here each process draws its own dropout masks
    ledger = method.ledger()
    ledger.head_params = sum(p.numel() for _, p in head)
    log.info("method %s on %s | budget %s | %s", method.name, plan.model_spec.name, plan.budget.name,
             ledger.summary())
    results["ledger_start"] = ledger.to_dict()

    collate = Collator(tokenizer.pad_token_id or 0)
    train_loader = BatchLoader(data.train, tcfg.batch_size, collate, shuffle=True, seed=plan.seed,
                               group_by_length=limits.group_by_length)
    eval_loaders = {k: BatchLoader(v, tcfg.eval_batch_size, collate, shuffle=False) for k, v in data.evals.items()}
    if processes.distributed:  # trainer.batch_size stays the global batch; each process takes its share
        train_loader = distributed.ShardedBatches(train_loader, processes)
        eval_loaders = distributed.shard_loaders(eval_loaders, processes)
    evaluate = make_evaluator(spec, eval_loaders, resolve_device(tcfg.device), tcfg.precision, method, processes)

    if resume is not None:
        # the resumed run redoes every step after the checkpoint: drop what the killed run logged past it
        for name in (rundir.METRICS_FILE, rundir.TRAIN_LOG_FILE) if processes.is_main else ():
            ckpt.truncate_jsonl(out_dir / name, resume.step)
        results["resumed_from"] = {"checkpoint": str(resume.ckpt_dir), "step": resume.step}
    train_params = list(method.named_trainable_parameters()) + head
    # Always present (every=0: no periodic saves) so that an interrupt can still save the state it stops at.
    checkpointer = ckpt.Checkpointer(out_dir, tcfg.checkpoint_every, tcfg.keep_checkpoints,
                                     ckpt.config_fingerprint(cfg), method, model, resume=resume,
                                     processes=processes)
    meta = {"task": spec.name, "name": cfg.get("run_name") or f"{spec.name}-{method.name}-{plan.budget.name}",
            "group": cfg.get("group"), "tags": [method.name, spec.name, plan.model_spec.name, plan.budget.name]}
    tracker = build_tracker(cfg.get("logger") or {}, out_dir, cfg, meta) if processes.is_main else Tracker()

    def on_eval(record: dict[str, Any]) -> None:
        _check_processes_agree(processes, method, head, f"at the evaluation of step {record['step']}")
        tracker.log_eval(record)
        tracker.log_rank_pattern(method.rank_pattern(), record["step"])
        shown = {k: round(v, 4) for k, v in record.items() if k.startswith("eval/")}
        log.info("eval step %d epoch %d: %s", record["step"], record["epoch"], shown)

    try:
        trainer = Trainer(tcfg, model, train_params, train_loader, evaluate, spec.primary_metric,
                          hooks=method.hooks(), regularizer=method.regularizer, log=tracker.log_metrics,
                          on_eval=on_eval, head_param_names=[n for n, _ in head], checkpointer=checkpointer,
                          stop_requested=signals.stop_requested if signals is not None else None,
                          processes=processes)
        _check_processes_agree(processes, method, head, "after the model was built")
    except BaseException:
        tracker.finish("failed")  # run_job finishes the tracker of a built job; this one never got that far
        raise
    where = (f"{processes.world_size} processes ({processes.backend}; about {tcfg.batch_size // processes.world_size}"
             f" examples of each batch per process) on {trainer.device.type}" if processes.distributed
             else str(trainer.device))
    log.info("training %d steps (%d epochs x %d steps, batch %d x accum %d) on %s, precision %s; evaluating %s",
             trainer.total_steps, trainer.epochs, trainer.steps_per_epoch, tcfg.batch_size, tcfg.grad_accum,
             where, tcfg.precision,
             f"every {trainer.eval_every} steps" if trainer.eval_every else "at the end of every epoch")
    return _Job(data, model, head, method, train_params, tracker, checkpointer, trainer)


def _train(job: _Job, plan: _Plan, results: dict[str, Any], signals, processes: distributed.Processes):
    """trainer.fit(), turning a stop signal into RunInterrupted (after saving the state it stopped at)."""
    trainer, checkpointer = job.trainer, job.checkpointer
    try:
        with signals.deferring() if signals is not None else contextlib.nullcontext():
            fit = trainer.fit()
    except TrainingStopped as stop:
        # SIGTERM or a scheduler's preemption signal always saves the state it stopped at: an adapter-sized file,
        # a second or less. Ctrl-C saves only when the run checkpoints anyway (trainer.checkpoint_every > 0).
        # Several processes stop after the same step and act on the same signal (the first any of them got).
        requested = distributed.first_signal(processes, signals.requested) if processes.distributed \
            else signals.requested
        save = plan.tcfg.checkpoint_every > 0 or requested != signal.SIGINT
        results.update(_partial_results(trainer, checkpointer.save(trainer) if save else None))
        raise RunInterrupted(requested, stop.step, stop.total_steps) from None
    except RunInterrupted as e:  # a second signal: stopped inside a step, nothing of that step is saved
        results.update(_partial_results(trainer, None))
        e.step, e.total_steps = trainer.state.step, trainer.total_steps
        raise
    except TrainingError as e:
        if checkpointer.last_saved is not None:
            raise TrainingError(f"{e} The last good checkpoint is {checkpointer.last_saved}.") from None
        raise
    _check_processes_agree(processes, job.method, job.head, "at the end of training")
    return fit


def _finish(cfg: dict[str, Any], plan: _Plan, job: _Job, fit, out_dir: Path, results: dict[str, Any], t0: float,
            processes: distributed.Processes) -> dict[str, Any]:
    """The adapter and results.json (rank 0); the results dict everywhere."""
    method, trainer, data = job.method, job.trainer, job.data
    ledger = method.ledger()
    ledger.head_params = sum(p.numel() for _, p in job.head)
    log.info("final | %s", ledger.summary())
    # share of the training time spent waiting for the next batch (collate, tokenized cache)
    data_fraction = fit.data_seconds / fit.train_seconds if fit.train_seconds > 0 else 0.0
    log.info("time: %.0f s training (%.2f s/step), %.0f s eval, data wait %.1f%% of training", fit.train_seconds,
             fit.train_seconds / max(fit.steps, 1), fit.eval_seconds, 100 * data_fraction)
    if not processes.is_main:  # rank 0 writes the adapter and results.json; the same state is everywhere
        results.update({"status": "ok", "rank_pattern": method.rank_pattern()})
        return results
    exports = _save_adapter(out_dir / rundir.ADAPTER_DIR, method, job.model, job.head, cfg)

    key = f"eval/{plan.spec.primary_metric}"
    results.update({
        "status": "ok",
        "primary_metric": key,
        "best": fit.best,
        "last": fit.last,
        "best_epoch": fit.best["epoch"] if fit.best else None,
        "best_step": fit.best["step"] if fit.best else None,
        "history": fit.history,
        "ledger": ledger.to_dict(),
        "rank_pattern": method.rank_pattern(),
        "adapter_exports": exports,
        "params": {"trainable": sum(p.numel() for _, p in job.train_params),
                   "adapter_trainable": ledger.trainable_now, "adapter_stored": ledger.stored_at_end,
                   "head": ledger.head_params, "total": sum(p.numel() for p in job.model.parameters())},
        "timings": {"train_seconds": fit.train_seconds, "eval_seconds": fit.eval_seconds,
                    "data_seconds": fit.data_seconds, "steps": fit.steps, "skipped_steps": fit.skipped_steps,
                    "seconds_per_step": fit.train_seconds / max(fit.steps, 1),
                    "data_fraction": data_fraction,
                    "wall_seconds": time.perf_counter() - t0},
        "peak_memory_mb": peak_memory_mb(trainer.device),
        "device": str(trainer.device) + (f" ({torch.cuda.get_device_name()})" if trainer.device.type == "cuda" else ""),
        "processes": processes.world_size,
        "versions": package_versions(),
        "git_hash": git_hash(),
        "data_sources": data.sources,
        "n_train": len(data.train),
        "n_eval": {k: len(v) for k, v in data.evals.items()},
    })
    job.tracker.log_summary({"best/" + k.split("/", 1)[1]: v for k, v in (fit.best or {}).items()
                             if k.startswith("eval/")})
    write_json_atomic(out_dir / rundir.RESULTS_FILE, results)
    log.info("done: best %s = %.4f (epoch %s), last %.4f; results in %s", key, fit.best[key], fit.best["epoch"],
             fit.last[key], out_dir)
    return results


def _check_processes_agree(processes: distributed.Processes, method, head, when: str) -> None:
    """With several processes: every one holds the same adapter, head and rank pattern, bit for bit (each
    schedule decision reads the same averaged gradients); a TrainingError names the first tensor that differs."""
    if not processes.distributed:
        return
    tensors = {f"adapter.{k}": v for k, v in method.adapter_state_dict().items() if torch.is_tensor(v)}
    tensors.update({f"head.{n}": p for n, p in head})
    processes.check_agree(tensors, extra=method.rank_pattern(), what=f"the adapter {when}")


def _partial_results(trainer: Trainer, saved: Path | None) -> dict[str, Any]:
    """What an interrupted run reached: the evaluations so far and the checkpoint it can resume from."""
    latest = trainer.checkpointer.last_saved if trainer.checkpointer is not None else None
    return {"history": trainer.result.history, "best": trainer.result.best, "last": trainer.result.last,
            "checkpoint": str(saved or latest) if (saved or latest) else None,
            "timings": {"train_seconds": trainer.result.train_seconds, "eval_seconds": trainer.result.eval_seconds,
                        "steps": trainer.state.step}}


def _save_adapter(adapter_dir: Path, method, model, head, cfg: dict[str, Any]) -> dict[str, str]:
    """adapter/: the adapter tensors and the task head (safetensors) plus what is needed to rebuild them, and
    the interchange forms export.py can write (an HF PEFT adapter, or merged weights). Returns the latter."""
    from safetensors.torch import save_file

    from . import export

    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"adapter.{k}": v.contiguous() for k, v in method.adapter_state_dict().items()}
    tensors.update({f"head.{n}": p.detach().contiguous().clone() for n, p in head})
    save_file(tensors, str(adapter_dir / "lorabench_adapter.safetensors"))
    meta = {"method": cfg["method"], "budget": cfg["budget"], "model": cfg["model"], "task": cfg["task"]["name"],
            "task_spec": cfg["task"], "seed": cfg["seed"], "vocab_size": model.config.vocab_size,
            "targets": [asdict(t) for t in method.targets.values()], "rank_pattern": method.rank_pattern(),
            "method_state": _jsonable_state(method.state_dict())}
    write_json_atomic(adapter_dir / "lorabench_adapter.json", meta)
    return export.export_adapter(adapter_dir, method, model, [n for n, _ in head], ModelSpec.from_dict(cfg["model"]))


def _jsonable_state(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        out[k] = v
    return out
