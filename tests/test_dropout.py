"""Adapter dropout: the mask generator's distribution and seeding, the dropout module, what the fused dropout
paths keep for backward, and the opt-in shared mask of q/k/v. (Fused == plain with the same seed, for every
method, is in test_registry.py; DoRA's §2.2 form and PEFT parity under dropout in test_dora.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import nn

from lorabench import assemble, methods
from lorabench.backbone import ModelSpec
from lorabench.budget import Budget
from lorabench.errors import ConfigError
from lorabench.methods.base import AdapterDropout, LowRankLinear, draw_keep_mask, keep_scale
from lorabench.methods.dora import DoraLinear
from lorabench.methods.dynamic_lora import DynamicLoRALinear
from conftest import REPO, TINY_SPEC_DICT, tiny_batch, tiny_bert

SPEC = ModelSpec.from_dict(TINY_SPEC_DICT)


@pytest.mark.parametrize("p", [0.1, 0.125, 0.3, 0.5, 0.9, 0.001])
def test_keep_mask_has_the_dropout_distribution(p):
    """Kept with probability 1 − p, independently: the mean over 4M entries within 5 standard errors, and no
    correlation between neighbours (the bytes of one 64-bit draw) or between consecutive masks."""
    torch.manual_seed(0)
    n = 1 << 22
    keep = draw_keep_mask((n,), p, "cpu")
    assert keep.dtype == torch.bool and keep.shape == (n,)
    k = keep.double()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(k.mean().item() - (1 - p)) < 5 * sd
    for lag in (1, 2, 3, 4, 5):
        cov = ((k[lag:] - (1 - p)) * (k[:-lag] - (1 - p))).mean().item()
        assert abs(cov) < 5 * p * (1 - p) / math.sqrt(n), lag
    other = draw_keep_mask((n,), p, "cpu").double()
    assert abs(((k - (1 - p)) * (other - (1 - p))).mean().item()) < 5 * p * (1 - p) / math.sqrt(n)


def test_keep_mask_tie_entries_are_resolved_with_more_bits(monkeypatch):
    """p = 0.1 is not a multiple of 1/256: entries whose random byte equals ⌊256 p⌋ draw 32 more bits, and are
    kept with probability 1 − frac. Forced here by making every byte a tie."""
    import numpy as np

    pcg64 = np.random.PCG64

    n = 1 << 20

    class AllTies:  # the mask's words (drawn block by block) are all ties; the words after them are random
        def __init__(self, seed):
            self.seed, self.start = seed, 0

        def advance(self, delta):
            self.start += delta

        def random_raw(self, size):
            if self.start < n // 8:
                return np.full(size, 25 * 0x0101010101010101, dtype=np.uint64)
            return pcg64(self.seed).random_raw(size)

    monkeypatch.setattr(np.random, "PCG64", AllTies)
    keep = draw_keep_mask((n,), 0.1, "cpu")
    frac = 0.1 * 256 - 25  # 0.6: a tie is dropped with probability 0.6
    assert abs(keep.double().mean().item() - (1 - frac)) < 5 * math.sqrt(frac * (1 - frac) / n)


def test_keep_mask_follows_torch_seed_and_edges():
    torch.manual_seed(3)
    a = draw_keep_mask((7, 11), 0.2, "cpu")
    torch.manual_seed(3)
    assert torch.equal(a, draw_keep_mask((7, 11), 0.2, "cpu"))
    assert not torch.equal(a, draw_keep_mask((7, 11), 0.2, "cpu"))  # the stream moves on
    assert draw_keep_mask((4, 3), 0.0, "cpu").all() and not draw_keep_mask((4, 3), 1.0, "cpu").any()
    assert keep_scale(0.2) == pytest.approx(1.25) and keep_scale(1.0) == 0.0


def test_keep_mask_does_not_depend_on_threads_or_blocks(monkeypatch):
    """Blocks of the random stream are drawn on several threads (one per thread); the mask is a function of the
    seed alone, and so is its float copy."""
    from lorabench.methods import base

    shape = (3, 1000, 77)  # not a multiple of 8 entries
    torch.manual_seed(9)
    reference = draw_keep_mask(shape, 0.1, "cpu")
    monkeypatch.setattr(base, "_MIN_BLOCK_WORDS", 37)  # a block per thread, however small
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            torch.manual_seed(9)
            assert torch.equal(draw_keep_mask(shape, 0.1, "cpu"), reference), n
            keep = draw_keep_mask(shape, 0.1, "cpu")
            assert torch.equal(base.float_mask(keep, torch.empty(0), temporary=True), keep.float())
    finally:
        torch.set_num_threads(threads)


def test_mask_buffers_stay_bounded_over_many_mask_sizes():
    """A long run meets many sequence lengths, so many mask sizes: past the kept count the smallest free buffers are
    forgotten (by identity: numpy arrays of other sizes cannot be compared with ==), the held masks stay valid, and
    a freed size is reused."""
    from lorabench.methods import base

    saved = list(base._mask_buffers)
    base._mask_buffers.clear()
    try:
        held = [draw_keep_mask((1, 64 + 3 * k), 0.5, "cpu") for k in range(base._MASK_BUFFERS_KEPT // 2)]
        copies = [m.clone() for m in held]
        for k in range(3 * base._MASK_BUFFERS_KEPT):  # masks dropped at once: their buffers are free again
            draw_keep_mask((1, 5000 + 7 * k), 0.5, "cpu")
        assert len(base._mask_buffers) <= base._MASK_BUFFERS_KEPT + 1
        assert all(torch.equal(m, c) for m, c in zip(held, copies))  # no held buffer was reused or dropped
        n = len(base._mask_buffers)
        draw_keep_mask((1, 5000), 0.5, "cpu")
        assert len(base._mask_buffers) == n  # a free buffer of a fitting size is reused
    finally:
        base._mask_buffers[:] = saved


def test_adapter_dropout_module():
    """x ⊙ keep/(1 − p) forward and backward, the mask saved as bool; identity in eval; p = 1 gives zeros."""
    drop = AdapterDropout(0.25)
    assert isinstance(drop, nn.Dropout)
    x = torch.randn(6, 9, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(4)
        y = drop(x)
    torch.manual_seed(4)
    keep = draw_keep_mask(x.shape, 0.25, "cpu")
    torch.testing.assert_close(y, x * keep / 0.75)
    assert [t.dtype for t in saved] == [torch.bool]
    g = torch.randn(6, 9)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * keep / 0.75)
    drop.eval()
    assert drop(x) is x
    full = AdapterDropout(1.0)
    assert torch.equal(full(x), torch.zeros_like(x))


def _aten_ops(fn) -> list[str]:
    """The aten operators `fn()` dispatches (the real dispatcher, recorded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        fn()
    return rec.ops


def test_adapter_dropout_is_torch_native_dropout_off_the_cpu():
    """Off the CPU the module is torch's own dropout (on CUDA one fused kernel; the meta device stands in for a
    GPU here, where torch's dropout is bernoulli_ and a multiply); on the CPU it draws its own bool mask and
    applies it in one addcmul."""
    drop = AdapterDropout(0.25)
    meta_ops = _aten_ops(lambda: drop(torch.empty(6, 9, device="meta")))
    assert "bernoulli_" in meta_ops and "addcmul" not in meta_ops, meta_ops
    cpu_ops = _aten_ops(lambda: drop(torch.randn(6, 9)))
    assert "addcmul" in cpu_ops and "bernoulli_" not in cpu_ops, cpu_ops


def _saved_activations(layer, x):
    """The float tensors of x's shape that autograd keeps from one forward of `layer`, as x itself or copies."""
    kept = []
    def pack(t):
        if t.shape == x.shape and t.is_floating_point():
            kept.append("x" if t.data_ptr() == x.data_ptr() else "copy")
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return kept


@pytest.mark.parametrize("cls", [LowRankLinear, DoraLinear])
def test_fused_dropout_keeps_no_dropped_copy(cls):
    """Under dropout the fused layer keeps x itself (shared by the q/k/v that read it, and what the no-dropout
    path keeps too) and a bool mask; the plain path keeps a dropped fp32 copy of x per layer."""
    torch.manual_seed(0)
    layer = cls(nn.Linear(64, 16), rank=4, alpha=8, dropout=0.1).train()
    x = torch.randn(200, 64, requires_grad=True)
    assert layer.fuse_dropout_now(x)
    assert set(_saved_activations(layer, x)) == {"x"}
    layer.allow_fold = False
    assert "copy" in _saved_activations(layer, x)


def test_token_gated_dropout_keeps_no_dropped_copy():
    """dynamic_lora's token-gated layer under dropout: its branch reads the dropped x and its gate the clean x,
    and the fused path keeps only x; the plain path keeps a dropped copy."""
    torch.manual_seed(0)
    layer = DynamicLoRALinear(nn.Linear(64, 16), n_components=4, scale=2.0, dropout=0.1, gate="token",
                              active_rank=None, mask_context=None).train()
    x = torch.randn(200, 64, requires_grad=True)
    assert layer.fuse_dropout_now(x)
    assert set(_saved_activations(layer, x)) == {"x"}
    layer.allow_fold = False
    assert not layer.fuse_dropout_now(x)
    assert "copy" in _saved_activations(layer, x)


def _qkv_masks(shared: bool):
    model = tiny_bert()
    cfg = {**yaml.safe_load((REPO / "conf" / "method" / "lora.yaml").read_text()), "dropout": 0.5}
    if shared:
        cfg["shared_dropout_mask"] = True
    method = assemble.attach(model, SPEC, cfg, Budget("r4", 4))
    model.train()
    masks = {}
    for name, layer in method.layers.items():
        original = layer.dropout.keep_mask
        layer.dropout.keep_mask = (lambda orig, n: lambda x: masks.setdefault(n, orig(x)))(original, name)
    torch.manual_seed(0)
    model(**tiny_batch()).loss.backward()
    block = [n for n in masks if ".layer.0." in n]
    return {method.targets[n].role: masks[n] for n in block}


def test_shared_dropout_mask_is_opt_in():
    """By default q, k and v draw one mask each (the papers' semantics); `shared_dropout_mask` gives them one."""
    own = _qkv_masks(shared=False)
    assert not torch.equal(own["query"], own["key"]) and not torch.equal(own["key"], own["value"])
    shared = _qkv_masks(shared=True)
    assert torch.equal(shared["query"], shared["key"]) and torch.equal(shared["key"], shared["value"])
    assert not torch.equal(shared["value"], shared["dense"] if "dense" in shared else shared["intermediate"])


def test_shared_dropout_mask_is_a_known_switch():
    """`+method.shared_dropout_mask=true` passes the method-option check (a shared switch, like fold_low_rank);
    a misspelling does not."""
    for name in methods.names():
        methods.check_options({"name": name, "shared_dropout_mask": True})
    with pytest.raises(ConfigError, match="shared_dropout_mask"):
        methods.check_options({"name": "lora", "shared_dropout_masks": True})
