"""One table over the registry: every method must keep these contracts (a new method joins automatically).

- attach keeps the function at init (bit-for-bit in fp32 eval);
- after its parameters move, merge() == unmerged output, and unmerge() restores it;
- adapter_state_dict → a fresh backbone → load_adapter_state_dict reproduces the logits;
- ledger and rank pattern cover every adapted matrix; the YAML of the method exists and names it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from lorabench import assemble, methods
from lorabench.backbone import ModelSpec
from lorabench.budget import Budget
from lorabench.errors import ConfigError
from lorabench.methods.base import AdapterDropout
from conftest import REPO, TINY_SPEC_DICT, tiny_batch, tiny_bert

SPEC = ModelSpec.from_dict(TINY_SPEC_DICT)
BUDGET = Budget("r4", 4)


def method_config(name: str) -> dict:
    return yaml.safe_load((REPO / "conf" / "method" / f"{name}.yaml").read_text())


def _attach(model, name):
    torch.manual_seed(0)
    return assemble.attach(model, SPEC, method_config(name), BUDGET)


def _perturb(method, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", methods.names())
def test_yaml_names_the_method_and_documents_its_options(name):
    """The options dataclass decides the defaults; the YAML must list every option (the switches aside) with the
    same default, so a run composed from conf/ and a method built in code behave alike."""
    doc = method_config(name)
    assert doc.pop("name") == name
    cls = methods.get(name)
    defaults = {k: v for k, v in cls.Options().to_dict().items() if k not in methods.MethodOptions.SWITCHES}
    assert set(doc) == set(defaults), f"conf/method/{name}.yaml lists {sorted(doc)}, the options {sorted(defaults)}"
    for key, value in defaults.items():
        assert doc[key] == value and type(doc[key]) in (type(value), int), f"{name}.{key}: YAML {doc[key]!r}, code {value!r}"
    assert cls.Options.from_dict(name, method_config(name)) == cls.Options()


@pytest.mark.parametrize("name", methods.names())
def test_options_refuse_unknown_keys_wrong_types_and_bad_ranges(name):
    with pytest.raises(ConfigError, match="has no option 'alphaa'.*did you mean alpha"):
        methods.check_options({"name": name, "alphaa": 8})
    with pytest.raises(ConfigError, match="method.alpha='x' is not valid: expected a number"):
        methods.check_options({"name": name, "alpha": "x"})
    with pytest.raises(ConfigError, match="dropout must be in"):
        methods.check_options({"name": name, "dropout": 1.5})
    given = {"name": name, "alpha": "8", "dropout": 0}  # another form of valid values: converted in place
    assert methods.check_options(given).alpha == 8.0 and given == {"name": name, "alpha": 8.0, "dropout": 0}


@pytest.mark.parametrize("name", methods.names())
def test_init_identity(name):
    base = tiny_bert()
    model = copy.deepcopy(base)
    _attach(model, name)
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", methods.names())
def test_merged_equals_unmerged(name):
    model = tiny_bert()
    m = _attach(model, name)
    _perturb(m)
    batch = tiny_batch()
    with torch.no_grad():
        unmerged = model(**batch).logits
        assert not torch.allclose(unmerged, tiny_bert()(**batch).logits)  # the adapter does something
        if not m.mergeable:
            with pytest.raises(ConfigError):
                m.merge()
            return
        m.merge()
        merged = model(**batch).logits
        m.unmerge()
        again = model(**batch).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", methods.names())
def test_save_load_gives_equal_logits(name):
    model = tiny_bert()
    m = _attach(model, name)
    _perturb(m)
    state = m.adapter_state_dict()
    fresh = tiny_bert()
    torch.manual_seed(123)  # a different init, overwritten by the load
    m2 = assemble.attach(fresh, SPEC, method_config(name), BUDGET)
    m2.load_adapter_state_dict(state)
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", methods.names())
def test_ledger_and_rank_pattern_cover_every_matrix(name):
    m = _attach(tiny_bert(), name)
    ledger = m.ledger()
    assert ledger.n_matrices == len(m.layers) == 12
    assert set(m.rank_pattern()) == set(m.layers)
    assert ledger.trainable_now > 0


@pytest.mark.parametrize("name", methods.names())
def test_merged_eval_matches_and_restores_training_weights_exactly(name):
    """Evaluation through merged weights gives the unmerged logits and leaves every base weight untouched:
    the same Parameter object, the same bits, the same in-place version (so optimizer and checkpoints see
    nothing)."""
    model = tiny_bert()
    method = _attach(model, name)
    _perturb(method)
    model.eval()
    batch = tiny_batch()
    bases = {n: layer.base.weight for n, layer in method.layers.items()}
    before = {n: (w.detach().clone(), w._version) for n, w in bases.items()}
    with torch.no_grad():
        unmerged = model(**batch).logits
        with method.merged_for_eval() as merged:
            during = model(**batch).logits
        after = model(**batch).logits
    assert merged == (method.merge_for_eval and method.mergeable)
    torch.testing.assert_close(during, unmerged, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, unmerged)
    for n, layer in method.layers.items():
        assert layer.base.weight is bases[n] and not layer.merged
        assert torch.equal(layer.base.weight, before[n][0]) and layer.base.weight._version == before[n][1]
    if merged:  # the merged pass really skipped the adapter branch: a changed adapter does not move its logits
        with torch.no_grad(), method.merged_for_eval():
            _perturb(method, seed=2)
            assert torch.equal(model(**batch).logits, during)


@pytest.mark.parametrize("name", methods.names())
def test_stacked_qkv_down_projection_is_the_same_function(name, monkeypatch):
    """q, k, v share one stacked `x [A_q; A_k; A_v]ᵀ`: logits and every gradient equal the per-module path."""
    from lorabench.methods.base import SharedInputGroup

    calls = []
    original_down = SharedInputGroup.down
    monkeypatch.setattr(SharedInputGroup, "down", lambda self, layer, x: calls.append(layer) or
                        original_down(self, layer, x))
    results = []
    for stacked in (True, False):
        model = tiny_bert()
        torch.manual_seed(0)
        cfg = {**method_config(name), "dropout": 0.0, "fold_low_rank": False}  # the unfolded path stacks
        if not stacked:
            cfg["stack_shared_inputs"] = False  # stacked: the method's own default
        method = assemble.attach(model, SPEC, cfg, BUDGET)
        _perturb(method)
        model.train()
        out = model(**tiny_batch())
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in method.named_trainable_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads))
        if stacked and method.stack_shared_inputs:
            qkv = [layer for n, layer in method.layers.items() if method.targets[n].role in ("query", "key", "value")]
            assert qkv and all(layer.shared_input is not None for layer in qkv)
            assert len(calls) == len(qkv)  # every q/k/v went through its group
            assert all(layer.shared_input._x is None for layer in qkv)  # no activation held after the forward
    (logits_s, grads_s), (logits_p, grads_p) = results
    torch.testing.assert_close(logits_s, logits_p, rtol=1e-5, atol=1e-6)
    assert grads_s.keys() == grads_p.keys() and grads_s
    for key in grads_s:
        torch.testing.assert_close(grads_s[key], grads_p[key], rtol=1e-4, atol=1e-6, msg=key)


def _step_both_ways(name: str, dropout: float, probe: str):
    """One fp32 training step of the method with its speed paths on (`fold_low_rank`) and off, from the same init
    and (seed 5 before the forward) the same dropout masks: [(logits, grads, probe per layer)] for on, then off.
    `probe` names the layer method that says whether the fast path applies (fold_now / fuse_dropout_now)."""
    results = []
    for fast in (True, False):
        model = tiny_bert()
        torch.manual_seed(0)
        method = assemble.attach(model, SPEC, {**method_config(name), "dropout": dropout, "fold_low_rank": fast},
                                 BUDGET)
        _perturb(method)
        model.train()
        x = torch.randn(2, 5, 32)
        used = [getattr(layer, probe)(x) for layer in method.layers.values() if hasattr(layer, probe)]
        torch.manual_seed(5)
        out = model(**tiny_batch())
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in method.named_trainable_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads, used))
    return model, results


def _assert_same_step(results) -> None:
    (logits_f, grads_f, _), (logits_u, grads_u, unused) = results
    assert not any(unused)
    torch.testing.assert_close(logits_f, logits_u, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_u.keys() and grads_f
    for key in grads_f:
        torch.testing.assert_close(grads_f[key], grads_u[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", methods.names())
def test_folded_fp32_step_is_the_same_function(name):
    """An fp32 training step folded into W0 + B diag(s·c) A: logits and every gradient equal the unfolded path."""
    _, results = _step_both_ways(name, 0.0, "fold_now")
    _assert_same_step(results)


# methods whose layers take a fused path under adapter dropout (fp32): _DroppedLowRank, DoRA's _DroppedDora, or
# the token-gated dynamic_lora's _TokenGatedLowRank (xgblora's boosters get the dropped down-projection
# `_DroppedDown` where they call down())
FUSED_DROPOUT = {"lora", "adalora", "dora", "dora_dynamic", "dynamic_lora"}


@pytest.mark.parametrize("name", methods.names())
def test_fused_dropout_step_is_the_same_function(name):
    """An fp32 training step with adapter dropout 0.3 through the fused dropout path: the same seed draws the same
    masks in both paths, and logits and every gradient equal the plain form's (autograd over drop(x))."""
    model, results = _step_both_ways(name, 0.3, "fuse_dropout_now")
    if name in FUSED_DROPOUT:
        assert results[0][2] and all(results[0][2])
    _assert_same_step(results)
    model.eval()
    torch.manual_seed(5)
    with torch.no_grad():  # the dropout acted: without it the logits differ
        assert not torch.allclose(model(**tiny_batch()).logits, results[0][0], rtol=0, atol=1e-6)


