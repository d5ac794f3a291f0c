"""Error policy of the `python -m train` entry (Hydra-free, so it is testable as a plain function).

Single run: a user-fixable error prints one line (`error: ...`) and exits 2; a bug keeps its traceback.
Sweep job: every failure is recorded in that job's results.json and the sweep goes on (Hydra skips its
multirun-end callback when a job raises); the reporter lists failed jobs and the sweep exits non-zero.
Before a job starts, Hydra itself can fail (unknown group option, bad override, unwritable output directory):
`guard_hydra_main` words those as one `error: ...` line too (exit 2) instead of Hydra's report.

Several processes of one job (torchrun, submitit tasks; distributed.py) each run this entry: rank 0 alone
prints, logs below warnings are its alone, and every process ends with the same exit status.
`+plan=true` (plan.py) estimates the jobs instead of running them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from . import distributed, rundir
from .errors import ConfigError, LorabenchError, RunInterrupted
from .rundir import FRESH_DIR_FILES, finished_ok

log = logging.getLogger("lorabench")

# Jobs that failed in this process (a sweep with the basic launcher runs every job here).
FAILED_JOBS: list[str] = []
# `+plan=true`: the estimate of every job planned in this process (plan.JobPlan), printed at the end.
PLANNED_JOBS: list = []


# Set once Hydra hands over to a job: an OSError before that is Hydra failing on the output directory.
_JOB_STARTED = False


def run_configured_job(config: dict[str, Any] | Callable[[], dict[str, Any]], out_dir: str | Path,
                       in_sweep: bool = False, composed: dict[str, Any] | None = None,
                       sweep_grid: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Run one job under the error policy above.

    `config` is the resolved config, or a function that resolves it: resolving can fail for one job of a sweep
    only (an interpolation into a per-task table that lacks the job's task), and must then fail that job like
    any other error, recorded in its results.json together with `composed` (the config before resolution).
    `sweep_grid` is the composed `hydra.sweeper.params`: a single run with one (a preset's grid) is refused,
    since it would run one job and silently ignore the grid.
    """
    global _JOB_STARTED
    _JOB_STARTED = True
    from .run import run_job  # imported here: the entry guard below must stay light (no torch before Hydra)

    from .interrupt import StopSignals

    processes = distributed.init_from_env()  # torchrun did it in guard_hydra_main; submitit's tasks do it here
    quiet_other_processes(processes)
    _reset_device_memory_stats()
    signals = StopSignals()
    try:
        with signals.installed():
            if sweep_grid and not in_sweep:
                keys = ", ".join(f"{k}={v}" for k, v in sweep_grid.items())
                raise ConfigError(f"this configuration defines a sweep grid ({keys}, from an experiment preset); "
                                  f"run it with -m: python -m train -m {' '.join(sys.argv[1:])}".rstrip())
            if callable(config):
                config = _resolve_or_record(config, Path(out_dir), composed)
            if config.get("plan"):
                from .plan import plan_job

                PLANNED_JOBS.append(plan_job(config, name=_job_name(config, in_sweep)))
                if not in_sweep:
                    from .plan import print_plan

                    print_plan(PLANNED_JOBS)
                return None
            if in_sweep:
                previous = finished_ok(out_dir, config)
                if previous is not None:  # a sweep run again into its directory: only the missing jobs run
                    if processes.is_main:
                        log.info("already finished ok with this configuration in %s: skipped (delete its "
                                 "results.json to run it again)", out_dir)
                    return previous
            return run_job(config, out_dir, signals=signals, processes=processes)
    except RunInterrupted as e:
        if signals.hand_over(e.signum):  # submitit requeues the job (and exits); the requeued job resumes
            return None
        # also in a sweep: the user (or the scheduler) stopped the whole process, not one job
        if processes.is_main:
            print(interrupted_message(e, Path(out_dir), in_sweep), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if in_sweep:
            FAILED_JOBS.append(str(out_dir))
            if processes.is_main:
                log.error("job failed (%s: %s); recorded in %s/results.json, the sweep goes on",
                          type(e).__name__, e, out_dir)
            return None
        if isinstance(e, LorabenchError):
            if processes.is_main:
                remove_setup_failure(Path(out_dir))
                print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        if hydra_error_message(e) is not None and processes.is_main:  # guard_hydra_main words it
            remove_setup_failure(Path(out_dir))
        raise
    finally:
        _release_memory()


def _job_name(config: dict[str, Any], in_sweep: bool) -> str:
    """How a planned job is named in the plan: the command-line overrides that differ between jobs."""
    shown = [o for o in str(config.get("run_name") or "").split(",")
             if o and o.split("=", 1)[0].lstrip("+~") not in ("plan", "seed")]
    if not shown:
        shown = [f"task={config['task']['name']}", f"method={config['method']['name']}"]
    return " ".join(shown + [f"seed={config.get('seed')}"])


def quiet_other_processes(processes: distributed.Processes) -> None:
    """Processes other than rank 0 log only warnings and errors, to the console: the job's log file and the
    terminal get rank 0's lines once, not N times."""
    if processes.is_main:
        return
    for name in ("lorabench", "hydra"):
        logging.getLogger(name).setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


# What a run directory holds when its job failed before training: Hydra's files and the failed record.
_SETUP_ONLY = FRESH_DIR_FILES | {rundir.RESULTS_FILE}


def remove_setup_failure(run_dir: Path) -> None:
    """A single run refused in setup (bad value, missing data or model) leaves no directory behind: nothing in
    it is worth keeping, and `python -m report runs` would list it. Only a directory that holds nothing else
    and whose results.json says so is removed (never a resumed run's, never one with checkpoints or logs)."""
    import json
    import shutil

    try:
        names = {p.name for p in run_dir.iterdir()}
        results = run_dir / rundir.RESULTS_FILE
        # no results.json: refused before run_job started (only Hydra's files are there)
        record = json.loads(results.read_text()) if results.exists() else {"stage": "setup", "status": "failed"}
    except (OSError, ValueError):
        return
    if record.get("stage") == "setup" and record.get("status") == "failed" and names <= _SETUP_ONLY:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in (run_dir.parent, run_dir.parent.parent):  # runs/<task>/<method>/ made for this run alone
            try:
                parent.rmdir()  # only if empty
            except OSError:
                break


def interrupted_message(e: RunInterrupted, out_dir: Path, in_sweep: bool) -> str:
    """The one line an interrupted run ends with: where it stopped, where its results are, how to go on."""
    import json

    where = f"at step {e.step}/{e.total_steps}" if e.step is not None else "before training started"
    line = f"interrupted ({e.signal_name}) {where}; partial results in {out_dir}"
    try:
        checkpoint = json.loads((out_dir / rundir.RESULTS_FILE).read_text()).get("checkpoint")
    except (OSError, ValueError):
        checkpoint = None
    if in_sweep:
        return line + "; the sweep stopped (`python -m report <sweep dir>` reports the jobs that finished)"
    if checkpoint:
        args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "trainer.resume="))]
        processes = distributed.current()
        entry = (f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', processes.world_size)} -m train"
                 if processes.distributed else "python -m train")
        return line + f"; resume with: {entry} {' '.join(args + [f'trainer.resume={out_dir}'])}".rstrip()
    return line + ("; no checkpoint was saved (trainer.checkpoint_every=<steps> makes Ctrl-C resumable; "
                   "SIGTERM always saves one)" if e.step is not None else "")


