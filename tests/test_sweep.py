"""Sweeps as a user runs them: real `python -m train -m ...` subprocesses on the real GLUE files, the report the
Hydra callback writes at the end, failures inside a sweep, `python -m report`, the launchers and the presets.

Expected table cells are recomputed here from the jobs' results.json files (mean ± sample std ×100), not taken
from the reporter.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, require, run_train, table_rows

# 2 optimizer steps per job (32 examples, batch 16): dora_dynamic's schedule then has a warm-up/prune step and
# a final step. log_every=1 so that train_log.jsonl holds the loss of every step.
SMALL = ["model=tiny", "trainer=debug", "trainer.max_train_samples=32", "trainer.max_eval_samples=16",
         "trainer.epochs=1", "trainer.max_seq_length=32", "trainer.log_every=1", "trainer.progress_bar=false",
         "logger=none"]
METHODS, TASKS, SEEDS = ("lora", "dora_dynamic"), ("rte", "wnli"), (1, 2)
GRID = ["method=lora,dora_dynamic", "task=rte,wnli", "seed=1,2"]
# Hydra's basic sweeper enumerates the product in command-line order; job dirs are <num>_<task>_<method>_s<seed>
JOB_NAMES = [f"{i}_{t}_{m}_s{s}" for i, (m, t, s) in enumerate(itertools.product(METHODS, TASKS, SEEDS))]
# One job of the grid gets an invalid learning rate (trainer.lr must be > 0): a per-job table looked up with
# the job's own method and seed, as the paper presets look up their per-task rows. Quoted: the value has a comma.
FAIL_ONE = ["trainer.lr='${oc.select:lr_override.${task.name}_${method.name}_s${seed},5e-4}'",
            "+lr_override={wnli_dora_dynamic_s2: -1.0}"]
TIME_DIR = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d")


def results(job_dir: Path) -> dict:
    return json.loads((job_dir / "results.json").read_text())


def expected_cell(values: list[float]) -> str:
    m = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{m:.2f} (n=1)"
    return f"{m:.2f} ± {100 * statistics.stdev(values):.2f} (n={len(values)})"


def metric_values(sweep: Path, selection: str = "best") -> dict[tuple[str, str], dict[int, float]]:
    """(method, task) → {seed: accuracy} over the ok jobs of a sweep directory."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for d in sweep.iterdir():
        try:
            r = results(d)
        except (OSError, ValueError):  # no results.json, or a half-written one
            continue
        if r["status"] == "ok":
            out.setdefault((r["method"], r["task"]), {})[r["seed"]] = r[selection]["eval/accuracy"]
    return out


@pytest.fixture(scope="module")
def glue_env(real_glue_dir) -> dict[str, str]:
    return {"GLUE_DIR": str(real_glue_dir)}


@pytest.fixture(scope="module")
def ok_sweep(tmp_path_factory, glue_env):
    """The acceptance sweep (8 jobs) with the default sweep directory, under a temporary working directory."""
    cwd = tmp_path_factory.mktemp("ok_sweep")
    p = run_train(["-m", *GRID, *SMALL], cwd=cwd, env=glue_env)
    assert p.returncode == 0, p.stderr[-4000:] + p.stdout[-4000:]
    (sweep,) = (cwd / "runs" / "multirun").iterdir()
    return sweep, p


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory, glue_env):
    """The acceptance sweep on one task (4 jobs; failures are handled per job, and a process fewer job startups
    keeps this file fast) with its last job (wnli, dora_dynamic, seed 2) given an invalid learning rate."""
    sweep = tmp_path_factory.mktemp("failing_sweep") / "sweep"
    p = run_train(["-m", "method=lora,dora_dynamic", "task=wnli", "seed=1,2", *SMALL, *FAIL_ONE,
                   f"hydra.sweep.dir={sweep}"], cwd=sweep.parent, env=glue_env)
    return sweep, p


# --- 1. the acceptance sweep ----------------------------------------------------------------------------------

