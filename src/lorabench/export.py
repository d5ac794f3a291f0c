"""Adapters in interchange formats, and merged models.

Every run's `adapter/` holds lorabench's own files (`lorabench_adapter.safetensors` + `.json`, written by
run.py) and, from here, one of:
- an HF PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) when the method has a LoRA
  form (`AdapterMethod.to_peft()`): `PeftModel.from_pretrained(base, run_dir/adapter)` then computes the same
  function. The task head goes in as `modules_to_save` (its module names come from
  `backbone.head_parameters`), so the base needs only the backbone weights;
- `merged_weights.safetensors` when it has none but can merge (XGBLoRA): the merged weight of every adapted
  matrix and the head, under the HF model's own parameter names (`model.load_state_dict(..., strict=False)`);
- nothing more when it can do neither (an input-dependent gate): lorabench's files are then the only form.

PEFT's format, as `save_pretrained` of peft 0.21 writes it (read off a saved adapter, and checked by
tests/test_export.py against PEFT at run time): tensors `base_model.model.<module>.lora_A.weight` (r, d_in),
`.lora_B.weight` (d_out, r), DoRA's `.lora_magnitude_vector` (d_out,), and each head parameter as
`base_model.model.<name>`; a LoraConfig JSON whose module i uses rank `rank_pattern[i]` (default `r`) and
scale `alpha_pattern[i] / r_i` (default `lora_alpha / r_i`; `/√r_i` with rsLoRA).

Command line (`python -m lorabench.export <run dir> [--merge] [--out DIR] [--svd-rank K]`): rebuilds the run's
model from `adapter/lorabench_adapter.json` + `.safetensors` (falling back to `.hydra/config.yaml` for what
an older adapter file lacks), then
- with no option: rewrites the interchange files in `<run dir>/adapter/`;
- `--merge`: folds the adapter into the base weights (`method.merge()`) and writes a plain HF model directory
  (`save_pretrained` + tokenizer) that `AutoModelForSequenceClassification.from_pretrained` loads;
- `--svd-rank K`: writes a PEFT LoRA adapter of rank K that is the truncated SVD of each merged update
  ΔW = W_merged − W0 (for methods without a LoRA form, XGBLoRA), and prints its relative reconstruction
  error ‖ΔW − B A‖_F / ‖ΔW‖_F per matrix and overall.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import ConfigError, LorabenchError
from .methods.base import PeftLoraExport
from .rundir import ADAPTER_DIR

log = logging.getLogger("lorabench")

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
MERGED_WEIGHTS_FILE = "merged_weights.safetensors"
LORABENCH_META = "lorabench_adapter.json"
LORABENCH_TENSORS = "lorabench_adapter.safetensors"
PEFT_PREFIX = "base_model.model."


# --- PEFT adapter ---------------------------------------------------------------------------------------------

def head_module_names(head_param_names: Sequence[str]) -> list[str]:
    """`modules_to_save` for PEFT: the full path of every module holding a head parameter (`classifier`,
    `bert.pooler.dense` when the pooler trains), from the parameter names of `backbone.head_parameters`.
    Full paths, since PEFT matches them as name suffixes: `dense` alone would catch every block."""
    return sorted({n.rpartition(".")[0] for n in head_param_names})


def base_model_location(model_spec) -> str | None:
    """What PEFT records as `base_model_name_or_path` (None for a backbone built from a config)."""
    if model_spec is None:
        return None
    if model_spec.source == "package":
        from .backbone import package_model_dir

        return str(package_model_dir(model_spec.package))
    if model_spec.source in ("hub", "path"):
        return model_spec.path
    return None


def _check_export(exp: PeftLoraExport, model: nn.Module) -> None:
    """Shapes must match what PEFT will allocate, or the adapter would load wrongly (or not at all)."""
    for name, t in exp.tensors.items():
        module = model.get_submodule(name)
        d_in, d_out = module.in_features, module.out_features
        r = int(exp.rank_pattern.get(name, exp.r))
        want = {"lora_A": (r, d_in), "lora_B": (d_out, r)}
        if exp.use_dora:
            want["magnitude"] = (d_out,)
        for key, shape in want.items():
            if key not in t:
                raise ValueError(f"to_peft() of {name} lacks {key!r}")
            if tuple(t[key].shape) != shape:
                raise ValueError(f"to_peft() of {name}: {key} has shape {tuple(t[key].shape)}, PEFT expects {shape} "
                                 f"(rank {r})")
        extra = set(t) - set(want)
        if extra:
            raise ValueError(f"to_peft() of {name} has tensors PEFT's LoRA does not know: {sorted(extra)}")


def peft_state_dict(exp: PeftLoraExport, head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    suffix = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
    out = {}
    for name, t in exp.tensors.items():
        for key, v in t.items():
            out[f"{PEFT_PREFIX}{name}.{suffix[key]}"] = v.detach().float().contiguous().cpu()
    for name, v in head.items():
        out[f"{PEFT_PREFIX}{name}"] = v.detach().float().contiguous().cpu()
    return out


def peft_config_dict(exp: PeftLoraExport, head_modules: list[str], base_model: str | None,
                     dropout: float = 0.0) -> dict[str, Any]:
    """A LoraConfig as JSON, with the fields and values PEFT's own save writes for such an adapter."""
    names = list(exp.tensors)
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model,
        "r": int(exp.r),
        "lora_alpha": float(exp.lora_alpha),
        "target_modules": names,  # full module paths: PEFT matches a name exactly or as a dotted suffix
        "rank_pattern": {n: int(r) for n, r in exp.rank_pattern.items() if n in exp.tensors},
        "alpha_pattern": {n: float(a) for n, a in exp.alpha_pattern.items() if n in exp.tensors},
        "use_rslora": bool(exp.use_rslora),
        "use_dora": bool(exp.use_dora),
        "modules_to_save": head_modules,
        "lora_dropout": float(dropout),
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "revision": None,
    }


