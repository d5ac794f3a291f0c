"""XGBLoRA invariants (methods.md §5.4 [ours]), tested through the real Trainer so the hook and the optimizer
reset are what runs. Oracles are independent: deltas are recomputed here as s·B·A from the live parameters,
Adam moments from the recorded gradient, and the degenerate case against the plain `lora` method."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from lorabench import assemble, methods
from lorabench.backbone import ModelSpec, freeze_backbone
from lorabench.budget import Budget
from lorabench.methods.xgblora import booster_end_steps, cyclic_block_schedule
from lorabench.data import BatchLoader, Collator, TokenizedSplit
from lorabench.training.hooks import TrainerHook
from lorabench.training.trainer import Trainer, TrainerConfig
from conftest import TINY_SPEC_DICT, eval_logits, tiny_batch, tiny_bert

SPEC = ModelSpec.from_dict(TINY_SPEC_DICT)
ALPHA = 2.0  # rank 1 ⇒ s = α / 1


def _cfg(**over):
    """The paper's rank-1 boosters (§5.3) unless a test says otherwise; the shipped default is rank 4."""
    return {"name": "xgblora", "alpha": ALPHA, "booster_rank": 1, "steps_per_booster": 100, "layers_per_booster": None,
            "shrinkage": 1.0, "booster_l2": 0.0, "dropout": 0.0, "sample_seed": 0, "block_sampling": "cyclic",
            **over}


def _xgb(model, **over):
    return assemble.attach(model, SPEC, _cfg(**over), Budget("b", 4))


def _split(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, 128, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return TokenizedSplit(ids, None, [i % 2 for i in range(n)], False)


def _trainer_cfg(**over):
    base = dict(epochs=3, batch_size=4, progress_bar=False, lr=1e-2, max_grad_norm=None, warmup_ratio=0.0)
    return TrainerConfig(**{**base, **over})


def _train_setup(model, method_cfg, tcfg, before=(), after=(), budget=Budget("b", 4)):
    """freeze → attach → Trainer with hooks [before..., method hooks..., after...]."""
    model.train()
    head = freeze_backbone(model)
    m = assemble.attach(model, SPEC, method_cfg, budget)
    loader = BatchLoader(_split(), tcfg.batch_size, Collator(0), seed=1)
    params = list(m.named_trainable_parameters()) + head
    tr = Trainer(tcfg, model, params, loader, lambda mdl: {"eval/accuracy": 0.5}, "accuracy",
                 hooks=[*before, *m.hooks(), *after], head_param_names=[n for n, _ in head])
    return tr, m


def _is_boundary(step, kappa, total):
    return step % kappa == 0 and step < total


_logits = eval_logits


class BeforeBoundary(TrainerHook):
    """Runs before the method's hook: logits and s·B·A of the live booster just before each merge."""

    def __init__(self, model, kappa, batch):
        self.model, self.kappa, self.batch = model, kappa, batch
        self.method = None
        self.logits, self.deltas, self.had_state = {}, [], {}
        self.grads = {}

    def after_backward(self, state):
        if self.method is not None:
            self.grads[state.step + 1] = {id(p): p.grad.clone() for p in self.method.trainable_parameters()
                                          if p.grad is not None}

    def after_optimizer_step(self, state):
        if not _is_boundary(state.step, self.kappa, state.total_steps):
            return
        self.logits[state.step] = _logits(self.model, self.batch)
        self.deltas.append({n: ALPHA * (layer.lora_B.detach() @ layer.lora_A.detach())
                            for n, layer in self.method.layers.items() if layer.active})
        self.had_state[state.step] = {id(p) for p in self.method.trainable_parameters() if p in state.optimizer.state}


class AfterBoundary(TrainerHook):
    """Runs after the method's hook: logits, optimizer state and the new booster right after each boundary."""

    def __init__(self, model, kappa, batch):
        self.model, self.kappa, self.batch = model, kappa, batch
        self.method = None
        self.logits, self.stale, self.blocks, self.live_b_nonzero = {}, {}, [], []
        self.adam_after_first_step = {}

    def after_optimizer_step(self, state):
        m = self.method
        if _is_boundary(state.step, self.kappa, state.total_steps):
            self.logits[state.step] = _logits(self.model, self.batch)
            live = [p for layer in m.layers.values() if layer.active for p in (layer.lora_A, layer.lora_B)]
            self.stale[state.step] = [p for p in live if p in state.optimizer.state]
            self.live_b_nonzero.append(any(layer.lora_B.abs().sum() > 0 for layer in m.layers.values()))
            self.blocks.append(list(m.active_blocks))
        elif state.step > self.kappa and (state.step - 1) % self.kappa == 0:
            # first step of a new booster: copy the Adam state of its params
            self.adam_after_first_step[state.step] = {
                id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in state.optimizer.state[p].items()}
                for layer in m.layers.values() if layer.active for p in (layer.lora_A, layer.lora_B)}


