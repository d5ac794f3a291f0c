"""Parameter budgets: what a run may store, what it trains, and the schedules that shrink it.

`budget=r8` means "end with the adapter size of LoRA r=8 on the same targets". Rank-pruning methods start at
`ceil(init_ratio · r)` and prune to an average of r; the ledger records what trains now and what is stored
at the end, per adapted matrix, so runs at one budget can be compared in one table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import ConfigError

# The six linear maps of a transformer encoder block, by role. Model configs map each role to a module path.
ALL_ROLES = ("query", "key", "value", "attention_output", "intermediate", "output")

BUDGET_MATCHES = ("rank", "params")


def keep_best_within(scores: torch.Tensor, costs: torch.Tensor, capacity: float) -> torch.Tensor:
    """[ours] Keep the best-scored components while their summed cost fits `capacity` (budget.match=params).

    A prefix of the components sorted by score (stable, so ties keep their order): it never skips a
    component to squeeze in a cheaper, less important one, and it falls short of `capacity` by less than one
    component's cost. Returns a bool mask shaped like `scores`.
    """
    flat = scores.flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    fits = torch.cumsum(costs.flatten().to(torch.float64)[order], 0) <= capacity + 1e-6
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[fits]] = True
    return keep.view_as(scores)


@dataclass(frozen=True)
class Budget:
    """The `budget` config group: final average rank per adapted matrix and what is adapted."""

    name: str
    rank: int
    target_modules: tuple[str, ...] = ALL_ROLES
    init_ratio: float = 1.5
    # What the pruning methods hold equal to LoRA r: "rank" counts kept components (n·r, the papers' budget);
    # "params" [ours] keeps the best components while their stored size fits LoRA r's (methods.md §3/§4 budgets
    # count components, so a pattern that favours FFN maps stores more than LoRA at the same count).
    match: str = "rank"

    def __post_init__(self) -> None:
        from .validate import check_field_types

        check_field_types(self, "budget")
        if not self.name:  # the budget group's YAMLs name no budget: it is r<rank>, whatever rank was set
            object.__setattr__(self, "name", f"r{self.rank}")
        if self.match not in BUDGET_MATCHES:
            raise ConfigError(f"budget.match must be one of {', '.join(BUDGET_MATCHES)}, got {self.match!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"budget.rank must be a positive integer, got {self.rank!r} (try budget=r8)")
        if not self.target_modules:
            raise ConfigError("budget.target_modules is empty: list at least one of " + ", ".join(ALL_ROLES))
        unknown = [t for t in self.target_modules if t not in ALL_ROLES]
        if unknown:
            raise ConfigError(f"budget.target_modules has unknown role(s) {unknown}; known: {', '.join(ALL_ROLES)}")
        if self.init_ratio < 1.0:
            raise ConfigError(f"budget.init_ratio must be >= 1 (initial rank >= final rank), got {self.init_ratio}")

    @property
    def init_rank(self) -> int:
        """Initial rank of the pruning methods: ceil(init_ratio · r) (r′ = 12 for r = 8)."""
        return math.ceil(self.init_ratio * self.rank - 1e-9)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Budget":
        targets = d.get("target_modules", ALL_ROLES)
        return cls(name=str(d.get("name") or ""), rank=d["rank"],
                   target_modules=tuple(targets) if isinstance(targets, (list, tuple)) else targets,
                   init_ratio=d.get("init_ratio", 1.5), match=d.get("match", "rank"))


@dataclass
class LedgerRow:
    name: str
    d_in: int
    d_out: int
    rank: int  # effective rank now (kept components for pruning methods)
    trainable_now: int  # parameters of this matrix's adapter that receive gradients
    # rank-factor parameters the adapter would store if the run ended now, rank · (d_in + d_out); at the start of a
    # pruning run that is not the end's size (AdaLoRA: every initial triplet; DoRA-dynamic: 0, its gates start at 0)
    stored_at_end: int
    extra_stored: int = 0  # stored extras counted separately (DoRA's magnitude vector)


@dataclass
class Ledger:
    rows: list[LedgerRow] = field(default_factory=list)
    # Parameters outside the adapted matrices that also train (task head); reported, not in the budget.
    head_params: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def n_matrices(self) -> int:
        return len(self.rows)

    @property
    def trainable_now(self) -> int:
        return sum(r.trainable_now for r in self.rows)

    @property
    def stored_at_end(self) -> int:
        return sum(r.stored_at_end for r in self.rows)

    @property
    def extra_stored(self) -> int:
        return sum(r.extra_stored for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_matrices": self.n_matrices,
            "adapter_trainable": self.trainable_now,
            "adapter_stored": self.stored_at_end,
            "extra_stored": self.extra_stored,
            "head_params": self.head_params,
            "notes": self.notes,
            "rows": [asdict(r) for r in self.rows],
        }

    def summary(self) -> str:
        s = (f"{self.n_matrices} adapted matrices | adapter params trainable now {self.trainable_now:,} | "
             f"stored now {self.stored_at_end:,}")
        if self.extra_stored:
            s += f" (+{self.extra_stored:,} extra)"
        s += f" | task head {self.head_params:,}"
        return s


def lora_param_count(shapes: list[tuple[int, int]], rank: int) -> int:
    """r · Σ (d_in + d_out): the size of a rank-r LoRA on matrices of these (d_in, d_out) shapes."""
    return sum(rank * (d_in + d_out) for d_in, d_out in shapes)


# --- schedules: pure functions of the optimizer step (counted from 1) ---------------------------------------

def adalora_budget(step: int, total_steps: int, b_init: int, b_target: int, t_init: int, t_final: int) -> int:
    """AdaLoRA's total rank budget b(t) (methods.md §4.5, the reference code's form).

    b(0) until t_init; cubic, fast then slow, down to b(T) at T − t_final; b(T) after.
    """
    if step <= t_init:
        return b_init
    if step > total_steps - t_final:
        return b_target
    span = total_steps - t_final - t_init
    progress = (step - t_init) / span
    return int(math.floor(b_target + (b_init - b_target) * (1.0 - progress) ** 3))


@dataclass(frozen=True)
class PruneEvent:
    """One DoRA-dynamic schedule decision for a step."""

    phase: str  # "warmup", "prune", "final" (mask fixed)
    is_event: bool  # a pruning event happens at this step
    n_prune: int  # components to prune at this event (0 when no event)
    is_last: bool  # this event fixes the final mask


def dora_dynamic_window(step: int, total_steps: int, warmup_frac: float = 0.15,
                        final_frac: float = 0.50) -> tuple[int, int]:
    """(p, P) of DoRA-dynamic: p = int(t − 0.15 T) (pruning progress, < 0 in the warm-up), P = int(0.35 T).

    The reference code's float expressions and truncation toward zero, kept as they are (so for T = 1001 the
    first event is at step 150 = ⌊0.15 T⌋).
    """
    return int(step - warmup_frac * total_steps), int(total_steps * (1.0 - warmup_frac - final_frac))


def dora_dynamic_n_pruned(p: int, P: int, n_components: int, init_rank: int, target_rank: int) -> int:
    """Components pruned at an event at progress p: max(floor(N (1 − r/r′) (p/P)³), 1).

    Integer arithmetic [ours]: the code's float product can land a hair below an integer and end one component
    above target (e.g. r = 9, r′ = 14); at p = P this gives N·(r′ − r)/r′ exactly, so #matrices·r stay. No
    component is pruned when r′ == r (the code's max(k, 1) would prune one anyway).
    """
    if init_rank == target_rank:
        return 0
    if P <= 0:
        k = n_components * (init_rank - target_rank) // init_rank
    else:
        k = n_components * (init_rank - target_rank) * p**3 // (init_rank * P**3)
    return max(k, 1)


def dora_dynamic_schedule(step: int, total_steps: int, n_components: int, init_rank: int, target_rank: int,
                          interval: int, warmup_frac: float = 0.15, final_frac: float = 0.50) -> PruneEvent:
    """DoRA-dynamic's pruning schedule, the reference code's form (methods.md §3.4).

    p = int(t − 0.15 T), P = int(0.35 T); events when p % interval == 0 or p == P; at an event prune
    k = floor(N (1 − r/r′) (p/P)³) components (at least one). Slow first, fast at the end.
    """
    if target_rank > init_rank:
        raise ValueError(f"target rank {target_rank} exceeds the initial rank {init_rank}")
    p, P = dora_dynamic_window(step, total_steps, warmup_frac, final_frac)
    if p < 0:
        return PruneEvent("warmup", False, 0, False)
    if p > P:
        return PruneEvent("final", False, 0, False)
    is_last = p == P
    if p % interval != 0 and not is_last:
        return PruneEvent("prune", False, 0, False)
    return PruneEvent("prune", True, dora_dynamic_n_pruned(p, P, n_components, init_rank, target_rank), is_last)
