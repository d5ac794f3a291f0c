"""LoRA invariants (methods.md §1.8), including parity with HF PEFT given copied weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lorabench import assemble, methods
from lorabench.backbone import ModelSpec, find_targets
from lorabench.budget import Budget, lora_param_count
from lorabench.methods.base import LowRankLinear
from conftest import TINY_SPEC_DICT, require, tiny_batch, tiny_bert

SPEC = ModelSpec.from_dict(TINY_SPEC_DICT)


def _lora(model, rank=4, alpha=8, **kw):
    return assemble.attach(model, SPEC, {"name": "lora", "alpha": alpha, **kw}, Budget("b", rank))


def _randomize(method, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def test_identity_at_init_bit_for_bit():
    base = tiny_bert()
    model = copy.deepcopy(base)
    _lora(model)
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(base(**batch).logits, model(**batch).logits)


def test_gradients_at_init():
    model = tiny_bert()
    m = _lora(model)
    model.train()
    model(**tiny_batch()).loss.backward()
    for layer in m.layers.values():
        assert torch.count_nonzero(layer.lora_A.grad) == 0  # B = 0 ⇒ ∂L/∂A = 0 exactly
    assert any(torch.count_nonzero(layer.lora_B.grad) > 0 for layer in m.layers.values())


def test_merge_unmerge():
    model = tiny_bert()
    m = _lora(model)
    _randomize(m)
    w0 = {n: layer.base.weight.detach().clone() for n, layer in m.layers.items()}
    batch = tiny_batch()
    with torch.no_grad():
        before = model(**batch).logits
        m.merge()
        merged = model(**batch).logits
        m.unmerge()
        after = model(**batch).logits
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    for n, layer in m.layers.items():
        torch.testing.assert_close(layer.base.weight, w0[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rank, alpha, rslora, expected", [
    (8, 16, False, 2.0), (4, 16, False, 4.0), (8, 16, True, 16 / math.sqrt(8)), (2, 8, True, 8 / math.sqrt(2)),
])
def test_scale(rank, alpha, rslora, expected):
    layer = LowRankLinear(nn.Linear(6, 5), rank, alpha, use_rslora=rslora)
    assert layer.scale == pytest.approx(expected)


def test_dropout_only_on_adapter_input():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LowRankLinear(copy.deepcopy(base), rank=4, alpha=8, dropout=0.999999)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()
    x = torch.randn(5, 16)
    # p → 1: the adapter input is (almost surely) all zeros, so the output equals the untouched base path
    torch.testing.assert_close(layer(x), base(x))


def test_frozen_base_and_trainable_set():
    model = tiny_bert()
    m = _lora(model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    params = list(m.trainable_parameters())
    assert {id(p) for p in params} == {id(p) for l in m.layers.values() for p in (l.lora_A, l.lora_B)}
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(3):
        model(**tiny_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n


def test_param_count_formula_and_roberta_anchor():
    model = tiny_bert(layers=2, hidden=32)
    m = _lora(model, rank=4)
    shapes = [(l.in_features, l.out_features) for l in m.layers.values()]
    assert len(shapes) == 12  # 6 maps x 2 blocks
    assert sum(p.numel() for p in m.trainable_parameters()) == lora_param_count(shapes, 4)
    assert m.ledger().stored_at_end == lora_param_count(shapes, 4)
    # methods.md §0.2: RoBERTa-base q,v r=8 → 294,912; all six r=8 → 1,327,104
    assert lora_param_count([(768, 768)] * 24, 8) == 294_912
    assert lora_param_count(([(768, 768)] * 4 + [(768, 3072), (3072, 768)]) * 12, 8) == 1_327_104


def test_targets_by_full_path_not_suffix():
    model = tiny_bert()
    names = [t.name for t in find_targets(model, SPEC, ("output",))]
    assert names == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    all6 = find_targets(model, SPEC, ("query", "key", "value", "attention_output", "intermediate", "output"))
    assert len(all6) == 12 and not any("pooler" in t.name for t in all6)


@pytest.mark.parametrize("rslora", [False, True])
def test_parity_with_peft(rslora):
    peft = require("peft")
    base = tiny_bert()
    ours = copy.deepcopy(base)
    m = _lora(ours, rank=4, alpha=8, use_rslora=rslora)
    _randomize(m, seed=3)
    targets = list(m.layers)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rslora,
                          target_modules=[t.replace("bert.", "", 1) for t in targets])
    ref = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, layer in m.layers.items():
            mod = ref.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(layer.lora_A)
            mod.lora_B["default"].weight.copy_(layer.lora_B)
    batch = tiny_batch()
    with torch.no_grad():
        a = ours(**batch).logits
        b = ref(**batch).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
