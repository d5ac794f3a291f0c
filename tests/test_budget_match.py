"""budget.match: `rank` keeps n·r components (the papers' budget); `params` [ours] keeps LoRA r's stored size.

The importance scores are set by hand so that the kept pattern favours the large FFN maps: the case in which a
component count and a parameter count disagree.
"""

from __future__ import annotations

import pytest
import torch

from lorabench import assemble
from lorabench.backbone import ModelSpec
from lorabench.budget import Budget, keep_best_within
from conftest import TINY_SPEC_DICT, tiny_bert

SPEC = ModelSpec.from_dict(TINY_SPEC_DICT)


def test_keep_best_within_is_a_score_prefix_that_fits():
    scores = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0])
    costs = torch.tensor([2.0, 1.0, 1.0, 2.0, 3.0])
    # by score: 5 (2), 4 (3) → 5 fits; the next, 3 (2), would make 7 > 6: stop there, never skip ahead to 2 (1)
    assert keep_best_within(scores, costs, 6.0).tolist() == [False, False, False, True, True]
    assert keep_best_within(scores, costs, 8.0).tolist() == [True, False, True, True, True]
    assert not keep_best_within(scores, costs, 0.5).any()


def _lora_stored(rank: int) -> int:
    model = tiny_bert()
    return assemble.attach(model, SPEC, {"name": "lora"}, Budget("b", rank)).ledger().stored_at_end


def _ffn_first_scores(layers, shape):
    """Scores that rank every component of an FFN map above every attention one (tie-free)."""
    big = torch.tensor([float(l.in_features + l.out_features) for l in layers])
    return (big[:, None] * 1000 + torch.rand(shape, generator=torch.Generator().manual_seed(0))).reshape(shape)


def _final_ledger(name: str, match: str):
    model = tiny_bert()
    torch.manual_seed(0)
    method = assemble.attach(model, SPEC, {"name": name}, Budget("r4", 4, match=match))
    layers = list(method.layers.values())
    if name == "adalora":
        alloc = method.allocator
        scores = _ffn_first_scores(layers, (len(layers), layers[0].rank)).flatten()
        alloc.triplet_scores = lambda: scores
        alloc.mask_to_budget(alloc.b_target)
    else:
        method.scores = _ffn_first_scores(layers, method.scores.shape)
        with torch.no_grad():
            for layer in layers:
                layer.lora_gate.fill_(1.0)  # gates start at 0; a trained gate is non-zero until pruned
            method._prune_lowest(method.n_components - method.target_components)
    return method.ledger(), max(l.in_features + l.out_features + 1 for l in layers)


@pytest.mark.parametrize("name", ["adalora", "dora_dynamic"])
def test_rank_match_counts_components_params_match_counts_size(name):
    lora = _lora_stored(4)
    ledger, cost_max = _final_ledger(name, "rank")
    assert sum(row.rank for row in ledger.rows) == 4 * len(ledger.rows)  # the papers' budget: exactly n·r kept
    assert ledger.stored_at_end > lora * 1.02  # ... which stores more than LoRA when the FFN maps win
    ledger, cost_max = _final_ledger(name, "params")
    assert lora - cost_max < ledger.stored_at_end <= lora  # LoRA's size, short by less than one component
