"""Exact resume, as a user would do it: `python -m train ... trainer.checkpoint_every=k`, SIGKILL after the first
complete checkpoint (before the pruning / boosting schedule is over; the run kills itself there, so the step does not
depend on the machine's load), `trainer.resume=true`, and the result must equal an uninterrupted run of the same
seed bit for bit (CPU, fp32, one thread per process).

The runs to kill and resume are `python -m train` subprocesses; the uninterrupted references run in the pytest
process meanwhile (one module fixture), so the file costs about two process lifetimes of wall time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, crash_after_first_checkpoint

# 96 RTE examples, batch 8: 12 steps per epoch, 2 epochs = 24 steps. dora_dynamic's pruning window is
# steps ⌊0.15·24⌋ .. 0.15·24 + ⌊0.35·24⌋ (events every 2 steps), so it ends after step 11; the first
# checkpoint (step 4) is mid-epoch (4 of 12 batches) and inside the warm-up/pruning schedule.
COMMON = ["task=rte", "model=tiny", "budget=r4", "logger=none", "trainer.max_train_samples=96",
          "trainer.max_eval_samples=32", "trainer.max_seq_length=32", "trainer.batch_size=8", "trainer.epochs=2",
          "trainer.eval_every=6", "trainer.progress_bar=false", "trainer.log_every=2", "seed=7"]
CKPT_EVERY = 4
TOTAL_STEPS = 24
METHODS = {
    # name: (overrides, the last optimizer step at which its schedule still changes the adapter structure)
    "dora_dynamic": (["method=dora_dynamic", "method.prune_interval=2"], 11),
    # boosters of 5 steps: booster index, sampled blocks and merged weights change at steps 5, 10, 15, 20
    "xgblora": (["method=xgblora", "method.steps_per_booster=5", "method.layers_per_booster=1"], 20),
}
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fixed reduction order, and room for parallel runs


def _start(args: list[str], run_dir: Path, cwd: Path, glue: Path, crash: bool = False) -> subprocess.Popen:
    """`python -m train`; with `crash`, a run that SIGKILLs itself after its first checkpoint (conftest)."""
    env = {**os.environ, **ENV, "GLUE_DIR": str(glue)}
    entry = [str(crash_after_first_checkpoint(cwd))] if crash else ["-m", "train"]
    return subprocess.Popen([sys.executable, *entry, *args, f"hydra.run.dir={run_dir}"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def _complete_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name.split("-")[1]) for d in root.glob("step-*") if (d / "manifest.json").is_file())


def _compose(overrides: list[str], glue: Path) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=[*overrides, f"data.glue_dir={glue}"]),
                                      resolve=True)


def _run_here(args: list[str], run_dir: Path, glue: Path) -> tuple[Path, int, str]:
    """An uninterrupted run in this process (as `python -m train` runs it, minus the start-up), one thread."""
    import torch

    from lorabench.run import run_job

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_job(_compose(args, glue), run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir, 0, ""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_glue_dir):
    """All the runs of this file; returns {label: (run_dir, returncode, stderr)}.

    The runs to kill and resume are real `python -m train` processes; the uninterrupted references run in
    this process meanwhile (same code, same config, one thread), which also makes "resumed == reference" a
    check across processes.
    """
    tmp = tmp_path_factory.mktemp("resume")
    out: dict[str, tuple[Path, int, str]] = {}
    killed = {name: (_start(COMMON + args + [f"trainer.checkpoint_every={CKPT_EVERY}"], tmp / f"{name}-killed",
                            tmp, real_glue_dir, crash=True), tmp / f"{name}-killed")
              for name, (args, _) in METHODS.items()}
    killed_at: dict[str, list[int]] = {}
    for name, (p, d) in killed.items():
        rc, err = _finish(p)
        assert rc == -signal.SIGKILL, f"{name}: the run to crash ended with {rc} before its first checkpoint:\n{err[-3000:]}"
        killed_at[name] = _complete_steps(d)
        out[f"{name}/killed"] = (d, rc, "")
    # a snapshot of the killed run, for the refused resumes
    shutil.copytree(tmp / "dora_dynamic-killed", tmp / "dora_dynamic-killed-copy")
    out["_killed_copy"] = tmp / "dora_dynamic-killed-copy"  # type: ignore[assignment]
    # the resumes: dora_dynamic continues in place (trainer.resume=true); xgblora gets a new hydra.run.dir and
    # names the run to continue (trainer.resume=<run dir>), whose directory then receives the outputs
    dd, xgb = METHODS["dora_dynamic"][0], METHODS["xgblora"][0]
    ck = f"trainer.checkpoint_every={CKPT_EVERY}"
    resumed = {
        "dora_dynamic/resumed": (_start(COMMON + dd + [ck, "trainer.resume=true"], tmp / "dora_dynamic-killed", tmp,
                                        real_glue_dir), tmp / "dora_dynamic-killed"),
        "xgblora/resumed": (_start(COMMON + xgb + [ck, f"trainer.resume={tmp / 'xgblora-killed'}"],
                                   tmp / "xgblora-elsewhere", tmp, real_glue_dir), tmp / "xgblora-killed"),
    }
    # uninterrupted references (dora_dynamic twice, the second without checkpoints: determinism)
    out["dora_dynamic/ref"] = _run_here(COMMON + dd + [ck], tmp / "dora_dynamic-ref", real_glue_dir)
    out["dora_dynamic/ref2"] = _run_here(COMMON + dd, tmp / "dora_dynamic-ref2", real_glue_dir)
    out["xgblora/ref"] = _run_here(COMMON + xgb + [ck], tmp / "xgblora-ref", real_glue_dir)
    for label, (p, d) in resumed.items():
        rc, err = _finish(p)
        out[label] = (d, rc, err)
    out["_killed_at"] = killed_at  # type: ignore[assignment]
    return out


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _ok(runs, label) -> dict:
    d, rc, err = runs[label]
    assert rc == 0, f"{label} failed:\n{err[-4000:]}"
    r = _results(d)
    assert r["status"] == "ok"
    return r


@pytest.mark.parametrize("name", list(METHODS))
def test_killed_run_left_a_checkpoint_inside_the_schedule(runs, name):
    d, rc, _ = runs[f"{name}/killed"]
    steps = runs["_killed_at"][name]
    assert rc == -signal.SIGKILL
    assert steps and steps[0] == CKPT_EVERY
    # killed before the schedule ended, and mid-epoch (12 steps per epoch)
    assert max(steps) <= METHODS[name][1] - 1 and max(steps) % 12 != 0, steps


@pytest.mark.parametrize("name", list(METHODS))
def test_resume_equals_uninterrupted(runs, name):
    ref = _ok(runs, f"{name}/ref")
    res = _ok(runs, f"{name}/resumed")
    assert res["resumed_from"]["step"] in runs["_killed_at"][name]
    assert res["timings"]["steps"] == ref["timings"]["steps"] == TOTAL_STEPS
    for key in ("best", "last", "history", "rank_pattern", "ledger"):
        assert res[key] == ref[key], key
    ref_dir, res_dir = runs[f"{name}/ref"][0], runs[f"{name}/resumed"][0]
    # the logs of the resumed run are the uninterrupted run's (the killed run's lines past the checkpoint dropped)
    for log in ("metrics.jsonl", "train_log.jsonl"):
        assert (res_dir / log).read_text() == (ref_dir / log).read_text(), log
    # the trained tensors themselves, bit for bit (adapter, head, and xgblora's merged boosters)
    a = load_file(str(ref_dir / "adapter" / "lorabench_adapter.safetensors"))
    b = load_file(str(res_dir / "adapter" / "lorabench_adapter.safetensors"))
    assert a.keys() == b.keys()
    # the head includes the backbone's untouched pooler, which trains and must come back from the checkpoint
    assert {"head.bert.pooler.dense.weight", "head.classifier.weight"} <= a.keys()
    for k in a:
        assert a[k].equal(b[k]), k


def test_xgblora_resume_kept_booster_state(runs):
    ref = _ok(runs, "xgblora/ref")
    res = _ok(runs, "xgblora/resumed")
    assert ref["ledger"]["notes"] == res["ledger"]["notes"]
    a = load_file(str(runs["xgblora/ref"][0] / "adapter" / "merged_weights.safetensors"))
    b = load_file(str(runs["xgblora/resumed"][0] / "adapter" / "merged_weights.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)


def test_same_config_twice_gives_identical_metrics(runs):
    r1 = _ok(runs, "dora_dynamic/ref")
    r2 = _ok(runs, "dora_dynamic/ref2")  # no checkpointing: saving must not change the run either
    for key in ("best", "last", "history", "rank_pattern"):
        assert r1[key] == r2[key], key


def _run_in_process(overrides: list[str], out: Path, glue: Path, capsys) -> tuple[int, str]:
    """The `python -m train` job entry in this process (Hydra's compose; no Python start-up per case)."""
    from lorabench.cli import run_configured_job

    cfg = _compose(overrides, glue)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_configured_job(cfg, out)
    return exc.value.code, capsys.readouterr().err


def test_resume_with_nothing_to_resume_is_refused(tmp_path, real_glue_dir, capsys):
    args = COMMON + METHODS["dora_dynamic"][0] + ["trainer.resume=true"]
    rc, err = _run_in_process(args, tmp_path / "empty", real_glue_dir, capsys)
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: nothing to resume") and "checkpoint_every" in last
    # a checkpoint cut short by a kill (a temp folder, a step folder without manifest) is not a checkpoint
    root = tmp_path / "cut" / "checkpoints"
    (root / ".tmp-step-0000004-123").mkdir(parents=True)
    (root / ".tmp-step-0000004-123" / "state.pt").write_bytes(b"partial")
    (root / "step-0000008").mkdir()
    (root / "step-0000008" / "state.pt").write_bytes(b"partial")
    rc, err = _run_in_process(args, tmp_path / "cut", real_glue_dir, capsys)
    assert rc == 2 and "nothing to resume" in err and "no complete checkpoint" in err
    assert not (tmp_path / "cut" / "results.json").exists()


def test_resume_with_changed_config_is_refused_naming_the_keys(runs, real_glue_dir, capsys):
    d = runs["_killed_copy"]
    before = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    args = COMMON + METHODS["dora_dynamic"][0] + [f"trainer.checkpoint_every={CKPT_EVERY}", "trainer.lr=1e-3",
                                                  "method.beta=0.8", "trainer.resume=true"]
    rc, err = _run_in_process(args, d, real_glue_dir, capsys)
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume") and "trainer.lr" in last and "method.beta" in last
    # the refused resume left the earlier run as it was: same files, no results.json, still resumable
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == before
    assert not (d / "results.json").exists()
    assert _complete_steps(d) == runs["_killed_at"]["dora_dynamic"]


def test_fresh_run_over_a_checkpointed_run_is_refused(runs, real_glue_dir, capsys):
    d = runs["_killed_copy"]
    rc, err = _run_in_process(COMMON + METHODS["dora_dynamic"][0], d, real_glue_dir, capsys)
    assert rc == 2 and "already holds checkpoints" in err and "trainer.resume=true" in err
    assert not (d / "results.json").exists()


def test_resume_of_a_finished_run_is_refused(runs, real_glue_dir, capsys):
    d = runs["dora_dynamic/ref"][0]
    before = (d / "results.json").read_text()
    rc, err = _run_in_process(COMMON + METHODS["dora_dynamic"][0] + [f"trainer.checkpoint_every={CKPT_EVERY}",
                                                                    "trainer.resume=true"], d, real_glue_dir, capsys)
    assert rc == 2 and "already finished" in err
    assert (d / "results.json").read_text() == before
