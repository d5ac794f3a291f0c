"""A resumable queue of `python -m train` jobs, N at a time with one torch thread each (bench/ablation.py,
bench/glue_minilm.py).

A job is a run directory plus its overrides. One whose results.json says "ok" is skipped, so a killed queue is
finished by running it again; a killed attempt's directory is removed first (train.py refuses a used one).
SIGUSR1, or the deadline, drains the queue: nothing new starts, and the running jobs finish.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Job:
    name: str              # for the log: "<arm> <task> s<seed>"
    run_dir: Path
    overrides: tuple[str, ...]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "train", *self.overrides, f"hydra.run.dir={self.run_dir}"]


def finished_ok(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def job_env() -> dict[str, str]:
    """One torch thread per job; the checkout's src/ first on the path, whatever PYTHONPATH already holds kept."""
    path = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": path}


def run_queue(queue: list[Job], jobs: int, deadline_s: float | None = None) -> tuple[int, int]:
    """Runs the queue; returns (ok, failed). Jobs not started (drained) count as neither."""
    env = job_env()
    running: dict[subprocess.Popen, tuple[Job, float]] = {}
    ok = failed = 0
    draining = False
    t_start = time.time()

    def drain(*_):
        nonlocal draining
        if not draining:
            print("draining: no new jobs", flush=True)
        draining = True

    signal.signal(signal.SIGUSR1, drain)
    pending = [j for j in queue if not finished_ok(j.run_dir)]
    print(f"{len(pending)} jobs to run ({len(queue) - len(pending)} already done)", flush=True)
    while pending or running:
        if deadline_s is not None and time.time() - t_start > deadline_s:
            drain()
        while pending and len(running) < jobs and not draining:
            job = pending.pop(0)
            if job.run_dir.exists():
                shutil.rmtree(job.run_dir)
            job.run_dir.parent.mkdir(parents=True, exist_ok=True)
            with open(job.run_dir.parent / f"{job.run_dir.name}.log", "w") as log:  # the child keeps its handle
                proc = subprocess.Popen(job.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[proc] = (job, time.time())
            print(f"start {job.name} ({len(pending)} queued)", flush=True)
        if draining:
            pending.clear()
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            job, t0 = running.pop(proc)
            good = proc.returncode == 0 and finished_ok(job.run_dir)
            ok += good
            failed += not good
            print(f"{'done' if good else 'FAILED'} {job.name} in {time.time() - t0:.0f} s", flush=True)
    return ok, failed


def report(jobs_dir: Path, out_dir: Path, *extra: str) -> int:
    """`python -m report` on a folder of jobs, with paths relative to the checkout where they can be (a committed
    report should not name this machine)."""
    rel = lambda p: os.path.relpath(p, REPO) if Path(p).resolve().is_relative_to(REPO) else str(p)  # noqa: E731
    return subprocess.run([sys.executable, "-m", "report", rel(jobs_dir), "--out", rel(out_dir), *extra], cwd=REPO,
                          env=job_env(), check=False).returncode
