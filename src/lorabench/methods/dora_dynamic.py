"""DoRA-dynamic: dynamic rank distribution (Mao et al., ACL 2024), methods.md §3.

The update is a sum of r′ rank-1 components, each switched by a trainable scalar gate:
    ΔW = s · Σ_i c_i b_i a_iᵀ = s · B diag(c) A,   y = x W0ᵀ + b + s · ((drop(x) Aᵀ) ⊙ c) Bᵀ,
with s = α / r′ where r′ = budget.init_rank = ceil(1.5 r) is the initial rank (pruning does not change s).
A and B are kaiming-uniform with PyTorch's default a = 0 (B is not zero); ΔW = 0 at start because c = 0 (§3.2).

Pruning (§3.3–3.4, the reference code's form), run by the method's ScheduleHook after every optimizer step:
- importance σ_i = |c_i|·‖a_i‖·‖b_i‖ / (‖B diag(c) A‖_F + ε): a component's share of its layer's update (s
  cancels), from the weights only; smoothed by an EMA (β = 0.9, from 0) on every step from step 1 up to and
  including the last pruning event;
- events at p % prune_interval == 0 or p == P (p = int(t − 0.15 T), P = int(0.35 T)); at an event the
  max(k, 1) globally lowest-scored components (ties included) get c_i = 0, k = floor(N (1 − r/r′)(p/P)³)
  (budget.dora_dynamic_schedule);
- pruning is soft: only c_i is zeroed, A, B and c stay trainable, a zeroed c_i can come back through its
  gradient, and each event re-decides the pruned set; the mask of the last event (p == P) is final and is
  re-applied after every later step.
The norms are batched: layers of equal shape are stacked and handled by one batched matmul per group.

DEM (§3.5): R = mean of the unbiased variances of every row a_i and column b_i (pruned components too), added
as η·R until pruning ends (0 afterwards). `dem_form: code` (default) divides by #layers·2·r′ as the reference
code does; `dem_form: paper` divides by the number of components n = #layers·r′ (eq. 10), i.e. twice the code's R.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..budget import Budget, Ledger, dora_dynamic_n_pruned, dora_dynamic_schedule, dora_dynamic_window, keep_best_within
from ..errors import ConfigError
from ..training.hooks import TrainState
from . import register
from .base import AdapterMethod, LowRankLinear, MethodOptions, PeftLoraExport, TargetInfo

DEM_FORMS = ("code", "paper")


class GatedLowRankLinear(LowRankLinear):
    """r′ rank-1 components `c_i · b_i a_iᵀ`: the shared core with a gate vector `lora_gate` (c, shape (r′,))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout=dropout)
        self.lora_gate = nn.Parameter(torch.zeros(rank, device=base.weight.device, dtype=torch.float32))

    def reset_lora_parameters(self) -> None:
        # The reference code: kaiming_uniform_ with default arguments (a = 0) on both factors, so
        # A ~ U(±√(6/d_in)) and B ~ U(±√(6/r′)); the zero start comes from c = 0, not from B.
        nn.init.kaiming_uniform_(self.lora_A)
        nn.init.kaiming_uniform_(self.lora_B)
        if hasattr(self, "lora_gate"):
            nn.init.zeros_(self.lora_gate)

    def component_scale(self) -> torch.Tensor:
        return self.lora_gate


