"""AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512), methods.md §4.

Each adapted matrix gets an SVD-form update `ΔW = (α / r_init) · P diag(λ) Q` with `P = lora_B` (d_out × r_init),
`Q = lora_A` (r_init × d_in) and the singular values `λ = lora_E` (r_init,). P and Q are pushed towards
orthonormality by a penalty (`regularizer()`). A hook (`AdaLoraAllocator`) runs after every optimizer step:

- importance of every entry w of P, λ, Q: sensitivity `I = |w · ∂L/∂w|` (post-step w, that step's gradient),
  EMA `Ī` (β1), uncertainty EMA `Ū` of `|I − Ī|` (β2), entry score `Ī · Ū`; triplet score
  `S_i = s(λ_i) + mean s(P_{·i}) + mean s(Q_{i·})`, updated only while `t < T − t_f`;
- a global budget `b(t)` of triplets on AdaLoRA's cubic schedule (budget.adalora_budget): every ΔT steps in
  `t_i < t < T − t_f` the `b(0) − b(t)` lowest-scoring triplets over all matrices get `λ ← 0`; P, Q are never
  touched and λ stays trainable, so a masked value can regrow until the next mask;
- at `t = T − t_f` the pattern is fixed at `b(T) = n · r` triplets and re-applied after every later step.

Step boundaries follow peft's `AdaLoraModel.update_and_allocate` (the behaviour of the reference code); see
`schedule_phase`. [ours] t_i and t_f are fractions of the run's total steps by default (the paper gives
absolute steps per task); `t_init_steps` / `t_final_steps` take absolute steps instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..budget import Budget, Ledger, LedgerRow, adalora_budget, keep_best_within
from ..errors import ConfigError
from ..training.hooks import TrainerHook, TrainState
from . import register
from .base import AdapterMethod, LowRankLinear, MethodOptions, PeftLoraExport, TargetInfo

ORTH_FORMS = ("code", "paper")


class SVDLinear(LowRankLinear):
    """`y = x W0ᵀ + b + (α / r_init) · ((drop(x) Qᵀ) ⊙ λ) Pᵀ` (methods.md §4.1).

    Q is the core's `lora_A`, P its `lora_B`; the singular values λ are `lora_E`, the name loralib and peft use,
    so weights copy one to one. The scale stays α / r_init while λ is masked: the reference code divides by
    the initial rank, never by the live one.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.lora_E = nn.Parameter(torch.zeros(rank, device=base.weight.device, dtype=torch.float32))

    def reset_lora_parameters(self) -> None:
        # §4.2: P, Q ~ N(0, 0.02²) and λ = 0, so ΔW = 0 at start although P, Q ≠ 0 (loralib / peft init).
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        if hasattr(self, "lora_E"):
            nn.init.zeros_(self.lora_E)

    def component_scale(self) -> torch.Tensor:
        return self.lora_E


@dataclass(frozen=True)
class SchedulePhase:
    """What the allocator does after optimizer step t (methods.md §4.4–4.5, peft `update_and_allocate`)."""

    update_scores: bool  # importance EMAs take this step's gradient (only while t < T − t_f)
    action: str  # "none" | "mask" (to b(t)) | "finalize" (mask to b(T), fix the pattern) | "reapply" (fixed)


def schedule_phase(step: int, total_steps: int, t_init: int, t_final: int, delta_t: int) -> SchedulePhase:
    """The allocator's decision for optimizer step `step` (counted from 1), a pure function of the step.

    t ≤ t_i: scores only; t_i < t < T − t_f: scores, and a mask when t % ΔT == 0; t = T − t_f: the final mask
    with the scores as they stood after step t − 1 (no update at this step, as in peft); t > T − t_f: the fixed
    pattern is re-applied.
    """
    final_step = total_steps - t_final
    if step < final_step:
        masks = step > t_init and step % delta_t == 0
        return SchedulePhase(True, "mask" if masks else "none")
    if step == final_step:
        return SchedulePhase(False, "finalize")
    return SchedulePhase(False, "reapply")


def steps_from_config(fraction: float, absolute: int | None, total_steps: int) -> int:
    """t_i or t_f in steps: the absolute value when given, else floor(fraction · T) [ours]."""
    if absolute is not None:
        return int(absolute)
    return int(math.floor(fraction * total_steps + 1e-9))