def _resolve_or_record(resolve: Callable[[], dict[str, Any]], out_dir: Path,
                       composed: dict[str, Any] | None) -> dict[str, Any]:
    """resolve(); on failure, a results.json with status "failed" (as run_job writes one), then re-raise."""
    try:
        return resolve()
    except Exception as e:
        if not distributed.current().is_main:
            raise  # rank 0 records it
        record = rundir.failed_record(e, stage="setup", config=composed)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            rundir.write_json_atomic(out_dir / rundir.RESULTS_FILE, record)
        except OSError:  # an unwritable directory: the error itself still reaches the user
            pass
        raise


def _reset_device_memory_stats() -> None:
    """A sweep runs jobs in one process: each job's peak_memory_mb must be its own, not the sweep's so far."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _release_memory() -> None:
    """Free the finished job's model, optimizer and cached CUDA blocks before the next job of the sweep."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def hydra_error_message(e: BaseException) -> str | None:
    """One line for a failure of Hydra before the job (None: not such a failure, keep the traceback)."""
    from hydra.errors import (CompactHydraException, HydraException, MissingConfigException,
                              OverrideParseException)
    from omegaconf.errors import OmegaConfBaseException

    def first_lines(text: str, n: int = 2) -> str:
        lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
        return " ".join(lines[:n])

    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        from .validate import did_you_mean

        group, _, choice = str(e.missing_cfg_file).rpartition("/")
        hint = did_you_mean(choice, e.options)
        if group == "budget" and re.fullmatch(r"r\d+", choice):
            hint = f" (any rank: budget.rank={choice[1:]})"
        return (f"unknown {group or 'config'} {choice!r}{hint}; choose one of: {', '.join(e.options)} "
                f"(the files in conf/{group}/)")
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {first_lines(e.message, 1)} (see `python -m train --help`)"
    if isinstance(e, (CompactHydraException, HydraException)):
        cause = f" ({first_lines(e.__cause__, 1)})" if isinstance(e.__cause__, OmegaConfBaseException) else ""
        return first_lines(e) + cause
    if isinstance(e, OmegaConfBaseException):
        return f"invalid configuration: {first_lines(e, 2)}"
    if isinstance(e, OSError) and not isinstance(e, LorabenchError) and not _JOB_STARTED:
        where = e.filename or "the output directory"
        return (f"cannot create the run directory {where} ({e.strerror or e}); choose a writable one with "
                f"hydra.run.dir=<dir> (or paths.runs_dir=<dir>)")
    return None


