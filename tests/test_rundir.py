"""A run directory belongs to one run: default directories are claimed atomically (runs started in the same second
get <name>-2, ...), and a directory a live run holds is refused with one error line, its files untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from lorabench import rundir
from lorabench.errors import ConfigError

TINY = ["task=rte", "model=tiny", "trainer=debug", "logger=none", "trainer.max_train_samples=32",
        "trainer.max_eval_samples=16", "trainer.max_seq_length=32", "trainer.progress_bar=false", "seed=1"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextmanager
def held_by_another_process(run_dir: Path):
    """A live process holding the lock of `run_dir` (as a running job does) until the block ends."""
    code = ("import sys; from lorabench.rundir import hold; hold(sys.argv[1]); print('held', flush=True); "
            "sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        p.stdin.close()
        p.wait(timeout=30)


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_unique_dir_claims_atomically_across_processes(tmp_path):
    """Eight processes released at the same instant ask for the same name: each gets its own directory."""
    base = tmp_path / "runs" / "rte" / "lora" / "2020-01-01_00-00-00_s1"
    go = tmp_path / "go"
    code = ("import os, sys, time\nfrom lorabench.rundir import unique_dir\n"
            "while not os.path.exists(sys.argv[2]):\n    time.sleep(0.001)\n"
            "print(unique_dir(sys.argv[1]))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(base), str(go)], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    time.sleep(1.0)  # every process is waiting on the file by now
    go.write_text("")
    got = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(got) == sorted([str(base)] + [f"{base}-{n}" for n in range(2, 9)])
    # within one process the answer is stable (Hydra evaluates the directory more than once)
    again = rundir.unique_dir(str(tmp_path / "x"))
    assert rundir.unique_dir(str(tmp_path / "x")) == again == str(tmp_path / "x")
    assert rundir.unique_dir(str(base)) == f"{base}-9" and rundir.renamed_note(f"{base}-9")


def test_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    d = tmp_path / "run"
    code = "import sys, time; from lorabench.rundir import hold; hold(sys.argv[1]); print('held', flush=True); " \
           "time.sleep(600)"
    p = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=rf"run directory .*run is in use by a running job \(pid {p.pid} on "):
        rundir.hold(d)
    os.kill(p.pid, signal.SIGKILL)  # the kernel drops the lock of a killed run: its resume is not blocked
    p.wait(timeout=30)
    assert rundir.hold(d) is True
    assert rundir.hold(d) is False  # this process holds it already
    rundir.release(d)


def _compose(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


def test_run_job_refuses_a_directory_a_live_run_holds(tmp_path, real_glue_dir):
    from lorabench.run import run_job

    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 2, "eval/accuracy": 0.5}\n')
    cfg = _compose(TINY + [f"data.glue_dir={real_glue_dir}"])
    with held_by_another_process(d):
        before = snapshot(d)
        with pytest.raises(ConfigError, match="is in use by a running job"):
            run_job(cfg, d)
        assert snapshot(d) == before  # no results.json, logs not truncated
    # resuming a run that is still alive is refused the same way (trainer.resume=<dir>)
    from lorabench.training import checkpoint as ckpt

    ckpt.write_checkpoint(d, 2, {"step": 2}, ckpt.config_fingerprint(cfg))
    with held_by_another_process(d):
        before = snapshot(d)
        with pytest.raises(ConfigError, match="is in use by a running job"):
            run_job({**cfg, "trainer": {**cfg["trainer"], "resume": str(d)}}, tmp_path / "other")
        assert snapshot(d) == before


def test_explicit_run_dir_held_by_a_live_run_is_one_error_line(tmp_path, real_glue_dir):
    """`hydra.run.dir=<dir>` of a running job: exit 2 before Hydra writes .hydra/ or the log into that run."""
    d = tmp_path / "run"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("- trainer.lr=1e-3\n")
    (d / "metrics.jsonl").write_text('{"step": 2, "eval/accuracy": 0.5}\n')
    (d / "train.log").write_text("the live run's log\n")
    with held_by_another_process(d) as holder:
        before = snapshot(d)
        p = subprocess.run([sys.executable, "-m", "train", *TINY, f"data.glue_dir={real_glue_dir}",
                            f"hydra.run.dir={d}"], cwd=tmp_path, env={**os.environ, **ENV}, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2, p.stderr[-3000:]
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert lines == [lines[-1]] and lines[-1].startswith("error: run directory "), p.stderr[-3000:]
        assert f"pid {holder.pid}" in lines[-1] and "in use by a running job" in lines[-1]
        assert snapshot(d) == before


def test_two_runs_started_together_get_their_own_directories(tmp_path, real_glue_dir):
    """Two `python -m train` with the default run directory, same seed, different learning rates, started at once.
    The time-stamped names of the next minutes exist already, so both runs must take a `-N` sibling, and when they
    start in the same second they race for the same one."""
    runs = tmp_path / "runs"
    parent = runs / "rte" / "lora"
    now = datetime.now()
    for s in range(-2, 180):
        (parent / f"{(now + timedelta(seconds=s)):%Y-%m-%d_%H-%M-%S}_s1").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **ENV, "GLUE_DIR": str(real_glue_dir)}
    procs = {lr: subprocess.Popen([sys.executable, "-m", "train", *TINY, f"trainer.lr={lr}",
                                   f"paths.runs_dir={runs}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
             for lr in ("1e-3", "2e-3")}
    for lr, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    done = sorted(d for d in parent.iterdir() if (d / "results.json").exists())
    assert len(done) == 2 and all(d.name.rsplit("-", 1)[1].isdigit() for d in done), [d.name for d in done]
    lrs = set()
    for d in done:
        results = json.loads((d / "results.json").read_text())
        overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        lr = results["config"]["trainer"]["lr"]
        assert [float(o.split("=", 1)[1]) for o in overrides if o.startswith("trainer.lr=")] == [lr]
        lrs.add(lr)
        # metrics.jsonl holds this run's evaluations only, in order
        lines = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
        assert [(e["step"], e["eval/accuracy"]) for e in lines] == \
            [(h["step"], h["eval/accuracy"]) for h in results["history"]]
        assert (d / "train.log").read_text().count("done: best") == 1
    assert lrs == {1e-3, 2e-3}
