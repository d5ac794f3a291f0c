"""XGBLoRA: gradient-boosted rank-1 LoRA (Zhang et al., 2024, arXiv 2410.19694), methods.md §5.

What is the paper's (methods.md §5.1; abstract and the public ICLR 2025 reviews, the body was not available):
  - a sequence of LoRA "boosters" is trained and each is merged into the weights once trained ("iteratively
    learns and merges a sequence of LoRA adaptations"), at rank 1;
  - each booster sits on a randomly sampled subset of L_s layers; κ and K name the per-booster and total steps;
  - the merge has a step size α_t (a reviewer: a constant 1, our `shrinkage`); the booster objective has a norm
    penalty on A and B (our `booster_l2`, weight unknown).
No public code exists. Everything concrete below is OUR design (methods.md §5.3) [ours]:
  - K = the trainer's total optimizer steps; booster t covers steps (t−1)κ+1 … min(tκ, K), so there are exactly
    ⌈K/κ⌉ boosters; after the optimizer step tκ < K the live booster is merged and a new one starts (a
    TrainerHook); the last booster stays live at the end (merge() or the merged export folds it);
  - a booster is a rank-1 LoRA (s = α/1) on every target matrix of L_s distinct encoder blocks, sampled
    uniformly without replacement (default L_s = ⌈L/3⌉); A kaiming-uniform(a=√5), B = 0, so a new booster
    leaves the function unchanged;
  - the merge adds η·s·B_t A_t (η = `shrinkage`; with η ≠ 1 a boundary changes the function) to an fp32
    master delta per matrix and rewrites the weight from it, so a bf16 / fp16 backbone holds
    round(W0 + Σ_t ΔW_t) instead of a sum of rounded steps;
  - the new booster's Adam moments start at zero (state.reset_optimizer_state); the LR schedule is the
    trainer's one global schedule; the task head (owned by the trainer) trains throughout, never reset;
  - sampling and the A init use a torch.Generator re-seeded per booster from (sample_seed, booster index), so
    the pair is the complete RNG state (exact resume) and a run seed gives the same blocks every time.

Implementation [ours]: every target matrix keeps a rank-1 (A, B) pair allocated; only the live booster's pairs
have requires_grad and run in forward (inactive layers skip the branch). All pairs are handed to the optimizer
once (`named_trainable_parameters`), since the trainer builds it at the start; inactive ones get no gradient,
so AdamW leaves them untouched. The ledger counts only the live booster as trainable.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..budget import Ledger, LedgerRow
from ..errors import ConfigError
from ..training.hooks import TrainerHook, TrainState
from . import register
from .base import AdapterMethod, LowRankLinear, TargetInfo

log = logging.getLogger("lorabench")

BOOSTER_RANK = 1  # the paper's boosters are rank-1 (methods.md §5.1)


class BoosterLinear(LowRankLinear):
    """A frozen `nn.Linear` carrying the merged boosters of the past and, when active, one live rank-1 booster.

    The effective weight is `W0 + merged_delta` (written into `base.weight`); the live booster adds
    `s·(drop(x) Aᵀ) Bᵀ` while the layer is active and not merged.
    """

    def __init__(self, base: nn.Linear, alpha: float, dropout: float) -> None:
        super().__init__(base, rank=BOOSTER_RANK, alpha=alpha, dropout=dropout)
        weight = base.weight
        # Σ of the merged boosters (fp32 master), what `adapter_state_dict` carries to a fresh backbone.
        self.register_buffer("merged_delta", torch.zeros(self.out_features, self.in_features,
                                                         dtype=torch.float32, device=weight.device))
        self.register_buffer("merged_boosters", torch.zeros((), dtype=torch.long, device=weight.device))
        self.register_buffer("active_flag", torch.zeros((), dtype=torch.bool, device=weight.device))
        # A low-precision backbone keeps its original W0 so the weight is always rewritten as one rounding of
        # W0 + Σ ΔW_t; an fp32 weight is its own fp32 master and is updated in place.
        self.register_buffer("base_weight0", weight.detach().clone() if weight.dtype != torch.float32 else None,
                             persistent=False)
        self.active = False  # Python mirror of active_flag: forward reads it without a device sync
        self.set_active(False)

    # --- booster life cycle -------------------------------------------------------------------------
    def set_active(self, active: bool) -> None:
        self.active = bool(active)
        self.active_flag.fill_(self.active)
        self.lora_A.requires_grad_(self.active)
        self.lora_B.requires_grad_(self.active)

    @torch.no_grad()
    def start_booster(self, generator: torch.Generator) -> None:
        """A fresh booster: A ~ kaiming-uniform(a=√5) from `generator`, B = 0 (ΔW = 0, function unchanged)."""
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)  # CPU: a CPU generator cannot fill CUDA memory
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.copy_(a)
        self.lora_B.zero_()
        self.set_active(True)

    @torch.no_grad()
    def absorb_booster(self, shrinkage: float) -> None:
        """Merge the live booster for good: merged_delta += η·s·B A, the weight follows, the booster is retired."""
        self.unmerge()
        step = self.delta_weight() * shrinkage
        self.merged_delta += step
        self.merged_boosters += 1
        self._shift_weight(step, live_folded=False)
        self.lora_B.zero_()
        self.set_active(False)

    # --- weight bookkeeping -------------------------------------------------------------------------
    @torch.no_grad()
    def _shift_weight(self, change: torch.Tensor, live_folded: bool) -> None:
        """Move base.weight by `change` (fp32); `live_folded`: whether the live booster is in it afterwards."""
        w = self.base.weight
        if self.base_weight0 is None:
            w.add_(change.to(w.dtype))
        else:
            total = self.base_weight0.float() + self.merged_delta
            if live_folded:
                total += self.delta_weight()
            w.copy_(total.to(w.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the live booster (s·B A, no shrinkage: merged == unmerged); inactive layers have nothing live."""
        if self.merged:
            return
        if self.active:
            self._shift_weight(self.delta_weight(), live_folded=True)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.active:
            self._shift_weight(-self.delta_weight(), live_folded=False)
        self.merged = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.set_active(bool(self.active_flag.item()))  # the flag came in as a buffer; sync the mirror

    # --- forward and reporting ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.active and not self.merged:
            y = y + self.branch(x)
        return y

    def booster_count(self) -> int:
        """Boosters that touched this matrix (merged + live): an upper bound of rank(ΔW_total)."""
        return int(self.merged_boosters.item()) + int(self.active)

    def effective_rank(self) -> int:
        return self.booster_count()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active={self.active}"