def test_sweep_job_dirs_and_report(ok_sweep):
    sweep, p = ok_sweep
    # the sweep says where it is, and ends with its table in the terminal
    log = p.stdout + p.stderr
    assert all(f"job {k}/8: " in log for k in range(1, 9)), log[-3000:]
    assert "| lora |" in p.stdout and f"{sweep.name}/report.md)" in p.stdout.split("(full report: ")[-1]
    assert TIME_DIR.fullmatch(sweep.name), sweep.name  # runs/multirun/<time>/
    jobs = sorted((d.name for d in sweep.iterdir() if d.is_dir() and d.name != "plots"),
                  key=lambda n: int(n.split("_")[0]))
    assert jobs == JOB_NAMES
    for name in jobs:
        r = results(sweep / name)
        assert r["status"] == "ok" and f"{r['task']}_{r['method']}_s{r['seed']}" == name.split("_", 1)[1]
        assert r["config"]["group"] == sweep.name  # dashboards group a sweep's runs by its directory name

    md = (sweep / "report.md").read_text()
    assert "8 job(s): 8 ok, 0 failed" in md
    for selection, title in (("best", "Best epoch"), ("last", "Last epoch")):
        values = metric_values(sweep, selection)
        rows = table_rows(md, title)
        assert rows[0] == ["method", "stored params", "RTE (acc)", "WNLI (acc)", "GLUE avg"]
        body = rows[2:]
        assert [r[0] for r in body] == ["lora", "dora_dynamic"]
        for row, method in zip(body, METHODS):
            assert row[2] == expected_cell([values[method, "rte"][s] for s in SEEDS])
            assert row[3] == expected_cell([values[method, "wnli"][s] for s in SEEDS])
            # GLUE average: its mean over tasks, its std over the per-seed averages
            per_seed = [statistics.mean(values[method, t][s] for t in TASKS) for s in SEEDS]
            assert row[4] == expected_cell(per_seed)
            assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d \(n=2\)", row[2])
    # lora r8 on the tiny BERT (hidden 32, FFN 64, 2 layers): 2 × (4 × 8·(32+32) + 2 × 8·(32+64)) = 7168 stored
    assert results(sweep / JOB_NAMES[0])["ledger"]["adapter_stored"] == 7168
    assert table_rows(md, "Best epoch")[2][1] == "7.2K"

    with (sweep / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    lora_best = next(r for r in rows if r["selection"] == "best" and r["method"] == "lora")
    assert lora_best["rte/accuracy/n"] == "2" and lora_best["glue_avg/n_seeds"] == "2"
    assert float(lora_best["rte/accuracy/mean"]) == pytest.approx(
        statistics.mean(metric_values(sweep)["lora", "rte"].values()), abs=1e-6)
    tex = (sweep / "report.tex").read_text()
    assert tex.count("\\begin{tabular}") == 2 and "\\pm" in tex and "(n=2)" in tex


def test_sweep_plots_are_pngs_and_heatmap_matches_results(ok_sweep):
    import matplotlib.image

    from lorabench import report

    sweep, _ = ok_sweep
    names = sorted(p.name for p in (sweep / "plots").glob("*.png"))
    assert names == ["budget_rte.png", "budget_wnli.png", "eval_rte.png", "eval_wnli.png", "pareto.png",
                     "ranks_dora_dynamic_rte.png", "ranks_dora_dynamic_wnli.png"]
    for name in names:
        img = matplotlib.image.imread(sweep / "plots" / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 100
    # the heatmap's cells: the mean over seeds of each (layer, matrix) rank of the real module names
    patterns = [results(sweep / n)["rank_pattern"] for n in JOB_NAMES if "_rte_dora_dynamic_" in n]
    mat, layers, types = report.rank_matrix(patterns)
    assert layers == [0, 1] and types == ["query", "key", "value", "attn_out", "ffn_in", "ffn_out"]
    suffix = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
              "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}
    for i, layer in enumerate(layers):
        for k, kind in enumerate(types):
            name = f"bert.encoder.layer.{layer}.{suffix[kind]}"
            assert mat[i, k] == statistics.mean(p[name] for p in patterns)


# --- 5. jobs in one process do not leak state -----------------------------------------------------------------

def test_sweep_job_equals_the_same_config_run_alone(ok_sweep, tmp_path, glue_env, monkeypatch):
    """Job 5 ran after five other jobs in the sweep's process; run alone (here, from the same composed config)
    it must give the same losses, metrics and final ranks: seeds, RNG state, caches and method state are per job."""
    from omegaconf import OmegaConf

    from lorabench.run import run_job

    sweep, _ = ok_sweep
    in_sweep = sweep / "5_rte_dora_dynamic_s2"
    monkeypatch.setenv("GLUE_DIR", glue_env["GLUE_DIR"])
    alone = tmp_path / "alone"
    b = run_job(OmegaConf.to_container(compose(["method=dora_dynamic", "task=rte", "seed=2", *SMALL]), resolve=True),
                alone)
    a = results(in_sweep)
    assert a["config"]["trainer"] == b["config"]["trainer"] and a["config"]["method"] == b["config"]["method"]
    assert a["history"] == b["history"] and a["best"] == b["best"]
    assert a["rank_pattern"] == b["rank_pattern"] and a["ledger"]["rows"] == b["ledger"]["rows"]

    def losses(d: Path) -> list[float]:
        return [json.loads(ln)["train/loss"] for ln in (d / "train_log.jsonl").read_text().splitlines()]

    assert len(losses(in_sweep)) == 2 and losses(in_sweep) == losses(alone)


# --- 2. a failing job -----------------------------------------------------------------------------------------

def test_failing_job_is_recorded_and_the_sweep_reports_and_exits_nonzero(failing_sweep):
    sweep, p = failing_sweep
    assert p.returncode == 1, p.stderr[-3000:]
    names = ["0_wnli_lora_s1", "1_wnli_lora_s2", "2_wnli_dora_dynamic_s1", "3_wnli_dora_dynamic_s2"]
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir() and d.name != "plots") == names
    bad = sweep / names[-1]
    r = results(bad)
    assert r["status"] == "failed" and r["error"] == "ConfigError: trainer.lr must be > 0, got -1.0"
    assert "Traceback (most recent call last)" in r["traceback"] and "ConfigError" in r["traceback"]
    for name in names[:-1]:  # the sweep went on around it; the others kept the default learning rate
        ok = results(sweep / name)
        assert ok["status"] == "ok" and ok["config"]["trainer"]["lr"] == 5e-4

    md = (sweep / "report.md").read_text()
    assert "4 job(s): 3 ok, 1 failed (1 before training)" in md
    failed = md.split("## Failed before training (1)", 1)[1]  # refused its config: listed, not tabulated
    assert f"- `{bad.name}` (method dora_dynamic, task wnli, budget r8, seed 2): ConfigError: trainer.lr must be" \
        in failed
    values = metric_values(sweep)
    body = {r[0]: r for r in table_rows(md, "Best epoch")[2:]}
    assert table_rows(md, "Best epoch")[0][2:] == ["WNLI (acc)", "GLUE avg"]
    assert body["dora_dynamic"][2] == expected_cell([values["dora_dynamic", "wnli"][1]])  # n=1: one seed left
    assert body["lora"][2] == expected_cell([values["lora", "wnli"][s] for s in SEEDS])
    assert "1 job(s) failed" in p.stdout and str(bad) in p.stdout  # Hydra's log goes to stdout
    assert (sweep / "report.csv").exists() and (sweep / "report.tex").exists()


def test_job_whose_config_does_not_resolve_is_recorded_in_sweep_and_single_run(tmp_path, glue_env):
    """An interpolation into a per-task table without the job's task (e.g. a paper preset run on WNLI) fails
    while Hydra's config is resolved: in a sweep that job is recorded as failed and the report is still
    written; a single run says `error: invalid configuration ...` and leaves a failed results.json."""
    lookup = ["trainer.lr='${lr_of.${task.name}}'", "+lr_of={rte: 5e-4}"]
    sweep = tmp_path / "sweep"
    p = run_train(["-m", "task=wnli", "seed=1", *SMALL, *lookup, f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                  env=glue_env)
    assert p.returncode == 1, p.stderr[-3000:]
    r = results(sweep / "0_wnli_lora_s1")
    assert r["status"] == "failed" and r["error_type"] == "InterpolationKeyError" and "lr_of.wnli" in r["error"]
    assert r["config"]["task"]["name"] == "wnli" and "Traceback" in r["traceback"]
    md = (sweep / "report.md").read_text()
    assert "## Failed before training (1)" in md
    assert "`0_wnli_lora_s1` (method lora, task wnli, budget r8, seed 1)" in md

    single = tmp_path / "single"
    p = run_train(["task=wnli", *SMALL, *lookup, f"hydra.run.dir={single}"], cwd=tmp_path, env=glue_env)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: invalid configuration: Interpolation key 'lr_of.wnli'")
    assert not single.exists()  # refused before training: a single run leaves no directory behind


# --- 3. `python -m report` on damaged job directories ---------------------------------------------------------

def test_report_cli_names_half_written_and_missing_results(ok_sweep, tmp_path):
    src, _ = ok_sweep
    sweep = tmp_path / "copy"
    shutil.copytree(src, sweep, ignore=shutil.ignore_patterns("adapter", "plots", "report.*"))
    half = sweep / "1_rte_lora_s2" / "results.json"
    text = half.read_text()
    half.write_text(text[: len(text) // 2])  # killed while writing
    (sweep / "6_wnli_dora_dynamic_s1" / "results.json").unlink()  # killed before the end
    p = subprocess.run([sys.executable, "-m", "report", str(sweep)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "`1_rte_lora_s2` (method lora, task rte, budget r8, seed 2): results.json is unreadable" in p.stderr
    assert "`6_wnli_dora_dynamic_s1` (method dora_dynamic, task wnli, budget r8, seed 1): no results.json" in p.stderr
    assert "6 ok, 0 failed, 2 without readable results" in p.stdout

    values = metric_values(sweep)  # the readable jobs only
    body = {r[0]: r for r in table_rows("## Best epoch\n" + p.stdout, "Best epoch")[2:]}
    assert body["lora"][2] == expected_cell([values["lora", "rte"][1]])
    assert body["lora"][3] == expected_cell([values["lora", "wnli"][s] for s in SEEDS])
    assert body["dora_dynamic"][3] == expected_cell([values["dora_dynamic", "wnli"][2]])
    md = (sweep / "report.md").read_text()
    assert "## Missing or unreadable results (2)" in md and (sweep / "plots" / "eval_rte.png").exists()


# --- 4. launchers ---------------------------------------------------------------------------------------------

def test_submitit_local_two_job_sweep(tmp_path, glue_env):
    """hydra/launcher=submitit_local: each job is pickled and runs in its own process; the report follows."""
    require("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    p = run_train(["-m", "hydra/launcher=submitit_local", "method=lora", "task=rte", "seed=1,2", *SMALL,
                   f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=glue_env)
    assert p.returncode == 0, p.stderr[-4000:]
    assert (sweep / ".submitit").is_dir()
    values = metric_values(sweep)
    assert set(values["lora", "rte"]) == {1, 2}
    md = (sweep / "report.md").read_text()
    assert "2 job(s): 2 ok" in md
    assert table_rows(md, "Best epoch")[2][2] == expected_cell([values["lora", "rte"][s] for s in SEEDS])
    # the callback gave each side-by-side job one torch thread (submitit's local executor starts all at once)
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert logs.count("torch threads for this job: 1") == 2


def compose(overrides: list[str], hydra_cfg: bool = False, more: list[list[str]] = ()):
    """The composed config (with hydra.* when hydra_cfg); with `more`, a list: one config per extra override set."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        if more:
            return [hydra_compose("config", overrides=overrides + m, return_hydra_config=hydra_cfg) for m in more]
        return hydra_compose("config", overrides=overrides, return_hydra_config=hydra_cfg)


def test_parallel_and_slurm_launcher_configs():
    require("hydra_plugins.hydra_joblib_launcher")
    require("hydra_plugins.hydra_submitit_launcher")
    from omegaconf import OmegaConf

    from lorabench.hydra_callback import threads_for_launcher

    parallel = OmegaConf.to_container(compose(["hydra/launcher=parallel"], True).hydra.launcher, resolve=True)
    assert parallel["_target_"].endswith("JoblibLauncher") and parallel["n_jobs"] == 2
    assert threads_for_launcher(parallel, cpus=16) == 8 and threads_for_launcher(parallel, cpus=2) == 1
    assert threads_for_launcher({**parallel, "n_jobs": -1}, cpus=4) == 1  # joblib's -1: one job per CPU
    # lorabench loads batches in the job's own process: no DataLoader worker processes to multiply by n_jobs
    assert "num_workers" not in json.dumps(OmegaConf.to_container(compose(["hydra/launcher=parallel"])))

    slurm = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu-a100", "hydra.launcher.gpus_per_node=4",
                     "hydra.launcher.timeout_min=30"], True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.partition, slurm.gpus_per_node, slurm.timeout_min) == ("gpu-a100", 4, 30)
    assert threads_for_launcher(OmegaConf.to_container(slurm), cpus=64) == slurm.cpus_per_task
    default = compose(["hydra/launcher=slurm"], True).hydra.launcher
    assert default.partition is None and default.gpus_per_node == 1 and default.timeout_min > 0


# --- 6. presets ---------------------------------------------------------------------------------------------

def test_cpu_smoke_names_every_registered_method():
    from lorabench import methods

    cfg = compose(["experiment=cpu_smoke"], True)
    params = cfg.hydra.sweeper.params
    assert sorted(params.method.split(",")) == sorted(methods.names())
    assert set(params.task.split(",")) == {"rte", "mrpc", "stsb", "cola", "wnli"}  # the small tasks
    assert cfg.model.name == "minilm" and cfg.trainer.max_train_samples == 256 and cfg.logger.backend == "none"


@pytest.mark.parametrize("preset, model, method", [("lora_glue_roberta", "roberta_base", "lora"),
                                                   ("dora_dynamic_glue_roberta", "roberta_base", "dora_dynamic"),
                                                   ("adalora_glue_deberta", "deberta_v3_base", "adalora")])
def test_paper_presets_compose_for_each_of_their_tasks(preset, model, method):
    from omegaconf import OmegaConf

    tasks = compose([f"experiment={preset}"], True).hydra.sweeper.params.task.split(",")
    assert len(tasks) == 8 and "wnli" not in tasks
    for task, composed in zip(tasks, compose([f"experiment={preset}"], more=[[f"task={t}"] for t in tasks])):
        cfg = OmegaConf.to_container(composed, resolve=True)
        row = cfg["paper_hparams"][task]
        assert cfg["model"]["name"] == model and cfg["method"]["name"] == method and cfg["task"]["name"] == task
        assert cfg["trainer"]["lr"] == row["lr"] and cfg["trainer"]["epochs"] == row["epochs"]


# --- resumable sweeps ------------------------------------------------------------------------------------------

def test_a_sweep_run_again_runs_only_the_missing_jobs(tmp_path, glue_env):
    """Re-running a sweep into the same directory skips every job already ok with the same config, re-runs the
    killed (no results.json / status running) and failed ones, says how many it skipped, and reports them all."""
    sweep = tmp_path / "sweep"
    args = ["-m", "method=lora", "task=rte,wnli", "seed=1,2", *SMALL, f"hydra.sweep.dir={sweep}"]
    p = run_train(args, cwd=tmp_path, env=glue_env)
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(d for d in sweep.iterdir() if (d / "results.json").exists())
    assert len(jobs) == 4
    killed, failed, kept = jobs[0], jobs[1], jobs[2:]
    (killed / "results.json").write_text(json.dumps({"status": "running", "config": results(killed)["config"]}))
    r = results(failed)
    r["status"] = "failed"
    (failed / "results.json").write_text(json.dumps(r))
    before = {d: (d / "results.json").stat().st_mtime_ns for d in kept}
    p = run_train(args, cwd=tmp_path, env=glue_env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {d: (d / "results.json").stat().st_mtime_ns for d in kept} == before  # not run again
    assert results(killed)["status"] == results(failed)["status"] == "ok"
    log = p.stderr + p.stdout
    assert log.count("already finished ok with this configuration") == 2
    assert "2 of 4 finished jobs were already ok" in log and "2 ran now" in log
    md = (sweep / "report.md").read_text()
    assert "4 job(s): 4 ok" in md
    # a changed configuration is a different job: it runs again
    p = run_train([*args, "trainer.max_eval_samples=8"], cwd=tmp_path, env=glue_env)
    assert p.returncode == 0 and "already finished ok" not in p.stderr + p.stdout
