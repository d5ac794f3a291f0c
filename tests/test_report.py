"""The reporter on synthetic run directories: tables (md/csv/tex), failed and broken jobs, plots."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from lorabench import report
from conftest import table_rows

RANK_TYPES = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
              "attention.output.dense": "attn_out", "intermediate.dense": "ffn_in", "output.dense": "ffn_out"}


def write_run(root: Path, name: str, *, task: str, method: str = "lora", budget: str = "r8", seed: int = 1,
              best: dict[str, float], last: dict[str, float] | None = None, model: str = "tiny",
              method_cfg: dict | None = None, stored: int = 7168, rank_pattern: dict | None = None,
              evals: list[dict] | None = None, status: str = "ok", extra: dict | None = None,
              mtime: float | None = None) -> Path:
    """A job directory as run.py leaves it (only the fields the reporter reads, with their real shapes).

    A failed job failed in training (it has the ledger of its built model); `extra` adds fields to results.json
    (a None value removes one), `mtime` sets when results.json was written."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"seed": seed, "task": {"name": task}, "method": {"name": method, **(method_cfg or {"alpha": 16})},
           "budget": {"name": budget, "rank": int(budget[1:])}, "model": {"name": model}}
    results = {"status": status, "config": cfg, "task": task, "method": method, "model": model, "budget": budget,
               "seed": seed}
    if status == "ok":
        last = last or best
        results.update({
            "primary_metric": "eval/" + next(iter(best)),
            "best": {"step": 10, "epoch": 1, **{f"eval/{k}": v for k, v in best.items()}},
            "last": {"step": 20, "epoch": 2, **{f"eval/{k}": v for k, v in last.items()}},
            "ledger": {"adapter_stored": stored, "extra_stored": 0},
            "rank_pattern": rank_pattern or {f"bert.encoder.layer.{i}.attention.self.query": 8 for i in range(2)},
        })
    else:
        results.update({"error": "TrainingError: non-finite loss (nan) at optimizer step 3", "traceback": "...",
                        "ledger_start": {"adapter_stored": stored}})
    for k, v in (extra or {}).items():
        if v is None:
            results.pop(k, None)
        else:
            results[k] = v
    (d / "results.json").write_text(json.dumps(results))
    if mtime is not None:
        os.utime(d / "results.json", (mtime, mtime))
    (d / ".hydra").mkdir()  # Hydra writes the composed config into every job directory
    (d / ".hydra" / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    lines = evals if evals is not None else [results["best"], results["last"]] if status == "ok" else []
    (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return d


def cell(values: list[float]) -> str:
    """The expected text of one metric, computed here independently of the reporter."""
    m = 100 * statistics.mean(values)
    return f"{m:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{m:.2f}"


@pytest.fixture
def sweep(tmp_path):
    """2 budgets x 3 tasks (given out of GLUE order) x 3 seeds of lora, with known values."""
    root = tmp_path / "sweep"
    values = {}
    rng = np.random.default_rng(0)
    for budget in ("r2", "r8"):
        for task, metrics in (("stsb", ("pearson", "spearman")), ("rte", ("accuracy",)), ("cola", ("mcc",)),
                              ("mrpc", ("accuracy", "f1"))):
            for seed in (1, 2, 3):
                best = {m: float(rng.uniform(0.3, 0.9)) for m in metrics}
                last = {m: v - 0.05 for m, v in best.items()}
                values[budget, task, seed] = (best, last)
                write_run(root, f"{budget}_{task}_s{seed}", task=task, budget=budget, seed=seed, best=best,
                          last=last, stored=1792 if budget == "r2" else 7168)
    return root, values


def test_tables_mean_std_in_glue_order(sweep, tmp_path):
    root, values = sweep
    rep = report.build_report(root, tmp_path / "out", plots=False)
    assert rep.clean and len(rep.ok) == 24
    md = (tmp_path / "out" / "report.md").read_text()
    for selection, title in ((0, "Best epoch"), (1, "Last epoch")):
        rows = table_rows(md, title)
        assert rows[0] == ["method", "budget", "stored params", "CoLA (MCC)", "MRPC (acc/F1)",
                           "STS-B (Pearson/Spearman)", "RTE (acc)", "GLUE avg"]
        body = {r[1]: r for r in rows[2:]}
        assert [r[1] for r in rows[2:]] == ["r8", "r2"]  # larger budget first
        for budget in ("r2", "r8"):
            row = body[budget]
            assert row[0] == "lora" and row[2] == ("1.8K" if budget == "r2" else "7.2K")
            for col, task, metrics in ((3, "cola", ("mcc",)), (4, "mrpc", ("accuracy", "f1")),
                                       (5, "stsb", ("pearson", "spearman")), (6, "rte", ("accuracy",))):
                expected = " / ".join(cell([values[budget, task, s][selection][m] for s in (1, 2, 3)])
                                      for m in metrics) + " (n=3)"
                assert row[col] == expected
            # GLUE average: one number per task (MCC, MRPC accuracy, STS-B Pearson, accuracy); std over the
            # per-seed averages
            first = {"cola": "mcc", "mrpc": "accuracy", "stsb": "pearson", "rte": "accuracy"}
            per_seed = [statistics.mean(values[budget, t, s][selection][m] for t, m in first.items())
                        for s in (1, 2, 3)]
            assert row[7] == cell(per_seed) + " (n=3)"


def test_csv_and_tex(sweep, tmp_path):
    root, values = sweep
    report.build_report(root, tmp_path / "out", plots=False)
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert len(rows) == 4  # 2 selections x 2 rows
    r = next(x for x in rows if x["selection"] == "last" and x["budget"] == "r2")
    stsb_spearman = [values["r2", "stsb", s][1]["spearman"] for s in (1, 2, 3)]
    assert float(r["stsb/spearman/mean"]) == pytest.approx(statistics.mean(stsb_spearman), abs=1e-6)
    assert float(r["stsb/spearman/std"]) == pytest.approx(statistics.stdev(stsb_spearman), abs=1e-6)
    assert r["stsb/spearman/n"] == "3" and float(r["adapter_stored"]) == 1792
    tex = (tmp_path / "out" / "report.tex").read_text()
    assert tex.count("\\begin{tabular}") == 2 and "\\toprule" in tex
    m = 100 * statistics.mean(values["r8", "rte", s][0]["accuracy"] for s in (1, 2, 3))
    assert f"${m:.2f}_{{\\pm" in tex


def test_multi_metric_conventions_and_method_variants(tmp_path):
    """MNLI m/mm and QQP acc/F1 shown as pairs; the average takes matched accuracy; lora with two alphas at one
    budget gives two rows (no budget column: one budget), not one row with mixed seeds."""
    root = tmp_path / "runs"
    for alpha, base in ((8, 0.80), (16, 0.70)):
        for seed in (1, 2):
            write_run(root, f"a{alpha}_mnli_s{seed}", task="mnli", seed=seed, method_cfg={"alpha": alpha},
                      best={"accuracy": base + seed / 100, "accuracy_mm": base - 0.1})
            write_run(root, f"a{alpha}_qqp_s{seed}", task="qqp", seed=seed, method_cfg={"alpha": alpha},
                      best={"accuracy": base, "f1": base - 0.2})
    report.build_report(root, plots=False)
    rows = table_rows((root / "report.md").read_text(), "Best epoch")
    assert rows[0] == ["method", "stored params", "QQP (acc/F1)", "MNLI (acc/mm)", "GLUE avg"]
    body = {r[0]: r for r in rows[2:]}
    assert set(body) == {"lora (alpha=8)", "lora (alpha=16)"}
    row = body["lora (alpha=8)"]
    assert row[2] == "80.00 ± 0.00 / 60.00 ± 0.00 (n=2)"
    assert row[3] == f"{cell([0.81, 0.82])} / 70.00 ± 0.00 (n=2)"
    assert row[4] == cell([(0.80 + 0.81) / 2, (0.80 + 0.82) / 2]) + " (n=2)"


def test_task_title_and_columns_come_from_the_runs_task_config(tmp_path):
    """A task the reporter has never heard of is named and laid out by the task group its runs trained with
    (title, table_metrics on each dev split's suffix); a known task without them falls back to conf/task/."""
    root = tmp_path / "runs"
    task_cfg = {"name": "mytask", "title": "My Task", "table_metrics": ["f1", "accuracy"],
                "eval_splits": {"dev": {"suffix": ""}, "dev2": {"suffix": "_b"}}}
    for seed in (1, 2):
        d = write_run(root, f"mytask_s{seed}", task="mytask", seed=seed,
                      best={"f1": 0.5, "accuracy": 0.6, "f1_b": 0.4, "accuracy_b": 0.3})
        results = json.loads((d / "results.json").read_text())
        results["config"]["task"] = task_cfg
        (d / "results.json").write_text(json.dumps(results))
        write_run(root, f"rte_s{seed}", task="rte", seed=seed, best={"accuracy": 0.7})
    report.build_report(root, plots=False)
    rows = table_rows((root / "report.md").read_text(), "Best epoch")
    assert rows[0] == ["method", "stored params", "RTE (acc)", "My Task (F1/acc/f1_b/accuracy_b)", "GLUE avg"]
    assert rows[2][3].startswith("50.00 ± 0.00 / 60.00 ± 0.00 / 40.00 ± 0.00 / 30.00 ± 0.00")


def test_a_task_config_with_table_metrics_outside_its_metrics_is_refused():
    from lorabench.data import TaskSpec
    from lorabench.errors import ConfigError

    d = {"name": "t", "dir": "T", "header": True, "text_columns": ["s"], "label_column": "label",
         "label_values": ["0", "1"], "is_regression": False, "eval_splits": {"validation": {"file": "dev.tsv"}},
         "metrics": ["accuracy"], "primary_metric": "accuracy"}
    assert TaskSpec.from_dict(d).table_metrics == ("accuracy",) and TaskSpec.from_dict(d).title == "t"
    with pytest.raises(ConfigError, match="table_metrics"):
        TaskSpec.from_dict({**d, "table_metrics": ["f1"]})


def test_failed_broken_and_missing_jobs_are_listed_and_the_rest_reported(tmp_path):
    root = tmp_path / "sweep"
    (root / "multirun.yaml").parent.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for seed in (1, 2):
        write_run(root, f"{seed - 1}_rte_lora_s{seed}", task="rte", seed=seed, best={"accuracy": 0.5 + seed / 10})
    write_run(root, "2_mrpc_lora_s1", task="mrpc", seed=1, status="failed", best={})
    ok = write_run(root, "3_mrpc_lora_s2", task="mrpc", seed=2, best={"accuracy": 0.7, "f1": 0.8})
    text = (ok / "results.json").read_text()
    (ok / "results.json").write_text(text[: len(text) // 2])  # killed while writing
    missing = root / "4_cola_lora_s1"
    (missing / ".hydra").mkdir(parents=True)
    (missing / ".hydra" / "config.yaml").write_text("seed: 1\ntask: {name: cola}\nmethod: {name: lora}\n"
                                                    "budget: {name: r8, rank: 8}\n")
    (missing / "metrics.jsonl").write_text('{"step": 5, "epoch": 1, "eval/mcc": 0.1}\n{"step": 1')  # torn line

    assert report.main([str(root), "--no-plots"]) == 1  # written, but not clean
    md = (root / "report.md").read_text()
    rows = table_rows(md, "Best epoch")
    assert rows[0][2:] == ["MRPC (acc/F1)", "RTE (acc)", "GLUE avg"]  # the failed task keeps its column
    assert rows[2][3] == f"{cell([0.6, 0.7])} (n=2)" and rows[2][2] == "—"
    failed = md.split("## Failed jobs (1)", 1)[1]
    assert "`2_mrpc_lora_s1`" in failed and "non-finite loss" in failed
    broken = md.split("## Missing or unreadable results (2)", 1)[1]
    assert "`3_mrpc_lora_s2` (method lora, task mrpc, budget r8, seed 2): results.json is unreadable" in broken
    assert "`4_cola_lora_s1` (method lora, task cola, budget r8, seed 1): no results.json" in broken
    # the grid (lora × r8 × {rte, mrpc, cola} × seeds {1, 2}) has no trace of cola seed 2
    assert "## Not found (1)" in md and "lora, r8, cola, seed 2" in md


def test_main_without_jobs(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert report.main([str(tmp_path)]) == 2
    assert "no job directory" in capsys.readouterr().err


def test_rank_heatmap_cells_equal_results(tmp_path):
    """A rank-adaptive run's heatmap is a real PNG whose cells are its results.json rank_pattern."""
    import matplotlib.image

    rng = np.random.default_rng(3)
    pattern = {f"bert.encoder.layer.{i}.{suffix}": int(rng.integers(0, 13))
               for i in range(3) for suffix in RANK_TYPES}
    pattern["bert.encoder.layer.1.attention.self.key"] = 0  # a fully pruned matrix is a 0, not a gap
    root = tmp_path / "runs"
    write_run(root, "adaptive", task="rte", method="dora_dynamic", best={"accuracy": 0.6}, rank_pattern=pattern,
              evals=[{"step": 5, "eval/accuracy": 0.5, "train/budget": 40},
                     {"step": 10, "eval/accuracy": 0.6, "train/budget": 30}])
    write_run(root, "fixed", task="rte", method="lora", best={"accuracy": 0.6},
              evals=[{"step": 10, "eval/accuracy": 0.6, "ranks/total": 16}])
    rep = report.build_report(root, tmp_path / "out")
    names = sorted(p.name for p in rep.paths if p.suffix == ".png")
    assert names == ["budget_rte.png", "eval_rte.png", "pareto.png", "ranks_dora_dynamic_rte.png"]  # none for lora
    for p in [p for p in rep.paths if p.suffix == ".png"]:
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert "![ranks_dora_dynamic_rte](plots/ranks_dora_dynamic_rte.png)" in (tmp_path / "out" / "report.md").read_text()

    mat, layers, types = report.plot_rank_heatmap([pattern], tmp_path / "h.png", "t")
    assert layers == [0, 1, 2] and types == ["query", "key", "value", "attn_out", "ffn_in", "ffn_out"]
    for name, rank in pattern.items():
        layer = int(name.split(".")[3])
        kind = RANK_TYPES[name.split(".", 4)[4]]
        assert mat[layers.index(layer), types.index(kind)] == rank
    assert matplotlib.image.imread(tmp_path / "h.png").ndim == 3


def test_deberta_names_and_seed_mean_in_heatmap():
    a = {"deberta.encoder.layer.0.attention.self.query_proj": 4, "deberta.encoder.layer.0.output.dense": 2}
    b = {"deberta.encoder.layer.0.attention.self.query_proj": 6, "deberta.encoder.layer.0.output.dense": 2}
    mat, layers, types = report.rank_matrix([a, b])
    assert layers == [0] and types == ["query", "ffn_out"] and mat.tolist() == [[5.0, 2.0]]


def test_jobs_that_failed_before_training_are_listed_not_tabulated(tmp_path):
    """A job that never trained (results.json "stage": "setup", or an older file without the model's ledger or a
    history) adds no row, no column and no [k/N tasks] marker; it is listed once, in its own section."""
    root = tmp_path / "runs"
    for seed in (1, 2):
        write_run(root, f"lora_rte_s{seed}", task="rte", seed=seed, best={"accuracy": 0.5 + seed / 10})
    write_run(root, "lora_mrpc_s1", task="mrpc", status="failed", best={},
              extra={"stage": "setup", "error": "DataError: task mrpc: folder /x/MRPC not found"})
    # an older results.json: no "stage"; failed before the model was built (no ledger_start, no history)
    write_run(root, "dora_cola_s1", task="cola", method="dora", status="failed", best={},
              extra={"ledger_start": None, "error": "ConfigError: unknown budget 'r3'"})
    # "stage": "training" wins over the heuristic: that job's configuration stays in the table
    write_run(root, "lora_wnli_s1", task="wnli", status="failed", best={},
              extra={"stage": "training", "ledger_start": None})

    assert report.main([str(root), "--no-plots"]) == 1  # failed jobs still make the report not clean
    md = (root / "report.md").read_text()
    rows = table_rows(md, "Best epoch")
    assert rows[0] == ["method", "stored params", "RTE (acc)", "WNLI (acc)", "GLUE avg"]  # no MRPC, no CoLA
    assert [r[0] for r in rows[2:]] == ["lora"]  # no dora row
    assert rows[2][2] == f"{cell([0.6, 0.7])} (n=2)" and rows[2][3] == "—"
    assert "5 job(s): 2 ok, 3 failed (2 before training), 0 without readable results.json." in md
    before = md.split("## Failed before training (2)", 1)[1]
    assert "- `lora_mrpc_s1` (method lora, task mrpc, budget r8, seed 1): DataError: task mrpc: folder" in before
    assert "- `dora_cola_s1` (method dora, task cola, budget r8, seed 1): ConfigError: unknown budget" in before
    assert "## Failed jobs (1)" in md and "`lora_wnli_s1`" in md.split("## Failed jobs (1)", 1)[1]
    for name in ("lora_mrpc_s1", "dora_cola_s1", "lora_wnli_s1"):
        assert md.count(f"`{name}`") == 1

    # without the training failure: no column but RTE, and no [k/N tasks] marker anywhere
    shutil.rmtree(root / "lora_wnli_s1")
    rep = report.build_report(root, plots=False)
    md = (root / "report.md").read_text()
    for title in ("Best epoch", "Last epoch"):
        rows = table_rows(md, title)
        assert rows[0][2:] == ["RTE (acc)", "GLUE avg"] and rows[2][3] == f"{cell([0.6, 0.7])} (n=2)"
    assert len(rep.failed_setup) == 2 and rep.failed == [] and not rep.clean
    assert [r["selection"] for r in csv.DictReader((root / "report.csv").open())] == ["best", "last"]


def test_runs_sharing_a_seed_count_once_and_the_newest_is_used(tmp_path):
    """n is the number of distinct seeds; of several runs of one seed in a cell the newest (results.json written
    last) is used, and a note under each table says so."""
    root = tmp_path / "runs"
    t = 1_700_000_000
    write_run(root, "a_rte_s1", task="rte", seed=1, best={"accuracy": 0.50}, mtime=t)
    write_run(root, "b_rte_s1", task="rte", seed=1, best={"accuracy": 0.70}, mtime=t + 60)  # rerun of seed 1
    write_run(root, "c_rte_s2", task="rte", seed=2, best={"accuracy": 0.80}, mtime=t + 30)
    write_run(root, "d_rte_s2", task="rte", seed=2, best={"accuracy": 0.60}, mtime=t + 10)  # older, listed later
    for seed in (1, 2):
        write_run(root, f"mrpc_s{seed}", task="mrpc", seed=seed, best={"accuracy": 0.7, "f1": 0.8}, mtime=t)

    rep = report.build_report(root, plots=False)
    assert len(rep.ok) == 6 and rep.clean
    md = (root / "report.md").read_text()
    for title in ("Best epoch", "Last epoch"):
        row = table_rows(md, title)[2]
        assert row[3] == f"{cell([0.70, 0.80])} (n=2)"  # RTE: seed 1 → b, seed 2 → c
        assert row[2] == "70.00 ± 0.00 / 80.00 ± 0.00 (n=2)"  # MRPC: one run per seed, no note
        # GLUE average over the per-seed averages of the runs used
        assert row[4] == f"{cell([(0.7 + 0.70) / 2, (0.7 + 0.80) / 2])} (n=2)"
    note = "Note: rte/lora: 4 runs share 2 seeds; the newest run per seed is used."
    assert md.count(note) == 2 and "mrpc/lora" not in md
    assert md.index(note) < md.index("## Last epoch")  # under the first table too
    rows = list(csv.DictReader((root / "report.csv").open()))
    assert {r["rte/accuracy/n"] for r in rows} == {"2"}
    assert float(rows[0]["rte/accuracy/mean"]) == pytest.approx(0.75)


def test_interrupted_jobs_are_listed_with_their_step_not_tabulated(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, "lora_rte_s1", task="rte", seed=1, best={"accuracy": 0.6})
    write_run(root, "lora_rte_s2", task="rte", seed=2, status="interrupted", best={},
              extra={"step": 37, "error": "KeyboardInterrupt", "stage": "training"},
              evals=[{"step": 20, "epoch": 1, "eval/accuracy": 0.9}])
    write_run(root, "lora_mrpc_s1", task="mrpc", seed=1, status="interrupted", best={},
              extra={"ledger_start": None, "error": None})

    assert report.main([str(root), "--no-plots"]) == 1
    out = capsys.readouterr()
    assert "1 ok, 0 failed, 0 without readable results.json, 2 interrupted" in out.out
    md = (root / "report.md").read_text()
    rows = table_rows(md, "Best epoch")
    assert rows[0][2:] == ["RTE (acc)", "GLUE avg"]  # no MRPC column from the interrupted job
    assert rows[2][2] == "60.00 (n=1)"  # its own evaluations do not count
    assert "## Failed" not in md
    section = md.split("## Interrupted jobs (2)", 1)[1]
    assert "- `lora_rte_s2` (method lora, task rte, budget r8, seed 2): interrupted at step 37" in section
    assert "- `lora_mrpc_s1` (method lora, task mrpc, budget r8, seed 1): interrupted\n" in section
    assert "## Interrupted jobs (2)" in out.err


# --- paired differences and the Pareto plot (paired.py) -------------------------------------------------------

def _t975(dof):
    return {1: 12.706204736174707, 2: 4.302652729749464, 3: 3.182446305284263}[dof]


def test_paired_differences_match_a_hand_computation(tmp_path):
    """Δ per task = mean over shared seeds of (row − lora); interval = Δ ± t(.975, n−1)·sd/√n (table values of t);
    ▲/▼ only when the interval excludes 0; seeds only one side has are counted, not paired."""
    root = tmp_path / "sweep"
    lora = {("rte", 1): .60, ("rte", 2): .62, ("rte", 3): .58, ("mrpc", 1): .80, ("mrpc", 2): .81, ("mrpc", 3): .79}
    dora = {("rte", 1): .65, ("rte", 2): .66, ("rte", 3): .64, ("mrpc", 1): .78, ("mrpc", 2): .83, ("mrpc", 3): .79,
            ("rte", 4): .99}  # seed 4: only dora has it
    for method, values in (("lora", lora), ("dora", dora)):
        for (task, seed), v in values.items():
            write_run(root, f"{method}_{task}_s{seed}", task=task, method=method, seed=seed, best={"accuracy": v})
    rep = report.build_report(root, plots=False)
    (row,) = rep.table.paired("best", "lora")
    assert row.label == "dora" and row.reference_label == "lora"
    for task, d in zip(rep.table.tasks, row.per_task):
        diffs = [100 * (dora[task, s] - lora[task, s]) for s in (1, 2, 3)]
        mean, half = statistics.mean(diffs), _t975(2) * statistics.stdev(diffs) / 3 ** 0.5
        assert d.n == 3 and d.unpaired == (1 if task == "rte" else 0)
        assert d.mean == pytest.approx(mean) and d.low == pytest.approx(mean - half)
        assert d.high == pytest.approx(mean + half)
    by_task = dict(zip(rep.table.tasks, row.per_task))
    assert by_task["rte"].sign == 1 and by_task["mrpc"].sign == 0  # +5 ± small vs +0 ± noise
    assert row.record == (1, 1, 0)
    # the GLUE average: per-seed averages over both tasks, on seeds 1-3 (seed 4 lacks mrpc)
    avg = [100 * ((dora["rte", s] + dora["mrpc", s]) - (lora["rte", s] + lora["mrpc", s])) / 2 for s in (1, 2, 3)]
    assert row.average.mean == pytest.approx(statistics.mean(avg)) and row.average.n == 3
    text = (root / "report.md").read_text()
    assert "## Paired differences vs lora" in text and "▲" in text and "| dora | lora |" in text
    with (root / "paired.csv").open() as f:
        rows = list(csv.DictReader(f))
    rte_best = next(r for r in rows if r["selection"] == "best" and r["task"] == "rte")
    assert float(rte_best["delta"]) == pytest.approx(by_task["rte"].mean, abs=1e-4) and rte_best["sign"] == "1"


def test_paired_reference_is_selectable_and_needs_the_same_budget(tmp_path, capsys):
    root = tmp_path / "sweep"
    for seed in (1, 2):
        write_run(root, f"lora_s{seed}", task="rte", method="lora", seed=seed, best={"accuracy": .6 + seed / 100})
        write_run(root, f"dora_s{seed}", task="rte", method="dora", seed=seed, best={"accuracy": .5 + seed / 100})
        write_run(root, f"ada_s{seed}", task="rte", method="adalora", budget="r2", seed=seed,
                  best={"accuracy": .7})
    rep = report.build_report(root, plots=False)
    assert [p.label for p in rep.table.paired("best", "lora")] == ["dora r8"]  # adalora r2: no lora r2 to pair
    (d,) = rep.table.paired("best", "lora")[0].per_task
    assert d.mean == pytest.approx(-10.0) and d.low == d.high == pytest.approx(-10.0)
    assert d.sign == -1  # the same difference on every seed: the seeds support it
    assert report.main([str(root), "--reference", "dora", "--no-plots"]) == 0
    assert "## Paired differences vs dora" in (root / "report.md").read_text()
    # a row with no reference at all gives no section
    solo = tmp_path / "solo"
    write_run(solo, "dora_s1", task="rte", method="dora", best={"accuracy": .5})
    report.build_report(solo, plots=False)
    assert "Paired differences" not in (solo / "report.md").read_text()


def test_pareto_points_and_plot(tmp_path):
    root = tmp_path / "sweep"
    for method, stored, acc in (("lora", 7168, (.60, .62)), ("dora", 7300, (.64, .66))):
        for seed, v in zip((1, 2), acc):
            for task in ("rte", "mrpc"):
                write_run(root, f"{method}_{task}_s{seed}", task=task, method=method, seed=seed, stored=stored,
                          best={"accuracy": v}, extra={"timings": {"seconds_per_step": 0.5 if method == "lora" else 0.7}})
    rep = report.build_report(root)
    points = {p[0]: p for p in report.pareto_points(rep.table)}
    assert points["dora"][1] == 7300 and points["dora"][2] == pytest.approx(0.7)
    assert points["dora"][3] == pytest.approx(65.0)
    assert points["dora"][4] == pytest.approx(_t975(1) * statistics.stdev([64.0, 66.0]) / 2 ** 0.5)
    assert (root / "plots" / "pareto.png").stat().st_size > 0
    assert "plots/pareto.png" in (root / "report.md").read_text()


@pytest.mark.parametrize("sizes, scale", [((331_200, 331_776, 331_776), "linear"), ((83_000, 331_776, 1_327_104), "log")])
def test_size_axis_labels_are_readable(sizes, scale):
    """Equal-budget rows a few hundred params apart get a linear axis with distinct labels (a log axis printed a pile
    of overlapping 3.31e5 minor labels); budgets that differ by multiples keep a log axis. Labels are in K / M."""
    fig = report._new_figure(4, 3)
    ax = fig.subplots()
    ax.plot(sizes, [1, 2, 3], "o")
    report.size_axis(ax, sizes)
    fig.canvas.draw()
    assert ax.get_xscale() == scale
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    minor = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
    assert labels and not minor and len(set(labels)) == len(labels)
    assert all(re.fullmatch(r"[\d.]+[KM]", label) for label in labels), labels