def test_fold_is_used_where_it_applies_and_only_there():
    model = tiny_bert()
    method = assemble.attach(model, SPEC, method_config("lora"), BUDGET)
    layer = next(iter(method.layers.values()))
    x = torch.randn(2, 5, 32)
    model.train()
    assert layer.fold_now(x)
    with torch.no_grad():
        assert layer.fold_now(x)  # an unmerged eval forward folds too (forward only)
    layer.dropout = AdapterDropout(0.1)
    assert not layer.fold_now(x)  # base and adapter would see different inputs
    assert layer.fuse_dropout_now(x)  # ... the dropout path instead
    assert not layer.fuse_dropout_now(x.to(torch.bfloat16))
    layer.dropout = torch.nn.Dropout(0.1)  # a foreign dropout module draws its own masks: the plain path
    assert not layer.fold_now(x) and not layer.fuse_dropout_now(x)
    model.eval()
    assert layer.fold_now(x)  # dropout is inactive in eval
    assert not layer.fuse_dropout_now(x)
    model.train()
    layer.dropout = torch.nn.Identity()
    assert not layer.fold_now(x.to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.fold_now(x)  # a small ΔW would be rounded away in bf16 W0 + ΔW
    dyn = assemble.attach(tiny_bert(), SPEC, method_config("dynamic_lora"), BUDGET)
    assert not next(iter(dyn.layers.values())).fold_now(x)  # the token gate depends on the input


def test_fused_autograd_functions_pass_gradcheck():
    """The hand-written backwards of the speed paths against finite differences (float64, small shapes),
    including 3-D inputs, a bias and a trainable per-component scale."""
    from lorabench.methods.base import FoldedLowRank, _UpProjection
    from lorabench.methods.dynamic_lora import _TokenGatedLowRank

    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, w0, bias = rand(2, 3, 5), rand(4, 5, grad=False), rand(4, grad=False)
    a, b, cs = rand(3, 5), rand(4, 3), rand(3)
    assert torch.autograd.gradcheck(FoldedLowRank.apply, (x, w0, bias, a, b, cs, None))
    assert torch.autograd.gradcheck(FoldedLowRank.apply, (x, w0, None, a, b, cs.detach(), None))
    assert torch.autograd.gradcheck(_UpProjection.apply, (rand(2, 3, 3), b))
    assert torch.autograd.gradcheck(FoldedLowRank.apply, (x, w0, bias, a, b, cs.detach(), rand(4)))  # DoRA's gain
    assert torch.autograd.gradcheck(FoldedLowRank.apply, (x, w0, None, a, b, cs.detach(), rand(4)))
    down, gate_v = rand(4, 5), rand(1)  # [A; u'] for r = 3
    assert torch.autograd.gradcheck(_TokenGatedLowRank.apply, (x, w0, bias, down, gate_v, b, cs.detach(), 0.5))


def test_fused_dropout_functions_pass_gradcheck():
    """The dropout paths' backwards against finite differences, for a fixed mask (float64, small shapes)."""
    from lorabench.methods.base import _DroppedDown, _DroppedLowRank
    from lorabench.methods.dora import _DroppedDora
    from lorabench.methods.dynamic_lora import _TokenGatedLowRank

    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, w0, bias = rand(2, 3, 5), rand(4, 5, grad=False), rand(4, grad=False)
    a, b, cs = rand(3, 5), rand(4, 3), rand(3)
    keep = torch.rand(x.shape, generator=g) >= 0.4  # a fixed dropout mask, scale 1/(1 − 0.4)
    assert torch.autograd.gradcheck(_DroppedLowRank.apply, (x, w0, bias, a, b, cs, keep, 1 / 0.6))
    assert torch.autograd.gradcheck(_DroppedLowRank.apply, (x, w0, None, a, b, cs.detach(), keep, 1 / 0.6))
    gain = rand(4)
    assert torch.autograd.gradcheck(_DroppedDora.apply, (x, w0, bias, a, b, gain, keep, 1 / 0.6, 1.5))
    assert torch.autograd.gradcheck(_DroppedDora.apply, (x, w0, None, a, b, gain, keep, 1 / 0.6, 1.5))
    assert torch.autograd.gradcheck(_DroppedDown.apply, (x, a, keep, 1 / 0.6))
    down, gate_v = rand(4, 5), rand(1)  # [A; u'] for r = 3: the branch reads the dropped x, the gate the clean x
    assert torch.autograd.gradcheck(_TokenGatedLowRank.apply, (x, w0, bias, down, gate_v, b, cs.detach(), 0.5, keep,
                                                               1 / 0.6))