class AdaLoraAllocator(TrainerHook):
    """Importance scores, the global budget and the masks of λ over all adapted matrices (methods.md §4.4–4.5).

    All matrices are handled together: the EMAs are updated with a handful of `torch._foreach_*` calls over the
    list of P, Q, λ tensors, the triplet scores of all matrices form one vector, and one `kthvalue` gives the
    global threshold. The mask is one bool vector over all triplets (matrix after matrix, r_init each).
    """

    def __init__(self, layers: list[SVDLinear], target_rank: int, beta1: float, beta2: float, delta_t: int,
                 t_init: float, t_final: float, t_init_steps: int | None = None,
                 t_final_steps: int | None = None, match: str = "rank") -> None:
        self.layers = layers
        self.ranks = [layer.rank for layer in layers]
        self.b_init = sum(self.ranks)
        self.b_target = target_rank * len(layers)
        # budget.match=params [ours]: a budget of b triplets becomes the size of b LoRA components spread like
        # LoRA's (b · mean of d_in + d_out), filled with triplets at their stored size (d_in + d_out + 1)
        self.match = match
        self._triplet_cost = torch.cat([torch.full((layer.rank,), float(layer.in_features + layer.out_features + 1))
                                        for layer in layers])
        self._mean_cost = sum(layer.in_features + layer.out_features for layer in layers) / len(layers)
        self.beta1, self.beta2, self.delta_t = beta1, beta2, delta_t
        self.t_init_frac, self.t_final_frac = t_init, t_final
        self.t_init_steps, self.t_final_steps = t_init_steps, t_final_steps
        # resolved at on_train_begin, when T is known
        self.total_steps: int | None = None
        self.t_init: int | None = None
        self.t_final: int | None = None
        self.ema_ipt: list[torch.Tensor] | None = None  # Ī per tensor of `_tensors()`
        self.ema_unc: list[torch.Tensor] | None = None  # Ū per tensor of `_tensors()`
        self.kept = torch.ones(self.b_init, dtype=torch.bool, device=self._device())
        self.final = False  # the pattern is fixed (t ≥ T − t_f)
        self.last_step = 0
        self._triplet_matrix = torch.repeat_interleave(torch.arange(len(layers)), torch.tensor(self.ranks))
        self._kept_per_matrix = list(self.ranks)  # python ints: progress() and the ledger never sync the device

    # --- configuration ---------------------------------------------------------------------------------------
    def configure(self, total_steps: int) -> None:
        T = int(total_steps)
        t_i = steps_from_config(self.t_init_frac, self.t_init_steps, T)
        t_f = steps_from_config(self.t_final_frac, self.t_final_steps, T)
        if t_i < 0 or t_f < 0:
            raise ConfigError(f"adalora: t_init and t_final must be >= 0 steps, got {t_i} and {t_f}")
        if t_i >= T - t_f:
            # peft enforces the same: without t_i < T − t_f there is no budgeting phase at all
            raise ConfigError(f"adalora: t_init ({t_i} steps) must be < total steps ({T}) - t_final ({t_f} steps); "
                              f"lower method.t_init_steps / method.t_final_steps or train longer")
        self.total_steps, self.t_init, self.t_final = T, t_i, t_f

    def budget(self, step: int) -> int:
        """b(t) in triplets over all matrices (b(0) before training starts)."""
        if self.total_steps is None or step <= 0:
            return self.b_init
        return adalora_budget(step, self.total_steps, self.b_init, self.b_target, self.t_init, self.t_final)

    # --- tensors -----------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.layers[0].lora_E.device

    def _tensors(self) -> list[torch.Tensor]:
        # Fetched each time (not cached): model.to(device) after attach must not leave stale references.
        return [t for layer in self.layers for t in (layer.lora_A, layer.lora_B, layer.lora_E)]

    def _follow_device(self) -> None:
        device = self._device()
        if self.kept.device != device:
            self.kept = self.kept.to(device)
            if self.ema_ipt is not None:
                self.ema_ipt = [t.to(device) for t in self.ema_ipt]
                self.ema_unc = [t.to(device) for t in self.ema_unc]

    # --- the hook ----------------------------------------------------------------------------------------------
    def on_train_begin(self, state: TrainState) -> None:
        self.configure(state.total_steps)

    def after_optimizer_step(self, state: TrainState) -> None:
        self.step(state.step, state.total_steps)

    def step(self, step: int, total_steps: int | None = None) -> None:
        """Run the allocator for optimizer step `step` (parameters post-update, that step's gradients present)."""
        if self.total_steps is None:
            if not total_steps:
                raise RuntimeError("AdaLoraAllocator needs the run length: call on_train_begin / configure first")
            self.configure(total_steps)
        self._follow_device()
        phase = schedule_phase(step, self.total_steps, self.t_init, self.t_final, self.delta_t)
        if phase.update_scores:
            self.update_importance()
        if phase.action == "mask":
            self.mask_to_budget(self.budget(step))
        elif phase.action in ("finalize", "reapply"):
            if not self.final:
                # "finalize", or "reapply" when the T − t_f step itself never reached the hook (an fp16 step
                # the scaler skipped): the pattern is fixed at b(T) either way, with the last scores.
                self.mask_to_budget(self.b_target)
                self.final = True
                self.ema_ipt = self.ema_unc = None  # frozen from now on (peft resets them too): frees the memory
            else:
                self.apply_mask()
        self.last_step = step

    @torch.no_grad()
    def update_importance(self) -> None:
        """Ī ← β1 Ī + (1−β1) I and Ū ← β2 Ū + (1−β2) |I − Ī| with I = |w · ∂L/∂w|, for every entry (§4.4)."""
        tensors = self._tensors()
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
        if self.ema_ipt is None:
            self.ema_ipt = [torch.zeros_like(t) for t in tensors]
            self.ema_unc = [torch.zeros_like(t) for t in tensors]
        sensitivity = torch._foreach_mul(tensors, grads)
        torch._foreach_abs_(sensitivity)
        torch._foreach_mul_(self.ema_ipt, self.beta1)
        torch._foreach_add_(self.ema_ipt, sensitivity, alpha=1.0 - self.beta1)
        # the uncertainty uses the freshly updated Ī (paper eq. 11, reference code)
        deviation = torch._foreach_sub(sensitivity, self.ema_ipt)
        torch._foreach_abs_(deviation)
        torch._foreach_mul_(self.ema_unc, self.beta2)
        torch._foreach_add_(self.ema_unc, deviation, alpha=1.0 - self.beta2)

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """S over all triplets, matrix after matrix: s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), s = Ī·Ū."""
        if self.ema_ipt is None:
            return torch.zeros(self.b_init, device=self._device())
        entry = torch._foreach_mul(self.ema_ipt, self.ema_unc)
        per_matrix = []
        for k in range(len(self.layers)):
            s_Q, s_P, s_lambda = entry[3 * k], entry[3 * k + 1], entry[3 * k + 2]
            # means, not sums: P and Q entries count once per triplet whatever d_in and d_out are
            per_matrix.append(s_lambda + s_P.mean(dim=0) + s_Q.mean(dim=1))
        return torch.cat(per_matrix)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Keep the `budget` best triplets over all matrices: λ ← 0 where S ≤ the (b(0) − budget)-th smallest S.

        Ties at the threshold are all masked (as in the reference code), so ties can leave fewer than `budget`.
        """
        n_masked = self.b_init - budget
        if n_masked <= 0:
            self.kept = torch.ones(self.b_init, dtype=torch.bool, device=self._device())
        elif self.match == "params":
            scores = self.triplet_scores()
            self.kept = keep_best_within(scores, self._triplet_cost.to(scores.device), budget * self._mean_cost)
        else:
            scores = self.triplet_scores()
            threshold = torch.kthvalue(scores, n_masked).values
            self.kept = scores > threshold
        self.apply_mask()
        counts = torch.zeros(len(self.layers), dtype=torch.long, device=self.kept.device)
        counts.index_add_(0, self._triplet_matrix.to(self.kept.device), self.kept.long())
        self._kept_per_matrix = counts.tolist()

    @torch.no_grad()
    def apply_mask(self) -> None:
        """λ ← 0 for every masked triplet; P, Q and kept λ untouched."""
        lambdas = [layer.lora_E for layer in self.layers]
        masks = list(self.kept.to(lambdas[0].dtype).split(self.ranks))
        torch._foreach_mul_(lambdas, masks)

    # --- reporting and resume ------------------------------------------------------------------------------------
    @property
    def kept_per_matrix(self) -> list[int]:
        """Triplets each matrix keeps after the last mask (r_init before the first one)."""
        return list(self._kept_per_matrix)

    def progress(self) -> dict[str, Any]:
        return {"budget": self.budget(self.last_step), "kept": sum(self._kept_per_matrix)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema_ipt": None if self.ema_ipt is None else [t.detach().clone() for t in self.ema_ipt],
            "ema_unc": None if self.ema_unc is None else [t.detach().clone() for t in self.ema_unc],
            **self.pattern_state(),
        }

    def pattern_state(self) -> dict[str, Any]:
        """The small part of the state: mask, whether it is final, counters (no score tensors)."""
        return {"kept": self.kept.detach().cpu().clone(), "final": self.final, "last_step": self.last_step,
                "total_steps": self.total_steps, "t_init": self.t_init, "t_final": self.t_final}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ema_ipt" in state:
            device = self._device()
            self.ema_ipt = None if state["ema_ipt"] is None else [t.to(device).clone() for t in state["ema_ipt"]]
            self.ema_unc = None if state["ema_unc"] is None else [t.to(device).clone() for t in state["ema_unc"]]
        kept = torch.as_tensor(state["kept"], dtype=torch.bool)
        if kept.numel() != self.b_init:
            raise ValueError(f"adalora state holds {kept.numel()} triplets, this adapter has {self.b_init}")
        self.kept = kept.to(self._device()).clone()
        self.final = bool(state["final"])
        self.last_step = int(state["last_step"])
        self.total_steps, self.t_init, self.t_final = state["total_steps"], state["t_init"], state["t_final"]
        self._kept_per_matrix = [int(m.sum()) for m in self.kept.split(self.ranks)]


@dataclass(frozen=True)
class AdaLoraOptions(MethodOptions):
    """AdaLoRA's options (conf/method/adalora.yaml says where each default comes from)."""

    alpha: float = 16.0               # s = alpha / r_init, fixed while λ is masked
    dropout: float = 0.0              # adapter-input dropout
    orth_reg_weight: float = 0.1      # γ of the orthogonality penalty
    orth_form: str = "code"           # code | paper (ORTH_FORMS)
    beta1: float = 0.85               # EMA of the sensitivity
    beta2: float = 0.85               # EMA of its uncertainty
    delta_t: int = 10                 # steps between masks in the cubic phase
    t_init: float = 0.15              # warm-up fraction of the run
    t_final: float = 0.5              # final-phase fraction of the run
    t_init_steps: int | None = None   # absolute t_i; overrides t_init
    t_final_steps: int | None = None  # absolute t_f; overrides t_final

    def validate(self) -> None:
        if self.orth_form not in ORTH_FORMS:
            raise ConfigError(f"method.orth_form must be one of {', '.join(ORTH_FORMS)}, got {self.orth_form!r}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"method.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        for key in ("beta1", "beta2"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"method.{key} must be in (0, 1), got {getattr(self, key)}")
        if self.delta_t < 1:
            raise ConfigError(f"method.delta_t must be >= 1 step, got {self.delta_t}")
        if not (0.0 <= self.t_init and 0.0 <= self.t_final and self.t_init + self.t_final < 1.0):
            raise ConfigError(f"method.t_init and method.t_final are fractions of the run with t_init + t_final < 1, "
                              f"got {self.t_init} and {self.t_final}")
        for key in ("t_init_steps", "t_final_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0 steps or null, got {getattr(self, key)}")


@register("adalora")
class AdaLoRA(AdapterMethod):
    """AdaLoRA: SVD-form adapters with a shrinking global budget of singular values (module docstring)."""

    Options = AdaLoraOptions
    options: AdaLoraOptions

    def __init__(self, config: dict[str, Any], budget: Budget) -> None:
        super().__init__(config, budget)
        o = self.options
        self.alpha, self.dropout, self.orth_reg_weight, self.orth_form = o.alpha, o.dropout, o.orth_reg_weight, \
            o.orth_form
        self.beta1, self.beta2, self.delta_t = o.beta1, o.beta2, o.delta_t
        self.t_init, self.t_final, self.t_init_steps, self.t_final_steps = o.t_init, o.t_final, o.t_init_steps, \
            o.t_final_steps
        self.allocator: AdaLoraAllocator | None = None
        self._orth_groups: list[tuple[str, list[int]]] = []

    # --- building --------------------------------------------------------------------------------------------
    def make_layer(self, base: nn.Linear, target: TargetInfo) -> nn.Module:
        return SVDLinear(base, rank=self.budget.init_rank, alpha=self.alpha, dropout=self.dropout)

    def after_attach(self, model: nn.Module) -> None:
        layers = list(self.layers.values())
        self.allocator = AdaLoraAllocator(layers, self.budget.rank, self.beta1, self.beta2, self.delta_t,
                                          self.t_init, self.t_final, self.t_init_steps, self.t_final_steps,
                                          match=self.budget.match)
        # Same-shaped factors are stacked so the penalty is a few batched matmuls, not one per matrix.
        groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for k, layer in enumerate(layers):
            groups.setdefault(("lora_A", tuple(layer.lora_A.shape)), []).append(k)
            groups.setdefault(("lora_B", tuple(layer.lora_B.shape)), []).append(k)
        self._orth_groups = [(kind, idx) for (kind, _), idx in groups.items()]

    # --- what the trainer uses -------------------------------------------------------------------------------
    def orthogonality(self) -> torch.Tensor:
        """Σ over all factors of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (`code`), or of their squares (`paper`), in fp32."""
        layers = list(self.layers.values())
        device = layers[0].lora_A.device
        total = torch.zeros((), device=device)
        with torch.autocast(device.type, enabled=False):
            for kind, idx in self._orth_groups:
                stacked = torch.stack([getattr(layers[k], kind).float() for k in idx])
                if kind == "lora_B":
                    stacked = stacked.transpose(1, 2)  # PᵀP: the columns of P are the triplets' vectors
                gram = stacked @ stacked.transpose(1, 2)
                eye = torch.eye(gram.shape[-1], device=device)
                norms = torch.linalg.matrix_norm(gram - eye, ord="fro")
                total = total + (norms.sum() if self.orth_form == "code" else norms.square().sum())
        return total

    def regularizer(self) -> torch.Tensor | None:
        """γ · orthogonality penalty (§4.3).

        `code` (default, the reference code and peft): γ · mean over all 2n factors of the unsquared Frobenius
        norms. `paper` (eq. 4): γ · Σ_k (‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F), summed over matrices, not averaged.
        """
        if self.orth_reg_weight == 0 or not self.layers:
            return None
        penalty = self.orthogonality()
        if self.orth_form == "code":
            penalty = penalty / (2 * len(self.layers))
        return self.orth_reg_weight * penalty

    def hooks(self) -> list:
        return [self.allocator] if self.allocator is not None else []

    # --- what the results contract uses ----------------------------------------------------------------------
    def rank_pattern(self) -> dict[str, int]:
        """Non-zero singular values per matrix (what the adapter computes with right now)."""
        return {name: layer.effective_rank() for name, layer in self.layers.items()}

    def ledger_row(self, name: str, layer: nn.Module) -> LedgerRow:
        kept = self.allocator.kept_per_matrix[list(self.layers).index(name)]
        d_in, d_out = layer.in_features, layer.out_features
        # A stored triplet is a column of P, a row of Q and its singular value: d_in + d_out + 1 numbers
        # (the +1 is λ; the paper counts 1537 per 768×768 triplet, methods.md §0.2).
        return LedgerRow(name=name, d_in=d_in, d_out=d_out, rank=kept,
                         trainable_now=sum(p.numel() for p in layer.parameters() if p.requires_grad),
                         stored_at_end=kept * (d_in + d_out + 1))

    def ledger(self) -> Ledger:
        ledger = super().ledger()
        ledger.notes = {"init_rank": self.budget.init_rank, "target_rank": self.budget.rank,
                        "budget_init": self.allocator.b_init, "budget_target": self.allocator.b_target,
                        "kept_triplets": sum(self.allocator.kept_per_matrix)}
        return ledger

    def to_peft(self) -> PeftLoraExport:
        """A plain LoRA adapter with one rank per module: the triplets with λ ≠ 0, λ and α / r_init folded into B.

        Every module's PEFT scale is alpha_i / r_i = 1 (alpha_pattern = rank_pattern), so B carries the whole
        scale and the export reproduces ΔW exactly; a module that kept nothing is left out.
        """
        tensors, ranks = {}, {}
        for name, layer in self.layers.items():
            keep = (layer.lora_E.detach() != 0).nonzero().flatten()
            if keep.numel() == 0:
                continue
            lam = layer.lora_E.detach().float()[keep]
            tensors[name] = {"lora_A": layer.lora_A.detach().float()[keep].clone(),
                             "lora_B": (layer.lora_B.detach().float()[:, keep] * lam * layer.scale).contiguous()}
            ranks[name] = int(keep.numel())
        return PeftLoraExport(r=self.budget.rank, lora_alpha=float(self.budget.rank), tensors=tensors,
                              rank_pattern=ranks, alpha_pattern={n: float(r) for n, r in ranks.items()})

    def state_dict(self) -> dict[str, Any]:
        """The mask and counters (small; the importance EMAs live in the hook's state_dict)."""
        return self.allocator.pattern_state() if self.allocator is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.allocator is not None:
            self.allocator.load_state_dict(state)
