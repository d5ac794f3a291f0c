"""The training loop: schedule, AMP on CPU, gradient accumulation, hook order, non-finite loss."""

from __future__ import annotations

import copy

import pytest
import torch

from lorabench import assemble
from lorabench.backbone import ModelSpec, freeze_backbone
from lorabench.budget import Budget
from lorabench.data import BatchLoader, Collator, TokenizedSplit
from lorabench.errors import TrainingError
from lorabench.training.hooks import TrainerHook
from lorabench.training.trainer import Trainer, TrainerConfig, linear_warmup_decay
from conftest import TINY_SPEC_DICT, tiny_bert

SPEC = ModelSpec.from_dict(TINY_SPEC_DICT)


def _split(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, 128, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return TokenizedSplit(ids, None, [i % 2 for i in range(n)], False)


def _setup(cfg: TrainerConfig, hooks=(), n=16, regularizer=None, model=None):
    model = model or tiny_bert()
    model.train()
    head = freeze_backbone(model)
    m = assemble.attach(model, SPEC, {"name": "lora", "alpha": 8}, Budget("b", 4))
    loader = BatchLoader(_split(n), cfg.batch_size, Collator(0), seed=1)
    evaluate = lambda mdl: {"eval/accuracy": 0.5}  # noqa: E731
    params = list(m.named_trainable_parameters()) + head
    tr = Trainer(cfg, model, params, loader, evaluate, "accuracy", hooks=list(hooks),
                 regularizer=regularizer, head_param_names=[n for n, _ in head])
    return tr, m, model


def test_linear_warmup_decay_endpoints():
    assert linear_warmup_decay(1, 100, 10) == pytest.approx(0.1)
    assert linear_warmup_decay(10, 100, 10) == pytest.approx(1.0)
    assert linear_warmup_decay(100, 100, 10) == pytest.approx(0.0)
    assert linear_warmup_decay(55, 100, 10) == pytest.approx(0.5)
    assert linear_warmup_decay(1, 10, 0) == pytest.approx(0.9)


class Recorder(TrainerHook):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, state):
        self.calls.append(("begin", state.total_steps))

    def after_backward(self, state):
        grads = [p.grad for p in state.optimizer.param_groups[0]["params"]]
        self.calls.append(("backward", state.step + 1, all(g is not None for g in grads)))

    def after_optimizer_step(self, state):
        grads = [p.grad for p in state.optimizer.param_groups[0]["params"]]
        self.calls.append(("step", state.step, all(g is not None for g in grads)))

    def on_eval(self, state, metrics):
        self.calls.append(("eval", state.step))


def test_hooks_called_in_order_with_grads_present():
    rec = Recorder()
    tr, _, _ = _setup(TrainerConfig(epochs=2, batch_size=4, progress_bar=False, lr=1e-3), hooks=[rec])
    res = tr.fit()
    assert rec.calls[0] == ("begin", 8)
    body = rec.calls[1:]
    steps = [c for c in body if c[0] == "step"]
    assert [c[1] for c in steps] == list(range(1, 9))
    assert all(c[2] for c in body if c[0] in ("backward", "step"))  # gradients still there
    assert [c[1] for c in body if c[0] == "eval"] == [4, 8]  # once per epoch
    assert body.index(("backward", 1, True)) < body.index(("step", 1, True))
    assert res.steps == 8 and len(res.history) == 2


def test_gradient_accumulation_matches_big_batch():
    """2 micro-batches of 4 with accum 2 == 1 batch of 8 (same examples, mean loss, no dropout)."""
    cfg_a = TrainerConfig(epochs=1, batch_size=4, grad_accum=2, progress_bar=False, max_grad_norm=None, lr=1e-2,
                          warmup_ratio=0.0)
    cfg_b = TrainerConfig(epochs=1, batch_size=8, grad_accum=1, progress_bar=False, max_grad_norm=None, lr=1e-2,
                          warmup_ratio=0.0)
    base = tiny_bert()
    tr_a, m_a, _ = _setup(cfg_a, n=8, model=copy.deepcopy(base))
    tr_b, m_b, _ = _setup(cfg_b, n=8, model=copy.deepcopy(base))
    # same adapter init in both
    m_b.load_adapter_state_dict(m_a.adapter_state_dict())
    # padding differs between micro-batches and the big batch but masked positions do not change the loss
    tr_a.fit()
    tr_b.fit()
    assert tr_a.state.step == tr_b.state.step == 1
    for (na, a), (nb, b) in zip(m_a.named_trainable_parameters(), m_b.named_trainable_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=na)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_step_on_cpu(precision):
    rec = Recorder()
    tr, m, model = _setup(TrainerConfig(epochs=1, batch_size=8, precision=precision, progress_bar=False, lr=1e-2),
                          hooks=[rec])
    before = {n: p.detach().clone() for n, p in m.named_trainable_parameters()}
    res = tr.fit()
    assert res.steps == 2
    # master weights stay fp32 and move
    for n, p in m.named_trainable_parameters():
        assert p.dtype == torch.float32
    assert any(not torch.equal(before[n], p) for n, p in m.named_trainable_parameters())
    if precision == "fp16":
        assert tr.scaler.is_enabled()
    # hooks ran on every non-skipped step
    assert len([c for c in rec.calls if c[0] == "step"]) == res.steps - res.skipped_steps


def test_fp16_overflow_step_is_skipped_and_hooks_not_called():
    rec = Recorder()
    tr, m, model = _setup(TrainerConfig(epochs=1, batch_size=16, precision="fp16", progress_bar=False), hooks=[rec])
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # guaranteed overflow in fp16 grads
    before = {n: p.detach().clone() for n, p in m.named_trainable_parameters()}
    res = tr.fit()
    assert res.skipped_steps == 1
    assert not [c for c in rec.calls if c[0] in ("backward", "step")]
    for n, p in m.named_trainable_parameters():
        assert torch.equal(before[n], p)


def test_non_finite_loss_stops_with_step():
    tr, _, _ = _setup(TrainerConfig(epochs=1, batch_size=4, progress_bar=False),
                      regularizer=lambda: torch.tensor(float("nan")))
    with pytest.raises(TrainingError, match="non-finite loss .* at optimizer step 1"):
        tr.fit()


@pytest.mark.parametrize("steps_per_epoch,total,expected", [
    (78, 234, 0),        # RTE: every epoch
    (125, 375, 0),       # SST-2 4k subset: every epoch (epochs under 200 steps)
    (2105, 6315, 632),   # full SST-2: an epoch is a third of the run; every tenth instead
    (300, 3000, 0),      # an epoch is a tenth of the run already
])
def test_eval_every_auto(steps_per_epoch, total, expected):
    from lorabench.training.trainer import resolve_eval_every

    assert resolve_eval_every("auto", steps_per_epoch, total) == expected
    assert resolve_eval_every(50, steps_per_epoch, total) == 50


def test_eval_every_rejects_other_words():
    from lorabench.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.eval_every must be a number of steps, 0 .* or auto"):
        TrainerConfig(eval_every="often")