def _run_with_probes(kappa, max_steps=None, layers_per_booster=None, model=None):
    model = model or tiny_bert()
    batch = tiny_batch()
    before, after = BeforeBoundary(model, kappa, batch), AfterBoundary(model, kappa, batch)
    tr, m = _train_setup(model, _cfg(steps_per_booster=kappa, layers_per_booster=layers_per_booster),
                         _trainer_cfg(max_steps=max_steps), before=[before], after=[after])
    before.method = after.method = m
    w0 = {n: layer.base.weight.detach().clone() for n, layer in m.layers.items()}
    tr.fit()
    return tr, m, model, before, after, w0


@pytest.mark.parametrize("total,kappa", [(12, 5), (10, 5), (12, 3)])
def test_function_preserved_and_booster_count(total, kappa, caplog):
    caplog.set_level(logging.INFO, logger="lorabench")
    tr, m, _, before, after, _ = _run_with_probes(kappa, max_steps=total)
    assert tr.total_steps == total
    boundaries = [s for s in range(1, total + 1) if _is_boundary(s, kappa, total)]
    assert sorted(before.logits) == sorted(after.logits) == boundaries
    assert m.booster_index + 1 == len(boundaries) + 1 == math.ceil(total / kappa) == m.n_boosters
    for step in boundaries:
        # merge-and-reinit must not change the function (shrinkage 1)
        torch.testing.assert_close(after.logits[step], before.logits[step], rtol=1e-5, atol=1e-5)
    assert all(any(d.abs().sum() > 0 for d in ds.values()) for ds in before.deltas)  # boosters did learn
    assert not any(after.live_b_nonzero)  # every new booster starts at B = 0
    text = caplog.text
    assert text.count("merged booster") == len(boundaries)
    assert f"-> {math.ceil(total / kappa)} rank-1 boosters" in text


def test_final_weight_is_w0_plus_sum_of_merged_deltas():
    _, m, _, before, _, w0 = _run_with_probes(kappa=4, max_steps=12)
    assert len(before.deltas) == 2
    for name, layer in m.layers.items():
        expected = sum((d[name] for d in before.deltas if name in d), torch.zeros_like(w0[name]))
        torch.testing.assert_close(layer.base.weight - w0[name], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.merged_delta, expected, rtol=1e-5, atol=1e-7)
        touched = sum(name in d for d in before.deltas)
        assert int(layer.merged_boosters) == touched
    assert any(d.abs().max() > 1e-4 for ds in before.deltas for d in ds.values())


