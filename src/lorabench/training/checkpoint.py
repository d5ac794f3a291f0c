"""Checkpoints for an exact resume: a run killed at any point continues as if it had never stopped.

A checkpoint is `<run dir>/checkpoints/step-NNNNNNN/` holding `state.pt` and `manifest.json`. It is written
into a hidden temporary folder, the manifest last, and then renamed into place (one atomic `os.replace`),
so a folder named `step-*` with a manifest is complete; anything else (a `.tmp-*` folder left by a kill, a
folder without a manifest) is ignored by `latest_checkpoint` and swept away on the next save.

`state.pt` holds everything the remaining steps depend on:
- the model tensors that can differ from a freshly built model: every parameter that trains, the method's
  adapter state (`adapter_state_dict`, which includes its buffers), and any frozen tensor that was modified in
  place (a boosting method merging into the base weights), found by PyTorch's in-place version counter;
- which parameters have `requires_grad` (methods may switch them);
- optimizer, fp16 grad scaler, the trainer's step / epoch / batches consumed in that epoch / running loss,
  evaluation history (best, last), the method's and every hook's `state_dict()`;
- the RNG states of torch (CPU and CUDA), numpy and Python; with several processes (lorabench.distributed)
  every process's, gathered into the one checkpoint rank 0 writes (`rng_per_rank`).
The LR schedule is a pure function of the step and the batch order a pure function of (seed, epoch), so the
step and the number of batches consumed are all the position they need.

The manifest carries a fingerprint of the configuration keys that shape the result (model, task, method,
budget, trainer without the resume/checkpoint keys, seed): resuming under a different configuration is
refused with the keys that differ.

Checkpoints are the run's own files and are loaded with `torch.load(weights_only=False)` (they hold numpy and
Python RNG states and free-form hook state): resume only run directories you trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, TrainingError
from ..rundir import CHECKPOINTS_DIR, flatten

log = logging.getLogger("lorabench")

CHECKPOINT_DIR = CHECKPOINTS_DIR
MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Trainer keys that say how to checkpoint or display, not what is computed: they may change on resume.
NON_FINGERPRINT_TRAINER_KEYS = ("resume", "checkpoint_every", "keep_checkpoints", "progress_bar")


# --- configuration fingerprint -----------------------------------------------------------------------------------

def config_fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a run config a checkpoint is only valid for, in canonical JSON form."""
    trainer = {k: v for k, v in (cfg.get("trainer") or {}).items() if k not in NON_FINGERPRINT_TRAINER_KEYS}
    picked = {"model": cfg.get("model"), "task": cfg.get("task"), "method": cfg.get("method"),
              "budget": cfg.get("budget"), "trainer": trainer, "seed": cfg.get("seed")}
    return json.loads(json.dumps(picked, sort_keys=True, default=str))


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: checkpoint X, now Y` for every leaf that differs."""
    a, b = flatten(saved), flatten(current)
    return [f"{k}: checkpoint {a.get(k, '<unset>')!r}, now {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


# --- finding checkpoints -----------------------------------------------------------------------------------------

def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / MANIFEST).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {ckpt_dir} has an unreadable manifest ({e})") from None


def check_resumable(ckpt_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The manifest of `ckpt_dir` after checking it belongs to this configuration (ConfigError if not)."""
    manifest = read_manifest(ckpt_dir)
    if manifest.get("format") != FORMAT_VERSION:
        raise ConfigError(f"checkpoint {ckpt_dir} has format {manifest.get('format')!r}; this lorabench reads "
                          f"format {FORMAT_VERSION}")
    current = config_fingerprint(cfg)
    if manifest.get("fingerprint_hash") != fingerprint_hash(current):
        diff = fingerprint_diff(manifest.get("fingerprint") or {}, current)
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise ConfigError(f"cannot resume from {ckpt_dir}: it was written by a different configuration "
                          f"({shown}). Resume with the run's own settings, or start a new run.")
    for name, size in (manifest.get("files") or {}).items():
        f = Path(ckpt_dir) / name
        if not f.is_file() or f.stat().st_size != size:
            raise ConfigError(f"checkpoint {ckpt_dir} is damaged: {name} is missing or has the wrong size; "
                              f"delete that folder to resume from the one before")
    return manifest


# --- writing -------------------------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any],
                     fingerprint: dict[str, Any], extra_manifest: dict[str, Any] | None = None) -> Path:
    """Write `state` as checkpoint `step` of `run_dir` atomically; returns its folder."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state_path = tmp / STATE_FILE
        with state_path.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        manifest = {"format": FORMAT_VERSION, "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "fingerprint_hash": fingerprint_hash(fingerprint), "fingerprint": fingerprint,
                    "files": {STATE_FILE: state_path.stat().st_size}, **(extra_manifest or {})}
        with (tmp / MANIFEST).open("w") as f:  # the completion marker: written last
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a leftover of an earlier attempt at this step (os.replace cannot replace a full dir)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and leftovers of interrupted saves."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    complete = complete_checkpoints(run_dir)
    keep_dirs = {d for _, d in complete[-keep:]}
    for d in root.iterdir():
        if not d.is_dir() or d in keep_dirs:
            continue
        if d.name.startswith(".tmp-step-") and d.name.endswith(f"-{os.getpid()}"):
            continue  # our own save in progress (never the case between saves, but cheap to respect)
        if _STEP_DIR.match(d.name) or d.name.startswith(".tmp-step-"):
            shutil.rmtree(d, ignore_errors=True)


# --- RNG ------------------------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- model tensors --------------------------------------------------------------------------------------------------

def _tensor_versions(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in-place version counter, storage pointer) of every state tensor: what tells a modified tensor apart."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[name] = (t._version, t.data_ptr())
    return out


# --- the trainer-facing object --------------------------------------------------------------------------------------

@dataclass
class ResumePoint:
    """A checkpoint to continue from, found and validated before anything heavy is loaded."""

    run_dir: Path
    ckpt_dir: Path
    step: int


class Checkpointer:
    """Saves every `every` optimizer steps (Trainer.after_step) and restores a `ResumePoint` (Trainer.fit).

    `method` is the AdapterMethod (its adapter tensors and schedule state are saved); the trainer brings the
    model, optimizer, scaler, hooks, step counters and history.
    """

    def __init__(self, run_dir: str | os.PathLike, every: int, keep: int, fingerprint: dict[str, Any],
                 method, model: nn.Module, resume: ResumePoint | None = None, processes=None) -> None:
        from ..distributed import SINGLE

        # With several processes every one of them calls save() (their RNG states are gathered) and restore();
        # only rank 0 writes.
        self.processes = processes or SINGLE
        self.run_dir = Path(run_dir)
        self.every = int(every)
        self.keep = int(keep)
        self.fingerprint = fingerprint
        self.method = method
        self.model = model
        self.resume = resume
        self.last_saved: Path | None = None
        self._versions: dict[str, tuple[int, int]] | None = None

    # --- save -------------------------------------------------------------------------------------------------
    def after_step(self, trainer) -> None:
        if self._versions is None:
            self._versions = _tensor_versions(self.model)
        if self.every > 0 and trainer.state.step % self.every == 0:
            self.save(trainer)

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        versions = self._versions or {}
        out = {}
        named_params = dict(self.model.named_parameters())
        for name, t in self.model.state_dict(keep_vars=True).items():
            p = named_params.get(name)
            trains = p is not None and p.requires_grad
            if trains or versions.get(name) != (t._version, t.data_ptr()):
                out[name] = t.detach().cpu().clone()
        return out

    def save(self, trainer) -> Path | None:
        """Write the checkpoint of the trainer's current step; returns its folder (None in processes other than
        rank 0, which only contribute their RNG state)."""
        st = trainer.state
        model_tensors = self._model_tensors()
        bad = [n for n, t in model_tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise TrainingError(f"parameters became non-finite by optimizer step {st.step} ({bad[0]}"
                                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); not checkpointing "
                                f"this state. Lower trainer.lr or use trainer.precision=fp32.")
        rng_per_rank = self.processes.gather(rng_state())
        if not self.processes.is_main:
            return None
        state = {
            **trainer.loop_state(),  # step, where the data order continues, running loss, evaluation history
            "model": model_tensors,
            "adapter": self.method.adapter_state_dict(),
            "requires_grad": sorted(n for n, p in self.model.named_parameters() if p.requires_grad),
            "optimizer": trainer.optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict(),
            "method": self.method.state_dict(),
            "hooks": [{"type": type(h).__qualname__, "state": h.state_dict()} for h in trainer.hooks],
            "rng": rng_per_rank[0],
        }
        if self.processes.distributed:
            state["rng_per_rank"] = rng_per_rank
        path = write_checkpoint(self.run_dir, st.step, state, self.fingerprint,
                                {"epoch": st.epoch, "total_steps": trainer.total_steps,
                                 "processes": self.processes.world_size})
        prune_checkpoints(self.run_dir, self.keep)
        self.last_saved = path
        log.info("checkpoint step %d → %s", st.step, path)
        return path

    # --- restore ----------------------------------------------------------------------------------------------
    def restore(self, trainer) -> None:
        """Load the pending ResumePoint into the trainer (once); a no-op for a fresh run."""
        if self.resume is None:
            self._versions = _tensor_versions(self.model)
            return
        point, self.resume = self.resume, None
        state = torch.load(point.ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)
        if state["step"] > trainer.total_steps:
            raise ConfigError(f"checkpoint {point.ckpt_dir} is at step {state['step']}, beyond this run's "
                              f"{trainer.total_steps} steps")
        self._versions = _tensor_versions(self.model)  # before loading: what the load changes is saved later
        self.method.load_adapter_state_dict(state["adapter"])
        self._load_model_tensors(state["model"], state["requires_grad"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        saved_hooks = state["hooks"]
        types = [type(h).__qualname__ for h in trainer.hooks]
        if [h["type"] for h in saved_hooks] != types:
            raise ConfigError(f"checkpoint {point.ckpt_dir} was written with hooks "
                              f"{[h['type'] for h in saved_hooks]}, this run has {types}")
        for h, saved in zip(trainer.hooks, saved_hooks):
            h.load_state_dict(saved["state"])
        trainer.load_loop_state(state)
        set_rng_state(self._own_rng_state(state))  # last: nothing above may consume random numbers after it
        self.last_saved = point.ckpt_dir
        log.info("resumed from %s: step %d of %d (epoch %d, %d batches into it)", point.ckpt_dir, state["step"],
                 trainer.total_steps, state["resume_epoch"] + 1, state["resume_skip_batches"])

    def _own_rng_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This process's RNG state in the checkpoint. A process the checkpoint has none for (resumed with more
        processes than wrote it) continues from rank 0's, then forks its own torch stream from the step."""
        rank = self.processes.rank
        saved = state.get("rng_per_rank") or [state["rng"]]
        if rank < len(saved):
            return saved[rank]
        if self.processes.is_main or not self.processes.distributed:
            return state["rng"]
        own = dict(saved[0])
        own["torch"] = torch.Generator().manual_seed(int(state["step"]) * 1_000_003 + rank).get_state()
        log.warning("rank %d: the checkpoint has no RNG state of its own (written by %d processes); dropout masks "
                    "continue from a fresh stream", rank, len(saved))
        return own

    @torch.no_grad()
    def _load_model_tensors(self, tensors: dict[str, torch.Tensor], requires_grad: Iterable[str]) -> None:
        current = self.model.state_dict(keep_vars=True)
        unknown = sorted(set(tensors) - set(current))
        if unknown:
            raise ConfigError(f"checkpoint holds tensors this model does not have: {unknown[:3]}")
        for name, t in tensors.items():
            dst = current[name]
            if dst.shape != t.shape:
                raise ConfigError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, the model "
                                  f"{tuple(dst.shape)}")
            dst.copy_(t)
        trains = set(requires_grad)
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in trains)


# --- run-level helpers (used by run.py) -----------------------------------------------------------------------------

def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop lines logged after `max_step` (they are redone by the resumed run), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step")
        except ValueError:
            continue  # a line cut short by the kill
        if isinstance(step, (int, float)) and step <= max_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(f"{ln}\n" for ln in kept))
    os.replace(tmp, path)
