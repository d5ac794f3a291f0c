"""Interchange formats against their real consumers: HF PEFT loads `adapter/` (PeftModel.from_pretrained) and HF
transformers loads the `--merge` directory (AutoModelForSequenceClassification.from_pretrained); both must give
our logits on 32 real RTE dev examples within 1e-4 relative.

The run directories are written as run.py writes them (`_save_adapter`) from a model built the way run.py builds
it (`build_adapted_model`, conf/model/tiny.yaml: random init from a config and the seed), with adapter weights
moved off their init and schedule masks applied so the exported ranks differ per module. One test does it all
through `python -m train` + `python -m lorabench.export` subprocesses; one uses the real MiniLM weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO

from lorabench import export, methods
from lorabench.backbone import ModelSpec, load_model, load_tokenizer
from lorabench.budget import Budget
from lorabench.data import TaskSpec, read_glue_tsv
from lorabench.assemble import build_adapted_model, seed_everything
from lorabench.run import _save_adapter

SEED = 5
PEFT_METHODS = {  # method → overrides of its YAML
    "lora": {},
    "dora": {},
    "adalora": {},
    "dora_dynamic": {},
    "dynamic_lora": {"gate": "none"},
    "dynamic_lora_rank": {"gate": "none", "allocation": "rank"},
}


def yaml_conf(group: str, name: str) -> dict:
    return yaml.safe_load((REPO / "conf" / group / f"{name}.yaml").read_text())


def run_config(method: str, overrides: dict, model: str = "tiny") -> dict:
    method_cfg = {**yaml_conf("method", method.replace("_rank", "")), **overrides}
    return {"method": method_cfg, "budget": yaml_conf("budget", "r4"), "model": yaml_conf("model", model),
            "task": yaml_conf("task", "rte"), "seed": SEED}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def dev_batch(real_glue_dir, minilm_tokenizer):
    """32 real RTE dev examples, tokenized as the runs do (MiniLM tokenizer, also tiny's)."""
    spec = TaskSpec.from_dict(yaml_conf("task", "rte"))
    ex = read_glue_tsv(real_glue_dir / "RTE" / "dev.tsv", spec)
    enc = minilm_tokenizer(ex.text_a[:32], ex.text_b[:32], padding=True, truncation=True, max_length=64,
                           return_tensors="pt")
    return {k: v for k, v in enc.items()}


@torch.no_grad()
def _train_like(method, model, head, seed: int = 11) -> None:
    """Move every adapter tensor and the head off their init, and apply a schedule outcome: some components
    pruned (gates / singular values zeroed, ranks lowered), per-module scale weights away from 1."""
    g = torch.Generator().manual_seed(seed)
    for p in method.trainable_parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.2)
    for _, p in head:
        p.add_(torch.randn(p.shape, generator=g) * 0.2)
    for i, layer in enumerate(method.layers.values()):
        for gate_name in ("lora_gate", "lora_E"):  # dora_dynamic's gates c, adalora's λ
            gate = getattr(layer, gate_name, None)
            if gate is not None:
                gate[: i % 3 + 1] = 0.0  # 1..3 components pruned: the rank pattern differs per module
                if i == 4:
                    gate.zero_()  # one module keeps nothing (left out of the PEFT adapter)
        if getattr(layer, "alloc_weight", None) is not None:
            layer.alloc_weight.fill_(0.5 + 0.25 * (i % 4))
        if getattr(layer, "rank_mask", None) is not None:
            layer.set_rank(1 + i % layer.rank)  # dynamic_lora's rank mode: r_l in 1..r_init


def make_run(tmp_path: Path, method: str, overrides: dict, model: str = "tiny", vocab_size: int | None = None):
    """A run directory with adapter/ as run.py writes it; returns (run_dir, our model in eval mode)."""
    cfg = run_config(method, overrides, model)
    spec = ModelSpec.from_dict(cfg["model"])
    task = TaskSpec.from_dict(cfg["task"])
    vocab = vocab_size or len(load_tokenizer(spec))
    model_, head, m = build_adapted_model(spec, task, methods.get(cfg["method"]["name"]), cfg["method"],
                                          Budget.from_dict(cfg["budget"]), SEED, vocab)
    _train_like(m, model_, head)
    run_dir = tmp_path / f"run-{method}"
    exports = _save_adapter(run_dir / "adapter", m, model_, head, cfg)
    model_.eval()
    return run_dir, model_, m, exports


