"""Every bad input of issue 6 §3, as ONE table: the overrides a user would type, the message fragments the one
`error: ...` line must hold, exit status != 0, and no results.json claiming success (nor a checkpoint that is not
complete).

Cases marked `cli` run as real `python -m train` subprocesses (all started at once by a module fixture); the
others compose the same Hydra config in-process and go through the same entry (`cli.run_configured_job`), which
prints the line and exits: the checks are the same, without a Python start-up per case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import FIXTURE_GLUE, REPO

TINY = ["model=tiny", "task=rte", "method=lora", "budget=r4", "logger=none", "trainer.progress_bar=false",
        "trainer.max_seq_length=32", "trainer.epochs=1"]


# --- broken inputs, each written into its own tmp folder ------------------------------------------------------

def glue_copy(tmp: Path) -> Path:
    d = tmp / "glue"
    shutil.copytree(FIXTURE_GLUE, d)
    return d


def rte_file(edit: Callable[[str], str], name: str = "train.tsv"):
    """A GLUE copy whose RTE/<name> is `edit(original text)`."""
    def setup(tmp: Path) -> dict[str, str]:
        d = glue_copy(tmp)
        f = d / "RTE" / name
        f.write_text(edit(f.read_text()))
        return {"glue": str(d), "file": str(f)}
    return setup


def fixture_glue(tmp: Path) -> dict[str, str]:
    return {"glue": str(glue_copy(tmp))}


def no_rte_folder(tmp: Path) -> dict[str, str]:
    d = glue_copy(tmp)
    shutil.rmtree(d / "RTE")
    return {"glue": str(d)}


def not_a_model(tmp: Path) -> dict[str, str]:
    d = tmp / "not_a_model"
    d.mkdir()
    (d / "weights.txt").write_text("no config.json here")
    return {**fixture_glue(tmp), "model": str(d)}


def file_in_the_way(tmp: Path) -> dict[str, str]:
    # the run directory would be inside a regular file: unwritable even for root (tests may run as root)
    (tmp / "blocker").write_text("")
    return {**fixture_glue(tmp), "out": str(tmp / "blocker" / "run")}


def run_with_other_config_checkpoint(tmp: Path) -> dict[str, str]:
    """A run directory holding a complete checkpoint written under trainer.lr=1e-3 (this config has 5e-4)."""
    from lorabench.training import checkpoint as ckpt

    info = fixture_glue(tmp)
    cfg = compose(TINY + [f"data.glue_dir={info['glue']}", "trainer.lr=1e-3", "seed=3"])
    out = tmp / "out"
    ckpt.write_checkpoint(out, 2, {"step": 2}, ckpt.config_fingerprint(cfg))
    return {**info, "out": str(out)}


def lower(text: str) -> str:
    return text.replace("entailment", "ENT", 1)


def drop_column(text: str) -> str:
    lines = text.split("\n")
    lines[2] = lines[2].rsplit("\t", 2)[0] + "\t" + lines[2].rsplit("\t", 1)[1]  # line 3: 3 fields instead of 4
    return "\n".join(lines)


def bad_label(text: str) -> str:
    lines = text.split("\n")
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\tmaybe"  # line 3
    return "\n".join(lines)


def wrong_header(text: str) -> str:
    lines = text.split("\n")
    lines[0] = "index\tpremise\thypothesis\tlabel"
    return "\n".join(lines)


@dataclass
class Case:
    id: str
    overrides: list[str]          # {glue}, {out}, {model}, {tmp} are filled from setup()
    fragments: list[str]          # all must be in the last stderr line, which starts with "error: "
    setup: Callable[[Path], dict[str, str]] = fixture_glue
    cli: bool = False             # a real `python -m train` subprocess
    check: Callable[[Path], None] | None = None  # extra checks on the run directory
    leaves_no_dir: bool = True    # refused before training: the run directory is removed (no litter)


def nan_checks(out: Path) -> None:
    """Stopped at the step the loss went non-finite; the checkpoints kept are complete and finite."""
    from lorabench.training import checkpoint as ckpt

    steps = [s for s, _ in ckpt.complete_checkpoints(out)]
    assert steps, "the last good checkpoint was not kept"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    state = torch.load(ckpt.latest_checkpoint(out) / "state.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


CASES = [
    # names: Hydra refuses before the job (the valid names are listed)
    Case("unknown-method", ["method=nope"], ["unknown method 'nope'", "dora_dynamic", "lora", "xgblora"], cli=True),
    Case("unknown-task", ["task=nope"], ["unknown task 'nope'", "rte", "sst2"], cli=True),
    Case("unknown-model", ["model=nope"], ["unknown model 'nope'", "minilm", "tiny"], cli=True),
    Case("unknown-budget", ["budget=r3"], ["unknown budget 'r3'", "r2", "r4", "r8"], cli=True),
    # near-miss names get a "did you mean"
    Case("near-miss-method", ["method=dora-dynamic"], ["unknown method 'dora-dynamic'", "did you mean dora_dynamic"],
         cli=True),
    Case("near-miss-task", ["task=SST2"], ["unknown task 'SST2'", "did you mean sst2"], cli=True),
    Case("budget-by-rank-name", ["budget=r16"], ["unknown budget 'r16'", "budget.rank=16"], cli=True),
    Case("unknown-trainer-key", ["+trainer.lrr=1e-3"], ["unknown trainer option 'lrr'", "did you mean lr"]),
    Case("unknown-method-key", ["+method.alpah=8"], ["method lora has no option 'alpah'", "did you mean alpha"]),
    # values of the wrong type or outside their range, named with what is allowed
    Case("lr-not-a-number", ["trainer.lr=abc"], ["trainer.lr='abc' is not valid", "expected a number"], cli=True),
    Case("max-steps-zero", ["trainer.max_steps=0"], ["trainer.max_steps must be >= 1", "got 0"], cli=True),
    Case("warmup-ratio-above-1", ["trainer.warmup_ratio=1.5"], ["trainer.warmup_ratio must be in [0, 1)", "1.5"]),
    Case("batch-size-float", ["trainer.batch_size=2.5"], ["trainer.batch_size=2.5", "expected an integer"]),
    Case("max-train-samples-negative", ["trainer.max_train_samples=-5"], ["trainer.max_train_samples must be >= 1"]),
    Case("max-seq-length-tiny", ["trainer.max_seq_length=2"], ["trainer.max_seq_length must be >= 8", "got 2"]),
    Case("rank-float", ["budget.rank=2.5"], ["budget.rank=2.5 is not valid", "expected an integer"]),
    Case("method-option-type", ["method.alpha=abc"], ["method.alpha='abc' is not valid", "expected a number"]),
    Case("method-flag-type", ["method.use_rslora=maybe"], ["method.use_rslora='maybe'", "true or false"]),
    Case("grid-preset-without-m", ["experiment=cpu_smoke"], ["defines a sweep grid", "run it with -m"], cli=True),
    # budgets the method cannot meet
    Case("target-rank-above-initial", ["method=dora_dynamic", "budget.init_ratio=0.5"],
         ["budget.init_ratio must be >= 1", "0.5"]),
    Case("zero-rank", ["budget.rank=0"], ["budget.rank must be a positive integer", "got 0"], cli=True),
    Case("empty-target-list", ["budget.target_modules=[]"], ["budget.target_modules is empty", "query"]),
    Case("unknown-target-role", ["budget.target_modules=[querry]"], ["unknown role(s) ['querry']", "query"]),
    Case("targets-match-nothing", ["budget.target_modules=[query]", "model.targets.query=attention.self.qq"],
         ["matched no nn.Linear in model tiny", "attention.self.qq"]),
    # data
    Case("glue-dir-missing", ["data.glue_dir={tmp}/no_such_glue"], ["GLUE directory", "no_such_glue",
                                                                    "does not exist"], cli=True),
    Case("task-folder-missing", [], ["task rte: folder", "RTE not found"], setup=no_rte_folder),
    Case("empty-file", [], ["GLUE file", "RTE/train.tsv is empty"], setup=rte_file(lambda t: "")),
    Case("wrong-header", [], ["RTE/train.tsv line 1: wrong header", "missing ['sentence1', 'sentence2']"],
         setup=rte_file(wrong_header)),
    Case("wrong-column-count", [], ["RTE/train.tsv line 3: expected 4 tab-separated columns, found 3"],
         setup=rte_file(drop_column)),
    Case("label-outside-set", [], ["RTE/dev.tsv line 3: label 'maybe' is not one of", "entailment"],
         setup=rte_file(bad_label, "dev.tsv"), cli=True),
    # model
    Case("model-path-missing", ["model=minilm", "model.source=path", "model.path={tmp}/no_model"],
         ["model path", "no_model does not exist"]),
    Case("model-path-not-a-model", ["model=minilm", "model.source=path", "model.path={model}"],
         ["not_a_model is not a model folder"], setup=not_a_model),
    # training: an honest NaN (a learning rate that overflows the weights); the step is named
    Case("nan-loss", ["trainer.lr=1e30", "trainer.warmup_steps=0", "trainer.checkpoint_every=1",
                      "trainer.max_train_samples=8", "trainer.batch_size=2"],
         ["non-finite", "optimizer step 2", "last good checkpoint", "step-0000001"], cli=True, check=nan_checks,
         leaves_no_dir=False),
    # output
    # Hydra creates the run directory before the job (cli.py words its failure); run_job checks it again
    Case("output-dir-not-writable", [], ["cannot create the run directory", "blocker/run", "hydra.run.dir"],
         setup=file_in_the_way, cli=True, leaves_no_dir=False),
    Case("output-dir-not-writable-job", [], ["output directory", "blocker/run is not writable", "hydra.run.dir"],
         setup=file_in_the_way, leaves_no_dir=False),
    # resume
    Case("resume-nothing", ["trainer.resume=true"], ["nothing to resume", "no complete checkpoint",
                                                     "trainer.checkpoint_every"]),
    Case("resume-missing-dir", ["trainer.resume={tmp}/no_such_run"], ["nothing to resume", "no_such_run",
                                                                       "is not a directory"]),
    Case("resume-other-config", ["trainer.resume=true", "seed=3"],
         ["cannot resume", "different configuration", "trainer.lr: checkpoint 0.001, now 0.0005"],
         setup=run_with_other_config_checkpoint, leaves_no_dir=False),
]


# --- running a case -------------------------------------------------------------------------------------------

def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(hydra_compose("config", overrides=overrides), resolve=True)


def _prepare(case: Case, tmp: Path) -> tuple[list[str], Path]:
    info = {"tmp": str(tmp), "out": str(tmp / "out"), **case.setup(tmp)}
    args = [a.format(**info) for a in TINY + case.overrides]
    if not any(a.startswith("data.glue_dir=") for a in args):
        args.append(f"data.glue_dir={info['glue']}")
    return args, Path(info["out"])


def _run_cli(case: Case, tmp: Path) -> tuple[int, str, Path]:
    args, out = _prepare(case, tmp)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GLUE_DIR", None)
    p = subprocess.run([sys.executable, "-m", "train", *args, f"hydra.run.dir={out}"], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stderr, out


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Every `cli` case, run as subprocesses two at a time (they are independent)."""
    cases = [c for c in CASES if c.cli]
    dirs = {c.id: tmp_path_factory.mktemp(c.id) for c in cases}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.id: pool.submit(_run_cli, c, dirs[c.id]) for c in cases}
        return {k: f.result() for k, f in futures.items()}


def _run_in_process(case: Case, tmp: Path, capsys) -> tuple[int, str, Path]:
    from lorabench.cli import run_configured_job

    args, out = _prepare(case, tmp)
    cfg = compose(args)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_configured_job(cfg, out)
    return exc.value.code, capsys.readouterr().err, out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys, request):
    if case.cli:
        rc, err, out = request.getfixturevalue("cli_results")[case.id]
    else:
        rc, err, out = _run_in_process(case, tmp_path, capsys)
    assert rc not in (0, None), err[-3000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines, "no message at all"
    last = lines[-1]
    assert last.startswith("error: "), err[-3000:]
    print(f"{case.id}: exit {rc}: {last}")
    for fragment in case.fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    assert "Traceback" not in err
    # nothing claims success; a failure record, if written, says failed
    results = out / "results.json"
    if results.exists():
        assert json.loads(results.read_text())["status"] == "failed"
    if case.check is not None:
        case.check(out)
    if case.leaves_no_dir:
        assert not out.exists(), f"a run refused before training left {sorted(p.name for p in out.iterdir())}"
    else:
        assert out.exists() or case.id.startswith("output-dir")  # a directory that was there stays
