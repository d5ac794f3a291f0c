"""Dynamic LoRA invariants (methods.md §6.3 [ours]). Oracles: plain `lora` and HF PEFT given copied weights, the
layer formula of §6.2 written out here, and the allocation constraints checked from their definitions."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch

from lorabench import assemble, methods
from lorabench.backbone import ModelSpec, freeze_backbone
from lorabench.budget import Budget
from lorabench.data import BatchLoader, Collator, TokenizedSplit
from lorabench.errors import ConfigError
from lorabench.methods.dynamic_lora import (allocate_ranks, allocate_scale_weights, is_realloc_step,
                                            solve_clipped_scale, spread_interval)
from lorabench.training.hooks import TrainerHook
from lorabench.training.trainer import Trainer, TrainerConfig
from conftest import TINY_SPEC_DICT, eval_logits, require, tiny_batch, tiny_bert

SPEC = ModelSpec.from_dict(TINY_SPEC_DICT)
RANK, ALPHA = 4, 8.0
S = ALPHA / RANK
GAMMA = 0.5  # the gate's bound γ: g = 1 + γ tanh(·)


def _cfg(**over):
    return {"name": "dynamic_lora", "alpha": ALPHA, "dropout": 0.0, "beta": 0.85, "realloc_interval": 100,
            "n_events": 10, "warmup_frac": 0.1, "freeze_frac": 0.2, "tau": 1.0, "w_min": 0.25, "w_max": 4.0,
            "rho": 0.5, "allocation": "scale", "gate": "token", "gate_scale": GAMMA, "gate_l2": 0.0,
            "unweighted_importance": True, "preserve_function": True, **over}


def _dyn(model, budget=Budget("b", RANK), **over):
    return assemble.attach(model, SPEC, _cfg(**over), budget)


def _randomize(method, seed=0, gate=True):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            if gate and hasattr(layer, "gate_u"):
                layer.gate_u.copy_(torch.randn(layer.gate_u.shape, generator=g))
                layer.gate_v.copy_(torch.randn(1, generator=g) * 0.5)


def _set_weights(method, seed=0):
    """A non-uniform mean-1 in-box allocation written into the method (as a reallocation would)."""
    g = torch.Generator().manual_seed(seed)
    imp = torch.rand(len(method.layers), generator=g, dtype=torch.float64) ** 3
    method.weights = allocate_scale_weights(imp, 1.0, method.w_min, method.w_max)
    method._write_weights()
    assert method.weights.std() > 0.1


# --- (4) the gate -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", ["token", "sequence"])
def test_gate_is_one_at_init_grad_zero_then_nonzero(gate):
    base = tiny_bert()
    model = copy.deepcopy(base)
    m = _dyn(model, gate=gate)
    for layer in m.layers.values():
        x = torch.randn(3, 5, layer.in_features)
        assert torch.equal(layer.gate_value(x), torch.ones(3, 5 if gate == "token" else 1, 1))
    batch = tiny_batch()
    model.train()
    model(**batch).loss.backward()
    for layer in m.layers.values():
        assert torch.count_nonzero(layer.gate_u.grad) == 0 and torch.count_nonzero(layer.gate_v.grad) == 0
        assert torch.count_nonzero(layer.lora_A.grad) == 0  # B = 0
    assert any(torch.count_nonzero(layer.lora_B.grad) > 0 for layer in m.layers.values())
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_B.normal_(0, 0.3)
    model(**batch).loss.backward()
    for layer in m.layers.values():
        assert torch.count_nonzero(layer.gate_u.grad) > 0 and torch.count_nonzero(layer.gate_v.grad) > 0


# --- (1) reduction to LoRA and the layer formula ----------------------------------------------------------

@pytest.mark.parametrize("gate", ["token", "sequence", "none"])
def test_unit_weights_zero_gate_equals_plain_lora(gate):
    base = tiny_bert()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    m = _dyn(ours, gate=gate)
    lora = assemble.attach(ref, SPEC, {"name": "lora", "alpha": ALPHA}, Budget("b", RANK))
    _randomize(m, gate=False)  # u = v = 0, w ≡ 1
    with torch.no_grad():
        for name, layer in m.layers.items():
            lora.layers[name].lora_A.copy_(layer.lora_A)
            lora.layers[name].lora_B.copy_(layer.lora_B)
        batch = tiny_batch()
        torch.testing.assert_close(ours(**batch).logits, ref(**batch).logits, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(ours(**batch).logits, base(**batch).logits)


@pytest.mark.parametrize("gate", ["token", "sequence", "none"])
def test_layer_matches_formula(gate):
    model = tiny_bert()
    m = _dyn(model, gate=gate)
    _randomize(m, seed=2)
    _set_weights(m, seed=3)
    layer = m.layers["bert.encoder.layer.1.intermediate.dense"]
    x = torch.randn(3, 7, 32)
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0
    if m.mask_context is not None:
        m.mask_context.mask = mask
    W0, b = layer.base.weight, layer.base.bias
    w = float(layer.alloc_weight)
    assert w != 1.0
    lora = (x @ layer.lora_A.T) @ layer.lora_B.T
    if gate == "token":
        g = 1 + GAMMA * torch.tanh(x @ layer.gate_u / math.sqrt(32) + layer.gate_v)
        g = g.unsqueeze(-1)
    elif gate == "sequence":
        xbar = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        g = (1 + GAMMA * torch.tanh(xbar @ layer.gate_u / math.sqrt(32) + layer.gate_v)).view(3, 1, 1)
    else:
        g = 1.0
    expected = x @ W0.T + b + S * w * g * lora
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_sequence_gate_ignores_padding_end_to_end():
    """With the attention-masked mean, padding an example does not change its logits; the plain mean does."""
    model = tiny_bert()
    m = _dyn(model, gate="sequence")
    _randomize(m, seed=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (1, 9), generator=g)
    padded = torch.cat([ids, torch.randint(1, 128, (1, 3), generator=g)], dim=1)
    pad_mask = torch.tensor([[1] * 9 + [0] * 3])
    with torch.no_grad():
        short = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        long = model(input_ids=padded, attention_mask=pad_mask).logits
        torch.testing.assert_close(long, short, rtol=1e-5, atol=1e-6)
        m._mask_hook.remove()  # negative control: without the mask the gate sees the padding
        m.mask_context.mask = None
        assert not torch.allclose(model(input_ids=padded, attention_mask=pad_mask).logits, short, atol=1e-4)


# --- (2) the allocation ------------------------------------------------------------------------------------

def test_bisection_meets_mean_and_bounds_where_clip_renormalize_fails():
    q = torch.tensor([0.60, 0.30, 0.05, 0.03, 0.02], dtype=torch.float64)
    m, lo, hi = q.numel(), 0.25, 4.0
    naive = (m * q).clamp(lo, hi)
    naive = naive / naive.mean()
    assert naive.min() < lo or naive.max() > hi  # the single clip-then-renormalize breaks a bound
    w, lam = solve_clipped_scale(q, float(m), lo, hi)
    assert abs(float(w.mean()) - 1.0) < 1e-12
    assert float(w.min()) >= lo and float(w.max()) <= hi
    free = (w > lo) & (w < hi)
    assert free.any()
    torch.testing.assert_close(w[free], lam * q[free], rtol=1e-12, atol=0)  # one common λ
    assert torch.all(w[~free] == lo) or torch.all((w[~free] == lo) | (w[~free] == hi))
    # many heavy-tailed random importances (and τ ≠ 1): mean exactly 1, inside the box, order kept
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        imp = torch.rand(36, generator=g, dtype=torch.float64) ** (1 + 10 * trial / 50)
        for tau in (0.5, 1.0, 2.0):
            w = allocate_scale_weights(imp, tau, lo, hi)
            assert abs(float(w.mean()) - 1.0) < 1e-12
            assert float(w.min()) >= lo - 1e-15 and float(w.max()) <= hi + 1e-15
            order = torch.argsort(imp)
            assert torch.all(w[order][1:] >= w[order][:-1] - 1e-12)


def test_uniform_or_zero_importance_gives_unit_weights():
    assert torch.allclose(allocate_scale_weights(torch.zeros(6), 1.0, 0.25, 4.0), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(allocate_scale_weights(torch.full((6,), 3.0), 1.0, 0.25, 4.0),
                          torch.ones(6, dtype=torch.float64))


def _run_training(allocation, gate="token", total=20, interval=3, caplog=None, **over):
    """Trainer on tiny_bert; a recorder after the method's hook snapshots the allocation every step."""
    model = tiny_bert()
    model.train()
    head = freeze_backbone(model)
    budget = Budget("b", RANK, init_ratio=1.5)
    m = assemble.attach(model, SPEC, _cfg(allocation=allocation, gate=gate, realloc_interval=interval, **over),
                       budget)

    class Snapshot(TrainerHook):
        def __init__(self):
            self.w, self.ranks, self.layer_w, self.importance = {}, {}, {}, {}

        def after_optimizer_step(self, state):
            self.w[state.step] = m.weights.clone()
            self.layer_w[state.step] = torch.stack([layer.alloc_weight.detach().clone() for layer in m.layers.values()])
            self.ranks[state.step] = [layer.effective_rank() for layer in m.layers.values()]
            self.importance[state.step] = m.importance_now().clone()

    snap = Snapshot()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 128, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
           for _ in range(16)]
    loader = BatchLoader(TokenizedSplit(ids, None, [i % 2 for i in range(16)], False), 4, Collator(0), seed=1)
    tcfg = TrainerConfig(epochs=total // 4, batch_size=4, progress_bar=False, lr=1e-2, warmup_ratio=0.0)
    params = list(m.named_trainable_parameters()) + head
    tr = Trainer(tcfg, model, params, loader, lambda mdl: {"eval/accuracy": 0.5}, "accuracy",
                 hooks=[*m.hooks(), snap], head_param_names=[n for n, _ in head])
    tr.fit()
    return tr, m, snap


def _expected_events(total, interval, warm_frac=0.1, freeze_frac=0.2):
    t_warm, t_end = round(warm_frac * total), round((1 - freeze_frac) * total)
    return [t for t in range(t_warm + interval, t_end + 1, interval)]


def test_scale_weights_mean_one_in_box_and_piecewise_constant(caplog):
    caplog.set_level(logging.INFO, logger="lorabench")
    tr, m, snap = _run_training("scale")
    total, n = tr.total_steps, len(m.layers)
    events = _expected_events(total, 3)
    assert events == [5, 8, 11, 14] == [t for t in range(1, total + 1) if is_realloc_step(t, total, 3, 0.1, 0.2)]
    assert m.n_realloc == len(events) and caplog.text.count("dynamic_lora realloc") == len(events)
    prev = torch.ones(n, dtype=torch.float64)
    for step in range(1, total + 1):
        w = snap.w[step]
        assert abs(float(w.sum()) - n) < 1e-9 and float(w.min()) >= 0.25 and float(w.max()) <= 4.0
        torch.testing.assert_close(snap.layer_w[step], w.float())  # layers hold the method's weights
        assert abs(float(snap.layer_w[step].sum()) - n) < 1e-5
        if step in events:
            assert not torch.equal(w, prev)
            # w_target = (w − (1−ρ) w_prev)/ρ must itself be a valid allocation: mean 1, in the box, and the
            # entries strictly inside the box proportional to the importance with one common λ (τ = 1)
            target = (w - 0.5 * prev) / 0.5
            assert abs(float(target.mean()) - 1.0) < 1e-9
            assert float(target.min()) >= 0.25 - 1e-9 and float(target.max()) <= 4.0 + 1e-9
            imp = snap.importance[step]
            free = (target > 0.25 + 1e-9) & (target < 4.0 - 1e-9)
            ratio = target[free] / (imp[free] / imp.sum())
            torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-5, atol=0)
        else:
            assert torch.equal(w, prev)  # constant between events and after the freeze
        prev = w
    assert m.progress()["w_min"] < 1 < m.progress()["w_max"]
    json.dumps(m.state_dict())  # JSON-able for the adapter metadata