def test_new_booster_adam_moments_start_at_zero():
    # L_s = L: every booster sits on the same layers, so their params did have Adam state before each reset
    kappa = 4
    _, m, _, before, after, _ = _run_with_probes(kappa=kappa, max_steps=12, layers_per_booster=2)
    for step, stale in after.stale.items():
        assert stale == [], f"optimizer state survived the booster boundary at step {step}"
        assert before.had_state[step]  # the reset had something to forget
    assert sorted(after.adam_after_first_step) == [kappa + 1, 2 * kappa + 1]
    beta1, beta2 = 0.9, 0.999
    for step, states in after.adam_after_first_step.items():
        grads = before.grads[step]
        for pid, st in states.items():
            g = grads[pid]
            # one Adam step from zero moments: m = (1-β1) g, v = (1-β2) g²
            assert float(st["step"]) == 1.0
            torch.testing.assert_close(st["exp_avg"], (1 - beta1) * g, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(st["exp_avg_sq"], (1 - beta2) * g * g, rtol=1e-6, atol=1e-15)


def test_only_live_blocks_train_and_compute():
    model = tiny_bert(layers=6)
    m = _xgb(model, layers_per_booster=2)
    assert m.layers_per_booster == 2
    for _ in range(3):
        live = [n for n, layer in m.layers.items() if layer.active]
        assert {m.targets[n].layer_index for n in live} == set(m.active_blocks) and len(m.active_blocks) == 2
        assert len(live) == 2 * 6
        for name, layer in m.layers.items():
            assert layer.lora_A.requires_grad == layer.lora_B.requires_grad == (name in live)
        # ledger: only the live booster is trainable now
        assert m.ledger().trainable_now == sum(m.layers[n].in_features + m.layers[n].out_features for n in live)
        # an inactive pair does not run: giving it a non-zero B changes nothing
        batch = tiny_batch()
        ref = _logits(model, batch)
        idle = [layer for layer in m.layers.values() if not layer.active]
        with torch.no_grad():
            for layer in idle:
                layer.lora_B.fill_(1.0)
            assert torch.equal(_logits(model, batch), ref)
            for layer in idle:
                layer.lora_B.zero_()
        m.next_booster()


def _block_sequence(model, n=12, **over):
    m = _xgb(model, **over)
    seq = [tuple(m.active_blocks)]
    a0 = {n_: layer.lora_A.detach().clone() for n_, layer in m.layers.items() if layer.active}
    for _ in range(n - 1):
        m.next_booster()
        seq.append(tuple(m.active_blocks))
    return seq, a0


@pytest.mark.parametrize("sampling", ["cyclic", "uniform"])
def test_block_sampling_is_seeded_and_reproducible(sampling):
    over = {"layers_per_booster": 2, "block_sampling": sampling}
    s1, a1 = _block_sequence(tiny_bert(layers=6), sample_seed=7, **over)
    s2, a2 = _block_sequence(tiny_bert(layers=6), sample_seed=7, **over)
    s3, _ = _block_sequence(tiny_bert(layers=6), sample_seed=8, **over)
    assert s1 == s2 and s1 != s3
    assert a1.keys() == a2.keys() and all(torch.equal(a1[k], a2[k]) for k in a1)  # same A init too
    assert all(len(set(b)) == 2 and all(0 <= i < 6 for i in b) for b in s1)
    assert len({b for s in (s1, s3) for b in s}) > 3  # it does sample
    # without sample_seed the run seed decides (run.py seeds torch right before building the method)
    runs = []
    for run_seed in (11, 11, 12):
        model = tiny_bert(layers=6)  # (tiny_bert seeds torch itself)
        torch.manual_seed(run_seed)
        runs.append(_block_sequence(model, sample_seed=None, **over)[0])
    r1, r2, r3 = runs
    assert r1 == r2 and r1 != r3


@pytest.mark.parametrize("booster_rank", [1, 2])
def test_degenerate_case_equals_rank1_lora_trained_then_merged(booster_rank):
    """κ = K and L_s = L: one booster on every block for K steps == LoRA r=b (same α, same init) merged."""
    tcfg = _trainer_cfg(max_steps=8)
    xgb_model, lora_model = tiny_bert(), tiny_bert()
    tr_x, m_x = _train_setup(xgb_model, _cfg(steps_per_booster=8, layers_per_booster=2, booster_rank=booster_rank),
                             tcfg)
    tr_l, m_l = _train_setup(lora_model, {"name": "lora", "alpha": ALPHA}, tcfg,
                             budget=Budget(f"r{booster_rank}", booster_rank))
    assert all(layer.active for layer in m_x.layers.values())
    with torch.no_grad():
        for name, layer in m_l.layers.items():
            layer.lora_A.copy_(m_x.layers[name].lora_A)
    tr_x.fit()
    tr_l.fit()
    assert m_x.booster_index == 0 and tr_x.state.step == 8
    assert any(layer.lora_B.abs().sum() > 0 for layer in m_l.layers.values())
    m_x.merge()
    m_l.merge()
    for name in m_l.layers:
        torch.testing.assert_close(m_x.layers[name].base.weight, m_l.layers[name].base.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_logits(xgb_model, tiny_batch()), _logits(lora_model, tiny_batch()),
                               rtol=1e-5, atol=1e-6)
    # the merged model is a plain backbone: the same weights work without any adapter
    plain = tiny_bert()
    with torch.no_grad():
        sd = plain.state_dict()
        for name, layer in m_x.layers.items():
            sd[f"{name}.weight"].copy_(layer.base.weight)
        for n, p in xgb_model.named_parameters():
            if n.startswith("classifier"):
                sd[n].copy_(p)
    torch.testing.assert_close(_logits(plain, tiny_batch()), _logits(xgb_model, tiny_batch()), rtol=1e-5, atol=1e-6)


def _fake_training(m, n_boosters, seed=0, scale=0.3):
    """Give each live booster random values and move on; returns the s·B·A merged at each boundary."""
    g = torch.Generator().manual_seed(seed)
    merged = []
    for _ in range(n_boosters):
        with torch.no_grad():
            for layer in m.layers.values():
                if layer.active:
                    layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g) * scale)
                    layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
        merged.append({n: ALPHA * (layer.lora_B.detach().float() @ layer.lora_A.detach().float())
                       for n, layer in m.layers.items() if layer.active})
        m.next_booster()
    with torch.no_grad():  # and a trained live booster at the end
        for layer in m.layers.values():
            if layer.active:
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
    return merged


