"""The Hydra callback of `python -m train -m ...` (registered in conf/config.yaml under hydra.callbacks).

- on_run_start (RunDirLockCallback): a single run locks its run directory before Hydra writes to it.
- on_job_start: under a parallel launcher (joblib, submitit), caps torch's intra-op threads per job so that
  jobs running side by side do not oversubscribe the cores (n_jobs jobs × all cores each).
- on_multirun_end: runs the reporter (lorabench.report) on the sweep directory, then exits non-zero when any
  job failed: recorded in this process (lorabench.cli.FAILED_JOBS, the basic launcher) or found in the sweep
  directory (a failed or missing results.json: the only trace of a job that ran in another process). A sweep
  with `+plan=true` trained nothing: it prints the plan of its jobs instead (lorabench.plan).

With several processes per job (torchrun; lorabench.distributed) only rank 0 locks and reports.

Hydra calls on_multirun_end only when no job raised; lorabench.cli records failures instead of raising in
sweeps, so the report is written even when jobs fail. Besides src/train.py, this is the only module that
imports Hydra.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("lorabench")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_for_launcher(launcher: dict[str, Any], cpus: int) -> int | None:
    """torch threads per job under this launcher config; None leaves torch's default (the basic launcher)."""
    target = str(launcher.get("_target_", ""))
    if "joblib" in target.lower():
        n_jobs = int(launcher.get("n_jobs") or 1)
        if n_jobs < 0:  # joblib: -1 = all CPUs, -2 = all but one, ...
            n_jobs = max(1, cpus + 1 + n_jobs)
        return max(1, cpus // n_jobs)
    if "submitit" in target.lower():
        if launcher.get("cpus_per_task"):
            return int(launcher["cpus_per_task"])
        # submitit's local executor starts every job at once; a SLURM job owns its allocation
        return 1 if "LocalLauncher" in target else None
    return None


def count_sweep_jobs(command_line: list[str], grid: dict[str, Any]) -> int | None:
    """How many jobs the basic sweeper makes of these overrides: the product of each swept key's values, the
    command line winning over the preset's `hydra.sweeper.params` for the same key. None when not countable."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parser = OverridesParser.create()
        counts: dict[str, int] = {}
        for source in ([f"{k}={v}" for k, v in grid.items()], command_line):
            for o in parser.parse_overrides(source):
                counts[o.get_key_element()] = len(list(o.sweep_iterator())) if o.is_sweep_override() else 1
    except Exception:  # a sweep syntax we do not count (ranges of floats, choice(...) forms): no total shown
        return None
    return math.prod(counts.values())


def skipped_jobs(ok_jobs: list, started_at: float | None) -> int:
    """Ok jobs whose results.json predates the sweep's start: a re-run sweep skipped them (cli.run_configured_job)."""
    if started_at is None:
        return 0
    return sum(1 for j in ok_jobs if j.finished_at() < started_at)


def print_main_table(report_md: Path) -> None:
    """The report's first table (best epoch) in the terminal, so a sweep ends with its result."""
    try:
        lines = report_md.read_text().splitlines()
    except OSError:
        return
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    if start is None:
        return
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    title = next((ln for ln in reversed(lines[:start]) if ln.startswith("#")), "")
    print("\n".join([title, *lines[start:end], f"(full report: {report_md})"]).strip(), flush=True)


class RunDirLockCallback(Callback):
    """A single run takes the lock of its run directory (lorabench.rundir) before Hydra writes .hydra/ and the log
    there; a directory that a live run holds stops this run with one error line and exit status 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from .distributed import current
        from .errors import LorabenchError
        from .rundir import hold

        run_dir = str(config.hydra.run.dir)  # resolved in every process: rank 0 creates it, the others learn it
        if not current().is_main:
            return
        try:
            hold(run_dir)  # held until this process exits
        except OSError:
            pass  # a directory that cannot be created: Hydra's own mkdir reports it next (cli.py words it)
        except LorabenchError as e:
            # Hydra turns a callback's exception into a warning and goes on; SystemExit passes its guard.
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)


class SweepReportCallback(Callback):
    """Thread caps per job; the report and a non-zero exit status at the end of a sweep."""

    def __init__(self, report: bool = True, plots: bool = True, fail_exit_code: int = 1,
                 threads_per_job: int | None = None, select_lr: bool = False) -> None:
        self.report = report
        self.select_lr = select_lr  # a tuning sweep (experiment=tune_lr): write <sweep dir>/selected/ at the end
        self.plots = plots
        self.fail_exit_code = fail_exit_code
        self.threads_per_job = threads_per_job

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.total_jobs = count_sweep_jobs(list(config.hydra.overrides.task),
                                           dict(config.hydra.sweeper.get("params") or {}))
        self.started_at = time.time()  # jobs whose results.json is older were finished before: skipped

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        total = getattr(self, "total_jobs", None)  # None in a launcher's worker process (another copy of us)
        if config.hydra.mode is not None and str(config.hydra.mode).endswith("MULTIRUN"):
            num = int(config.hydra.job.num) + 1
            log.info("job %d%s: %s", num, f"/{total}" if total else "", " ".join(config.hydra.overrides.task))
        launcher = OmegaConf.to_container(config.hydra.launcher, resolve=True) if "launcher" in config.hydra else {}
        threads = self.threads_per_job or threads_for_launcher(launcher or {}, _cpu_count())
        if threads:
            import torch

            torch.set_num_threads(int(threads))
            log.info("torch threads for this job: %d (parallel launcher)", int(threads))
            # Tokenizers fork their own pool per process otherwise; jobs are the parallelism here.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    @staticmethod
    def _write_lr_selection(sweep_dir: Path) -> None:
        from .report import select_learning_rates

        select_learning_rates(sweep_dir)
        selected = sweep_dir / "selected"
        log.info("selected learning rates: %s; run the final sweep with hydra.searchpath=[file://%s]",
                 selected / "selected_lr.md", selected.resolve())
        print((selected / "selected_lr.md").read_text())

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from . import cli
        from .distributed import current

        if config.get("plan"):
            from .plan import print_plan

            print_plan(cli.PLANNED_JOBS, failed=len(cli.FAILED_JOBS))
            return
        if not current().is_main:
            return  # rank 0 reports; the others' jobs are its jobs
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = [Path(d).resolve() for d in cli.FAILED_JOBS]
        report_ok = True
        if self.report and sweep_dir.is_dir():
            try:
                from .report import build_report

                rep = build_report(sweep_dir, sweep_dir, plots=self.plots)
                failed += [j.dir.resolve() for j in rep.not_ok]
                log.info("sweep report: %s (%s)", sweep_dir / "report.md", rep.counts())
                skipped = skipped_jobs(rep.ok, getattr(self, "started_at", None))
                if skipped:
                    log.info("%d of %d finished jobs were already ok in %s before this sweep started and were "
                             "skipped; %d ran now", skipped, len(rep.ok), sweep_dir, len(rep.jobs) - skipped)
                if self.select_lr:
                    self._write_lr_selection(sweep_dir)
            except Exception:  # the sweep's results are on disk; `python -m report` can be rerun by hand
                report_ok = False
                log.exception("the sweep report failed; run `python -m report %s` to retry", sweep_dir)
            else:
                print_main_table(sweep_dir / "report.md")
        failed = sorted({str(d) for d in failed})
        if failed:
            log.error("%d job(s) failed:\n  %s", len(failed), "\n  ".join(failed))
        if failed or not report_ok:
            # SystemExit is not an Exception: it passes Hydra's callback guard and sets the exit status.
            sys.exit(self.fail_exit_code)
