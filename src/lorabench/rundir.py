"""The run directory: its contract (the file names a run writes and readers rely on, atomic JSON, the failed
record, dotted config keys) and its ownership (one run per directory). Standard library only.

The contract (README "Outputs"): results.json (status ok / failed / interrupted, metrics, ledger, timings),
metrics.jsonl (one line per evaluation), train_log.jsonl (one line per log_every steps), adapter/ (the trained
adapter: lorabench's own form and, where the method has one, HF PEFT's), checkpoints/ (exact resume).

A run directory belongs to one run.

Two guarantees, for the two ways a directory is chosen:

- **The default, time-stamped directory** (hydra.run.dir and hydra.sweep.dir in conf/config.yaml) goes through
  the resolver `${lorabench.unique_dir:<path>}` (registered by src/train.py). It creates <path> with os.mkdir,
  which is atomic: of several processes that try the same name at the same moment, exactly one succeeds, and
  the others move on to <path>-2, <path>-3, ... . Checking "does it exist?" and then creating it would race
  (both processes see nothing and both use it); a lock taken inside the job would come too late, because Hydra
  has already written .hydra/ and opened the job's log in the directory by then. The claim is remembered per
  process, and by OmegaConf's resolver cache, which Hydra copies into each sweep job's config and which travels
  with the pickled config to launcher processes: evaluating the directory again gives the same one. When several
  processes train one job (torchrun), rank 0 creates the directory and the others take its path (each
  process's own `${now:}` may fall in another second): one run directory per job, not one per process.

- **A directory the user names** (hydra.run.dir=<dir>, trainer.resume=<dir>) may hold an earlier run to continue,
  so it cannot be made fresh. It is guarded by an exclusive lock: flock on <dir>/.lock, held by the job's
  process until the job ends or the process exits. The kernel drops the lock when the process dies, even by
  kill -9, so a dead run never blocks its resume. A second process that finds the lock held fails with one error
  line (ConfigError) before it touches the directory: the Hydra callback takes the lock in on_run_start, before
  Hydra writes .hydra/ there, and run_job takes it again (a no-op in the same process) for jobs started without
  the command line. The .lock file stays after the run: deleting it would let a process that opened the old file
  and one that creates a new file both "hold" the directory.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

from .errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
TRAIN_LOG_FILE = "train_log.jsonl"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
LOCK_NAME = ".lock"
# What a run directory holds before its job wrote anything: Hydra's config and log, and the lock.
FRESH_DIR_FILES = frozenset({".hydra", "train.log", LOCK_NAME})
RESOLVER = "lorabench.unique_dir"



def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one (rename is atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def failed_record(error: BaseException, **fields: Any) -> dict[str, Any]:
    """The fields results.json gets for a run that failed: status, the error in one line, its type and traceback
    (call it inside the `except` block), plus `fields` (stage, config, ...)."""
    return {**fields, "status": "failed", "error": f"{type(error).__name__}: {error}",
            "error_type": type(error).__name__, "traceback": traceback.format_exc()}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys ({"trainer": {"lr": 1}} → {"trainer.lr": 1}); empty dicts vanish."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_claimed: dict[str, str] = {}  # requested path → the directory this process created for it
_held: dict[str, int] = {}  # resolved run directory → descriptor of its locked .lock


def unique_dir(path: str) -> str:
    """`path` if this call creates it, else the first of `path-2`, `path-3`, ... that it creates; the same answer
    for the same `path` for the rest of the process.

    When the parent cannot be created the path is returned as it is: Hydra's own mkdir then fails on it and the
    entry words that as one error line (cli.py)."""
    path = str(path).rstrip("/") or "/"
    if path in _claimed:
        return _claimed[path]
    from .distributed import current

    processes = current()
    if processes.distributed:
        _claimed[path] = processes.main_decides(lambda: _claim(path))
        return _claimed[path]
    return _claim(path)


def _claim(path: str) -> str:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return path
    for n in itertools.count(1):
        candidate = path if n == 1 else f"{path}-{n}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        except OSError:
            return path
        _claimed[path] = candidate
        return candidate
    raise AssertionError("unreachable")


def renamed_note(run_dir: str | Path) -> str | None:
    """A log line when `run_dir` is a `-N` sibling because the time-stamped name was taken, else None."""
    for asked, got in _claimed.items():
        if got != asked and Path(got).resolve() == Path(run_dir).resolve():
            return f"run directory {asked} already exists (another run started in the same second?); this run " \
                   f"writes to {got}"
    return None


def hold(run_dir: str | Path) -> bool:
    """Take the exclusive lock of `run_dir` for this process.

    True when taken now (the caller releases it), False when this process holds it already or the file system
    cannot lock. Raises ConfigError when another live process holds it, and OSError when the directory cannot be
    created."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held or fcntl is None:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(os.path.join(key, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "owner unknown"
        os.close(fd)
        raise ConfigError(f"run directory {run_dir} is in use by a running job ({owner}); wait for it to end or "
                          f"stop it, or choose another directory (without hydra.run.dir each run gets a new "
                          f"time-stamped one)") from None
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            return False  # a file system without flock: run unguarded rather than not at all
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held[key] = fd
    return True


def release(run_dir: str | Path) -> None:
    """Drop this process's lock of `run_dir` (closing the descriptor releases the flock)."""
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)


# Config keys that say how a job is shown or where caches live, not what it computes: a re-run sweep may change
# them and still count an earlier job as the same job.
PRESENTATION_KEYS = ("group", "run_name", "logger", "trainer.progress_bar", "trainer.log_every", "data.cache_dir")


def _comparable(config: dict) -> dict:
    out = {k: v for k, v in (config or {}).items() if k not in PRESENTATION_KEYS}
    for key in PRESENTATION_KEYS:
        head, _, tail = key.partition(".")
        if tail and isinstance(out.get(head), dict):
            out[head] = {k: v for k, v in out[head].items() if k != tail}
    return out


def finished_ok(run_dir: str | Path, config: dict) -> dict | None:
    """The results of a job that already finished ok in `run_dir` with the same configuration (up to
    PRESENTATION_KEYS), else None. A sweep run again into its directory skips such jobs and re-runs the others
    (failed, interrupted, killed, or a changed configuration)."""
    import json

    try:
        results = json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if results.get("status") != "ok" or not isinstance(results.get("config"), dict):
        return None
    return results if _comparable(results["config"]) == _comparable(config) else None
