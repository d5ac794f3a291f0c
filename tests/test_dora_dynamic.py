"""DoRA-dynamic invariants (methods.md §3.7): gates, importance, schedule, soft pruning, DEM, merge, budget, PEFT."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorabench import assemble, methods
from lorabench.backbone import ModelSpec, freeze_backbone
from lorabench.budget import Budget, dora_dynamic_schedule, dora_dynamic_window
from lorabench.data import BatchLoader, Collator, TokenizedSplit
from lorabench.errors import ConfigError
from lorabench.methods.base import LowRankLinear
from lorabench.methods.dora_dynamic import GatedLowRankLinear
from lorabench.training.hooks import TrainerHook
from lorabench.training.trainer import Trainer, TrainerConfig
from conftest import TINY_SPEC_DICT, require, tiny_batch, tiny_bert

SPEC = ModelSpec.from_dict(TINY_SPEC_DICT)
BUDGET = Budget("r4", 4)  # r′ = 6 on 12 matrices of tiny_bert: N = 72, target 48


def _attach(model=None, budget=BUDGET, **kw):
    model = model if model is not None else tiny_bert()
    cfg = {"name": "dora_dynamic", "alpha": 8, "dropout": 0.0, **kw}
    return model, assemble.attach(model, SPEC, cfg, budget)


def _randomize(method, seed=0, gates=True):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            if gates:
                layer.lora_gate.copy_(torch.randn(layer.lora_gate.shape, generator=g))


def _gates(method):
    return torch.stack([l.lora_gate.detach().clone() for l in method.layers.values()])


def _reference_importance(layer):
    """σ_i from the definition: ‖c_i b_i a_iᵀ‖_F / (‖B diag(c) A‖_F + ε), every product formed densely."""
    a, b, c = layer.lora_A.detach().double(), layer.lora_B.detach().double(), layer.lora_gate.detach().double()
    total = torch.linalg.matrix_norm(b @ torch.diag(c) @ a) + 1e-8
    return torch.stack([torch.linalg.matrix_norm(c[i] * torch.outer(b[:, i], a[i])) for i in range(len(c))]) / total


# --- 1, 2: the layer ---------------------------------------------------------------------------------------------

def test_init_identity_with_nonzero_factors():
    ref = tiny_bert()
    model, m = _attach(copy.deepcopy(ref))
    for layer in m.layers.values():
        assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
        assert torch.count_nonzero(layer.lora_B) == layer.lora_B.numel()
        assert torch.equal(layer.lora_gate, torch.zeros(6))
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)


def test_kaiming_uniform_default_bounds_and_scale():
    torch.manual_seed(0)
    layer = GatedLowRankLinear(nn.Linear(768, 3072), rank=12, alpha=8)
    assert layer.scale == pytest.approx(8 / 12)
    bound_a, bound_b = math.sqrt(6 / 768), math.sqrt(6 / 12)  # a = 0: √(6/fan_in)
    assert layer.lora_A.abs().max() <= bound_a and layer.lora_A.abs().max() > 0.95 * bound_a
    assert layer.lora_B.abs().max() <= bound_b and layer.lora_B.abs().max() > 0.95 * bound_b
    _, m = _attach(budget=Budget("r8", 8))
    assert all(l.rank == 12 and l.scale == pytest.approx(8 / 12) for l in m.layers.values())


def test_unit_gates_equal_lora_with_scale_alpha_over_initial_rank():
    torch.manual_seed(0)
    base = nn.Linear(16, 10)
    layer = GatedLowRankLinear(copy.deepcopy(base), rank=6, alpha=8)
    lora = LowRankLinear(copy.deepcopy(base), rank=6, alpha=8)
    with torch.no_grad():
        layer.lora_gate.fill_(1.0)
        lora.lora_A.copy_(layer.lora_A)
        lora.lora_B.copy_(layer.lora_B)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), lora(x), rtol=1e-6, atol=1e-6)
    expected = base(x) + (8 / 6) * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # a gate is a per-component multiplier
        layer.lora_gate.copy_(torch.tensor([0.0, 2.0, -1.0, 0.5, 0.0, 3.0]))
    expected = base(x) + (8 / 6) * ((x @ layer.lora_A.T) * layer.lora_gate) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_dropout_only_on_adapter_input():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = GatedLowRankLinear(copy.deepcopy(base), rank=4, alpha=8, dropout=0.999999)
    with torch.no_grad():
        layer.lora_gate.fill_(1.0)
    layer.train()
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), base(x))


# --- 3: importance ------------------------------------------------------------------------------------------------

def test_importance_formula_on_random_tensors():
    _, m = _attach()
    _randomize(m, seed=3)
    with torch.no_grad():  # one layer with a pruned component and one with all gates zero
        m._layer_list[0].lora_gate[2] = 0.0
        m._layer_list[5].lora_gate.zero_()
    got = m.component_importance()
    expected = torch.stack([_reference_importance(l) for l in m._layer_list]).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert got[0, 2] == 0 and torch.equal(got[5], torch.zeros(6))
    assert torch.all(got[1].sum() <= 6)  # shares of one layer, each <= 1


def test_importance_is_invariant_to_the_scale():
    _, m1 = _attach(alpha=8)
    _, m2 = _attach(alpha=64)
    _randomize(m1, seed=4)
    _randomize(m2, seed=4)
    assert m1._layer_list[0].scale != m2._layer_list[0].scale
    torch.testing.assert_close(m1.component_importance(), m2.component_importance(), rtol=0, atol=0)


def test_ema_matches_hand_rollout():
    _, m = _attach(beta=0.9)
    m.total_steps = 1000  # steps 1..3 are in the warm-up: scores only
    expected = torch.zeros(12, 6, dtype=torch.float64)
    for step in (1, 2, 3):
        _randomize(m, seed=10 + step)  # the optimizer moved the weights
        sigma = torch.stack([_reference_importance(l) for l in m._layer_list])
        expected = 0.9 * expected + 0.1 * sigma
        m.on_optimizer_step(step)
        torch.testing.assert_close(m.scores, expected.float(), rtol=1e-5, atol=1e-7)
    assert m.n_events == 0 and torch.count_nonzero(_gates(m)) == 72  # nothing pruned in the warm-up


# --- 4: schedule --------------------------------------------------------------------------------------------------

def _expected_k(p, P, N, r_init, r):
    return max(math.floor(Fraction(N) * (1 - Fraction(r, r_init)) * Fraction(p, P) ** 3), 1)


def dora_dynamic_kept(step: int, total_steps: int, n_components: int, init_rank: int, target_rank: int,
                      interval: int, warmup_frac: float = 0.15, final_frac: float = 0.50) -> int:
    """Components kept after the latest event at or before `step` (§3.4, no ties): N − k; N before any event."""
    p, P = dora_dynamic_window(step, total_steps, warmup_frac, final_frac)
    if p < 0:
        return n_components
    p_event = P if p >= P else p - p % interval
    return n_components - _expected_k(p_event, P, n_components, init_rank, target_rank)


def test_worked_example_of_the_spec():
    N, r_init, r, T = 864, 12, 8, 1000
    # interval 5 makes step 325 (p = 175) an event; with interval 10 it keeps the count of p = 170 (831)
    kept = {t: dora_dynamic_kept(t, T, N, r_init, r, 5) for t in range(1, T + 1)}
    assert all(kept[t] == 864 for t in range(1, 150))
    assert all(kept[t] == 863 for t in range(150, 201))
    assert kept[325] == 828 and kept[400] == 760 and kept[500] == 576 and kept[1000] == 576
    assert dora_dynamic_kept(325, T, N, r_init, r, 10) == 831 and dora_dynamic_kept(400, T, N, r_init, r, 10) == 760
    events = {t: dora_dynamic_schedule(t, T, N, r_init, r, 10) for t in range(1, T + 1)}
    assert [t for t, e in events.items() if e.is_event][:3] == [150, 160, 170]
    assert [t for t, e in events.items() if e.is_last] == [500]
    assert N - events[500].n_prune == 576 == 72 * 8
    assert events[149].phase == "warmup" and events[501].phase == "final"
    assert dora_dynamic_schedule(325, T, N, r_init, r, 5).n_prune == 36


@pytest.mark.parametrize("T", [20, 57, 180, 1000, 1001, 2345])
@pytest.mark.parametrize("r", [2, 4, 8, 9])
def test_schedule_follows_the_formula(T, r):
    r_init = math.ceil(1.5 * r)
    n_matrices = 36
    N = n_matrices * r_init
    P = int(T * (1 - 0.15 - 0.5))
    last_k = 0
    for t in range(1, T + 1):
        e = dora_dynamic_schedule(t, T, N, r_init, r, 10)
        p = int(t - 0.15 * T)
        if t < math.floor(0.15 * T):
            assert e.phase == "warmup" and not e.is_event
        if e.is_event:
            assert 0 <= p <= P and (p % 10 == 0 or p == P)
            assert e.n_prune == _expected_k(p, P, N, r_init, r)
            assert e.n_prune >= last_k  # kept never increases
            last_k = e.n_prune
        else:
            assert e.n_prune == 0
    assert N - last_k == n_matrices * r  # exactly the target, also where float arithmetic rounds down (r = 9)


def test_method_schedule_on_frozen_tie_free_scores():
    """No training: the weights, hence the per-step σ, are fixed and tie-free; run every step of T."""
    T = 200
    _, m = _attach(prune_interval=5)
    _randomize(m, seed=7)
    m.total_steps = T
    a_before = [l.lora_A.detach().clone() for l in m._layer_list]
    b_before = [l.lora_B.detach().clone() for l in m._layer_list]
    zeros_prev = 0
    first_event = None
    for t in range(1, T + 1):
        e = dora_dynamic_schedule(t, T, 72, 6, 4, 5)
        m.on_optimizer_step(t)
        zeros = int((_gates(m) == 0).sum())
        if e.is_event:
            first_event = first_event or t
            assert zeros == e.n_prune  # tie-free: exactly k pruned at each event
        assert zeros >= zeros_prev  # kept never increases
        zeros_prev = zeros
    assert first_event == math.floor(0.15 * T)
    assert m.kept_budget == 48 == sum(m.rank_pattern().values())
    assert m.final_mask is not None and int(m.final_mask.sum()) == 24
    assert m.phase == "final" and m.n_events == len(range(0, 70 + 1, 5))
    for l, a, b in zip(m._layer_list, a_before, b_before):  # pruning touches only c
        assert torch.equal(l.lora_A, a) and torch.equal(l.lora_B, b)


def test_final_event_is_made_up_when_its_step_was_skipped():
    T = 100  # P = 35, last event at step 50
    _, m = _attach()
    _randomize(m, seed=8)
    m.total_steps = T
    for t in list(range(1, 50)) + [51, 52]:  # step 50 skipped by the fp16 scaler
        m.on_optimizer_step(t)
    assert m.final_mask is not None and sum(m.rank_pattern().values()) == 48


# --- 5, 6: permanence and soft pruning ------------------------------------------------------------------------------

def test_final_mask_is_permanent_and_unmasked_gates_move():
    T = 100
    _, m = _attach()
    _randomize(m, seed=9)
    m.total_steps = T
    for t in range(1, 51):
        m.on_optimizer_step(t)
    mask = m.final_mask.clone()
    scores = m.scores.clone()
    for t in range(51, 60):
        moved = torch.randn(12, 6)  # what an optimizer step could do to every gate
        with torch.no_grad():
            for layer, row in zip(m._layer_list, moved):
                layer.lora_gate.copy_(row)
        m.on_optimizer_step(t)
        gates = _gates(m)
        assert torch.equal(gates[mask], torch.zeros(int(mask.sum())))
        assert torch.equal(gates[~mask], moved[~mask])
    assert torch.equal(m.scores, scores)  # no scoring after the last event


def test_soft_pruning_revives_between_events():
    T = 100  # events at steps 15, 25, 35, 45 and 50 (interval 10)
    model, m = _attach()
    _randomize(m, seed=10)
    m.total_steps = T
    for t in range(1, 16):
        m.on_optimizer_step(t)
    pruned = _gates(m) == 0
    assert int(pruned.sum()) == 1
    layer_i, comp_i = [int(v) for v in torch.nonzero(pruned)[0]]
    layer = m._layer_list[layer_i]
    model.train()
    model(**tiny_batch()).loss.backward()
    assert layer.lora_gate.grad[comp_i] != 0  # the zeroed gate still gets a gradient
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.sub_(1.0 * p.grad)
    assert layer.lora_gate[comp_i] != 0
    m.on_optimizer_step(16)  # no event: the revived gate stays
    assert layer.lora_gate[comp_i] != 0 and not m.phase == "final"


# --- 7: DEM ---------------------------------------------------------------------------------------------------------

def _reference_dem(method, form):
    total = 0.0
    for layer in method.layers.values():
        for i in range(layer.rank):
            total += torch.var(layer.lora_A[i].double()) + torch.var(layer.lora_B[:, i].double())
    n = len(method.layers) * method.init_rank
    return total / (2 * n if form == "code" else n)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_dem_formula(form):
    _, m = _attach(dem_form=form, dem_weight=0.3)
    _randomize(m, seed=11)
    torch.testing.assert_close(m.dem_penalty().double(), _reference_dem(m, form), rtol=1e-5, atol=0)
    torch.testing.assert_close(m.regularizer(), 0.3 * m.dem_penalty())
    m.regularizer().backward()  # differentiable in A and B
    assert all(l.lora_A.grad is not None and l.lora_B.grad is not None for l in m.layers.values())


def test_dem_paper_form_is_twice_the_code_form():
    _, m_code = _attach(dem_form="code")
    _, m_paper = _attach(dem_form="paper")
    _randomize(m_code, seed=12)
    _randomize(m_paper, seed=12)
    torch.testing.assert_close(m_paper.dem_penalty(), 2 * m_code.dem_penalty())


def test_dem_zero_for_constant_components():
    _, m = _attach()
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_A.copy_(torch.arange(layer.rank, dtype=torch.float32)[:, None].expand_as(layer.lora_A))
            layer.lora_B.fill_(0.7)
    assert m.dem_penalty().item() == 0.0


def test_dem_switched_off_after_pruning_and_bad_options_refused():
    T = 100
    _, m = _attach()
    _randomize(m, seed=13)
    m.total_steps = T
    for t in range(1, 50):
        m.on_optimizer_step(t)
    assert m.regularizer() is not None  # step 50 (the last event) still has the penalty
    m.on_optimizer_step(50)
    assert m.regularizer() is None
    _, m0 = _attach(dem_weight=0.0)
    assert m0.regularizer() is None
    with pytest.raises(ConfigError, match="dem_form"):
        _attach(dem_form="mean")
    with pytest.raises(ConfigError, match="warmup_frac"):
        _attach(warmup_frac=0.6, final_frac=0.5)


# --- 8, 9: merge, budget report, export -------------------------------------------------------------------------------

def test_merge_after_pruning():
    T = 100
    model, m = _attach()
    _randomize(m, seed=14)
    m.total_steps = T
    for t in range(1, 52):
        m.on_optimizer_step(t)
    w0 = {n: l.base.weight.detach().clone() for n, l in m.layers.items()}
    batch = tiny_batch()
    with torch.no_grad():
        before = model(**batch).logits
        m.merge()
        for n, l in m.layers.items():
            expected = w0[n] + l.scale * l.lora_B @ torch.diag(l.lora_gate) @ l.lora_A
            torch.testing.assert_close(l.base.weight, expected, rtol=1e-5, atol=1e-6)
        merged = model(**batch).logits
        m.unmerge()
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    for n, l in m.layers.items():
        torch.testing.assert_close(l.base.weight, w0[n], rtol=0, atol=1e-6)


def test_budget_report_counts_kept_components():
    _, m = _attach()
    _randomize(m, seed=15)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_gate[torch.rand(6, generator=g) < 0.4] = 0.0
        m._layer_list[3].lora_gate.zero_()
    ledger = m.ledger()
    kept = {n: int(torch.count_nonzero(l.lora_gate)) for n, l in m.layers.items()}
    assert m.rank_pattern() == kept
    assert ledger.stored_at_end == sum(kept[n] * (l.in_features + l.out_features) for n, l in m.layers.items())
    assert ledger.trainable_now == sum(6 * (l.in_features + l.out_features) + 6 for l in m.layers.values())
    assert ledger.notes["kept_components"] == sum(kept.values()) and ledger.notes["target_components"] == 48


def test_to_peft_reproduces_the_update():
    peft = require("peft")
    base = tiny_bert()
    model, m = _attach(copy.deepcopy(base))
    _randomize(m, seed=16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_gate[torch.rand(6, generator=g) < 0.5] = 0.0
        m._layer_list[2].lora_gate.zero_()  # a module with nothing kept is left out
    exp = m.to_peft()
    dropped = list(m.layers)[2]
    assert dropped not in exp.tensors and len(exp.tensors) == 11
    assert exp.rank_pattern == {n: k for n, k in m.rank_pattern().items() if k > 0}
    cfg = peft.LoraConfig(r=exp.r, lora_alpha=exp.lora_alpha, rank_pattern=exp.rank_pattern,
                          alpha_pattern=exp.alpha_pattern, lora_dropout=0.0, target_modules=list(exp.tensors))
    ref = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, t in exp.tensors.items():
            mod = ref.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(t["lora_A"])
            mod.lora_B["default"].weight.copy_(t["lora_B"])
        batch = tiny_batch()
        ours = model(**batch).logits
        theirs = ref(**batch).logits
    assert not torch.allclose(ours, base(**batch).logits, atol=1e-3)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


# --- hook, resume, a real training loop ----------------------------------------------------------------------------------

def test_state_dict_gives_an_exact_resume():
    T = 100

    def perturb(method, t):
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for layer in method.layers.values():  # "training": gates and factors move every step
                layer.lora_gate.add_(0.1 * torch.randn(6, generator=g))
                layer.lora_A.add_(0.01 * torch.randn(layer.lora_A.shape, generator=g))

    _, full = _attach()
    _randomize(full, seed=17)
    full.total_steps = T
    _, first = _attach()
    first.load_adapter_state_dict(full.adapter_state_dict())
    first.total_steps = T
    for t in range(1, 41):
        perturb(full, t)
        full.on_optimizer_step(t)
        perturb(first, t)
        first.on_optimizer_step(t)
    saved_adapter, saved_state = first.adapter_state_dict(), first.state_dict()  # the schedule state is the method's
    _, resumed = _attach()
    resumed.load_adapter_state_dict(saved_adapter)
    resumed.load_state_dict(saved_state)
    for t in range(41, 61):
        perturb(full, t)
        full.on_optimizer_step(t)
        perturb(resumed, t)
        resumed.on_optimizer_step(t)
    assert torch.equal(resumed.scores, full.scores) and torch.equal(resumed.final_mask, full.final_mask)
    assert torch.equal(_gates(resumed), _gates(full))
    assert (resumed.n_events, resumed.kept_budget, resumed.step) == (full.n_events, full.kept_budget, full.step)


class _GateSpy(TrainerHook):
    """Runs after the method's hook: records the kept count and checks the final mask after every step."""

    def __init__(self, method):
        self.method = method
        self.kept = []

    def after_optimizer_step(self, state):
        gates = _gates(self.method)
        self.kept.append(int(torch.count_nonzero(gates)))
        if self.method.final_mask is not None:
            assert torch.equal(gates[self.method.final_mask], torch.zeros(int(self.method.final_mask.sum())))


