"""`python -m train` as a user runs it: real subprocesses on the real GLUE files."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, run_train


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def test_lora_on_real_rte(tmp_path, real_glue_dir):
    out = tmp_path / "run"
    p = run_train(["method=lora", "task=rte", "logger=none", "trainer=debug", "trainer.max_train_samples=64",
                   "trainer.max_eval_samples=64", "trainer.epochs=1", "trainer.max_seq_length=64",
                   f"hydra.run.dir={out}"], cwd=tmp_path, env={"GLUE_DIR": str(real_glue_dir)})
    assert p.returncode == 0, p.stderr[-3000:]
    r = _results(out)
    assert r["status"] == "ok" and r["task"] == "rte" and r["method"] == "lora"
    assert 0.0 <= r["best"]["eval/accuracy"] <= 1.0
    assert r["ledger"]["n_matrices"] == 36 and r["params"]["adapter_trainable"] == 331_776
    assert (out / "metrics.jsonl").read_text().count("\n") == 1
    assert (out / "adapter" / "lorabench_adapter.safetensors").exists()
    assert (out / ".hydra" / "config.yaml").exists()
    assert r["versions"]["torch"] and r["timings"]["steps"] == 4
    assert 0.0 <= r["timings"]["data_fraction"] <= 1.0


def test_unknown_method_lists_known(tmp_path):
    p = run_train(["method=nope", "logger=none"], cwd=tmp_path)
    assert p.returncode != 0
    assert "method" in p.stderr and "lora" in p.stderr


@pytest.mark.parametrize("task, missing", [("qnli", "train.tsv"), ("mnli", "MNLI")])
def test_missing_task_data_is_one_clear_line(tmp_path, real_glue_dir, task, missing):
    """The shared GLUE copy has QNLI's dev set only and no MNLI folder."""
    out = tmp_path / "run"
    p = run_train([f"task={task}", "logger=none", f"hydra.run.dir={out}"], cwd=tmp_path,
                  env={"GLUE_DIR": str(real_glue_dir)})
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: task {task}:") and missing in last and str(real_glue_dir) in last
    assert "Traceback" not in p.stderr
    assert not out.exists()  # refused before training: no run directory left behind


@pytest.mark.parametrize("task, metrics", [("cola", ["mcc", "accuracy"]), ("sst2", ["accuracy"]),
                                           ("mrpc", ["accuracy", "f1"]), ("stsb", ["pearson", "spearman"]),
                                           ("rte", ["accuracy"]), ("wnli", ["accuracy"])])
def test_every_local_task_trains_on_the_real_files(tmp_path, real_glue_dir, task, metrics):
    """One job per task through the same entry as `python -m train` (composed in-process to keep it quick):
    status ok and the task's official metrics, read from its real TSVs."""
    from test_bad_input import compose
    from lorabench.cli import run_configured_job

    cfg = compose(["model=tiny", f"task={task}", "method=lora", "logger=none", "trainer=debug",
                   "trainer.progress_bar=false", "trainer.max_train_samples=32", "trainer.max_eval_samples=32",
                   "trainer.epochs=1", "trainer.max_seq_length=32", f"data.glue_dir={real_glue_dir}"])
    run_configured_job(cfg, tmp_path / "run")
    r = _results(tmp_path / "run")
    assert r["status"] == "ok" and r["task"] == task
    assert sorted(r["best"]) == sorted(["step", "epoch"] + [f"eval/{m}" for m in metrics])


def test_values_in_another_form_are_accepted():
    """Odd but valid: an integral float for an integer, numbers and booleans as strings (what `${oc.env:...}`
    interpolations give) are converted, not refused."""
    from lorabench.budget import Budget
    from lorabench.training.trainer import TrainerConfig
    from lorabench.methods import check_options

    c = TrainerConfig(epochs=2.0, lr="1e-3", progress_bar="false", max_steps="10")
    assert (c.epochs, c.lr, c.progress_bar, c.max_steps) == (2, 1e-3, False, 10)
    assert Budget("r4", 4.0).rank == 4
    method = {"name": "lora", "alpha": "8", "use_rslora": "true", "dropout": 0}
    check_options(method)
    assert method == {"name": "lora", "alpha": 8.0, "use_rslora": True, "dropout": 0}


def test_a_missing_oracle_fails_in_ci_and_skips_elsewhere(tmp_path):
    """conftest.require: the PEFT parity tests must not pass silently where peft is missing in CI."""
    import subprocess
    import sys

    (tmp_path / "test_needs.py").write_text(
        "from conftest import require\n\ndef test_it():\n    require('no_such_oracle_module')\n")
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    for ci, outcome in (("1", "1 failed"), ("", "1 skipped")):
        env = {k: v for k, v in __import__("os").environ.items() if k != "CI"}
        if ci:
            env["CI"] = ci
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert outcome in p.stdout, p.stdout[-2000:]
