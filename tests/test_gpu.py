"""CUDA mixed precision (marked `gpu`; `make test-gpu` on a machine with a GPU; CI has none and deselects them).

Every registered method takes bf16 and fp16 autocast training steps on CUDA through the real Trainer: fp32
master weights that move, finite loss, hooks on every step the fp16 scaler did not skip, and merged evaluation
equal to unmerged evaluation under the same autocast.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from lorabench import assemble, methods
from lorabench.backbone import ModelSpec, freeze_backbone
from lorabench.budget import Budget
from lorabench.data import BatchLoader, Collator, TokenizedSplit
from lorabench.training.trainer import Trainer, TrainerConfig
from conftest import REPO, TINY_SPEC_DICT, tiny_batch, tiny_bert

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPEC = ModelSpec.from_dict(TINY_SPEC_DICT)


def _split(n=32):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 128, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return TokenizedSplit(ids, None, [i % 2 for i in range(n)], False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", methods.names())
def test_amp_training_on_cuda(name, precision):
    model = tiny_bert()
    head = freeze_backbone(model)
    torch.manual_seed(0)
    config = yaml.safe_load((REPO / "conf" / "method" / f"{name}.yaml").read_text())
    method = assemble.attach(model, SPEC, config, Budget("r4", 4))
    params = list(method.named_trainable_parameters()) + head
    before = {n: p.detach().clone() for n, p in params}
    loader = BatchLoader(_split(), 8, Collator(0), seed=1)
    cfg = TrainerConfig(epochs=2, batch_size=8, lr=1e-2, precision=precision, device="cuda", progress_bar=False)
    trainer = Trainer(cfg, model, params, loader, lambda m: {"eval/accuracy": 0.5}, "accuracy",
                      hooks=method.hooks(), regularizer=method.regularizer,
                      head_param_names=[n for n, _ in head])
    result = trainer.fit()
    assert result.steps == 8 and result.skipped_steps < result.steps
    for n, p in method.named_trainable_parameters():
        assert p.dtype == torch.float32 and p.device.type == "cuda" and torch.isfinite(p).all(), n
    assert any(not torch.equal(before[n].cuda(), p) for n, p in params)
    batch = {k: v.cuda() for k, v in tiny_batch().items()}
    model.eval()
    with torch.no_grad(), trainer.autocast():
        unmerged = model(**batch).logits.float()
        with method.merged_for_eval():
            merged = model(**batch).logits.float()
    torch.testing.assert_close(merged, unmerged, rtol=2e-2, atol=2e-2)  # low-precision matmuls, two orders