def base_model(run_dir: Path):
    """The backbone a user of this run starts from: for a config-built model (model=tiny) the same random init,
    rebuilt from the run's own record (model config + seed), as `lorabench.export` does."""
    meta = json.loads((run_dir / "adapter" / "lorabench_adapter.json").read_text())
    spec = ModelSpec.from_dict(meta["model"])
    task = TaskSpec.from_dict(meta["task_spec"])
    if spec.source == "config":
        seed_everything(int(meta["seed"]))
        return load_model(spec, task.num_labels, task.is_regression, vocab_size=meta["vocab_size"]).eval()
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(export.base_model_location(spec),
                                                              num_labels=task.num_labels).eval()


def peft_logits(run_dir: Path, batch) -> torch.Tensor:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base_model(run_dir), str(run_dir / "adapter")).eval()
    with torch.no_grad():
        return peft_model(**batch).logits


def merged_logits(model_dir: Path, batch) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return merged(**batch).logits


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_peft_loads_our_adapter(method, tmp_path, dev_batch):
    run_dir, model, m, exports = make_run(tmp_path, method, PEFT_METHODS[method])
    assert exports == {"peft": "adapter_config.json", "peft_weights": "adapter_model.safetensors"}
    with torch.no_grad():
        ours = model(**dev_batch).logits
    theirs = peft_logits(run_dir, dev_batch)
    assert rel_err(theirs, ours) < 1e-4
    # the adapter is not trivially the base model: the check above could not pass by accident
    with torch.no_grad():
        assert rel_err(base_model(run_dir)(**dev_batch).logits, ours) > 1e-2
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    if method in ("adalora", "dora_dynamic"):
        assert len(set(cfg["rank_pattern"].values())) > 1  # gates / λ pruned per module
        assert len(cfg["target_modules"]) == len(m.layers) - 1  # the module that kept nothing is left out
    if method == "dora":
        assert cfg["use_dora"]


@pytest.mark.parametrize("method", list(PEFT_METHODS) + ["xgblora"])
def test_merge_loads_in_transformers(method, tmp_path, dev_batch):
    overrides = PEFT_METHODS.get(method, {"steps_per_booster": 3})
    run_dir, model, m, _ = make_run(tmp_path, method, overrides)
    with torch.no_grad():
        ours = model(**dev_batch).logits
    out = export.merge_run(run_dir, tmp_path / "merged")
    assert rel_err(merged_logits(out, dev_batch), ours) < 1e-4


def test_xgblora_exports_merged_weights_and_svd_lora(tmp_path, dev_batch):
    run_dir, model, m, exports = make_run(tmp_path, "xgblora", {"steps_per_booster": 3})
    assert exports == {"merged_weights": "merged_weights.safetensors"}
    from safetensors.torch import load_file

    base = base_model(run_dir)
    missing, unexpected = base.load_state_dict(load_file(str(run_dir / "adapter" / "merged_weights.safetensors")),
                                               strict=False)
    assert not unexpected
    with torch.no_grad():
        ours = model(**dev_batch).logits
        assert rel_err(base(**dev_batch).logits, ours) < 1e-4
    # truncated SVD: full rank reproduces the update; rank 1 of a booster sum is lossy, and says so
    hidden = 32
    out_full, err_full = export.svd_lora(run_dir, hidden * 4, tmp_path / "svd_full")
    assert err_full["overall"] < 1e-5
    assert rel_err(peft_logits_at(run_dir, out_full, dev_batch), ours) < 1e-4
    out_1, err_1 = export.svd_lora(run_dir, 1, tmp_path / "svd_1")
    # the error is the exact Frobenius residual, recomputed here from the written adapter
    from safetensors.torch import load_file as lf

    merged = export.merged_weights(m, model, [])
    tensors = lf(str(out_1 / "adapter_model.safetensors"))
    loaded = export.load_run(run_dir)
    num = den = 0.0
    for name in m.layers:
        delta = merged[f"{name}.weight"] - loaded.base_weights0[name]
        ba = tensors[f"base_model.model.{name}.lora_B.weight"] @ tensors[f"base_model.model.{name}.lora_A.weight"]
        num += (delta - ba).norm().item() ** 2
        den += delta.norm().item() ** 2
    assert err_1["overall"] == pytest.approx((num / den) ** 0.5, rel=1e-4)
    assert 0.0 < err_1["overall"] < 1.0


