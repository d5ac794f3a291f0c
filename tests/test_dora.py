"""DoRA invariants (methods.md §2.7), including parity with HF PEFT `use_dora=True` given copied A, B, m."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorabench import assemble, methods
from lorabench.backbone import ModelSpec
from lorabench.budget import Budget
from lorabench.methods.base import AdapterDropout, draw_keep_mask
from lorabench.methods.dora import DoraLinear
from conftest import TINY_SPEC_DICT, require, tiny_batch, tiny_bert

SPEC = ModelSpec.from_dict(TINY_SPEC_DICT)


def _dora(model, rank=4, alpha=8, **kw):
    return assemble.attach(model, SPEC, {"name": "dora", "alpha": alpha, **kw}, Budget("b", rank))


def _layer(d_in=16, d_out=8, rank=4, alpha=8, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():  # rows with clearly distinct norms
        base.weight.mul_(torch.linspace(0.5, 3.0, d_out)[:, None])
        if bias:
            base.bias.normal_()
    return base, DoraLinear(copy.deepcopy(base), rank, alpha, dropout=dropout)


def _randomize_layer(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        layer.lora_magnitude.mul_(1.0 + 0.5 * torch.rand(layer.lora_magnitude.shape, generator=g))


def _randomize(method, seed=0):
    for i, layer in enumerate(method.layers.values()):
        _randomize_layer(layer, seed=seed * 1000 + i)


def _explicit_weight(layer, detach_norm=True):
    """W' = m · V' / ‖V'‖_row with V' = W0 + s·B A built densely (the oracle of §2.1)."""
    v = layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A
    norm = torch.linalg.vector_norm(v, dim=1)
    if detach_norm:
        norm = norm.detach()
    return (layer.lora_magnitude / norm)[:, None] * v


def _assert_rel_close(actual, expected, rel=1e-5, msg=""):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"{msg}: max abs err {err:.3g} > {rel} x {scale:.3g}"


# --- 1, 2: init and axis --------------------------------------------------------------------------------------

def test_init_identity_layer_and_model_bit_for_bit():
    base, layer = _layer()
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))
    assert torch.equal(layer.gain(), torch.ones(8))
    ref = tiny_bert()
    model = copy.deepcopy(ref)
    _dora(model)
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)


def test_magnitude_axis_is_output_rows():
    base, layer = _layer(d_in=16, d_out=8)
    assert layer.lora_magnitude.shape == (8,)
    expected = torch.linalg.norm(base.weight, dim=1)
    assert len(set(expected.round(decimals=3).tolist())) == 8  # distinct row norms: the axis is tested
    torch.testing.assert_close(layer.lora_magnitude.detach(), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(layer.lora_magnitude.detach()[:8], torch.linalg.norm(base.weight, dim=0)[:8])


def test_factored_norm_equals_dense_norm():
    for d_in, d_out in [(16, 8), (48, 96), (96, 40)]:
        _, layer = _layer(d_in=d_in, d_out=d_out, rank=6, alpha=12, seed=d_in)
        _randomize_layer(layer, seed=d_out)
        dense = torch.linalg.vector_norm(layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A, dim=1)
        torch.testing.assert_close(layer.weight_norm(), dense.detach(), rtol=2e-6, atol=1e-7)
        assert not layer.weight_norm().requires_grad  # detached by construction


# --- 3, 4: forward equivalence and the detach -------------------------------------------------------------------

def test_efficient_forward_equals_explicit_weight():
    base, layer = _layer()
    _randomize_layer(layer)
    x = torch.randn(7, 16)
    for mode in (layer.train, layer.eval):  # dropout 0: identical in both modes
        mode()
        expected = F.linear(x, _explicit_weight(layer), layer.base.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def _grads(fn, params):
    for p in params:
        p.grad = None
    fn().backward()
    return [p.grad.clone() for p in params]


def test_gradients_follow_detached_norm_reference_and_differ_from_non_detached():
    _, layer = _layer()
    _randomize_layer(layer)
    x = torch.randn(9, 16)
    target = torch.randn(9, 8)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude]

    def loss_ours():
        return ((layer(x) - target) ** 2).sum()

    def loss_ref(detach):
        return ((F.linear(x, _explicit_weight(layer, detach), layer.base.bias) - target) ** 2).sum()

    ours = _grads(loss_ours, params)
    detached = _grads(lambda: loss_ref(True), params)
    full = _grads(lambda: loss_ref(False), params)
    for name, a, b in zip("ABm", ours, detached):
        _assert_rel_close(a, b, 1e-5, f"grad {name} vs detached reference")
    # without the detach, A and B get an extra projection term; m's gradient is the same either way (§2.3)
    for name, a, b in zip("AB", ours[:2], full[:2]):
        assert (a - b).abs().max() > 1e-3 * b.abs().max(), f"grad {name} should differ from the non-detached one"
    _assert_rel_close(ours[2], full[2], 1e-5, "grad m")


# --- dropout (§2.2) ------------------------------------------------------------------------------------------

def test_active_dropout_recomputes_base_term_on_dropped_input():
    base, layer = _layer(dropout=0.5)
    _randomize_layer(layer)
    layer.train()
    x = torch.randn(6, 16)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    x_dropped = x * draw_keep_mask(x.shape, 0.5, x.device) / 0.5  # the same mask: the layer's only random draw
    g = layer.gain()
    w0 = layer.base.weight
    expected = (F.linear(x, w0, layer.base.bias) + (g - 1) * F.linear(x_dropped, w0)
                + g * layer.scale * F.linear(F.linear(x_dropped, layer.lora_A), layer.lora_B))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    # ... which is not the function x W'ᵀ + b that eval mode computes
    assert not torch.allclose(y, F.linear(x, _explicit_weight(layer), layer.base.bias), atol=1e-3)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, _explicit_weight(layer), layer.base.bias), rtol=1e-5, atol=1e-6)


def test_dropout_to_one_leaves_base_path():
    base, layer = _layer(dropout=0.999999)
    _randomize_layer(layer)
    layer.train()
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), base(x))


# --- 5, 6: merge and bias --------------------------------------------------------------------------------------

def test_merge_unmerge_with_cached_norm():
    model = tiny_bert()
    m = _dora(model)
    _randomize(m)
    w0 = {n: layer.base.weight.detach().clone() for n, layer in m.layers.items()}
    batch = tiny_batch()
    with torch.no_grad():
        before = model(**batch).logits
        m.merge()
        for n, layer in m.layers.items():  # the merged weight is W' itself
            torch.testing.assert_close(layer.base.weight, _explicit_weight(_unmerged_copy(layer, w0[n])),
                                       rtol=1e-5, atol=1e-6)
        merged = model(**batch).logits
        m.unmerge()
        after = model(**batch).logits
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    for n, layer in m.layers.items():
        torch.testing.assert_close(layer.base.weight, w0[n], rtol=0, atol=1e-6)


def _unmerged_copy(layer, w0):
    twin = copy.deepcopy(layer)
    twin.merged = False
    twin.base.weight.data.copy_(w0)
    return twin


def test_delta_weight_is_what_merge_adds():
    _, layer = _layer()
    _randomize_layer(layer)
    w0 = layer.base.weight.detach().clone()
    delta = layer.delta_weight()
    layer.merge()
    torch.testing.assert_close(layer.base.weight - w0, delta, rtol=1e-5, atol=1e-6)


def test_bias_is_not_scaled():
    base, layer = _layer(bias=True)
    with torch.no_grad():
        layer.lora_magnitude.mul_(2.0)  # B = 0: g = 2 on every row
    x = torch.randn(4, 16)
    y = layer(x)
    torch.testing.assert_close(y - base.bias, 2.0 * (base(x) - base.bias), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y, 2.0 * base(x), atol=1e-3)
    _randomize_layer(layer)
    g = layer.gain()
    v = layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer(x) - base.bias, g * (x @ v.T), rtol=1e-5, atol=1e-6)


# --- trainable set, ledger, export ------------------------------------------------------------------------------

def test_trainable_set_frozen_base_and_ledger():
    model = tiny_bert()
    m = _dora(model, rank=4)
    expected = {id(p) for l in m.layers.values() for p in (l.lora_A, l.lora_B, l.lora_magnitude)}
    assert {id(p) for p in m.trainable_parameters()} == expected
    assert all(not p.requires_grad for l in m.layers.values() for p in l.base.parameters())
    ledger = m.ledger()
    shapes = [(l.in_features, l.out_features) for l in m.layers.values()]
    assert ledger.stored_at_end == sum(4 * (i + o) for i, o in shapes)
    assert ledger.extra_stored == sum(o for _, o in shapes)
    assert ledger.trainable_now == ledger.stored_at_end + ledger.extra_stored
    assert m.rank_pattern() == {n: 4 for n in m.layers}


def test_to_peft_export():
    model = tiny_bert()
    m = _dora(model, rank=4, alpha=8)
    _randomize(m)
    exp = m.to_peft()
    assert exp.use_dora and exp.r == 4 and exp.lora_alpha == 8 and not exp.use_rslora
    assert set(exp.tensors) == set(m.layers)
    for name, layer in m.layers.items():
        t = exp.tensors[name]
        assert torch.equal(t["lora_A"], layer.lora_A) and torch.equal(t["lora_B"], layer.lora_B)
        assert torch.equal(t["magnitude"], layer.lora_magnitude)


# --- 7: parity with peft ----------------------------------------------------------------------------------------

def _peft_twin(base_model, ours, rank, alpha, dropout=0.0, rslora=False):
    peft = require("peft")
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, use_dora=True,
                          target_modules=[t.replace("bert.", "", 1) for t in ours.layers])
    ref = peft.get_peft_model(copy.deepcopy(base_model), cfg)
    with torch.no_grad():
        for name, layer in ours.layers.items():
            mod = ref.base_model.model.get_submodule(name)
            if dropout > 0:  # our masks come from another generator than torch's dropout: give peft the same one
                mod.lora_dropout["default"] = AdapterDropout(dropout)
            mod.lora_A["default"].weight.copy_(layer.lora_A)
            mod.lora_B["default"].weight.copy_(layer.lora_B)
            mod.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    return ref


def _peft_params(ref, name):
    mod = ref.base_model.model.get_submodule(name)
    return (mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize("rslora", [False, True])
def test_parity_with_peft_logits_and_gradients(rslora):
    base = tiny_bert()
    ours_model = copy.deepcopy(base)
    m = _dora(ours_model, rank=4, alpha=8, use_rslora=rslora)
    _randomize(m, seed=3)
    ref = _peft_twin(base, m, 4, 8, rslora=rslora)
    batch = tiny_batch()
    out_ours = ours_model(**batch)
    out_ref = ref(**batch)
    _assert_rel_close(out_ours.logits, out_ref.logits, 1e-5, "logits")
    out_ours.loss.backward()
    out_ref.loss.backward()
    for name, layer in m.layers.items():
        for label, a, b in zip(("A", "B", "m"), (layer.lora_A, layer.lora_B, layer.lora_magnitude),
                               _peft_params(ref, name)):
            _assert_rel_close(a.grad, b.grad, 1e-5, f"{name} grad {label}")


def test_parity_with_peft_under_active_dropout():
    """Train mode with dropout 0.3: both draw one mask per layer in the same order (peft's dropout modules
    swapped for ours, the same mask generator), so equal seeds give equal masks; ours runs the fused path."""
    base = tiny_bert()
    ours_model = copy.deepcopy(base)
    m = _dora(ours_model, rank=4, alpha=8, dropout=0.3)
    _randomize(m, seed=5)
    ref = _peft_twin(base, m, 4, 8, dropout=0.3)
    ours_model.train()
    ref.train()
    batch = tiny_batch()
    assert all(layer.fuse_dropout_now(torch.zeros(1, layer.in_features)) for layer in m.layers.values())
    torch.manual_seed(11)
    out_ours = ours_model(**batch)
    torch.manual_seed(11)
    out_ref = ref(**batch)
    _assert_rel_close(out_ours.logits, out_ref.logits, 1e-5, "logits")
    torch.manual_seed(11)
    assert not torch.allclose(ours_model.eval()(**batch).logits, out_ours.logits, atol=1e-4)  # dropout acted
    out_ours.loss.backward()
    out_ref.loss.backward()
    for name, layer in m.layers.items():
        for label, a, b in zip(("A", "B", "m"), (layer.lora_A, layer.lora_B, layer.lora_magnitude),
                               _peft_params(ref, name)):
            _assert_rel_close(a.grad, b.grad, 1e-5, f"{name} grad {label}")
