"""`+plan=true`: the jobs, their steps and an estimated time, before (and instead of) running them.

- a sweep with `+plan=true` prints every job with its optimizer steps and seconds, a total, and trains nothing
  (no run or sweep directory, no results); its calibrations are cached, one per configuration, not per job;
- the steps and evaluations a plan counts are the ones the trainer runs, and its estimate of a real run on the
  tiny model is within a loose factor (ESTIMATE_FACTOR) of the time that run took;
- a job estimated at over an hour is warned about.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from conftest import REPO, run_train

ESTIMATE_FACTOR = 3.0
TINY = ["model=tiny", "trainer=debug", "logger=none", "trainer.progress_bar=false"]


def test_sweep_plan_lists_every_job_and_trains_nothing(tmp_path, real_glue_dir):
    cache = tmp_path / "cache"
    p = run_train(["-m", "method=lora,dora_dynamic", "task=rte,mrpc", "seed=1,2", *TINY, "+plan=true"], cwd=tmp_path,
                  env={"GLUE_DIR": str(real_glue_dir), "LORABENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "plan: 8 jobs, nothing trained" in out
    rows = [ln for ln in out.splitlines() if re.match(r"^\s*\d+\s+method=", ln)]
    assert len(rows) == 8, out
    for row in rows:
        cells = row.split()
        assert int(cells[-1]) >= 0  # estimate (s)
        assert " 32 " in row  # 256 examples / batch 16 x 2 epochs
    assert re.search(r"total: 8 jobs, 256 optimizer steps, about \d+ s", out), out
    assert "over an hour" not in out
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob("results.json"))
    # one calibration per configuration (method x padded length), shared by the seeds
    calibrations = json.loads((cache / "calibration.json").read_text())
    assert len(calibrations) == 4, list(calibrations)
    assert all(v["seconds_per_step"] > 0 and v["seconds_per_eval_batch"] > 0 for v in calibrations.values())


def _compose(overrides: list[str], glue: Path) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=[*overrides, f"data.glue_dir={glue}"]),
                                      resolve=True)


def test_estimate_matches_a_real_run(tmp_path, real_glue_dir, monkeypatch):
    from lorabench.plan import plan_job
    from lorabench.run import run_job

    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    cfg = _compose(["method=lora", "task=mrpc", *TINY, "trainer.epochs=3", "trainer.max_steps=40", "trainer.eval_every=15"],
                   real_glue_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan = plan_job(cfg, name="lora mrpc")
        results = run_job(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    timings = results["timings"]
    assert plan.steps == timings["steps"] == 40
    assert plan.evaluations == len(results["history"]) == 3  # steps 15, 30 and the last
    assert plan.train_examples == results["n_train"]
    actual = timings["train_seconds"] + timings["eval_seconds"]
    estimated = plan.train_seconds + plan.eval_seconds
    assert 1 / ESTIMATE_FACTOR < estimated / actual < ESTIMATE_FACTOR, (estimated, actual)
    assert 1 / ESTIMATE_FACTOR < plan.estimate_seconds / timings["wall_seconds"] < ESTIMATE_FACTOR


def test_a_run_over_an_hour_is_warned_about():
    from lorabench.plan import JobPlan, format_plan

    def job(name: str, steps: int) -> JobPlan:
        return JobPlan(name=name, task="sst2", method="dora_dynamic", model="minilm", train_examples=67349,
                       batch_size=32, grad_accum=1, steps=steps, train_length=64, seconds_per_step=0.75,
                       evaluations=10, eval_examples=872, seconds_per_evaluation=6.0, setup_seconds=10.0,
                       device="cpu", calibrated_now=False)

    text = format_plan([job("method=dora_dynamic task=sst2 seed=1", 6315), job("method=lora task=rte seed=1", 234)])
    assert "total: 2 jobs, 6549 optimizer steps" in text
    assert "warning: 1 job will take over an hour each; the longest, #0 method=dora_dynamic task=sst2" in text
    assert "4806 s (1 h 20 min)" in text