def test_rank_mode_sums_exactly_and_masks_trailing_components():
    tr, m, snap = _run_training("rank")
    total, n = tr.total_steps, len(m.layers)
    events = _expected_events(total, 3)
    r_max = Budget("b", RANK).init_rank
    prev = [RANK] * n
    changed = False
    for step in range(1, total + 1):
        ranks = snap.ranks[step]
        assert sum(ranks) == n * RANK and min(ranks) >= 1 and max(ranks) <= r_max
        if step not in events:
            assert ranks == prev
        changed |= ranks != prev
        prev = ranks
        assert torch.all(snap.layer_w[step] == 1.0)  # rank mode leaves w ≡ 1
    assert changed
    for r, layer in zip(m.ranks, m.layers.values()):
        assert torch.equal(layer.rank_mask, (torch.arange(r_max) < r).float())
    ledger = m.ledger()
    assert ledger.stored_at_end == sum(r * (layer.in_features + layer.out_features)
                                       for r, layer in zip(m.ranks, m.layers.values()))
    assert m.progress() == {"r_min": min(m.ranks), "r_max": max(m.ranks)}


def test_allocate_ranks_largest_remainder_and_bounds():
    # no bound binds: exactly largest-remainder rounding of R·I/ΣI
    imp = torch.tensor([5.0, 3.0, 1.2, 0.8], dtype=torch.float64)
    R = 16
    real = (R * imp / imp.sum()).tolist()  # 8.0, 4.8, 1.92, 1.28
    floors = [math.floor(v) for v in real]
    extra = sorted(range(4), key=lambda i: -(real[i] - floors[i]))[: R - sum(floors)]
    expected = [f + (i in extra) for i, f in enumerate(floors)]
    assert allocate_ranks(imp, R, r_max=12) == expected == [8, 5, 2, 1]
    # bounds bind (max(1, ·) floor and r_max cap): the sum is still exact
    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        m = int(torch.randint(2, 40, (1,), generator=g))
        r = int(torch.randint(1, 9, (1,), generator=g))
        r_max = r + int(torch.randint(0, 2 * r + 1, (1,), generator=g))
        imp = torch.rand(m, generator=g, dtype=torch.float64) ** 6
        ranks = allocate_ranks(imp, m * r, r_max=r_max)
        assert sum(ranks) == m * r and min(ranks) >= 1 and max(ranks) <= r_max


