"""The trained task head: nothing that holds no pretrained value is frozen.

A weight the checkpoint lacks is newly initialised by transformers; frozen, it stays random for the whole run
(all-MiniLM-L6-v2's untouched pooler made every pair task sit at chance). For every model config of conf/model/,
a small checkpoint of that config's architecture is written with layers removed, loaded the way runs load
models, and every newly initialised parameter must train; every loaded pretrained one must stay frozen.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import REPO

from lorabench.backbone import ModelSpec, freeze_backbone, head_parameters, load_model

MODEL_CONFIGS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "vocab_size": 128, "max_position_embeddings": 66}


def _spec_dict(name: str) -> dict:
    return yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())


def _save_checkpoint(tmp: Path, architecture: str, drop: callable, edit=None) -> tuple[Path, set[str]]:
    """A small pretrained-looking checkpoint of `architecture` without the tensors `drop(name)` picks;
    returns its folder and the dropped names (as the classifier model names its parameters)."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(architecture, **SMALL)
    base = AutoModel.from_config(cfg)
    with torch.no_grad():  # "pretrained": every tensor moved off its init, biases included
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    if edit is not None:
        edit(base)
    base.save_pretrained(tmp)
    weights = tmp / "model.safetensors"
    tensors = load_file(str(weights))
    dropped = {k for k in tensors if drop(k)}
    assert dropped, "the test must remove something"
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(weights), metadata={"format": "pt"})
    prefix = base.base_model_prefix
    return tmp, {f"{prefix}.{k}" if not k.startswith(prefix + ".") else k for k in dropped}


@pytest.mark.parametrize("config_name", MODEL_CONFIGS)
def test_nothing_newly_initialised_is_frozen(config_name, tmp_path):
    d = _spec_dict(config_name)
    # the pooler (where the architecture has one) and one FFN output matrix of block 1 are missing
    folder, dropped = _save_checkpoint(tmp_path, d.get("architecture", "bert"),
                                       lambda k: "pooler" in k or k.startswith("encoder.layer.1.output.dense"))
    spec = ModelSpec.from_dict({**d, "source": "path", "path": str(folder), "config": {}})
    model = load_model(spec, num_labels=2, is_regression=False)
    head = dict(freeze_backbone(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    params = dict(model.named_parameters())
    missing = {n for n in dropped if n in params}
    assert missing, (dropped, list(params)[:5])
    assert missing <= trainable, f"newly initialised but frozen: {sorted(missing - trainable)}"
    assert missing <= set(head)  # counted, saved and exported as head parameters
    # everything loaded from the checkpoint stays frozen, except the task-specific head outside the backbone
    prefix = model.base_model_prefix + "."
    loaded_backbone = {n for n in params if n.startswith(prefix) and n not in missing}
    assert not (loaded_backbone & trainable), sorted(loaded_backbone & trainable)[:5]


def test_pretrained_pooler_stays_frozen_untouched_pooler_trains(tmp_path):
    """`pooler=auto`: a loaded pooler with non-zero bias is pretrained (frozen, the papers' rule); one whose bias
    is exactly zero never saw a training step (all-MiniLM-L6-v2's) and trains. `train` / `freeze` force it."""
    d = _spec_dict("minilm")

    def zero_pooler_bias(base):
        with torch.no_grad():
            base.pooler.dense.bias.zero_()

    pretrained, _ = _save_checkpoint(tmp_path / "a", "bert", lambda k: k.startswith("encoder.layer.0.output.dense"))
    untouched, _ = _save_checkpoint(tmp_path / "b", "bert", lambda k: k.startswith("encoder.layer.0.output.dense"),
                                    edit=zero_pooler_bias)
    pooler = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}

    def trained(folder, mode):
        spec = ModelSpec.from_dict({**d, "source": "path", "path": str(folder), "pooler": mode})
        return {n for n, _ in head_parameters(load_model(spec, 2, False))}

    assert not (pooler & trained(pretrained, "auto"))
    assert pooler <= trained(untouched, "auto")
    assert pooler <= trained(pretrained, "train")
    assert not (pooler & trained(untouched, "freeze"))


def test_default_model_trains_its_untouched_pooler():
    """all-MiniLM-L6-v2 ships pooler weights that were never trained (bias exactly zero)."""
    model = load_model(ModelSpec.from_dict(_spec_dict("minilm")), num_labels=1, is_regression=True)
    head = {n for n, _ in freeze_backbone(model)}
    assert head == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert all(p.requires_grad == (n in head) for n, p in model.named_parameters())


def test_config_built_model_trains_its_pooler():
    model = load_model(ModelSpec.from_dict(_spec_dict("tiny")), num_labels=2, is_regression=False, vocab_size=128)
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= {n for n, _ in freeze_backbone(model)}


def test_bad_pooler_value_is_refused():
    from lorabench.errors import ConfigError

    with pytest.raises(ConfigError, match="model.pooler must be one of auto, train, freeze"):
        ModelSpec.from_dict({**_spec_dict("minilm"), "pooler": "yes"})
