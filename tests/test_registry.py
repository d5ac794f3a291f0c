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

from lorabench import methods
from lorabench.backbone import ModelSpec
from lorabench.budget import Budget
from lorabench.errors import ConfigError
from conftest import REPO, TINY_SPEC_DICT, tiny_batch, tiny_bert

SPEC = ModelSpec.from_dict(TINY_SPEC_DICT)
BUDGET = Budget("r4", 4)


def method_config(name: str) -> dict:
    return yaml.safe_load((REPO / "conf" / "method" / f"{name}.yaml").read_text())


def _attach(model, name):
    torch.manual_seed(0)
    return methods.attach(model, SPEC, method_config(name), BUDGET)


def _perturb(method, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", methods.names())
def test_yaml_names_the_method(name):
    assert method_config(name)["name"] == name


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
    m2 = methods.attach(fresh, SPEC, method_config(name), BUDGET)
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
