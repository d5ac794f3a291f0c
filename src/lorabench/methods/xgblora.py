"""XGBLoRA: gradient-boosted low-rank LoRA (Zhang et al., 2024, arXiv 2410.19694), methods.md §5.

What is the paper's (methods.md §5.1; abstract and the public ICLR 2025 reviews, the body was not available):
  - a sequence of LoRA "boosters" is trained and each is merged into the weights once trained ("iteratively
    learns and merges a sequence of LoRA adaptations"), at rank 1;
  - each booster sits on a randomly sampled subset of L_s layers; κ and K name the per-booster and total steps;
  - the merge has a step size α_t (a reviewer: a constant 1, our `shrinkage`); the booster objective has a norm
    penalty on A and B (our `booster_l2`, weight unknown).
No public code exists. Everything concrete below is OUR design: methods.md §5.3, revised by §5.5 [ours]
(revision 2, defaults chosen by the ablation in bench/results/ablation_xgblora/: 2 rank-4 boosters, α 32 at r8):
  - K = the trainer's total optimizer steps, split into `n_boosters` boosters of near-equal length (booster t
    ends at step ⌊t·K/n⌋, so there are exactly n of them; `steps_per_booster` κ overrides this with the §5.3
    rule, ⌈K/κ⌉ boosters of κ steps). The default n keeps the stored factored size at LoRA-r's (see
    `default_n_boosters`). After each boundary step the live booster is merged and a new one starts (a
    ScheduleHook); the last booster stays live at the end (merge() or the merged export folds it);
  - a booster is a rank-`booster_rank` LoRA (the paper's rank is 1; the shipped YAML's 4 won the ablation;
    s = α / booster_rank, α 32 = twice the LoRA arm's, since under Adam the function moves with α, not α/r
    (§5.5), and each booster trains for its share of the run only) on every target matrix of L_s
    encoder blocks (default: all blocks up to 12, ⌈L/3⌉ beyond). `block_sampling: cyclic` walks random
    permutations of the blocks L_s at a time, so every block is adapted equally often; `uniform` (§5.3) draws
    L_s distinct blocks afresh per booster. A kaiming-uniform(a=√5), B = 0: a new booster leaves the function
    unchanged;
  - the merge adds η·s·B_t A_t (η = `shrinkage`; with η ≠ 1 a boundary changes the function) to an fp32
    master delta per matrix and rewrites the weight from it, so a bf16 / fp16 backbone holds
    round(W0 + Σ_t ΔW_t) instead of a sum of rounded steps;
  - the new booster's Adam moments start at zero (state.reset_optimizer_state); the LR schedule is the
    trainer's one global schedule; the task head (owned by the trainer) trains throughout, never reset;
  - sampling and the A init are functions of (sample_seed, booster index) only, so the pair is the complete
    RNG state (exact resume) and a run seed gives the same blocks every time.

Implementation [ours]: every target matrix keeps a rank-`booster_rank` (A, B) pair allocated; only the live booster's pairs
have requires_grad and run in forward (inactive layers skip the branch). All pairs are handed to the optimizer
once (`named_trainable_parameters`), since the trainer builds it at the start; inactive ones get no gradient,
so AdamW leaves them untouched. The ledger counts only the live booster as trainable.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..budget import Ledger, LedgerRow
from ..errors import ConfigError
from ..training.hooks import TrainState
from . import register
from .base import AdapterMethod, LowRankLinear, MethodOptions, TargetInfo

log = logging.getLogger("lorabench")

BLOCK_SAMPLINGS = ("cyclic", "uniform")


class BoosterLinear(LowRankLinear):
    """A frozen `nn.Linear` carrying the merged boosters of the past and, when active, one live booster.

    The effective weight is `W0 + merged_delta` (written into `base.weight`); the live booster adds
    `s·(drop(x) Aᵀ) Bᵀ` while the layer is active and not merged.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
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
        """Boosters that touched this matrix (merged + live)."""
        return int(self.merged_boosters.item()) + int(self.active)

    def effective_rank(self) -> int:
        """An upper bound of rank(ΔW_total): booster_rank per booster that touched the matrix."""
        return self.booster_count() * self.rank

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active={self.active}"