def write_peft_adapter(out_dir: Path, exp: PeftLoraExport, model: nn.Module, head_param_names: Sequence[str],
                       model_spec=None, dropout: float = 0.0) -> None:
    from safetensors.torch import save_file

    from .rundir import write_json_atomic

    _check_export(exp, model)
    params = dict(model.named_parameters())
    head = {n: params[n] for n in head_param_names}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(exp, head), str(out_dir / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    cfg = peft_config_dict(exp, head_module_names(head_param_names), base_model_location(model_spec), dropout)
    write_json_atomic(out_dir / PEFT_CONFIG_FILE, cfg)


# --- merged weights -------------------------------------------------------------------------------------------

def _base_linear(layer: nn.Module, name: str) -> nn.Linear:
    base = getattr(layer, "base", None)
    if not isinstance(base, nn.Linear):
        raise ConfigError(f"adapted layer {name} ({type(layer).__name__}) has no base nn.Linear to merge into")
    return base


@torch.no_grad()
def merged_weights(method, model: nn.Module, head_param_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The merged weight (and bias) of every adapted matrix plus the head, by HF parameter name; the model is
    left exactly as it was (the layers' tensors are restored bit for bit after the merge)."""
    if not method.mergeable:
        raise ConfigError(f"method {method.name} cannot merge in its current state, so it has no merged weights")
    saved = {name: {k: v.detach().clone() for k, v in layer.state_dict().items()} for name, layer in method.layers.items()}
    out: dict[str, torch.Tensor] = {}
    method.merge()
    try:
        for name, layer in method.layers.items():
            base = _base_linear(layer, name)
            out[f"{name}.weight"] = base.weight.detach().float().cpu().clone()
            if base.bias is not None:
                out[f"{name}.bias"] = base.bias.detach().float().cpu().clone()
    finally:
        method.unmerge()
        for name, layer in method.layers.items():
            layer.load_state_dict(saved[name])
    params = dict(model.named_parameters())
    for n in head_param_names:
        out[n] = params[n].detach().float().cpu().clone()
    return out


def export_adapter(adapter_dir: Path, method, model: nn.Module, head_param_names: Sequence[str],
                   model_spec=None) -> dict[str, str]:
    """Write the interchange form of this adapter into `adapter_dir`; returns {kind: file name}."""
    from safetensors.torch import save_file

    adapter_dir = Path(adapter_dir)
    for stale in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, MERGED_WEIGHTS_FILE):
        (adapter_dir / stale).unlink(missing_ok=True)
    exp = method.to_peft()
    if exp is not None and exp.tensors:
        write_peft_adapter(adapter_dir, exp, model, head_param_names, model_spec,
                           float(getattr(method.options, "dropout", 0.0)))
        return {"peft": PEFT_CONFIG_FILE, "peft_weights": PEFT_WEIGHTS_FILE}
    if exp is not None:
        log.warning("export: %s kept no adapter component; no PEFT adapter written", method.name)
        return {}
    if method.mergeable:
        save_file(merged_weights(method, model, head_param_names), str(adapter_dir / MERGED_WEIGHTS_FILE),
                  metadata={"format": "pt"})
        return {"merged_weights": MERGED_WEIGHTS_FILE}
    log.info("export: %s has no PEFT form and cannot merge; adapter/ holds lorabench's format only", method.name)
    return {}


# --- rebuilding a run's model ----------------------------------------------------------------------------------

@dataclass
class LoadedRun:
    run_dir: Path
    model: nn.Module
    method: Any
    head_param_names: list[str]
    tokenizer: Any
    model_spec: Any
    task_spec: Any
    meta: dict[str, Any]
    base_weights0: dict[str, torch.Tensor]  # each adapted matrix's weight before the adapter was loaded (W0)


def _hydra_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def load_run(run_dir: str | Path) -> LoadedRun:
    """The model of a finished run, unmerged, with its adapter and head loaded (eval mode)."""
    from safetensors.torch import load_file

    from . import methods
    from .backbone import ModelSpec, load_tokenizer
    from .budget import Budget
    from .data import TaskSpec
    from .assemble import build_adapted_model

    run_dir = Path(run_dir)
    adapter_dir = run_dir / ADAPTER_DIR
    meta_path, tensor_path = adapter_dir / LORABENCH_META, adapter_dir / LORABENCH_TENSORS
    if not meta_path.exists() or not tensor_path.exists():
        raise ConfigError(f"{run_dir} has no finished adapter ({meta_path.name} and {tensor_path.name} in "
                          f"{adapter_dir}); is it a completed lorabench run directory?")
    meta = json.loads(meta_path.read_text())
    hydra_cfg: dict[str, Any] | None = None

    def from_hydra(key: str):
        nonlocal hydra_cfg
        if hydra_cfg is None:
            hydra_cfg = _hydra_config(run_dir)
        if key not in hydra_cfg:
            raise ConfigError(f"{meta_path} lacks {key!r} and {run_dir}/.hydra/config.yaml has none either")
        return hydra_cfg[key]

    task_dict = meta.get("task_spec") or from_hydra("task")
    seed = int(meta["seed"]) if meta.get("seed") is not None else int(from_hydra("seed"))
    model_spec = ModelSpec.from_dict(meta["model"])
    task_spec = TaskSpec.from_dict(task_dict)
    budget = Budget.from_dict(meta["budget"])
    tokenizer = load_tokenizer(model_spec)
    vocab_size = int(meta.get("vocab_size") or len(tokenizer))
    model, head, method = build_adapted_model(model_spec, task_spec, methods.get(meta["method"]["name"]),
                                              meta["method"], budget, seed, vocab_size)
    base_weights0 = {name: _base_linear(layer, name).weight.detach().float().clone()
                     for name, layer in method.layers.items()}
    tensors = load_file(str(tensor_path))
    method.load_adapter_state_dict({k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("head."):
                params[k[len("head."):]].copy_(v)
    model.eval()
    return LoadedRun(run_dir, model, method, [n for n, _ in head], tokenizer, model_spec, task_spec, meta,
                     base_weights0)


def _unwrap_adapted_layers(model: nn.Module, method) -> None:
    """Put each (merged) adapted layer's base nn.Linear back in its place: a plain HF model again."""
    for name, layer in method.layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _base_linear(layer, name))


def merge_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """`--merge`: a plain HF model directory with the adapter folded in; returns it."""
    loaded = load_run(run_dir)
    out = Path(out_dir) if out_dir else loaded.run_dir / "merged"
    loaded.method.merge()  # raises ConfigError for a method that cannot merge (and says why)
    _unwrap_adapted_layers(loaded.model, loaded.method)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(str(out))
    loaded.tokenizer.save_pretrained(str(out))
    return out


@torch.no_grad()
def svd_lora(run_dir: str | Path, rank: int, out_dir: str | Path | None = None) -> tuple[Path, dict[str, float]]:
    """`--svd-rank K`: a rank-K PEFT LoRA adapter from the truncated SVD of each merged update.

    ΔW = U S Vᵀ → B = U_K S_K, A = V_Kᵀ with lora_alpha = r = K (scale 1). Returns the adapter folder and the
    relative Frobenius error per matrix plus "overall" (√ Σ‖ΔW − BA‖² / Σ‖ΔW‖²).
    """
    if rank < 1:
        raise ConfigError(f"--svd-rank must be >= 1, got {rank}")
    loaded = load_run(run_dir)
    method, model = loaded.method, loaded.model
    merged = merged_weights(method, model, loaded.head_param_names)
    tensors, errors = {}, {}
    err_sq, norm_sq = 0.0, 0.0
    for name in method.layers:
        delta = merged[f"{name}.weight"] - loaded.base_weights0[name]
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        k = min(rank, S.numel())
        B = (U[:, :k] * S[:k]).float()
        A = Vh[:k].float()
        if k < rank:  # a matrix smaller than K: pad with zero components so every module has rank K
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], 1)
            A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], 0)
        resid = (delta - B @ A).norm().item()
        norm = delta.norm().item()
        errors[name] = resid / norm if norm > 0 else 0.0
        err_sq += resid ** 2
        norm_sq += norm ** 2
        tensors[name] = {"lora_A": A.contiguous(), "lora_B": B.contiguous()}
    errors["overall"] = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    exp = PeftLoraExport(r=rank, lora_alpha=float(rank), tensors=tensors)
    out = Path(out_dir) if out_dir else loaded.run_dir / f"adapter_svd_r{rank}"
    write_peft_adapter(out, exp, model, loaded.head_param_names, loaded.model_spec)
    return out, errors