def test_masked_components_contribute_zero():
    model = tiny_bert()
    m = _dyn(model, allocation="rank", gate="none")
    _randomize(m, seed=5)
    imp = torch.linspace(0.1, 3.0, len(m.layers)) ** 2
    m.importance = imp.float()
    m.reallocate(step=1)
    assert sum(m.ranks) == len(m.layers) * RANK and len(set(m.ranks)) > 1
    batch = tiny_batch()
    with torch.no_grad():  # the same path as the comparison below, so equality can be exact
        ref_logits = model(**batch).logits
    for r, layer in zip(m.ranks, m.layers.values()):
        x = torch.randn(2, 5, layer.in_features)
        A, B = layer.lora_A[:r], layer.lora_B[:, :r]
        expected = layer.base(x) + S * (x @ A.T) @ B.T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # scribbling on masked components changes nothing
        for r, layer in zip(m.ranks, m.layers.values()):
            layer.lora_A[r:] = 7.0
            layer.lora_B[:, r:] = 7.0
        torch.testing.assert_close(model(**batch).logits, ref_logits, rtol=0, atol=0)


@pytest.mark.parametrize("unweighted", [True, False])
def test_importance_ema_matches_formula(unweighted):
    """I ← β I + (1−β) mean|θ ∂L/∂θ|, divided by w_ℓ when scoring the unweighted branch (§6.4.1)."""
    model = tiny_bert()
    m = _dyn(model, unweighted_importance=unweighted)
    _randomize(m, seed=6, gate=False)
    _set_weights(m, seed=2)
    w = m.weights.clone()
    layers = list(m.layers.values())
    g = torch.Generator().manual_seed(1)
    expected = torch.zeros(len(layers), dtype=torch.float64)
    for _ in range(3):
        for layer in layers:
            layer.lora_A.grad = torch.randn(layer.lora_A.shape, generator=g)
            layer.lora_B.grad = torch.randn(layer.lora_B.shape, generator=g)
        m.update_importance()
        for i, layer in enumerate(layers):
            total = sum(float((p.detach() * p.grad).abs().sum()) for p in (layer.lora_A, layer.lora_B))
            mean = total / (layer.lora_A.numel() + layer.lora_B.numel())
            expected[i] = 0.85 * expected[i] + 0.15 * (mean / float(w[i]) if unweighted else mean)
    torch.testing.assert_close(m.importance_now(), expected, rtol=1e-5, atol=0)