def peft_logits_at(run_dir: Path, adapter_dir: Path, batch) -> torch.Tensor:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base_model(run_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return peft_model(**batch).logits


def test_minilm_peft_and_merge(tmp_path, dev_batch):
    """The real backbone: PEFT's base is the MiniLM the package ships (base_model_name_or_path)."""
    run_dir, model, m, _ = make_run(tmp_path, "dora_dynamic", {}, model="minilm")
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"], "config.json").exists()
    with torch.no_grad():
        ours = model(**dev_batch).logits
    assert rel_err(peft_logits(run_dir, dev_batch), ours) < 1e-4
    out = export.merge_run(run_dir, tmp_path / "merged")
    assert rel_err(merged_logits(out, dev_batch), ours) < 1e-4


def test_end_to_end_train_then_export_cli(tmp_path, real_glue_dir, dev_batch):
    """`python -m train model=tiny ...` then `python -m lorabench.export <run dir> --merge`, as a user does."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "GLUE_DIR": str(real_glue_dir), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "train", "method=dora_dynamic", "task=rte", "model=tiny", "budget=r4",
                        "logger=none", "trainer.max_train_samples=48", "trainer.max_eval_samples=16",
                        "trainer.max_seq_length=32", "trainer.batch_size=8", "trainer.epochs=2", "trainer.lr=5e-3",
                        "method.prune_interval=2", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "lorabench.export", str(run_dir), "--merge"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run_dir / "merged" / "config.json").exists()
    loaded = export.load_run(run_dir)  # our model, rebuilt from the run's files
    with torch.no_grad():
        ours = loaded.model(**dev_batch).logits
    assert rel_err(peft_logits(run_dir, dev_batch), ours) < 1e-4
    assert rel_err(merged_logits(run_dir / "merged", dev_batch), ours) < 1e-4
    # the run's recorded rank pattern survives in the PEFT adapter (kept components per module)
    results = json.loads((run_dir / "results.json").read_text())
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    kept = {n: cfg["rank_pattern"].get(n, cfg["r"]) for n in cfg["target_modules"]}
    assert kept == {n: r for n, r in results["rank_pattern"].items() if r > 0}


def test_export_cli_errors_are_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "lorabench.export", str(tmp_path / "nope"), "--merge"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in p.stderr


def test_gated_dynamic_lora_has_no_interchange_form_and_refuses_merge(tmp_path, capsys):
    """An input-dependent gate is neither a LoRA nor a fixed weight: only lorabench's own files are written, and
    `--merge` says so in one line (exit 2) instead of writing a model that computes something else."""
    run_dir, _, _, exports = make_run(tmp_path, "dynamic_lora", {"gate": "token"})
    assert exports == {}
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == ["lorabench_adapter.json",
                                                                       "lorabench_adapter.safetensors"]
    assert export.main([str(run_dir), "--merge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "dynamic_lora" in err[-1]
    assert not (run_dir / "merged").exists()


def test_export_cli_rewrites_the_interchange_files(tmp_path, dev_batch, capsys):
    """`python -m lorabench.export <run dir>` (no option) rebuilds the run and writes adapter/ again, equal."""
    run_dir, model, _, _ = make_run(tmp_path, "adalora", {})
    peft_file = run_dir / "adapter" / "adapter_model.safetensors"
    before = peft_file.read_bytes()
    peft_file.unlink()
    assert export.main([str(run_dir)]) == 0
    assert peft_file.read_bytes() == before


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_update_norms_measures_the_factors_update(tmp_path, method):
    """bench/update_norms.py (merged − base weights) against ΔW written from the factors by the spec's formula:
    LoRA s·B A (§1.1), AdaLoRA s·P diag(λ) Q (§4.1), after a schedule zeroed some λ."""
    sys.path.insert(0, str(REPO / "bench"))
    import update_norms

    run_dir, _, m, _ = make_run(tmp_path, method, {})
    name, task, norms = update_norms.update_norms(run_dir)
    assert (name, task) == (method, "rte") and norms.keys() == m.layers.keys()
    for key, layer in m.layers.items():
        P, Q = layer.lora_B.double(), layer.lora_A.double()
        if method == "adalora":
            Q = layer.lora_E.double()[:, None] * Q
        delta = layer.scale * P @ Q
        spectral, frobenius = norms[key]
        assert spectral == pytest.approx(torch.linalg.matrix_norm(delta, 2).item(), rel=1e-4)
        assert frobenius == pytest.approx(delta.norm().item(), rel=1e-4)
    assert sum(s > 0 for s, _ in norms.values()) >= len(norms) - 1  # one adalora module kept nothing (_train_like)
