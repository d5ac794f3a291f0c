"""The learning-rate protocol: tune (a sweep over trainer.lr on tuning seeds) → run (the final sweep composes the
selection) → report (each row's learning rate named). The selection rule is checked on synthetic run directories
against a hand computation; the protocol end to end with real `python -m train` subprocesses on the tiny model."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from lorabench import report, tuning
from lorabench.errors import ConfigError
from conftest import require, run_train, table_rows
from test_report import write_run
from test_sweep import SMALL


def _lr_run(root, name, lr, **kw):
    d = write_run(root, name, **kw)
    r = json.loads((d / "results.json").read_text())
    r["config"]["trainer"] = {"lr": lr}
    (d / "results.json").write_text(json.dumps(r))
    return d


def test_selection_is_the_best_mean_per_method_and_task_ties_to_the_smaller_lr(tmp_path):
    root = tmp_path / "tune"
    scores = {("lora", "rte"): {1e-3: (.60, .64), 1e-2: (.66, .61)},   # means .62 vs .635 → 1e-2
              ("lora", "mrpc"): {1e-3: (.70, .72), 1e-2: (.72, .70)},  # a tie → the smaller, 1e-3
              ("dora", "rte"): {1e-3: (.55, .57), 1e-2: (.50, .52)}}   # → 1e-3
    for (method, task), by_lr in scores.items():
        for lr, values in by_lr.items():
            for seed, v in zip((101, 102), values):
                _lr_run(root, f"{method}_{task}_{lr:g}_s{seed}", lr, task=task, method=method, seed=seed,
                        best={"accuracy": v})
    paths = report.select_learning_rates(root)
    chosen = {(c["method"], c["task"]): c["selected"] for c in json.loads((root / "selected" /
                                                                           "selected_lr.json").read_text())}
    assert chosen == {("lora", "rte"): 1e-2, ("lora", "mrpc"): 1e-3, ("dora", "rte"): 1e-3}
    text = (root / "selected" / "task_method" / "rte_lora.yaml").read_text()
    assert text.startswith("# @package _global_") and "lr: 0.01" in text
    assert {p.name for p in paths} >= {"rte_lora.yaml", "mrpc_lora.yaml", "rte_dora.yaml", "selected_lr.md"}
    # the tuning report splits rows by lr (a grid within one cell)
    rep = report.build_report(root, plots=False)
    labels = {rep.table.full_label(r) for r in rep.table.rows}
    assert {"lora (lr=0.001)", "lora (lr=0.01)", "dora (lr=0.001)", "dora (lr=0.01)"} <= labels


def test_selection_by_method_pools_tasks_with_equal_weight_and_writes_every_requested_task(tmp_path, capsys):
    root = tmp_path / "tune"
    # per-task means (one seed each): lora rte .60/.70, mrpc .80/.74 → pooled .70 vs .72 → 1e-2, although mrpc
    # alone prefers 1e-3; dora's two lrs pool to a tie (.65 each) → the smaller
    scores = {("lora", "rte"): {1e-3: .60, 1e-2: .70}, ("lora", "mrpc"): {1e-3: .80, 1e-2: .74},
              ("dora", "rte"): {1e-3: .60, 1e-2: .50}, ("dora", "mrpc"): {1e-3: .70, 1e-2: .80}}
    for (method, task), by_lr in scores.items():
        for lr, v in by_lr.items():
            _lr_run(root, f"{method}_{task}_{lr:g}", lr, task=task, method=method, seed=101, best={"accuracy": v})
    paths = report.select_learning_rates(root, by="method", for_tasks=["rte", "mrpc", "sst2"])
    chosen = json.loads((root / "selected" / "selected_lr.json").read_text())
    assert {c["method"]: c["selected"] for c in chosen} == {"lora": 1e-2, "dora": 1e-3}
    lora = next(c for c in chosen if c["method"] == "lora")
    assert lora["means"] == pytest.approx({"0.001": .70, "0.01": .72})
    assert lora["per_task"]["mrpc"] == pytest.approx({"0.001": .80, "0.01": .74}) and lora["used_for"] == [
        "rte", "mrpc", "sst2"]
    for task in ("rte", "mrpc", "sst2"):  # sst2 was not tuned: the method's one lr is written for it too
        assert "lr: 0.01" in (root / "selected" / "task_method" / f"{task}_lora.yaml").read_text()
        assert "lr: 0.001" in (root / "selected" / "task_method" / f"{task}_dora.yaml").read_text()
    assert len([p for p in paths if p.suffix == ".yaml"]) == 6
    assert "per method, the lr with the highest unweighted mean" in (root / "selected" / "selected_lr.md").read_text()
    # the CLI: a typo'd task, and --select-for without a per-method selection, are one clear error each
    assert report.main([str(root), "--select-lr", "--select-lr-by", "method", "--select-for", "rtee",
                        "--no-plots"]) == 2
    assert "unknown task(s) rtee" in capsys.readouterr().err
    assert report.main([str(root), "--select-lr", "--select-for", "rte", "--no-plots"]) == 2
    assert "--select-lr-by method" in capsys.readouterr().err


def test_selection_by_method_needs_one_grid_for_every_task(tmp_path):
    root = tmp_path / "tune"
    for task, lrs in (("rte", (1e-3, 1e-2)), ("mrpc", (1e-3,))):
        for lr in lrs:
            _lr_run(root, f"{task}_{lr:g}", lr, task=task, seed=101, best={"accuracy": .6})
    with pytest.raises(ConfigError, match="different lr grids"):
        report.select_learning_rates(root, by="method")
    assert {c.selected for c in tuning.collect([report.read_job(d, root) for d in report.find_job_dirs(root)])} \
        == {1e-3}  # per task, each task's own grid is fine


def test_a_sweep_that_mixes_budgets_is_refused(tmp_path, capsys):
    root = tmp_path / "tune"
    _lr_run(root, "a", 1e-3, task="rte", budget="r8", best={"accuracy": .6})
    _lr_run(root, "b", 1e-3, task="rte", budget="r2", best={"accuracy": .6})
    with pytest.raises(ConfigError, match="mixes budgets"):
        report.select_learning_rates(root)
    assert report.main([str(root), "--select-lr", "--no-plots"]) == 2
    assert "error: the tuning sweep mixes" in capsys.readouterr().err


def test_a_method_option_missing_from_older_runs_counts_as_its_default(tmp_path):
    """A run whose config predates a documented option (no key) trained with its default: it is grouped with
    runs that state the default, and refused beside a run that set another value."""
    def run(name, lr, **method_options):
        d = _lr_run(root, name, lr, task="rte", method="dora_dynamic", best={"accuracy": .6})
        r = json.loads((d / "results.json").read_text())
        r["config"]["method"] = {"name": "dora_dynamic", "alpha": 8, **method_options}
        (d / "results.json").write_text(json.dumps(r))

    default_eps = report._checkout_config("method", "dora_dynamic")["eps"]
    root = tmp_path / "tune"
    run("old", 1e-3)  # before `eps` was in the YAML
    run("new", 2e-3, eps=default_eps)
    report.select_learning_rates(root)
    assert json.loads((root / "selected" / "selected_lr.json").read_text())[0]["means"].keys() == {"0.001", "0.002"}
    rep = report.build_report(root, plots=False)  # nor does the report split the rows by the absent key
    assert {rep.table.full_label(r) for r in rep.table.rows} == {"dora_dynamic (lr=0.001)", "dora_dynamic (lr=0.002)"}
    run("other", 4e-3, eps=1e-3)
    with pytest.raises(ConfigError, match="mixes budgets, models or method options within dora_dynamic/rte"):
        report.select_learning_rates(root)


def test_tune_run_report_end_to_end(tmp_path, real_glue_dir):
    """The README's three commands on the tiny model, a 2-value grid and 2 tuning seeds, then 2 final seeds."""
    env = {"GLUE_DIR": str(real_glue_dir)}
    tune, final = tmp_path / "tune", tmp_path / "final"
    p = run_train(["-m", "experiment=tune_lr", "method=lora,dora", "task=rte", "trainer.lr=1e-3,3e-2",
                   "seed=101,102", *SMALL, f"hydra.sweep.dir={tune}"], cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    selected = json.loads((tune / "selected" / "selected_lr.json").read_text())
    assert len(selected) == 2
    for c in selected:  # the choice is the argmax of the means, recomputed here from the jobs' results
        by_lr: dict[float, list[float]] = {}
        for d in tune.iterdir():
            if (d / "results.json").exists():
                r = json.loads((d / "results.json").read_text())
                if r["method"] == c["method"]:
                    by_lr.setdefault(r["config"]["trainer"]["lr"], []).append(r["best"]["eval/accuracy"])
        means = {lr: statistics.mean(v) for lr, v in by_lr.items()}
        assert set(means) == {1e-3, 3e-2} and all(len(v) == 2 for v in by_lr.values())
        assert c["selected"] == min(lr for lr, m in means.items() if m == max(means.values()))
    p = run_train(["-m", "method=lora,dora", "task=rte", "seed=1,2", *SMALL, f"hydra.searchpath=[file://{tune}/selected]",
                   f"hydra.sweep.dir={final}"], cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lrs = {}
    for d in final.iterdir():
        if (d / "results.json").exists():
            r = json.loads((d / "results.json").read_text())
            assert r["seed"] in (1, 2)
            lrs[r["method"]] = r["config"]["trainer"]["lr"]
    assert lrs == {c["method"]: c["selected"] for c in selected}
    md = (final / "report.md").read_text()
    if len(set(lrs.values())) > 1:
        rows = table_rows(md, "Learning rates")
        assert {row[0]: row[1] for row in rows[2:]} == {m: f"{lr:g}" for m, lr in lrs.items()}
    else:
        assert f"every run trained with trainer.lr = {next(iter(lrs.values())):g}" in md


def test_optuna_sweeper_maximizes_the_returned_dev_metric(tmp_path, real_glue_dir):
    """`main` returns each job's best primary dev metric, so hydra/sweeper=optuna can tune any key: a 2-trial study
    on the tiny model reports as its best value the best job's metric, and the sweep still gets its report."""
    require("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    sweep = tmp_path / "optuna"
    p = run_train(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=maximize",
                   "hydra.sweeper.sampler.seed=0", "trainer.lr=tag(log,interval(1e-4,1e-2))", "method=lora",
                   "task=rte", *SMALL, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env={"GLUE_DIR": str(real_glue_dir)})
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = [json.loads((d / "results.json").read_text()) for d in sweep.iterdir() if (d / "results.json").exists()]
    assert len(jobs) == 2 and jobs[0]["config"]["trainer"]["lr"] != jobs[1]["config"]["trainer"]["lr"]
    best = max(jobs, key=lambda r: r["best"]["eval/accuracy"])
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(best["best"]["eval/accuracy"])
    assert (sweep / "report.md").exists()


def test_objective_value_is_nan_unless_ok():
    import math

    assert tuning.objective_value({"status": "ok", "primary_metric": "eval/mcc", "best": {"eval/mcc": 0.4}}) == 0.4
    assert math.isnan(tuning.objective_value({"status": "failed"}))
    assert math.isnan(tuning.objective_value(None))