# --- (5) merge -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("allocation", ["scale", "rank"])
def test_merge_exact_with_gate_off(allocation):
    model = tiny_bert()
    m = _dyn(model, gate="none", allocation=allocation)
    assert m.mergeable
    _randomize(m, seed=7)
    if allocation == "scale":
        _set_weights(m)
    else:
        m.importance = torch.linspace(0.1, 2.0, len(m.layers))
        m.reallocate(step=1)
    w0 = {n: layer.base.weight.detach().clone() for n, layer in m.layers.items()}
    batch = tiny_batch()
    with torch.no_grad():
        before = model(**batch).logits
        m.merge()
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-5)
        m.unmerge()
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-5)
    for n, layer in m.layers.items():
        torch.testing.assert_close(layer.base.weight, w0[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("gate", ["token", "sequence"])
def test_merge_raises_with_active_gate(gate):
    m = _dyn(tiny_bert(), gate=gate)
    assert not m.mergeable
    with pytest.raises(ConfigError, match="cannot be merged"):
        m.merge()
    with pytest.raises(ConfigError, match="cannot be merged"):
        next(iter(m.layers.values())).merge()
    assert m.to_peft() is None


@pytest.mark.parametrize("allocation", ["scale", "rank"])
def test_to_peft_parity_with_gate_off(allocation):
    peft = require("peft")
    base = tiny_bert()
    ours = copy.deepcopy(base)
    m = _dyn(ours, gate="none", allocation=allocation)
    _randomize(m, seed=8)
    if allocation == "scale":
        _set_weights(m, seed=9)
    else:
        m.importance = torch.linspace(0.1, 2.0, len(m.layers)) ** 2
        m.reallocate(step=1)
    exp = m.to_peft()
    cfg = peft.LoraConfig(r=exp.r, lora_alpha=exp.lora_alpha, lora_dropout=0.0, target_modules=list(exp.tensors),
                          rank_pattern=exp.rank_pattern, alpha_pattern=exp.alpha_pattern)
    ref = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, t in exp.tensors.items():
            mod = ref.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(t["lora_A"])
            mod.lora_B["default"].weight.copy_(t["lora_B"])
        batch = tiny_batch()
        torch.testing.assert_close(ours(**batch).logits, ref(**batch).logits, rtol=1e-5, atol=1e-6)


# --- (6) overhead counters ---------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", ["token", "sequence", "none"])
def test_overhead_counters_match_formulas(gate):
    m = _dyn(tiny_bert(), gate=gate)
    shapes = [(layer.in_features, layer.out_features) for layer in m.layers.values()]
    on = gate != "none"
    gate_params = sum(d_in + 1 for d_in, _ in shapes) if on else 0
    assert sum(p.numel() for layer in m.layers.values() for n, p in layer.named_parameters()
               if n.startswith("gate_")) == gate_params
    ledger = m.ledger()
    assert ledger.extra_stored == gate_params
    assert ledger.trainable_now == sum(RANK * (a + b) for a, b in shapes) + gate_params
    assert ledger.stored_at_end == sum(RANK * (a + b) for a, b in shapes)
    o = m.overhead()
    assert o["gate_params"] == gate_params
    assert o["gate_flops_per_token"] == (sum(2 * d_in + RANK for d_in, _ in shapes) if on else 0)
    assert o["gate_flops_per_sequence"] == (sum(2 * d_in for d_in, _ in shapes) if gate == "sequence" else 0)
    assert o["lora_flops_per_token"] == sum(2 * RANK * (a + b) for a, b in shapes)
    # methods.md §6.2 anchor: RoBERTa-base q,v → 24·(768+1) = 18,456 extra, ≈ 0.015% of 125M
    assert 24 * (768 + 1) == 18_456 and abs(18_456 / 125e6 - 0.00015) < 1e-5


def test_rank_mode_ledger_counts_allocated_and_kept():
    m = _dyn(tiny_bert(), allocation="rank", gate="none", budget=Budget("b", RANK, init_ratio=1.5))
    r_max = 6
    ledger = m.ledger()
    assert ledger.trainable_now == sum(r_max * (l.in_features + l.out_features) for l in m.layers.values())
    assert ledger.stored_at_end == sum(RANK * (l.in_features + l.out_features) for l in m.layers.values())


def test_state_dict_round_trip():
    _, m, _ = _run_training("scale", total=12, interval=2)
    m2 = _dyn(tiny_bert())
    m2.load_adapter_state_dict(m.adapter_state_dict())
    m2.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert torch.equal(m2.weights, m.weights)
    torch.testing.assert_close(m2.importance_now(), m.importance_now())
    for name, layer in m.layers.items():
        assert torch.equal(m2.layers[name].alloc_weight, layer.alloc_weight)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="gate"):
        _dyn(tiny_bert(), gate="channel")
    with pytest.raises(ConfigError, match="w_min"):
        _dyn(tiny_bert(), w_min=1.5)


# --- revision 2 (methods.md §6.4) ---------------------------------------------------------------------------

class _EventProbe(TrainerHook):
    """Placed before and after the method's hook: logits, w, B and B's Adam moments around every step."""

    def __init__(self, model, method, batch):
        self.model, self.method, self.batch = model, method, batch
        self.seen = {}

    def after_optimizer_step(self, state):
        layers = list(self.method.layers.values())
        self.seen.setdefault(state.step, []).append({
            "logits": eval_logits(self.model, self.batch),
            "w": self.method.weights.clone(),
            "B": [layer.lora_B.detach().clone() for layer in layers],
            "m": [state.optimizer.state[layer.lora_B]["exp_avg"].clone() for layer in layers],
            "v": [state.optimizer.state[layer.lora_B]["exp_avg_sq"].clone() for layer in layers]})


def _train_with_probe(preserve, total=16, interval=4, lr=1e-2):
    model = tiny_bert()
    model.train()
    head = freeze_backbone(model)
    m = assemble.attach(model, SPEC, _cfg(realloc_interval=interval, preserve_function=preserve), Budget("b", RANK))
    batch = tiny_batch()
    before, after = _EventProbe(model, m, batch), _EventProbe(model, m, batch)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 128, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
           for _ in range(16)]
    loader = BatchLoader(TokenizedSplit(ids, None, [i % 2 for i in range(16)], False), 4, Collator(0), seed=1)
    tcfg = TrainerConfig(epochs=total // 4, batch_size=4, progress_bar=False, lr=lr, warmup_ratio=0.0)
    tr = Trainer(tcfg, model, list(m.named_trainable_parameters()) + head, loader,
                 lambda mdl: {"eval/accuracy": 0.5}, "accuracy", hooks=[before, *m.hooks(), after],
                 head_param_names=[n for n, _ in head])
    tr.fit()
    events = [t for t in range(1, total + 1) if is_realloc_step(t, total, interval, 0.1, 0.2)]
    return m, before.seen, after.seen, events


def test_reallocation_preserves_function_and_rescales_b_and_its_moments():
    """At an event w_old → w_new: logits unchanged (1e-5), B ← B·w_old/w_new, Adam first moment × w_new/w_old and
    second × (w_new/w_old)² (the gradient units of the new parametrization)."""
    m, before, after, events = _train_with_probe(preserve=True)
    assert events == [6, 10] and m.n_realloc == 2
    for step in events:
        b, a = before[step][0], after[step][-1]
        assert not torch.equal(b["w"], a["w"])  # the event did move w
        torch.testing.assert_close(a["logits"], b["logits"], rtol=1e-5, atol=1e-5)
        for i, (w_old, w_new) in enumerate(zip(b["w"].tolist(), a["w"].tolist())):
            c = w_new / w_old
            torch.testing.assert_close(a["B"][i], b["B"][i] / c, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(a["m"][i], b["m"][i] * c, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(a["v"][i], b["v"][i] * c * c, rtol=1e-6, atol=1e-15)


def test_without_preservation_an_event_moves_the_function():
    """§6.2's behaviour (preserve_function: false): the event rescales the learned update, B and moments stay."""
    m, before, after, events = _train_with_probe(preserve=False)
    step = events[0]
    b, a = before[step][0], after[step][-1]
    assert not torch.allclose(a["logits"], b["logits"], rtol=1e-4, atol=1e-4)
    assert all(torch.equal(x, y) for x, y in zip(a["B"], b["B"]))


def test_preserved_event_acts_as_a_learning_rate_multiplier():
    """After a function-preserving event, the model trains exactly like plain LoRA (w ≡ 1) whose B_ℓ learning rate
    is multiplied by w_new/w_old from that step on (Adam with eps → 0, no weight decay)."""
    torch.manual_seed(0)
    batch = tiny_batch()
    labels = torch.tensor([0, 1, 1, 0][: batch["input_ids"].shape[0]])
    n_before, n_after, lr = 3, 4, 1e-2

    def setup(cfg_over):
        model = tiny_bert()
        freeze_backbone(model)
        for p in model.parameters():
            p.requires_grad_(False)  # only the adapter trains here: the head would mix in its own path
        m = assemble.attach(model, SPEC, _cfg(gate="none", **cfg_over), Budget("b", RANK))
        _randomize(m, seed=4, gate=False)
        return model, m

    def step(model, opt):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        opt.step()

    model_a, m_a = setup({})
    model_b, m_b = setup({})
    layers_a, layers_b = list(m_a.layers.values()), list(m_b.layers.values())
    adam = dict(betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0)
    opt_a = torch.optim.AdamW([p for l in layers_a for p in (l.lora_A, l.lora_B)], lr=lr, **adam)
    groups_b = [{"params": [l.lora_A]} for l in layers_b] + [{"params": [l.lora_B]} for l in layers_b]
    opt_b = torch.optim.AdamW(groups_b, lr=lr, **adam)
    for _ in range(n_before):
        step(model_a, opt_a)
        step(model_b, opt_b)
    # the event on a: importance made up, reallocation through the method (rescales B and Adam state)
    m_a.importance = torch.rand(len(layers_a), generator=torch.Generator().manual_seed(1)) + 0.05
    m_a.reallocate(n_before, opt_a)
    ratio = m_a.weights  # w_old = 1
    assert float(ratio.max() - ratio.min()) > 0.1
    for group, c in zip(opt_b.param_groups[len(layers_b):], ratio.tolist()):
        group["lr"] = lr * c
    torch.testing.assert_close(eval_logits(model_a, batch), eval_logits(model_b, batch), rtol=1e-5, atol=1e-6)
    for _ in range(n_after):
        step(model_a, opt_a)
        step(model_b, opt_b)
    for la, lb, w in zip(layers_a, layers_b, ratio.tolist()):
        torch.testing.assert_close(la.lora_A, lb.lora_A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(la.lora_B * w, lb.lora_B, rtol=1e-4, atol=1e-6)  # w·B is the update
    torch.testing.assert_close(eval_logits(model_a, batch), eval_logits(model_b, batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("total,n_events", [(100, 10), (345, 10), (30, 10), (12, 4)])
def test_n_events_spread_over_the_run(total, n_events):
    interval = spread_interval(total, n_events, 0.1, 0.2)
    events = [t for t in range(1, total + 1) if is_realloc_step(t, total, interval, 0.1, 0.2)]
    t_warm, t_end = round(0.1 * total), round(0.8 * total)
    assert len(events) == min(n_events, t_end - t_warm)
    assert all(t_warm < t <= t_end for t in events)
    assert events[-1] > t_end - interval  # the events reach the freeze: spread over the whole window


def test_training_derives_the_interval_from_n_events(caplog):
    caplog.set_level(logging.INFO, logger="lorabench")
    tr, m, snap = _run_training("scale", total=40, interval=None, n_events=5)
    assert m.realloc_interval == spread_interval(40, 5, 0.1, 0.2) == (32 - 4) // 5
    assert m.n_realloc == 5


def test_allocation_none_keeps_unit_weights_and_trains_the_gate():
    tr, m, snap = _run_training("none", total=12)
    assert m.n_realloc == 0 and m.importance is None
    assert all(torch.equal(w, torch.ones_like(w)) for w in snap.layer_w.values())
    assert any(float(layer.gate_u.abs().sum()) > 0 for layer in m.layers.values())


def test_gate_is_bounded_by_gamma_and_penalized():
    model = tiny_bert()
    m = _dyn(model, gate_scale=0.25, gate_l2=0.1)
    layer = m.layers["bert.encoder.layer.0.attention.self.query"]
    with torch.no_grad():
        layer.gate_u.fill_(50.0)  # saturate
    x = torch.randn(2, 5, 32)
    g = layer.gate_value(x)
    assert float(g.min()) >= 0.75 - 1e-6 and float(g.max()) <= 1.25 + 1e-6
    assert float((g - 1).abs().max()) > 0.24
    expected = 0.1 * sum(float(l.gate_u.square().sum()) for l in m.layers.values())
    assert abs(float(m.regularizer()) - expected) < 1e-3 * expected
    assert _dyn(tiny_bert()).regularizer() is None  # gate_l2 = 0
    assert _dyn(tiny_bert(), gate="none", gate_l2=0.1).regularizer() is None


def test_shipped_config_is_revision_2():
    import yaml
    from conftest import REPO

    cfg = yaml.safe_load((REPO / "conf" / "method" / "dynamic_lora.yaml").read_text())
    m = assemble.attach(tiny_bert(), SPEC, cfg, Budget("r8", 8))
    assert (m.unweighted_importance, m.preserve_function, m.beta, m.n_events, m.w_min, m.w_max, m.gate_scale) == \
        (True, True, 0.95, 10, 0.5, 2.0, 0.5)