def test_bf16_backbone_accumulates_merges_in_fp32():
    model = tiny_bert().to(torch.bfloat16)
    m = _xgb(model, layers_per_booster=2)
    w0 = {n: layer.base.weight.detach().clone() for n, layer in m.layers.items()}
    merged = _fake_training(m, 40, scale=0.02)  # 40 small rank-1 updates per matrix
    naive_differs = False
    for name, layer in m.layers.items():
        total = sum(d[name] for d in merged)
        assert layer.base.weight.dtype == torch.bfloat16
        torch.testing.assert_close(layer.merged_delta, total, rtol=1e-5, atol=1e-6)
        assert torch.equal(layer.base.weight, (w0[name].float() + layer.merged_delta).to(torch.bfloat16))
        naive = w0[name].clone()
        for d in merged:
            naive += d[name].to(torch.bfloat16)  # what in-place bf16 merging would hold
        naive_differs |= not torch.equal(naive, layer.base.weight)
    assert naive_differs  # the fp32 master matters: rounded step sums drift


def test_save_load_after_boosting_reproduces_on_fresh_backbone():
    model = tiny_bert()
    m = _xgb(model)
    _fake_training(m, 5)
    state, method_state = m.adapter_state_dict(), m.state_dict()
    fresh = tiny_bert()
    m2 = _xgb(fresh, sample_seed=99)  # different blocks before the load
    m2.load_adapter_state_dict(state)
    m2.load_state_dict(method_state)
    batch = tiny_batch()
    torch.testing.assert_close(_logits(fresh, batch), _logits(model, batch), rtol=1e-6, atol=1e-6)
    assert m2.active_blocks == m.active_blocks and m2.booster_index == m.booster_index
    assert m2.rank_pattern() == m.rank_pattern()
    # exact resume: the next booster is the same in both
    m.next_booster()
    m2.next_booster()
    assert m2.active_blocks == m.active_blocks
    for name, layer in m.layers.items():
        assert torch.equal(layer.lora_A, m2.layers[name].lora_A)
        torch.testing.assert_close(m2.layers[name].base.weight, layer.base.weight, rtol=1e-6, atol=1e-6)


def test_merge_folds_live_booster_and_unmerge_removes_it():
    model = tiny_bert()
    m = _xgb(model)
    _fake_training(m, 3)
    batch = tiny_batch()
    w_before = {n: layer.base.weight.detach().clone() for n, layer in m.layers.items()}
    ref = _logits(model, batch)
    m.merge()
    for name, layer in m.layers.items():
        live = ALPHA * (layer.lora_B @ layer.lora_A) if layer.active else torch.zeros_like(w_before[name])
        torch.testing.assert_close(layer.base.weight, w_before[name] + live, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_logits(model, batch), ref, rtol=1e-5, atol=1e-5)
    m.unmerge()
    for name, layer in m.layers.items():
        torch.testing.assert_close(layer.base.weight, w_before[name], rtol=1e-6, atol=1e-7)