def test_trainer_run_ends_exactly_on_target():
    model = tiny_bert()
    model.train()
    head = freeze_backbone(model)
    m = assemble.attach(model, SPEC, {"name": "dora_dynamic", "alpha": 8, "dropout": 0.1, "prune_interval": 2},
                       BUDGET)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 128, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
           for _ in range(16)]
    loader = BatchLoader(TokenizedSplit(ids, None, [i % 2 for i in range(16)], False), 4, Collator(0), seed=1)
    cfg = TrainerConfig(epochs=5, batch_size=4, lr=5e-3, progress_bar=False)  # T = 20: last event at step 10
    spy = _GateSpy(m)
    params = list(m.named_trainable_parameters()) + head
    tr = Trainer(cfg, model, params, loader, lambda mdl: {"eval/accuracy": 0.5}, "accuracy",
                 hooks=m.hooks() + [spy], regularizer=m.regularizer, head_param_names=[n for n, _ in head])
    res = tr.fit()
    assert res.steps == 20
    assert spy.kept[0] == 72  # all gates moved off 0 at step 1
    assert m.final_mask is not None and m.phase == "final"
    assert sum(m.rank_pattern().values()) == 48 == m.target_components
    assert m.hooks()[0].progress() == {"budget": 48, "phase": "final"}
    assert spy.kept[8] > 48 and spy.kept[9:] == [48] * 11  # from the last event (step 10) on: exactly the target
    assert m.ledger().stored_at_end == sum(k * (l.in_features + l.out_features)
                                           for k, l in zip(m.rank_pattern().values(), m.layers.values()))