def _booster_generator(sample_seed: int, booster_index: int) -> torch.Generator:
    """The RNG of booster `booster_index`: a function of (seed, index) only, so resuming needs just the pair."""
    seed = int(np.random.SeedSequence([int(sample_seed) % 2**64, booster_index]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def _permutation_generator(sample_seed: int, cycle: int) -> torch.Generator:
    """The RNG of the cyclic sampler's `cycle`-th permutation (a stream apart from the boosters' own)."""
    seed = int(np.random.SeedSequence([int(sample_seed) % 2**64, 1, cycle]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def cyclic_block_schedule(n_blocks: int, per_booster: int, n: int, sample_seed: int) -> list[list[int]]:
    """Block indices (0…n_blocks−1) of boosters 0…n−1 under cyclic sampling without replacement [ours, §5.5].

    The boosters consume a random permutation of the blocks `per_booster` at a time, and a fresh permutation when
    it runs out, so after any number of boosters no block has been adapted more than once more than another. When
    a permutation runs out in the middle of a booster, the next one lists the blocks this booster does not hold
    yet first (each in random order), so a booster never holds a block twice and every permutation still covers
    every block once.
    """
    if not 1 <= per_booster <= n_blocks:
        raise ValueError(f"per_booster must be in [1, {n_blocks}], got {per_booster}")
    order: list[int] = []
    pos = cycle = 0
    schedule = []
    for _ in range(n):
        picks: list[int] = []
        while len(picks) < per_booster:
            if pos == len(order):
                g = _permutation_generator(sample_seed, cycle)
                cycle += 1
                fresh = [b for b in range(n_blocks) if b not in picks]
                order = ([fresh[i] for i in torch.randperm(len(fresh), generator=g).tolist()]
                         + [picks[i] for i in torch.randperm(len(picks), generator=g).tolist()])
                pos = 0
            picks.append(order[pos])
            pos += 1
        schedule.append(sorted(picks))
    return schedule


def default_n_boosters(rank: int, n_blocks: int, layers_per_booster: int, booster_rank: int) -> int:
    """Boosters that keep the stored factored size at LoRA-`rank`'s [ours, §5.5]: LoRA stores r components on
    each of the L blocks' matrices, a booster stores booster_rank on L_s blocks', so n = ⌊r·L / (b·L_s)⌋
    (at least 1). With L_s = L and b = 1 that is n = r."""
    return max(1, (rank * n_blocks) // (booster_rank * layers_per_booster))


def booster_end_steps(total_steps: int, n_boosters: int | None, steps_per_booster: int | None) -> list[int]:
    """The optimizer step at which each booster ends (the last one ends at K and is never merged in training).

    `steps_per_booster` κ set: §5.3's ⌈K/κ⌉ boosters, the t-th ending at min(tκ, K). Otherwise `n_boosters`
    boosters of near-equal length, the t-th ending at ⌊t·K/n⌋ (n capped at K so none is empty)."""
    k = max(int(total_steps), 1)
    if steps_per_booster is not None:
        return [min(t * steps_per_booster, k) for t in range(1, math.ceil(k / steps_per_booster) + 1)]
    n = min(int(n_boosters), k)
    return [(t * k) // n for t in range(1, n + 1)]


@dataclass(frozen=True)
class XgbLoraOptions(MethodOptions):
    """XGBLoRA's options; the defaults are those the issue-13 ablation chose (conf/method/xgblora.yaml and
    bench/results/ablation_xgblora/README.md say why)."""

    alpha: float = 32.0                     # s = alpha / booster_rank
    booster_rank: int = 4                   # rank of each booster (capped at budget.rank)
    n_boosters: int | None = None           # null: from the budget (default_n_boosters)
    steps_per_booster: int | None = None    # κ; null: the run's steps split evenly over the boosters
    layers_per_booster: int | None = None   # L_s; null: every block up to 12, ceil(L/3) beyond
    block_sampling: str = "cyclic"          # cyclic | uniform (BLOCK_SAMPLINGS)
    shrinkage: float = 1.0                  # a finished booster merges as W += shrinkage · s · B A
    booster_l2: float = 0.0                 # λ of the ‖A‖² + ‖B‖² penalty on the live booster
    dropout: float = 0.0                    # adapter-input dropout
    sample_seed: int | None = None          # null: the run's seed decides the block sampling

    def validate(self) -> None:
        if self.booster_rank < 1:
            raise ConfigError(f"method.booster_rank must be >= 1, got {self.booster_rank}")
        for key in ("n_boosters", "steps_per_booster", "layers_per_booster"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be >= 1 or null, got {getattr(self, key)}")
        if self.block_sampling not in BLOCK_SAMPLINGS:
            raise ConfigError(f"method.block_sampling must be one of {', '.join(BLOCK_SAMPLINGS)}, "
                              f"got {self.block_sampling!r}")
        if not self.shrinkage > 0:
            raise ConfigError(f"method.shrinkage must be > 0, got {self.shrinkage}")
        if self.booster_l2 < 0:
            raise ConfigError(f"method.booster_l2 must be >= 0, got {self.booster_l2}")


@register("xgblora")
class XGBLoRA(AdapterMethod):
    """Boosted low-rank LoRA (methods.md §5.3 revised by §5.5 [ours]); the module docstring says what is the
    paper's."""

    # only the active boosters compute a branch: a stacked q/k/v down-projection would be mostly wasted
    stack_shared_inputs = False

    # merging folds the live booster into the fp32 accumulated delta (a side effect a weight copy cannot undo),
    # and the one live booster may cover only L_s blocks: evaluate unmerged
    merge_for_eval = False

    Options = XgbLoraOptions
    options: XgbLoraOptions

    def __init__(self, config: dict[str, Any], budget) -> None:
        super().__init__(config, budget)
        o = self.options
        self.alpha, self.dropout, self.block_sampling = o.alpha, o.dropout, o.block_sampling
        self.shrinkage, self.booster_l2 = o.shrinkage, o.booster_l2
        # A booster larger than the budget's rank would store more than LoRA-r with even one booster (the shipped
        # rank 4 at budget r2): cap it, and say so in the ledger.
        self.booster_rank_asked = o.booster_rank
        self.booster_rank = min(o.booster_rank, int(budget.rank))
        self._n_boosters_cfg = o.n_boosters
        self._steps_per_booster_cfg = o.steps_per_booster
        self._layers_per_booster_cfg = o.layers_per_booster
        # Without an explicit seed: the seed of the global torch RNG, which run.py sets from the run seed right
        # before building the method; reading it consumes nothing, so the adapter init is unaffected.
        self.sample_seed = o.sample_seed if o.sample_seed is not None else torch.initial_seed()
        self.blocks: list[int] = []  # distinct encoder blocks holding targets
        self.layers_per_booster = 0
        self.n_boosters = 0  # planned boosters (from the config; with κ set, known once K is)
        self.booster_index = 0  # 0-based index of the live booster
        self.active_blocks: list[int] = []
        self.total_steps: int | None = None
        self.end_steps: list[int] = []  # step at which each booster ends, once K is known

    # --- building -----------------------------------------------------------------------------------
    def make_layer(self, base: nn.Linear, target: TargetInfo) -> nn.Module:
        return BoosterLinear(base, rank=self.booster_rank, alpha=self.alpha, dropout=self.dropout)

    def after_attach(self, model: nn.Module) -> None:
        self.blocks = sorted({t.layer_index for t in self.targets.values()})
        n_blocks = len(self.blocks)
        default_lpb = n_blocks if n_blocks <= 12 else math.ceil(n_blocks / 3)
        lpb = self._layers_per_booster_cfg
        self.layers_per_booster = default_lpb if lpb is None else lpb
        if not 1 <= self.layers_per_booster <= n_blocks:
            raise ConfigError(f"method.layers_per_booster must be in [1, {n_blocks}] (the model's adapted blocks), "
                              f"got {self.layers_per_booster}; null means {default_lpb} (all blocks up to 12, "
                              f"ceil(L/3) beyond)")
        self.n_boosters = self._n_boosters_cfg or default_n_boosters(self.budget.rank, n_blocks,
                                                                      self.layers_per_booster, self.booster_rank)
        self._start_booster(0)

    def set_total_steps(self, total_steps: int) -> None:
        """K is known (the trainer's on_train_begin): fix where each booster ends."""
        self.total_steps = int(total_steps)
        self.end_steps = booster_end_steps(self.total_steps, self.n_boosters, self._steps_per_booster_cfg)
        self.n_boosters = len(self.end_steps)

    def blocks_of(self, index: int, generator: torch.Generator) -> list[int]:
        """The encoder blocks of booster `index` (uniform sampling draws them from the booster's generator)."""
        if self.block_sampling == "uniform":
            picks = torch.randperm(len(self.blocks), generator=generator)[: self.layers_per_booster].tolist()
        else:
            picks = cyclic_block_schedule(len(self.blocks), self.layers_per_booster, index + 1, self.sample_seed)[-1]
        return sorted(self.blocks[i] for i in picks)

    def _start_booster(self, index: int) -> list[nn.Parameter]:
        """Pick the blocks of booster `index` and initialize their pairs; returns the new booster's params."""
        g = _booster_generator(self.sample_seed, index)
        self.booster_index = index
        self.active_blocks = self.blocks_of(index, g)
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

    def booster_ends_at(self, step: int) -> bool:
        """Whether the live booster's last step is `step` (or already behind it) and another booster follows.
        `>=` rather than `==`: a step the fp16 scaler skipped (no schedule call) delays the boundary by one step
        instead of merging two boosters into one."""
        i = self.booster_index
        return i + 1 < len(self.end_steps) and step >= self.end_steps[i] and step < self.total_steps

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

    # --- the schedule (the trainer calls these through a ScheduleHook) ---------------------------------
    def on_train_begin(self, state: TrainState) -> None:
        self.set_total_steps(state.total_steps)
        log.info("xgblora: %d steps -> %d rank-%d boosters (~%.0f steps each), %d of %d blocks each, %s sampling "
                 "(sample seed %d); booster %d on blocks %s", state.total_steps, self.n_boosters, self.booster_rank,
                 state.total_steps / max(self.n_boosters, 1), self.layers_per_booster, len(self.blocks),
                 self.block_sampling, self.sample_seed, self.booster_index + 1, self.active_blocks)

    def after_optimizer_step(self, state: TrainState) -> None:
        """At a booster's last step: merge it, start the next one, and reset the Adam state of both."""
        if not self.booster_ends_at(state.step):
            return
        merged_blocks = list(self.active_blocks)
        state.reset_optimizer_state(self.next_booster())
        log.info("xgblora step %d: merged booster %d (blocks %s); booster %d/%d on blocks %s", state.step,
                 self.booster_index, merged_blocks, self.booster_index + 1, self.n_boosters, self.active_blocks)

    def progress(self) -> dict[str, Any]:
        return {"booster": self.booster_index + 1, "blocks": ",".join(map(str, self.active_blocks))}

    # --- results contract ---------------------------------------------------------------------------
    def ledger_row(self, name: str, layer: nn.Module) -> LedgerRow:
        d_in, d_out = layer.in_features, layer.out_features
        # stored_at_end = the factored sum of the boosters, Σ_t b·(d_in + d_out) over the boosters touching this
        # matrix: the parameter count of the update as the method builds it (the dense alternative is in notes).
        return LedgerRow(name=name, d_in=d_in, d_out=d_out, rank=layer.effective_rank(),
                         trainable_now=layer.rank * (d_in + d_out) if layer.active else 0,
                         stored_at_end=layer.effective_rank() * (d_in + d_out))

    def ledger(self) -> Ledger:
        ledger = super().ledger()
        touched = [r for r in ledger.rows if r.rank > 0]
        per_block = sum(r.d_in + r.d_out for r in ledger.rows) / max(len(self.blocks), 1)
        projected = int(round(self.n_boosters * self.layers_per_booster * per_block * self.booster_rank))
        lora_size = self.budget.rank * sum(r.d_in + r.d_out for r in ledger.rows)
        ledger.notes = {
            "stored_at_end": "factored: sum over boosters of booster_rank*(d_in + d_out) per matrix they touched "
                             "(merged + live)",
            "stored_factored": ledger.stored_at_end,
            "stored_dense": sum(r.d_in * r.d_out for r in touched),
            "stored_dense_note": "the update as dense d_in*d_out deltas of the touched matrices (what "
                                 "adapter_state_dict and the merged export actually hold)",
            "trainable_per_step": ledger.trainable_now,
            "booster": self.booster_index + 1,
            "planned_boosters": self.n_boosters,
            "projected_factored_at_end": projected,
            "lora_factored_at_budget": lora_size,
            "projected_within_lora_budget": projected <= lora_size,
            "booster_rank": self.booster_rank,
            **({"booster_rank_capped_from": self.booster_rank_asked}
               if self.booster_rank_asked != self.booster_rank else {}),
            "steps_per_booster": (self._steps_per_booster_cfg if self._steps_per_booster_cfg is not None
                                  else (None if self.total_steps is None
                                        else round(self.total_steps / max(self.n_boosters, 1), 1))),
            "layers_per_booster": self.layers_per_booster,
            "block_sampling": self.block_sampling,
            "blocks": len(self.blocks),
            "active_blocks": list(self.active_blocks),
            "design": "methods.md §5.3 + §5.5 revision 2 [ours]: low-rank boosters on L_s blocks (cyclic), "
                      "n boosters over the run, merged at each boundary",
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
        # (sample_seed, booster_index) is the whole RNG state: each booster re-seeds its own generator and the
        # cyclic schedule is recomputed from the seed.
        return {"booster_index": self.booster_index, "active_blocks": list(self.active_blocks),
                "sample_seed": self.sample_seed, "layers_per_booster": self.layers_per_booster,
                "n_boosters": self.n_boosters, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.booster_index = int(state["booster_index"])
        self.sample_seed = int(state["sample_seed"])
        self.layers_per_booster = int(state["layers_per_booster"])
        self.n_boosters = int(state.get("n_boosters", self.n_boosters))
        if state.get("total_steps") is not None:
            self.set_total_steps(int(state["total_steps"]))
        self.active_blocks = sorted(int(b) for b in state["active_blocks"])
        chosen = set(self.active_blocks)
        for name, layer in self.layers.items():  # the pairs themselves come back with the adapter tensors
            layer.set_active(self.targets[name].layer_index in chosen)