def test_ledger_counts_live_booster_and_both_storage_forms():
    model = tiny_bert(layers=3)
    m = _xgb(model, layers_per_booster=1)
    _fake_training(m, 4)
    count = {n: 0 for n in m.layers}
    # boosters that touched each matrix, from the model itself: merged ones + the live one
    for name, layer in m.layers.items():
        count[name] = int(layer.merged_boosters) + int(layer.active)
    assert sum(int(layer.merged_boosters) for layer in m.layers.values()) == 4 * 6
    ledger = m.ledger()
    live = [layer for layer in m.layers.values() if layer.active]
    assert len(live) == 6
    assert ledger.trainable_now == sum(layer.in_features + layer.out_features for layer in live)
    assert ledger.stored_at_end == sum(c * (m.layers[n].in_features + m.layers[n].out_features)
                                       for n, c in count.items())
    assert ledger.notes["stored_factored"] == ledger.stored_at_end
    assert ledger.notes["stored_dense"] == sum(m.layers[n].in_features * m.layers[n].out_features
                                               for n, c in count.items() if c > 0)
    assert m.rank_pattern() == count
    assert m.to_peft() is None


def test_regularizer_is_l2_of_live_booster():
    m = _xgb(tiny_bert(), booster_l2=0.5)
    _fake_training(m, 1)
    expected = sum(0.5 * (layer.lora_A.detach().square().sum() + layer.lora_B.detach().square().sum())
                   for layer in m.layers.values() if layer.active)
    torch.testing.assert_close(m.regularizer().detach(), expected)
    assert _xgb(tiny_bert()).regularizer() is None


def test_bad_layers_per_booster_is_a_config_error():
    from lorabench.errors import ConfigError

    with pytest.raises(ConfigError, match="layers_per_booster"):
        _xgb(tiny_bert(), layers_per_booster=3)


# --- revision 2 (methods.md §5.5) ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_blocks,per_booster", [(6, 2), (6, 4), (5, 2), (6, 6), (7, 3), (12, 5)])
def test_cyclic_sampling_covers_every_block_equally(n_blocks, per_booster):
    """After any number of boosters, no block has been adapted more than once more than another, and a booster
    never holds a block twice."""
    schedule = cyclic_block_schedule(n_blocks, per_booster, 40, sample_seed=3)
    counts = [0] * n_blocks
    for picks in schedule:
        assert len(set(picks)) == per_booster and all(0 <= b < n_blocks for b in picks)
        for b in picks:
            counts[b] += 1
        assert max(counts) - min(counts) <= 1, counts
    # a prefix of a longer schedule is the shorter schedule (what exact resume relies on)
    assert cyclic_block_schedule(n_blocks, per_booster, 7, sample_seed=3) == schedule[:7]
    assert cyclic_block_schedule(n_blocks, per_booster, 40, sample_seed=4) != schedule or per_booster == n_blocks


def test_uniform_sampling_can_leave_a_block_out_where_cyclic_cannot():
    """§5.5's flaw of §5.3: with L_s = 2 of 6 and 3 boosters, uniform sampling misses some block for some seed."""
    def missed(sampling, seed):
        seq, _ = _block_sequence(tiny_bert(layers=6), n=3, sample_seed=seed, layers_per_booster=2,
                                 block_sampling=sampling)
        return len(set(range(6)) - {b for s in seq for b in s})

    assert any(missed("uniform", seed) > 0 for seed in range(5))
    assert all(missed("cyclic", seed) == 0 for seed in range(5))


@pytest.mark.parametrize("total,n", [(12, 3), (10, 4), (9, 4), (7, 7), (3, 5), (345, 8)])
def test_n_boosters_split_the_run_evenly(total, n):
    ends = booster_end_steps(total, n, None)
    assert len(ends) == min(n, total) and ends[-1] == total
    lengths = [b - a for a, b in zip([0] + ends[:-1], ends)]
    assert min(lengths) >= 1 and max(lengths) - min(lengths) <= 1
    assert booster_end_steps(12, None, 5) == [5, 10, 12]  # κ overrides: §5.3's ⌈K/κ⌉ boosters