def _booster_generator(sample_seed: int, booster_index: int) -> torch.Generator:
    """The RNG of booster `booster_index`: a function of (seed, index) only, so resuming needs just the pair."""
    seed = int(np.random.SeedSequence([int(sample_seed) % 2**64, booster_index]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


@register("xgblora")
class XGBLoRA(AdapterMethod):
    """Boosted rank-1 LoRA (methods.md §5.3 [ours]); see the module docstring for what is the paper's."""

    # only the active boosters compute a branch: a stacked q/k/v down-projection would be mostly wasted
    stack_shared_inputs = False

    # merging folds the live booster into the fp32 accumulated delta (a side effect a weight copy cannot undo),
    # and the one live booster covers only L_s blocks: evaluate unmerged
    merge_for_eval = False

    def __init__(self, config: dict[str, Any], budget) -> None:
        super().__init__(config, budget)
        self.alpha = float(config.get("alpha", 2.0))
        self.dropout = float(config.get("dropout", 0.0))
        self.steps_per_booster = int(config.get("steps_per_booster", 100))
        if self.steps_per_booster < 1:
            raise ConfigError(f"method.steps_per_booster must be >= 1, got {self.steps_per_booster}")
        lpb = config.get("layers_per_booster")
        self._layers_per_booster_cfg = None if lpb is None else int(lpb)
        self.shrinkage = float(config.get("shrinkage", 1.0))
        if not self.shrinkage > 0:
            raise ConfigError(f"method.shrinkage must be > 0, got {self.shrinkage}")
        self.booster_l2 = float(config.get("booster_l2", 0.0))
        if self.booster_l2 < 0:
            raise ConfigError(f"method.booster_l2 must be >= 0, got {self.booster_l2}")
        seed = config.get("sample_seed")
        # Without an explicit seed: the seed of the global torch RNG, which run.py sets from the run seed right
        # before building the method; reading it consumes nothing, so the adapter init is unaffected.
        self.sample_seed = int(seed) if seed is not None else torch.initial_seed()
        self.blocks: list[int] = []  # distinct encoder blocks holding targets
        self.layers_per_booster = 0
        self.booster_index = 0  # 0-based index of the live booster
        self.active_blocks: list[int] = []
        self.total_steps: int | None = None

    # --- building -----------------------------------------------------------------------------------
    def make_layer(self, base: nn.Linear, target: TargetInfo) -> nn.Module:
        return BoosterLinear(base, alpha=self.alpha, dropout=self.dropout)

    def after_attach(self, model: nn.Module) -> None:
        self.blocks = sorted({t.layer_index for t in self.targets.values()})
        n_blocks = len(self.blocks)
        lpb = self._layers_per_booster_cfg
        self.layers_per_booster = math.ceil(n_blocks / 3) if lpb is None else lpb
        if not 1 <= self.layers_per_booster <= n_blocks:
            raise ConfigError(f"method.layers_per_booster must be in [1, {n_blocks}] (the model's adapted blocks), "
                              f"got {self.layers_per_booster}; null means ceil(L/3) = {math.ceil(n_blocks / 3)}")
        self._start_booster(0)

    def _start_booster(self, index: int) -> list[nn.Parameter]:
        """Sample L_s blocks for booster `index` and initialize their pairs; returns the new booster's params."""
        g = _booster_generator(self.sample_seed, index)
        picks = torch.randperm(len(self.blocks), generator=g)[: self.layers_per_booster]
        self.booster_index = index
        self.active_blocks = sorted(self.blocks[i] for i in picks.tolist())
        chosen = set(self.active_blocks)
        params = []
        for name, layer in self.layers.items():  # model order, so the A draws are reproducible
            if self.targets[name].layer_index in chosen:
                layer.start_booster(g)
                params += [layer.lora_A, layer.lora_B]
            elif layer.active:
                layer.set_active(False)
        return params

    def next_booster(self) -> list[nn.Parameter]:
        """Booster boundary: merge the live booster, start the next one. Returns every parameter whose Adam
        state must be forgotten (the retired and the new booster's pairs)."""
        retired = []
        for layer in self.layers.values():
            if layer.active:
                layer.absorb_booster(self.shrinkage)
                retired += [layer.lora_A, layer.lora_B]
        return retired + self._start_booster(self.booster_index + 1)

    @property
    def planned_boosters(self) -> int | None:
        """⌈K/κ⌉ once the trainer has said K."""
        return None if self.total_steps is None else math.ceil(self.total_steps / self.steps_per_booster)

    # --- what the trainer uses ----------------------------------------------------------------------
    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every booster pair, live or not: the optimizer is built once, so it must hold all of them. Only the
        live booster has requires_grad; the others get no gradient and AdamW skips them."""
        for lname, layer in self.layers.items():
            yield f"{lname}.lora_A", layer.lora_A
            yield f"{lname}.lora_B", layer.lora_B

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_trainable_parameters():
            yield p

    def regularizer(self) -> torch.Tensor | None:
        """λ(‖A_t‖²_F + ‖B_t‖²_F) over the live booster (the paper's eq. 7 norm penalty; λ is ours, default 0)."""
        if self.booster_l2 == 0:
            return None
        live = [layer for layer in self.layers.values() if layer.active]
        return self.booster_l2 * sum(layer.lora_A.square().sum() + layer.lora_B.square().sum() for layer in live)

    def hooks(self) -> list:
        return [BoostingHook(self)]

    def progress(self) -> dict[str, Any]:
        return {"booster": self.booster_index + 1, "blocks": ",".join(map(str, self.active_blocks))}

    # --- results contract ---------------------------------------------------------------------------
    def ledger_row(self, name: str, layer: nn.Module) -> LedgerRow:
        d_in, d_out = layer.in_features, layer.out_features
        boosters = layer.booster_count()
        # stored_at_end = the factored sum of the boosters, Σ_t (d_in + d_out) over the boosters touching this
        # matrix: the parameter count of the update as the method builds it (the dense alternative is in notes).
        return LedgerRow(name=name, d_in=d_in, d_out=d_out, rank=boosters,
                         trainable_now=(d_in + d_out) * BOOSTER_RANK if layer.active else 0,
                         stored_at_end=boosters * BOOSTER_RANK * (d_in + d_out))

    def ledger(self) -> Ledger:
        ledger = super().ledger()
        touched = [r for r in ledger.rows if r.rank > 0]
        per_block = sum(r.d_in + r.d_out for r in ledger.rows) / max(len(self.blocks), 1)
        planned = self.planned_boosters
        ledger.notes = {
            "stored_at_end": "factored: sum over boosters of (d_in + d_out) per matrix they touched (merged + live)",
            "stored_factored": ledger.stored_at_end,
            "stored_dense": sum(r.d_in * r.d_out for r in touched),
            "stored_dense_note": "the update as dense d_in*d_out deltas of the touched matrices (what "
                                 "adapter_state_dict and the merged export actually hold)",
            "trainable_per_step": ledger.trainable_now,
            "booster": self.booster_index + 1,
            "planned_boosters": planned,
            "projected_factored_at_end": None if planned is None else int(round(planned * self.layers_per_booster
                                                                                 * per_block * BOOSTER_RANK)),
            "steps_per_booster": self.steps_per_booster,
            "layers_per_booster": self.layers_per_booster,
            "blocks": len(self.blocks),
            "active_blocks": list(self.active_blocks),
            "design": "methods.md §5.3 [ours]; rank-1 boosters on L_s random blocks, merged every κ steps",
        }
        return ledger

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load booster pairs, flags and merged deltas, and rewrite each weight as W0 + merged_delta (a fresh
        backbone gets the whole merged history, the same live booster and the same active blocks)."""
        for lname, layer in self.layers.items():
            layer.unmerge()
            old_delta = layer.merged_delta.clone()
            own = {k[len(lname) + 1:]: v for k, v in state.items() if k.startswith(lname + ".")}
            missing = [k for k in layer.state_dict() if not k.startswith("base.") and k not in own]
            if missing:
                raise KeyError(f"adapter state for {lname} lacks {missing}")
            layer.load_state_dict(own, strict=False)
            layer._shift_weight(layer.merged_delta - old_delta, live_folded=False)
        self.active_blocks = sorted({self.targets[n].layer_index for n, layer in self.layers.items() if layer.active})

    def to_peft(self) -> None:
        """No LoRA form: the update is a sum of many boosters; export writes the merged weights instead."""
        return None

    def state_dict(self) -> dict[str, Any]:
        # (sample_seed, booster_index) is the whole RNG state: each booster re-seeds its own generator.
        return {"booster_index": self.booster_index, "active_blocks": list(self.active_blocks),
                "sample_seed": self.sample_seed, "layers_per_booster": self.layers_per_booster,
                "steps_per_booster": self.steps_per_booster, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.booster_index = int(state["booster_index"])
        self.sample_seed = int(state["sample_seed"])
        self.layers_per_booster = int(state["layers_per_booster"])
        if state.get("total_steps") is not None:
            self.total_steps = int(state["total_steps"])
        self.active_blocks = sorted(int(b) for b in state["active_blocks"])
        chosen = set(self.active_blocks)
        for name, layer in self.layers.items():  # the pairs themselves come back with the adapter tensors
            layer.set_active(self.targets[name].layer_index in chosen)

    def describe(self) -> str:
        return (f"xgblora (rank-1 boosters, κ={self.steps_per_booster}, L_s={self.layers_per_booster} of "
                f"{len(self.blocks)} blocks)")


class BoostingHook(TrainerHook):
    """At step tκ < K (after the optimizer step): merge the live booster, start the next, reset its Adam state."""

    def __init__(self, method: XGBLoRA) -> None:
        self.method = method

    def on_train_begin(self, state: TrainState) -> None:
        m = self.method
        m.total_steps = state.total_steps
        log.info("xgblora: %d steps -> %d boosters of %d steps, %d of %d blocks each (sample seed %d); "
                 "booster %d on blocks %s", state.total_steps, m.planned_boosters, m.steps_per_booster,
                 m.layers_per_booster, len(m.blocks), m.sample_seed, m.booster_index + 1, m.active_blocks)

    def after_optimizer_step(self, state: TrainState) -> None:
        m = self.method
        # Booster t ends at step tκ; `>=` rather than `%` so that a step the fp16 scaler skipped (no hook call)
        # delays the boundary by one step instead of merging it into the next booster.
        if state.step >= state.total_steps or state.step < (m.booster_index + 1) * m.steps_per_booster:
            return
        merged_blocks = list(m.active_blocks)
        params = m.next_booster()
        state.reset_optimizer_state(params)
        log.info("xgblora step %d: merged booster %d (blocks %s); booster %d/%s on blocks %s", state.step,
                 m.booster_index, merged_blocks, m.booster_index + 1, m.planned_boosters, m.active_blocks)

    def progress(self) -> dict[str, Any]:
        return self.method.progress()

    def state_dict(self) -> dict[str, Any]:
        return self.method.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state)
