"""Ctrl-C and SIGTERM end a `python -m train` run cleanly: one line, exit 130 / 143, results.json with status
"interrupted" and the evaluations so far; SIGTERM leaves a checkpoint from which the run ends exactly as an
uninterrupted one (CPU, fp32, one thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, require

# 96 RTE examples, batch 8: 12 steps an epoch; 40 epochs = 480 steps, long enough to be caught mid-run
COMMON = ["task=rte", "model=tiny", "budget=r4", "logger=none", "trainer.max_train_samples=96",
          "trainer.max_eval_samples=16", "trainer.max_seq_length=32", "trainer.batch_size=8", "trainer.epochs=40",
          "trainer.progress_bar=false", "trainer.log_every=1", "seed=3"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(args: list[str], run_dir: Path, glue: Path) -> subprocess.Popen:
    env = {**os.environ, **ENV, "GLUE_DIR": str(glue)}
    return subprocess.Popen([sys.executable, "-m", "train", *COMMON, *args, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_when_training(p: subprocess.Popen, run_dir: Path, sig: int, count: int = 1,
                          after_steps: int = 3) -> tuple[int, str]:
    """Send `sig` once train_log.jsonl shows a few steps; returns (exit status, stderr); stdout (Hydra's log)
    is kept in p.log."""
    log = run_dir / "train_log.jsonl"
    t0 = time.monotonic()
    while not (log.exists() and len(log.read_text().splitlines()) >= after_steps):
        if p.poll() is not None:
            raise AssertionError(f"run ended before it was signalled:\n{p.stderr.read()[-3000:]}")
        assert time.monotonic() - t0 < 120, "training never started"
        time.sleep(0.01)
    for _ in range(count):
        os.kill(p.pid, sig)
    p.log, err = p.communicate(timeout=120)
    return p.returncode, err


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_a_stop_passes_through_code_that_catches_exception():
    """The handler raises RunInterrupted wherever the main thread is; loading code that falls back on `except
    Exception` (a corrupt cache entry, an optional import) must not swallow it. Seen once under load: a SIGTERM
    while data loaded ended the run with status 0 instead of 143."""
    from lorabench.errors import RunInterrupted
    from lorabench.interrupt import StopSignals

    signals = StopSignals()
    with pytest.raises(RunInterrupted) as stopped, signals.installed():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode boundary
        except Exception:  # what a fallback in loading code does
            pass
    assert stopped.value.exit_code == 143 and signals.requested == signal.SIGTERM


def test_ctrl_c_ends_with_one_line_and_partial_results(tmp_path, real_glue_dir):
    run_dir = tmp_path / "run"
    p = _start([], run_dir, real_glue_dir)
    rc, err = _signal_when_training(p, run_dir, signal.SIGINT, after_steps=8)
    assert rc == 130, err[-3000:]
    # the run said where it writes and what it will do
    assert f"run directory: {run_dir}" in p.log and "training 480 steps" in p.log
    assert "s/step over the first 5 steps: about" in p.log and "next evaluation at step 12" in p.log
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGINT) at step ") and str(run_dir) in last, last
    assert "no checkpoint was saved" in last  # checkpointing is off: Ctrl-C saves none
    r = _results(run_dir)
    assert r["status"] == "interrupted" and r["signal"] == "SIGINT"
    assert 1 <= r["step"] < r["total_steps"] == 480
    assert r["checkpoint"] is None and not (run_dir / "checkpoints").exists()
    assert isinstance(r["history"], list)


def test_second_ctrl_c_stops_at_once(tmp_path, real_glue_dir):
    run_dir = tmp_path / "run"
    rc, err = _signal_when_training(_start([], run_dir, real_glue_dir), run_dir, signal.SIGINT, count=2)
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    assert _results(run_dir)["status"] == "interrupted"


@pytest.mark.parametrize("checkpoint_every", [0, 1000])
def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, real_glue_dir,
                                                                            checkpoint_every):
    """checkpoint_every=0: SIGTERM saves the state it stops at anyway; 1000: no periodic save came before the
    signal either. Both resume to the uninterrupted run's metrics and adapter, bit for bit."""
    args = ["trainer.epochs=3", "trainer.log_every=1", f"trainer.checkpoint_every={checkpoint_every}"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _start(args, ref_dir, real_glue_dir)
    rc, err = _signal_when_training(_start(args, run_dir, real_glue_dir), run_dir, signal.SIGTERM)
    assert rc == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGTERM) at step ") and "resume with: python -m train" in last, last
    interrupted = _results(run_dir)
    assert interrupted["status"] == "interrupted" and interrupted["checkpoint"]
    assert interrupted["step"] < 36
    assert Path(interrupted["checkpoint"]).name == f"step-{interrupted['step']:07d}"

    resumed = _start([*args, "trainer.resume=true"], run_dir, real_glue_dir)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    a, b = _results(ref_dir), _results(run_dir)
    assert b["status"] == "ok" and b["resumed_from"]["step"] == interrupted["step"]
    for key in ("best", "last", "history"):
        assert a[key] == b[key], key
    from safetensors.torch import load_file

    ta = load_file(str(ref_dir / "adapter" / "lorabench_adapter.safetensors"))
    tb = load_file(str(run_dir / "adapter" / "lorabench_adapter.safetensors"))
    assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def test_sigterm_before_training_is_recorded(tmp_path, real_glue_dir):
    """A signal while data and model load stops at once, as interrupted (not failed), exit 143."""
    run_dir = tmp_path / "run"
    p = _start([], run_dir, real_glue_dir)
    t0 = time.monotonic()
    while not (run_dir / ".hydra").exists():  # the job has started; training has not (no train_log yet)
        assert p.poll() is None and time.monotonic() - t0 < 60
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    if (run_dir / "results.json").exists():  # the signal may land before run_job has a directory to write to
        r = _results(run_dir)
        assert r["status"] == "interrupted" and r["signal"] == "SIGTERM"


def _submitit_task_pids(folder: Path) -> list[int]:
    """The submitit task processes (`python -m submitit.core._submit <folder>/...`) of a sweep."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmd and str(folder) in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's process through /proc")
def test_submitit_job_preempted_is_requeued_and_resumes(tmp_path, real_glue_dir):
    """submitit's preemption signal (USR2, what SLURM sends before a preemption or the time limit), sent to a
    running job of `hydra/launcher=submitit_local`: the job checkpoints at the signal, submitit requeues it, and
    the requeued job resumes and ends exactly as an uninterrupted run."""
    require("hydra_plugins.hydra_submitit_launcher")
    args = ["trainer.epochs=3"]
    sweep = tmp_path / "sweep"
    env = {**os.environ, **ENV, "GLUE_DIR": str(real_glue_dir)}
    p = subprocess.Popen([sys.executable, "-m", "train", "-m", "hydra/launcher=submitit_local", *COMMON, *args,
                          "hydra.callbacks.sweep_report.plots=false", f"hydra.sweep.dir={sweep}"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not any(len(f.read_text().splitlines()) >= 3 for f in sweep.glob("*/train_log.jsonl")):
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 300, "the job never started training"
        time.sleep(0.01)
    pids = _submitit_task_pids(sweep / ".submitit")
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:] + out[-3000:]
    (job,) = [d for d in sweep.iterdir() if d.is_dir() and d.name[0].isdigit()]
    r = _results(job)
    assert r["status"] == "ok", r.get("error")
    logs = "".join(f.read_text() for f in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs and "requeued job: continuing the interrupted run" in logs, logs[-3000:]
    assert 1 <= r["resumed_from"]["step"] < 36

    ref_dir = tmp_path / "ref"
    ref = _start([*args], ref_dir, real_glue_dir)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    ref_r = _results(ref_dir)
    for key in ("best", "last", "history"):
        assert ref_r[key] == r[key], key


def test_same_command_with_resume_true_continues_the_killed_default_directory(tmp_path, real_glue_dir):
    """`python -m train ...` with the default time-stamped directory, killed by SIGTERM; the same command plus
    trainer.resume=true continues that run (the newest resumable run of this configuration beside its own fresh
    directory, which it removes)."""
    args = ["trainer.epochs=3", f"paths.runs_dir={tmp_path / 'runs'}"]
    env = {**os.environ, **ENV, "GLUE_DIR": str(real_glue_dir)}
    p = subprocess.Popen([sys.executable, "-m", "train", *COMMON, *args], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = tmp_path / "runs" / "rte" / "lora"
    t0 = time.monotonic()
    while not list(parent.glob("*/train_log.jsonl")):
        assert p.poll() is None and time.monotonic() - t0 < 120
        time.sleep(0.01)
    (run_dir,) = parent.iterdir()
    rc, err = _signal_when_training(p, run_dir, signal.SIGTERM)
    assert rc == 143, err[-3000:]
    time.sleep(1.1)  # the resumed command's own time-stamped directory is another one
    q = subprocess.run([sys.executable, "-m", "train", *COMMON, *args, "trainer.resume=true"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    assert [d.name for d in parent.iterdir()] == [run_dir.name]
    r = _results(run_dir)
    assert r["status"] == "ok" and 1 <= r["resumed_from"]["step"] < 36 and r["timings"]["steps"] == 36