@dataclass(frozen=True)
class DoraDynamicOptions(MethodOptions):
    """DoRA-dynamic's options; the defaults follow the reference code and the paper's Table 8 (the YAML says
    where each comes from)."""

    alpha: float = 8.0          # s = alpha / r' (r' the initial rank)
    dropout: float = 0.1        # adapter-input dropout (the reference code's value)
    beta: float = 0.9           # EMA factor of the importance scores
    prune_interval: int = 10    # optimizer steps between pruning events
    warmup_frac: float = 0.15   # no pruning in the first 15% of steps
    final_frac: float = 0.50    # the last 50% keep the final mask
    dem_weight: float = 0.5     # eta of the DEM variance regularizer
    dem_form: str = "code"      # code | paper (DEM_FORMS)
    eps: float = 1e-8           # guard of the importance score's denominator (the layer's update norm + eps)

    def validate(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"method.beta must be in [0, 1), got {self.beta}")
        if self.prune_interval < 1:
            raise ConfigError(f"method.prune_interval must be >= 1 (optimizer steps), got {self.prune_interval}")
        if self.warmup_frac < 0 or self.final_frac < 0 or self.warmup_frac + self.final_frac > 1:
            raise ConfigError(f"method.warmup_frac ({self.warmup_frac}) and method.final_frac ({self.final_frac}) "
                              f"must be >= 0 and sum to at most 1 (the pruning window is what is left)")
        if self.dem_form not in DEM_FORMS:
            raise ConfigError(f"method.dem_form must be one of {', '.join(DEM_FORMS)}, got {self.dem_form!r}")
        if self.dem_weight < 0:
            raise ConfigError(f"method.dem_weight must be >= 0, got {self.dem_weight}")
        if not self.eps > 0:
            raise ConfigError(f"method.eps must be > 0, got {self.eps}")