# --- command line ------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorabench.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory (holds adapter/)")
    parser.add_argument("--merge", action="store_true", help="write a merged HF model directory")
    parser.add_argument("--out", type=Path, default=None, help="where --merge writes (default <run dir>/merged)")
    parser.add_argument("--svd-rank", type=int, default=None, metavar="K",
                        help="write a rank-K PEFT LoRA of the merged update (truncated SVD)")
    parser.add_argument("--svd-out", type=Path, default=None,
                        help="where --svd-rank writes (default <run dir>/adapter_svd_r<K>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.run_dir.is_dir():
            raise ConfigError(f"run directory {args.run_dir} does not exist")
        if not args.merge and args.svd_rank is None:
            loaded = load_run(args.run_dir)
            written = export_adapter(loaded.run_dir / ADAPTER_DIR, loaded.method, loaded.model,
                                     loaded.head_param_names, loaded.model_spec)
            print(f"{loaded.run_dir / ADAPTER_DIR}: {', '.join(written.values()) or 'no interchange form'}")
        if args.merge:
            out = merge_run(args.run_dir, args.out)
            print(f"merged model: {out}")
        if args.svd_rank is not None:
            out, errors = svd_lora(args.run_dir, args.svd_rank, args.svd_out)
            for name, e in errors.items():
                if name != "overall":
                    print(f"  {name}: relative error {e:.4g}")
            print(f"rank-{args.svd_rank} SVD LoRA: {out}; relative reconstruction error {errors['overall']:.4g}")
    except LorabenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
