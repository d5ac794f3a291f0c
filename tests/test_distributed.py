"""One job on two processes (torchrun, gloo on CPU) computes what one process computes.

- the collectives themselves (distributed.py) on two real processes: gradient averaging with missing gradients,
  the flags carried with it, the agreement check catching a difference, rank 0's errors reaching the others,
  each process's share of a global batch and its loss weight;
- a sweep of every registered method run by `torchrun --nproc_per_node=2 -m train -m ...` against the same jobs
  run by one process: the same adapter and head tensors within fp32 rounding (|a − b| ≤ ATOL + RTOL·|b|: the
  gradient of each global batch is summed in another order), the same rank pattern and training losses, one
  results.json per job written by rank 0. The last global batch (241 = 15·16 + 1 examples) leaves rank 0 with
  nothing: the zero-weight example path. Every job also checks in-run that both processes hold bit-identical
  adapters after every evaluation (a run whose processes diverged fails);
- a single 2-process run in the default time-stamped directory, killed (SIGKILL to every process) after its first
  checkpoint and resumed with `trainer.resume=true`: one run directory, one results.json, and the resumed run
  ends bit for bit where the uninterrupted 2-process run ends.
Dropout is off (backbone and adapters), so that one process and two draw no different masks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, crash_after_first_checkpoint

METHODS = ["lora", "adalora", "dora_dynamic", "dora", "xgblora", "dynamic_lora"]
COMMON = ["task=rte", "model=tiny", "trainer=debug", "logger=none", "trainer.progress_bar=false",
          "trainer.max_train_samples=241", "trainer.max_eval_samples=64", "trainer.max_seq_length=64",
          "method.dropout=0.0", "+model.config.hidden_dropout_prob=0.0",
          "+model.config.attention_probs_dropout_prob=0.0"]
RTOL, ATOL = 1e-4, 1e-6
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(args: list[str], cwd: Path, glue: Path, nproc: int = 2, **popen) -> subprocess.Popen:
    env = {**os.environ, **ENV, "GLUE_DIR": str(glue)}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _finish(p: subprocess.Popen, timeout: int = 400) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def _why(out: str) -> str:
    """A failed torchrun's own lines, without torchrun's report around them."""
    return "\n".join(ln for ln in out.splitlines() if "torch/distributed" not in ln)[-5000:]


def _compose(overrides: list[str], glue: Path) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=[*overrides, f"data.glue_dir={glue}"]),
                                      resolve=True)


def _tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "lorabench_adapter.safetensors"))


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(ln)["train/loss"] for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]


# --- the collectives on two processes ---------------------------------------------------------------------------

WORKER = textwrap.dedent('''
    import sys
    import torch
    from lorabench import distributed
    from lorabench.errors import ConfigError, TrainingError

    procs = distributed.init_from_env()
    rank = procs.rank
    assert procs.world_size == 2 and procs.backend == "gloo"

    # gradients: averaged; missing in one process = zero there; missing everywhere = stays None; frozen untouched
    both, one, none, frozen = (torch.nn.Parameter(torch.zeros(3)) for _ in range(4))
    frozen.requires_grad_(False)
    both.grad = torch.full((3,), float(rank + 1))
    if rank == 1:
        one.grad = torch.full((3,), 4.0)
    frozen.grad = torch.full((3,), 9.0)
    flags = procs.average_gradients([both, one, none, frozen], [rank + 1.0, 0.5])
    assert flags == [3.0, 1.0], flags
    assert both.grad.tolist() == [1.5] * 3 and one.grad.tolist() == [2.0] * 3, (both.grad, one.grad)
    assert none.grad is None and frozen.grad.tolist() == [9.0] * 3

    # agreement: equal passes; a difference in one process fails in both, naming the tensor
    procs.check_agree({"a": torch.ones(4), "b": torch.arange(3.0)}, extra={"m": 2})
    try:
        procs.check_agree({"a": torch.ones(4), "b": torch.arange(3.0) + (1e-6 if rank else 0)})
        raise AssertionError("a difference went unnoticed")
    except TrainingError as e:
        assert " b differs" in str(e), e
    try:
        procs.check_agree({}, extra={"m": rank})
        raise AssertionError("a different rank pattern went unnoticed")
    except TrainingError as e:
        assert "rank 1 has" in str(e), e

    # rank 0 decides; its error (a user error) reaches every process as the same error
    assert procs.main_decides(lambda: f"decided by {rank}") == "decided by 0"
    try:
        procs.main_decides(lambda: (_ for _ in ()).throw(ConfigError("no such thing")))
        raise AssertionError("rank 0's error did not reach rank %d" % rank)
    except ConfigError as e:
        assert str(e) == "no such thing"

    # shares of a global batch: 5 examples in batches of 4 -> [4, 1]; rank 0 gets nothing of the second
    class Loader:
        batch_size, epoch, skip_batches = 4, 0, 0
        split = list(range(10, 15))
        def __len__(self): return 2
        def order(self, epoch): return [4, 3, 2, 1, 0]
        def collate(self, split, idx): return {"ids": torch.tensor([split[i] for i in idx])}
    got = [(b["ids"].tolist(), float(b[distributed.LOSS_WEIGHT_KEY])) for b in
           distributed.ShardedBatches(Loader(), procs)]
    want = {0: [([14, 13], 1.0), ([10], 0.0)], 1: [([12, 11], 1.0), ([10], 2.0)]}[rank]
    assert got == want, got
    print(f"rank {rank} ok", flush=True)
''')


def test_collectives_on_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO / "src")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rank 0 ok" in p.stdout and "rank 1 ok" in p.stdout


# --- whole runs -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_glue_dir):
    """{"one": {method: run dir}, "two": {method: run dir}, "two_log": output, "resume": {...}}."""
    tmp = tmp_path_factory.mktemp("distributed")
    two_sweep = tmp / "two"
    sweep = torchrun(["-m", "train", "-m", f"method={','.join(METHODS)}", *COMMON, f"hydra.sweep.dir={two_sweep}"],
                     tmp, real_glue_dir)
    # meanwhile, the same jobs in this process, one thread (as each torchrun process has)
    from lorabench.run import run_job

    one: dict[str, Path] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for m in METHODS:
            one[m] = tmp / "one" / m
            run_job(_compose([f"method={m}", *COMMON], real_glue_dir), one[m])
    finally:
        torch.set_num_threads(threads)
    rc, out = _finish(sweep)
    assert rc == 0, _why(out)
    two = {m: two_sweep / f"{i}_rte_{m}_s1" for i, m in enumerate(METHODS)}

    # killed after the first checkpoint, then resumed, in the default time-stamped run directory
    runs_dir = tmp / "runs"
    args = ["method=adalora", *COMMON, f"paths.runs_dir={runs_dir}", "trainer.checkpoint_every=4"]
    killed = torchrun([str(crash_after_first_checkpoint(tmp, whole_job=True)), *args], tmp, real_glue_dir)
    rc, out = _finish(killed)
    assert rc == -signal.SIGKILL, f"the run to crash ended with {rc}, not killed after a checkpoint:\n{_why(out)}"
    method_dir = runs_dir / "rte" / "adalora"
    killed_dirs = sorted(method_dir.iterdir())
    killed_steps = sorted(int(d.name.split("-")[1]) for d in killed_dirs[0].glob("checkpoints/step-*"))
    rc, out = _finish(torchrun(["-m", "train", *args, "trainer.resume=true"], tmp, real_glue_dir))
    assert rc == 0, _why(out)
    return {"one": one, "two": two, "two_sweep": two_sweep, "killed_dirs": killed_dirs,
            "killed_steps": killed_steps, "after_resume": sorted(method_dir.iterdir()), "resume_log": out}


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_end_with_the_one_process_adapter(runs, method):
    one, two = runs["one"][method], runs["two"][method]
    r1, r2 = _results(one), _results(two)
    assert r1["status"] == r2["status"] == "ok"
    assert r2["processes"] == 2 and r1["processes"] == 1
    assert r2["timings"]["steps"] == r1["timings"]["steps"] == 32
    assert r2["rank_pattern"] == r1["rank_pattern"]
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{method} {k}: {m}")
        else:
            assert a[k].equal(b[k]), k
    # the logged loss is the global batch's mean loss, not rank 0's share
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    assert [h["step"] for h in r2["history"]] == [h["step"] for h in r1["history"]]


def test_one_results_file_per_job_written_by_rank_zero(runs):
    sweep = runs["two_sweep"]
    jobs = sorted(d.name for d in sweep.iterdir() if d.is_dir() and d.name != "plots")
    assert jobs == sorted(f"{i}_rte_{m}_s1" for i, m in enumerate(METHODS))
    for job in jobs:
        files = {p.name for p in (sweep / job).iterdir()}
        assert "results.json" in files and ".hydra" in files, files
        assert not any(n.startswith(".results.json.tmp") for n in files), files
    assert (sweep / "report.md").exists()  # rank 0 reported once
    assert not list(sweep.parent.glob(sweep.name + "-*"))  # no second sweep directory from the other process


def test_killed_and_resumed_two_process_run(runs):
    killed, after = runs["killed_dirs"], runs["after_resume"]
    assert len(killed) == 1, killed  # one time-stamped directory for both processes
    assert runs["killed_steps"] and runs["killed_steps"][0] == 4
    assert after == killed, after  # the resume continued it; the directory it was given was dropped
    run_dir = killed[0]
    resumed = _results(run_dir)
    assert resumed["status"] == "ok" and resumed["processes"] == 2
    assert resumed["resumed_from"]["step"] in runs["killed_steps"]
    assert len(list(run_dir.rglob("results.json"))) == 1
    # bit for bit the uninterrupted 2-process run of the same configuration (the sweep's adalora job)
    ref_dir = runs["two"]["adalora"]
    ref = _results(ref_dir)
    for key in ("best", "last", "history", "rank_pattern"):
        assert resumed[key] == ref[key], key
    a, b = _tensors(ref_dir), _tensors(run_dir)
    assert all(a[k].equal(b[k]) for k in a)


def test_submitit_tasks_form_one_job(runs, tmp_path, real_glue_dir):
    """hydra.launcher.tasks_per_node=2 (the SLURM recipe's path, here with submitit's local executor): the two
    tasks of a job join one process group from submitit's environment and end where torchrun's two processes do."""
    from conftest import require, run_train

    require("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    p = run_train(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "method=lora", *COMMON,
                   f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env={**ENV, "GLUE_DIR": str(real_glue_dir)})
    assert p.returncode == 0, p.stderr[-4000:]
    job = sweep / "0_rte_lora_s1"
    r = _results(job)
    assert r["status"] == "ok" and r["processes"] == 2
    a, b = _tensors(runs["two"]["lora"]), _tensors(job)
    assert all(a[k].equal(b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL refuses two processes on one)")
def test_two_gpus_end_with_the_one_gpu_adapter(tmp_path, real_glue_dir):
    """NCCL for the gradients, gloo for the CPU-side exchanges: the same run on one GPU and on two."""
    from lorabench.run import run_job

    args = ["method=adalora", *COMMON, "trainer.device=auto"]
    rc, out = _finish(torchrun(["-m", "train", *args, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path, real_glue_dir))
    assert rc == 0, _why(out)
    run_job(_compose(args, real_glue_dir), tmp_path / "one")
    two, one = _results(tmp_path / "two"), _results(tmp_path / "one")
    assert two["processes"] == 2 and two["device"].startswith("cuda:0")
    assert two["rank_pattern"] == one["rank_pattern"]
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    for k in a:  # CUDA kernels reduce in their own order: a looser tolerance than on the CPU
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