def guard_hydra_main(hydra_main: Callable[[], Any]) -> Any:
    """Call a `@hydra.main` function so that Hydra's own failures end in one `error: ...` line (exit 2).

    Hydra prints such failures itself unless HYDRA_FULL_ERROR is set, then re-raises them; we set it for the
    call to word the message here. A user who sets HYDRA_FULL_ERROR gets Hydra's full tracebacks as usual.
    """
    global _JOB_STARTED
    _JOB_STARTED = False
    from .interrupt import StopSignals

    planning = _plan_requested(sys.argv)
    if distributed.launched_with_several_processes():
        if planning:
            print("error: +plan=true estimates one-process runs on this machine; run it without torchrun",
                  file=sys.stderr)
            sys.exit(2)
        # Join the process group before Hydra resolves the run directory: rank 0 creates it and the others get
        # its path (rundir.unique_dir); they write nothing of Hydra's (.hydra/) there.
        processes = distributed.init_from_env()
        if not processes.is_main:
            sys.argv.append("hydra.output_subdir=null")
            logging.getLogger("hydra").setLevel(logging.WARNING)
    scratch = _plan_overrides(sys.argv) if planning else None
    # Until a job installs its own, a signal stops the process at once, as one line (no traceback).
    try:
        with StopSignals().installed():
            try:
                return _call_hydra_main(hydra_main)
            except RunInterrupted as e:
                print(f"interrupted ({e.signal_name}) before the run started", file=sys.stderr)
                sys.exit(e.exit_code)
    finally:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)


_PLAN_ARG = re.compile(r"^(\+{0,2})plan=(.*)$")


def _plan_requested(argv: list[str]) -> bool:
    for arg in argv[1:]:
        m = _PLAN_ARG.match(arg)
        if m and m.group(2).strip().lower() not in ("false", "0", "no", "null", ""):
            return True
    return False


def _plan_overrides(argv: list[str]) -> str:
    """Rewrite the command line of a `+plan=true` run in place so that it trains nothing and leaves nothing:
    Hydra's run and sweep directories go to a scratch folder (returned; removed at the end), and the jobs run
    in this process with the basic launcher (a SLURM launcher would submit them). `plan=true` is accepted for
    `+plan=true`."""
    import tempfile

    scratch = tempfile.mkdtemp(prefix="lorabench-plan-")
    kept = []
    for arg in argv[1:]:
        if arg.startswith(("hydra/launcher=", "hydra.launcher.", "hydra.run.dir=", "hydra.sweep.dir=")):
            continue
        m = _PLAN_ARG.match(arg)
        kept.append(f"+plan={m.group(2)}" if m else arg)
    argv[1:] = kept + ["hydra/launcher=basic", f"hydra.run.dir={scratch}/run", f"hydra.sweep.dir={scratch}/sweep",
                       "hydra.output_subdir=null"]
    return scratch


def _call_hydra_main(hydra_main: Callable[[], Any]) -> Any:
    if os.environ.get("HYDRA_FULL_ERROR"):
        return hydra_main()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return hydra_main()
    except Exception as e:
        message = hydra_error_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