@pytest.mark.parametrize("layers_per_booster,booster_rank", [(None, 1), (2, 1), (None, 2), (1, 4), (2, 3)])
def test_default_boosters_store_at_most_lora_r(layers_per_booster, booster_rank):
    """n_boosters = ⌊r·L/(b·L_s)⌋: the factored size at the end of a run equals LoRA-r's when that divides, and
    never exceeds it; the ledger projects it and says so."""
    rank, n_blocks = 4, 2
    model = tiny_bert(layers=n_blocks)
    cfg = _cfg(steps_per_booster=None, layers_per_booster=layers_per_booster, booster_rank=booster_rank)
    m = assemble.attach(model, SPEC, cfg, Budget("r4", rank))
    lora = assemble.attach(tiny_bert(layers=n_blocks), SPEC, {"name": "lora", "alpha": 16}, Budget("r4", rank))
    lora_size = lora.ledger().stored_at_end
    lpb = layers_per_booster or n_blocks
    assert m.n_boosters == max(1, rank * n_blocks // (booster_rank * lpb))
    m.set_total_steps(40)
    for _ in range(m.n_boosters - 1):
        m.next_booster()
    ledger = m.ledger()
    assert ledger.stored_at_end <= lora_size
    assert ledger.notes["lora_factored_at_budget"] == lora_size
    assert ledger.notes["projected_factored_at_end"] == ledger.stored_at_end
    assert ledger.notes["projected_within_lora_budget"] is True
    if (rank * n_blocks) % (booster_rank * lpb) == 0:
        assert ledger.stored_at_end == lora_size


def test_shipped_config_is_the_ablation_choice():
    """The YAML decides the defaults a run gets (bench/results/ablation_xgblora/README.md): α twice the LoRA arm's,
    rank-4 boosters, n from the budget (2 at r8: LoRA r8's stored size), all blocks of a ≤ 12-block encoder,
    cyclic sampling."""
    import yaml
    from conftest import REPO

    cfg = yaml.safe_load((REPO / "conf" / "method" / "xgblora.yaml").read_text())
    lora = yaml.safe_load((REPO / "conf" / "method" / "lora.yaml").read_text())
    assert cfg["alpha"] == 2 * lora["alpha"]
    m = assemble.attach(tiny_bert(layers=2), SPEC, cfg, Budget("r8", 8))
    assert (m.layers_per_booster, m.n_boosters, m.block_sampling, m.booster_rank) == (2, 2, "cyclic", 4)


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16])
def test_shipped_boosters_fit_every_budget(rank):
    """The shipped rank-4 boosters at a budget below rank 4 (r2): capped to the budget's rank, so the stored size
    stays LoRA-r's, and the ledger says it was capped."""
    import yaml
    from conftest import REPO

    cfg = yaml.safe_load((REPO / "conf" / "method" / "xgblora.yaml").read_text())
    m = assemble.attach(tiny_bert(layers=2), SPEC, cfg, Budget(f"r{rank}", rank))
    notes = m.ledger().notes
    assert m.booster_rank == min(cfg["booster_rank"], rank)
    assert notes["projected_within_lora_budget"] and notes["projected_factored_at_end"] == notes["lora_factored_at_budget"]
    assert notes.get("booster_rank_capped_from") == (cfg["booster_rank"] if rank < cfg["booster_rank"] else None)


@pytest.mark.parametrize("booster_rank", [1, 2])
def test_rank_b_boosters_preserve_function_and_reset(booster_rank):
    """Booster rank > 1: the §5.4 invariants still hold (function kept at each merge, fresh B, Σ merged deltas)."""
    model = tiny_bert()
    batch = tiny_batch()
    tr, m = _train_setup(model, _cfg(steps_per_booster=None, n_boosters=3, booster_rank=booster_rank,
                                     alpha=4.0), _trainer_cfg(max_steps=9))
    assert all(layer.lora_A.shape[0] == booster_rank for layer in m.layers.values())
    seen = {}

    class Probe(TrainerHook):
        def after_optimizer_step(self, state):
            seen.setdefault(state.step, []).append(_logits(model, batch))

    tr.hooks.insert(0, Probe())
    tr.hooks.append(Probe())
    w0 = {n: layer.base.weight.detach().clone() for n, layer in m.layers.items()}
    tr.fit()
    assert m.end_steps == [3, 6, 9] and m.booster_index == 2
    for step in (3, 6):
        before, after = seen[step]
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for name, layer in m.layers.items():
        torch.testing.assert_close(layer.base.weight - w0[name], layer.merged_delta, rtol=1e-5, atol=1e-6)
        assert int(layer.merged_boosters) == 2 and layer.effective_rank() == 3 * booster_rank