@register("dora_dynamic")
class DoraDynamic(AdapterMethod):
    Options = DoraDynamicOptions
    options: DoraDynamicOptions

    def __init__(self, config: dict[str, Any], budget: Budget) -> None:
        super().__init__(config, budget)
        o = self.options
        self.alpha, self.dropout, self.beta, self.prune_interval = o.alpha, o.dropout, o.beta, o.prune_interval
        self.warmup_frac, self.final_frac, self.eps = o.warmup_frac, o.final_frac, o.eps
        self.dem_weight, self.dem_form = o.dem_weight, o.dem_form
        self.init_rank = budget.init_rank  # r′
        self.target_rank = budget.rank  # r: the final average number of components per matrix
        # Schedule state (state_dict holds all of it, for an exact resume).
        self.step = 0  # last optimizer step seen
        self.total_steps = 0  # T, set by the hook at the start of training
        self.scores: torch.Tensor | None = None  # EMA importance ŝ, (n_layers, r′)
        self.final_mask: torch.Tensor | None = None  # components pruned for good, (n_layers, r′) bool
        self.n_events = 0
        self.last_event_step = 0
        self.kept_budget = 0  # components kept by the latest event (N before the first one)
        self._layer_list: list[GatedLowRankLinear] = []
        self._shape_groups: list[tuple[list[GatedLowRankLinear], torch.Tensor]] = []

    # --- building -----------------------------------------------------------------------------------
    def make_layer(self, base: nn.Linear, target: TargetInfo) -> nn.Module:
        layer = GatedLowRankLinear(base, rank=self.init_rank, alpha=self.alpha, dropout=self.dropout)
        return layer.train(base.training)  # a new module starts in train mode; keep the model's mode (dropout)

    def after_attach(self, model: nn.Module) -> None:
        self._layer_list = list(self.layers.values())
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, layer in enumerate(self._layer_list):
            by_shape.setdefault((layer.in_features, layer.out_features), []).append(i)
        self._shape_groups = [([self._layer_list[i] for i in idx], torch.tensor(idx)) for idx in by_shape.values()]
        self.scores = torch.zeros(len(self._layer_list), self.init_rank, device=self._device())
        self.kept_budget = self.n_components

    @property
    def n_components(self) -> int:
        return len(self._layer_list) * self.init_rank

    @property
    def target_components(self) -> int:
        return len(self._layer_list) * self.target_rank

    def _device(self) -> torch.device:
        return self._layer_list[0].lora_gate.device

    # --- importance and pruning ---------------------------------------------------------------------
    @torch.no_grad()
    def component_importance(self) -> torch.Tensor:
        """σ (n_layers, r′): |c_i|·‖a_i‖·‖b_i‖ / (‖B diag(c) A‖_F + ε) per layer, from the weights.

        ‖B diag(c) A‖_F² = cᵀ (AAᵀ ⊙ BᵀB) c, so only the r′×r′ Gram matrices are formed, one batched matmul per
        group of equally shaped layers.
        """
        out = torch.empty(len(self._layer_list), self.init_rank, device=self._device())
        for layers, index in self._shape_groups:
            a = torch.stack([l.lora_A for l in layers]).float()  # (L, r′, d_in)
            b = torch.stack([l.lora_B for l in layers]).float()  # (L, d_out, r′)
            c = torch.stack([l.lora_gate for l in layers]).float()  # (L, r′)
            gram_a = a @ a.mT
            gram_b = b.mT @ b
            component = c.abs() * (gram_a.diagonal(dim1=1, dim2=2) * gram_b.diagonal(dim1=1, dim2=2)).sqrt()
            update_sq = torch.einsum("li,lij,lj->l", c, gram_a * gram_b, c).clamp_min(0.0)
            out[index.to(out.device)] = component / (update_sq.sqrt() + self.eps)[:, None]
        return out

    def _align_state_device(self) -> None:
        # The trainer moves the model after attach; the score state follows the gates.
        device = self._device()
        if self.scores.device != device:
            self.scores = self.scores.to(device)
        if self.final_mask is not None and self.final_mask.device != device:
            self.final_mask = self.final_mask.to(device)

    def _zero_gates(self, pruned: torch.Tensor) -> None:
        for layer, layer_pruned in zip(self._layer_list, pruned):
            layer.lora_gate.masked_fill_(layer_pruned, 0.0)

    def _prune_lowest(self, n_prune: int) -> torch.Tensor:
        """Zero the gates of every component scored at or below the n_prune-th smallest EMA score."""
        if self.budget.match == "params":
            # [ours] budget.match=params: keep N − n_prune components' worth of parameters (mean component size)
            cost = torch.tensor([float(l.in_features + l.out_features) for l in self._layer_list],
                                device=self.scores.device)[:, None].expand_as(self.scores)
            capacity = (self.n_components - n_prune) * float(cost[:, 0].mean())
            pruned = ~keep_best_within(self.scores, cost, capacity)
        else:
            threshold = torch.kthvalue(self.scores.flatten(), n_prune).values
            pruned = self.scores <= threshold
        self._zero_gates(pruned)
        self.n_events += 1
        self.last_event_step = self.step
        self.kept_budget = self.n_components - int(pruned.sum().item())
        return pruned

    @torch.no_grad()
    def on_optimizer_step(self, step: int) -> None:
        """After optimizer step `step` (1-based): EMA update, a pruning event if scheduled, or the final mask."""
        if self.total_steps < 1:
            raise RuntimeError("dora_dynamic needs the total number of optimizer steps (set by its hook's "
                               "on_train_begin) before the first step")
        self._align_state_device()
        self.step = step
        event = dora_dynamic_schedule(step, self.total_steps, self.n_components, self.init_rank,
                                      self.target_rank, self.prune_interval, self.warmup_frac, self.final_frac)
        if event.phase == "final":
            if self.final_mask is None and self.init_rank > self.target_rank:
                # The step of the last event never reached the hook (fp16 overflow skip): decide it now [ours].
                _, P = dora_dynamic_window(step, self.total_steps, self.warmup_frac, self.final_frac)
                n_prune = dora_dynamic_n_pruned(P, P, self.n_components, self.init_rank, self.target_rank)
                self.final_mask = self._prune_lowest(n_prune)
            if self.final_mask is not None:
                self._zero_gates(self.final_mask)
            return
        self.scores.mul_(self.beta).add_(self.component_importance(), alpha=1.0 - self.beta)
        if event.is_event and event.n_prune > 0:
            pruned = self._prune_lowest(event.n_prune)
            if event.is_last:
                self.final_mask = pruned

    @property
    def phase(self) -> str:
        if self.total_steps < 1:
            return "warmup"
        p, P = dora_dynamic_window(self.step, self.total_steps, self.warmup_frac, self.final_frac)
        return "warmup" if p < 0 else ("prune" if p <= P else "final")

    # --- DEM regularizer -----------------------------------------------------------------------------
    def dem_penalty(self) -> torch.Tensor:
        """R: the unbiased variances of every a_i (over d_in) and b_i (over d_out), over all components.

        `code`: their sum / (#layers · 2 · r′) (the mean of the 2n variances); `paper`: sum / (#layers · r′).
        """
        total = None
        for layers, _ in self._shape_groups:
            a = torch.stack([l.lora_A for l in layers]).float()
            b = torch.stack([l.lora_B for l in layers]).float()
            group = a.var(dim=-1).sum() + b.var(dim=-2).sum()
            total = group if total is None else total + group
        n = len(self._layer_list) * self.init_rank
        return total / (2 * n if self.dem_form == "code" else n)

    def regularizer(self) -> torch.Tensor | None:
        """η·R while pruning is not finished; None after the last event (the code returns 0 there)."""
        if self.dem_weight == 0.0:
            return None
        if self.total_steps >= 1:
            p, P = dora_dynamic_window(self.step + 1, self.total_steps, self.warmup_frac, self.final_frac)
            if p > P:
                return None
        return self.dem_weight * self.dem_penalty()

    # --- the schedule (the trainer calls these through a ScheduleHook) ---------------------------------
    def on_train_begin(self, state: TrainState) -> None:
        self.total_steps = state.total_steps

    def after_optimizer_step(self, state: TrainState) -> None:
        """Importance update, pruning and the final mask (on_optimizer_step)."""
        self.total_steps = state.total_steps
        self.on_optimizer_step(state.step)

    def progress(self) -> dict[str, Any]:
        # budget: components the schedule keeps (all N before the first event); the bar shows it shrink.
        return {"budget": self.kept_budget, "phase": self.phase}

    # --- results contract -----------------------------------------------------------------------------
    def ledger(self) -> Ledger:
        ledger = super().ledger()
        ledger.notes = {"init_rank": self.init_rank, "components": self.n_components,
                        "kept_components": sum(row.rank for row in ledger.rows),
                        "target_components": self.target_components, "phase": self.phase}
        return ledger

    def to_peft(self) -> PeftLoraExport:
        """Kept components only (c ≠ 0), c folded into B; alpha_i = s·k_i so PEFT's α_i/k_i is our s = α/r′."""
        tensors, ranks, alphas = {}, {}, {}
        for name, layer in self.layers.items():
            c = layer.lora_gate.detach()
            kept = torch.nonzero(c != 0).flatten()
            if kept.numel() == 0:
                continue
            tensors[name] = {"lora_A": layer.lora_A.detach()[kept].clone(),
                             "lora_B": (layer.lora_B.detach()[:, kept] * c[kept]).clone()}
            ranks[name] = int(kept.numel())
            alphas[name] = layer.scale * kept.numel()
        return PeftLoraExport(r=self.target_rank, lora_alpha=self.alpha, tensors=tensors, rank_pattern=ranks,
                              alpha_pattern=alphas)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "scores": self.scores.detach().flatten().cpu().clone(),
            "final_mask": None if self.final_mask is None else self.final_mask.flatten().cpu().clone(),
            "n_events": self.n_events,
            "last_event_step": self.last_event_step,
            "kept_budget": self.kept_budget,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = (len(self._layer_list), self.init_rank)
        device = self._device()
        self.step = int(state["step"])
        self.total_steps = int(state["total_steps"])
        self.scores = torch.as_tensor(state["scores"], dtype=torch.float32).reshape(shape).to(device).clone()
        mask = state.get("final_mask")
        self.final_mask = None if mask is None else torch.as_tensor(mask, dtype=torch.bool).reshape(shape).to(device)
        self.n_events = int(state["n_events"])
        self.last_event_step = int(state["last_event_step"])
        self.kept_budget = int(state["kept_budget"])
