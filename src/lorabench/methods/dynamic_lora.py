"""Dynamic LoRA, input-dynamic (Liao et al., 2025, arXiv 2501.14859), methods.md §6.

What is the paper's (methods.md §6.1, abstract only; the body was not available): LoRA with an "adaptive weight
allocation mechanism" that "dynamically evaluates the layer's importance during fine-tuning" to reallocate
adapter capacity, plus an "input feature-based adaptive strategy"; "+0.1% resources" over LoRA.
No formulas and no code are public. Everything concrete below is OUR design: methods.md §6.2, revised by §6.4
(revision 2), defaults kept by the ablation in bench/results/ablation_dynamic_lora/ (ties LoRA) [ours]:

  y = x W0ᵀ + b + s · w_ℓ · g_ℓ(x) · (drop(x) Aᵀ) Bᵀ,   s = α / r,  A kaiming-uniform, B = 0

(a) allocation weight w_ℓ (a buffer, no gradient), one per adapted matrix ℓ = 1…M:
    - importance I_ℓ ← β I_ℓ + (1−β) · mean |θ ⊙ ∂L/∂θ| / w_ℓ over the entries of θ ∈ {A_ℓ, B_ℓ} (β = 0.95),
      after every optimizer step (post-update θ, the step's gradient: AdaLoRA's convention), batched over
      modules, until the freeze (nothing reads it afterwards); the mean is over the entries of the kept
      components. Dividing by w_ℓ scores the unweighted branch s·g·BA (§6.4.1): |θ ⊙ ∂L/∂θ| is the size of
      the w-scaled branch's contribution, so without it a module's score grows with its own weight
      (`unweighted_importance: false` restores §6.2);
    - `n_events` reallocations spread evenly between t_warm and the freeze (last `freeze_frac` of the steps),
      or one every `realloc_interval` steps when that is set:
      q = I^{1/τ} / Σ I^{1/τ};  w̃ = clip(λ q, w_min, w_max) with λ found by bisection so mean(w̃) = 1;
      w ← (1−ρ) w + ρ w̃ (a convex mix of two mean-1 in-box vectors stays mean-1 and in the box);
    - function-preserving events (§6.4.2, `preserve_function: true`): where w_ℓ changes from w_old to w_new,
      B ← B·w_old/w_new, so w·B and the output do not move; B's Adam moments are rescaled to the new
      parametrization's gradient units (∂L/∂B scales by w_new/w_old: first moment × w_new/w_old, second ×
      its square). Adam's next step on B then has the same size in B as before, so the function-space step of
      the module is multiplied by w_new/w_old: w acts as a per-module learning-rate multiplier. (§6.4's text
      says "by the same ratio" w_old/w_new; that would leave the moments in the old units, off by the ratio
      squared from the gradients that follow. The test checks the multiplier property against plain Adam with
      a scaled learning rate.) `false` restores §6.2: an event rescales the learned update at once;
    - `allocation: rank` instead keeps w ≡ 1 and moves rank: each module holds r_max = budget.init_rank
      components behind a 0/1 mask (initially the first r on), and at each event r_ℓ ≈ R·I_ℓ/ΣI with
      Σ r_ℓ = R = M·r exactly, 1 ≤ r_ℓ ≤ r_max, trailing components masked (see `allocate_ranks`);
      `allocation: none` keeps w ≡ 1 (the gate alone, for ablations).
(b) input gate g_ℓ(x) = 1 + γ·tanh(u_ℓ·x/√d_in + v_ℓ), u = 0, v = 0 at init (g ≡ 1), g ∈ (1−γ, 1+γ),
    γ = `gate_scale` (§6.4: 0.5; §6.2 had 1), plus an L2 penalty `gate_l2`·‖u‖² in the loss:
    - `gate: token` — one gate per token (the gate reads the clean x, the branch the dropped one);
    - `gate: sequence` — one gate per example from the attention-masked mean of x over tokens. A layer sees
      only x, so the method registers a forward pre-hook on the model that records the `attention_mask`
      keyword of each call; a layer uses it when its shape matches x's (batch, tokens), and otherwise (no
      mask passed, or passed positionally) falls back to the plain mean over the token dimension;
    - `gate: none` — g ≡ 1: plain LoRA with scale s·w_ℓ, exactly mergeable and exportable to PEFT.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..budget import Ledger, LedgerRow
from ..errors import ConfigError
from ..training.hooks import TrainState
from . import register
from .base import (AdapterDropout, AdapterMethod, LowRankLinear, MethodOptions, PeftLoraExport, TargetInfo, float_mask,
                   keep_scale, up_project)

log = logging.getLogger("lorabench")

GATES = ("token", "sequence", "none")
ALLOCATIONS = ("scale", "rank", "none")
ROLE_ABBREV = {"query": "q", "key": "k", "value": "v", "attention_output": "ao", "intermediate": "i",
               "output": "o"}


# --- allocation math: pure functions (tested directly) ------------------------------------------------------

def solve_clipped_scale(x: torch.Tensor, target_sum: float, lo: float, hi: float,
                        iterations: int = 200) -> tuple[torch.Tensor, float]:
    """λ ≥ 0 with Σ clip(λ·x, lo, hi) = target_sum, by bisection, for x > 0 and M·lo ≤ target_sum ≤ M·hi.

    f(λ) = Σ clip(λx, lo, hi) is continuous and non-decreasing, f(0) = M·lo and f(hi / min x) = M·hi, so a
    root exists. After bisection, λ is re-solved in closed form on the found clip pattern, which makes the
    sum exact to rounding. Returns (clip(λx, lo, hi), λ), in float64.
    """
    x = x.detach().double().cpu()
    m = x.numel()
    if not (m * lo - 1e-9 <= target_sum <= m * hi + 1e-9):
        raise ValueError(f"no λ gives sum {target_sum} for {m} entries in [{lo}, {hi}]")
    if (x <= 0).any():
        raise ValueError("solve_clipped_scale needs strictly positive x")
    lam_lo, lam_hi = 0.0, hi / float(x.min())
    for _ in range(iterations):
        mid = 0.5 * (lam_lo + lam_hi)
        if float((mid * x).clamp(lo, hi).sum()) < target_sum:
            lam_lo = mid
        else:
            lam_hi = mid
    lam = 0.5 * (lam_lo + lam_hi)
    y = (lam * x).clamp(lo, hi)
    free = (lam * x > lo) & (lam * x < hi)
    if free.any():
        pinned = float(y[~free].sum())
        lam_exact = (target_sum - pinned) / float(x[free].sum())
        y_exact = (lam_exact * x).clamp(lo, hi)
        # keep the polish only if it leaves the clip pattern unchanged (it should, up to rounding)
        if torch.equal(((lam_exact * x > lo) & (lam_exact * x < hi)), free):
            lam, y = lam_exact, y_exact
    return y, lam


def importance_shares(importance: torch.Tensor, tau: float) -> torch.Tensor:
    """q = I^{1/τ} / Σ I^{1/τ} (float64), computed in log space; zero or negative importances get a tiny floor
    so every share is positive, and all-zero importance gives uniform shares."""
    imp = importance.detach().double().cpu()
    top = float(imp.max()) if imp.numel() else 0.0
    if not top > 0 or not math.isfinite(top):
        return torch.full_like(imp, 1.0 / max(imp.numel(), 1))
    imp = imp.clamp_min(top * 1e-12)
    return torch.softmax(imp.log() / tau, dim=0)


def allocate_scale_weights(importance: torch.Tensor, tau: float, w_min: float, w_max: float) -> torch.Tensor:
    """w̃ = clip(λ q, w_min, w_max) with mean(w̃) = 1 (float64)."""
    q = importance_shares(importance, tau)
    w, _ = solve_clipped_scale(q, float(q.numel()), w_min, w_max)
    return w


def allocate_ranks(importance: torch.Tensor, total_rank: int, r_max: int, r_min: int = 1) -> list[int]:
    """Integer ranks r_ℓ ∈ [r_min, r_max] with Σ r_ℓ = total_rank exactly, proportional to importance.

    The spec's r_ℓ = max(1, round(R·I_ℓ/ΣI)) with Σ r_ℓ = R [ours]: the real targets R·I_ℓ/ΣI are rescaled
    by the bisection above so that clip(·, r_min, r_max) sums to R (λ = 1 when no bound binds), then rounded
    by largest remainder (floors, plus one for the largest fractional parts), which keeps the sum exact.
    """
    m = importance.numel()
    if not m * r_min <= total_rank <= m * r_max:
        raise ValueError(f"cannot split rank {total_rank} over {m} modules within [{r_min}, {r_max}]")
    q = importance_shares(importance, 1.0)
    real, _ = solve_clipped_scale(q * total_rank, float(total_rank), float(r_min), float(r_max))
    floors = real.floor().clamp(r_min, r_max)
    ranks = [int(v) for v in floors.tolist()]
    remainder = total_rank - sum(ranks)
    frac = (real - floors).tolist()
    order = sorted(range(m), key=lambda i: (-frac[i], i))
    while remainder > 0:  # one pass suffices unless rounding noise pinned a value at a floor
        for i in order:
            if remainder == 0:
                break
            if ranks[i] < r_max:
                ranks[i] += 1
                remainder -= 1
    while remainder < 0:  # rounding noise the other way: take from the smallest fractional parts
        for i in reversed(order):
            if remainder == 0:
                break
            if ranks[i] > r_min:
                ranks[i] -= 1
                remainder += 1
    return ranks


def realloc_window(total_steps: int, warmup_frac: float, freeze_frac: float) -> tuple[int, int]:
    """(t_warm, t_end): reallocation events happen at steps t_warm < t ≤ t_end; w is frozen after t_end."""
    t_warm = int(round(warmup_frac * total_steps))
    t_end = int(round((1.0 - freeze_frac) * total_steps))
    return t_warm, t_end


def spread_interval(total_steps: int, n_events: int, warmup_frac: float, freeze_frac: float) -> int:
    """ΔT that puts `n_events` events evenly in (t_warm, t_end] (fewer when the window is shorter) [ours, §6.4]."""
    t_warm, t_end = realloc_window(total_steps, warmup_frac, freeze_frac)
    return max(1, (t_end - t_warm) // max(n_events, 1))


def is_realloc_step(step: int, total_steps: int, interval: int, warmup_frac: float, freeze_frac: float) -> bool:
    """Every `interval` steps counted from t_warm, up to the freeze: t = t_warm + k·ΔT, k ≥ 1, t ≤ t_end."""
    t_warm, t_end = realloc_window(total_steps, warmup_frac, freeze_frac)
    return t_warm < step <= t_end and (step - t_warm) % interval == 0


def gate_overhead(d_in: int, rank: int, gate: str) -> tuple[int, int, int]:
    """(extra params, extra FLOPs per token, extra FLOPs per sequence) of one module's gate [ours].

    token: the dot product u·x (2·d_in) and gating the rank-r hidden (r) per token; sequence: the masked mean
    (2·d_in per token: multiply by the mask, add) and gating (r) per token, the dot product once per sequence;
    O(1) scalar ops (bias, tanh, +1) are not counted. Parameters: u (d_in) and v (1).
    """
    if gate == "none":
        return 0, 0, 0
    if gate == "token":
        return d_in + 1, 2 * d_in + rank, 0
    return d_in + 1, 2 * d_in + rank, 2 * d_in


# --- the layer -------------------------------------------------------------------------------------------------

class _MaskContext:
    """The attention mask of the model call in progress (for the sequence gate), shared by the layers."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs.get("attention_mask")


class _TokenGatedLowRank(torch.autograd.Function):
    """`y = x W0ᵀ + b + (g ⊙ (x̃ Aᵀ) ⊙ cs) Bᵀ` with the token gate `g = 1 + γ tanh(x u'ᵀ + v)`, `u' = u/√d_in`,
    for an fp32 call (the gate makes the update input-dependent, so it cannot fold into W0). `x̃` is x, or under
    adapter dropout `x ⊙ keep / (1 − p)` (`keep` given, `scale` = 1/(1 − p)); the gate reads the clean x.

    The same function as `DynamicLoRALinear.branch` added to the base output, computed with fewer
    activation-sized passes: without dropout `x [A; u']ᵀ` is one r+1-wide product; the adapter's output is
    accumulated into the base GEMM (`addmm_` with β = 1) instead of being written and added; in backward the
    r+1-wide ∂x term is the buffer the frozen GEMM `∂Y W0` accumulates into. Under dropout the dropped x is a
    reused buffer, gone after the r-wide product, recomputed from x and the bool mask for ∂A (as `_DroppedLowRank`
    does), so no dropped copy is kept. `cs = s·w·mask` is a constant here.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, gate_v, lora_B, cs, gamma, keep=None, scale=1.0):
        r = lora_B.shape[1]
        x2 = x.reshape(-1, x.shape[-1])
        if keep is None:
            hz = x2 @ down.t()  # (tokens, r + 1): the hidden and the gate's pre-activation
            h, z = hz[:, :r], hz[:, r:]
        else:  # the branch reads the dropped x (a reused buffer), the gate the clean one
            h = (float_mask(keep, x2, temporary=True).view(x2.shape).mul_(x2) @ down[:r].t()).mul_(scale)
            z = x2 @ down[r:].t()
        t = torch.tanh(z + gate_v)
        ctx.gamma, ctx.scale = gamma, scale
        gated = h * cs * (1.0 + gamma * t)
        out = gated @ lora_B.t() if bias is None else torch.addmm(bias, gated, lora_B.t())
        out.addmm_(x2, weight.t())
        ctx.save_for_backward(x, h, t, weight, down, lora_B, cs, keep)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, h, t, weight, down, lora_B, cs, keep = ctx.saved_tensors
        need_x, _, _, need_down, need_v, need_B = ctx.needs_input_grad[:6]
        g = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gamma = ctx.gamma
        r = lora_B.shape[1]
        gate = 1.0 + gamma * t
        u = (lora_B.t() @ g.t()).t()  # ∂Y B, on the fast side of the GEMM
        grad_B = ((h * cs * gate).t() @ g).t() if need_B else None
        dz = (u * h * cs).sum(dim=1, keepdim=True) * (gamma * (1.0 - t * t))  # through g = 1 + γ tanh(z)
        dh = u * cs * gate  # ∂L/∂h
        grad_v = dz.sum(dim=0) if need_v else None
        grad_x = grad_down = None
        if keep is None:
            dhz = torch.cat([dh, dz], dim=1)
            grad_down = dhz.t() @ x2 if need_down else None
            if need_x:
                grad_x = (dhz @ down).addmm_(g, weight).view(x.shape)
        else:  # h = (x ⊙ keep) Aᵀ · scale: ∂x = (∂h A) ⊙ keep · scale + ∂z u' + ∂Y W0, ∂A = ∂hᵀ (x ⊙ keep) · scale
            dh = dh * ctx.scale
            mask = float_mask(keep, x2, temporary=True).view(x2.shape)
            if need_x:
                grad_x = (dh @ down[:r]).mul_(mask).addmm_(dz, down[r:]).addmm_(g, weight).view(x.shape)
            if need_down:  # the dropped x, recomputed (the mask is not needed after this)
                grad_down = torch.cat([dh.t() @ mask.mul_(x2), dz.t() @ x2])
        return grad_x, None, None, grad_down, grad_v, grad_B, None, None, None, None


class DynamicLoRALinear(LowRankLinear):
    """LoRA with an allocation weight w (buffer), an optional rank mask (buffer) and an optional input gate."""

    def __init__(self, base: nn.Linear, n_components: int, scale: float, dropout: float, gate: str,
                 active_rank: int | None, mask_context: _MaskContext | None, gate_scale: float = 1.0) -> None:
        super().__init__(base, rank=n_components, alpha=0.0, dropout=dropout, scale=scale)
        device = base.weight.device
        self.gate = gate
        self.gate_scale = float(gate_scale)  # γ: g ∈ (1 − γ, 1 + γ)
        self.register_buffer("alloc_weight", torch.ones((), dtype=torch.float32, device=device))
        mask = None
        if active_rank is not None:  # rank mode: the first `active_rank` components on
            mask = (torch.arange(n_components, device=device) < active_rank).float()
        self.register_buffer("rank_mask", mask)
        if gate != "none":
            self.gate_u = nn.Parameter(torch.zeros(self.in_features, dtype=torch.float32, device=device))
            self.gate_v = nn.Parameter(torch.zeros(1, dtype=torch.float32, device=device))
        self.gate_inv_sqrt_d = 1.0 / math.sqrt(self.in_features)
        self.mask_context = mask_context

    def component_scale(self) -> torch.Tensor | None:
        return self.rank_mask

    def can_fold(self) -> bool:
        return self.gate == "none"  # a gate makes the update depend on the input

    def fuse_dropout_now(self, x: torch.Tensor) -> bool:
        if self.gate != "token":
            return super().fuse_dropout_now(x)
        return isinstance(self.dropout, AdapterDropout) and self.dropout_active() and self.fp32_any_dropout(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and self.gate == "token" and (self.fp32_call(x) or self.fuse_dropout_now(x)):
            keep, scale = None, 1.0
            if self.dropout_active():
                keep, scale = self.dropout.keep_mask(x), keep_scale(self.dropout.p)
            return _TokenGatedLowRank.apply(x, self.base.weight, self.base.bias, self.down_weight(), self.gate_v,
                                            self.lora_B, self.hidden_scale().detach(), self.gate_scale, keep, scale)
        return super().forward(x)

    def hidden_scale(self) -> torch.Tensor:
        scale = self.alloc_weight * self.scale
        return scale.expand(self.rank) if self.rank_mask is None else self.rank_mask * scale

    def set_rank(self, rank: int) -> None:
        self.rank_mask.copy_((torch.arange(self.rank, device=self.rank_mask.device) < rank).float())

    def _sequence_summary(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1, d_in): the attention-masked mean of x over tokens (plain mean without a usable mask)."""
        mask = self.mask_context.mask if self.mask_context is not None else None
        if mask is not None and mask.shape == x.shape[:2]:
            m = mask.to(x.dtype).unsqueeze(-1)
            return (x * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)
        return x.mean(dim=1, keepdim=True)

    def gate_value(self, x: torch.Tensor) -> torch.Tensor | None:
        """g(x) = 1 + γ tanh(u·x/√d_in + v), shape (..., 1) broadcasting over the hidden; None when off."""
        if self.gate == "none":
            return None
        if self.gate == "sequence" and x.dim() >= 3:
            x = self._sequence_summary(x)
        z = F.linear(x, self._gate_row().to(x.dtype), self.gate_v.to(x.dtype))
        return 1.0 + self.gate_scale * torch.tanh(z)

    def _gate_row(self) -> torch.Tensor:
        """u/√d_in as a (1, d_in) weight row."""
        return (self.gate_u * self.gate_inv_sqrt_d).unsqueeze(0)

    def down_weight(self) -> torch.Tensor:
        """A, plus the token gate's row u/√d_in when it reads the same input: its pre-activation then comes
        out of the down-projection's matmul as one extra column instead of a separate matrix-vector product
        (and a separate activation-sized gradient in backward)."""
        if self.gate != "token":
            return self.lora_A
        return torch.cat([self.lora_A, self._gate_row()])

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate == "token" and not self.dropout_active():
            hz = self.down(x)  # [x Aᵀ | u·x/√d_in]: the branch and the gate read the same (clean) x
            h, z = hz[..., : self.rank], hz[..., self.rank:]
            g = 1.0 + self.gate_scale * torch.tanh(z + self.gate_v.to(z.dtype))
        elif self.gate == "token":  # active dropout: the gate reads the clean x, the branch the dropped one
            h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
            g = self.gate_value(x)
        else:
            h = self.down(x)
            g = self.gate_value(x)
        h = h * self.hidden_scale().to(h.dtype)  # s·w, times the rank mask in rank mode
        if g is not None:  # gating the r-dim hidden is the same as gating the output, and cheaper
            h = h * g.to(h.dtype)
        return up_project(h, self.lora_B.to(h.dtype))

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight() * self.alloc_weight.float()

    def merge(self) -> None:
        if self.gate != "none":
            raise ConfigError(f"dynamic_lora with gate={self.gate} cannot be merged: its update depends on the "
                              f"input; serve it unmerged or train with method.gate=none")
        super().merge()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate={self.gate}"


# --- the method ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DynamicLoraOptions(MethodOptions):
    """Dynamic LoRA's options (methods.md §6.2 with the §6.4 revision; conf/method/dynamic_lora.yaml explains
    each, bench/results/ablation_dynamic_lora/ measured the defaults)."""

    alpha: float = 16.0                  # s = alpha / r
    dropout: float = 0.0                 # adapter-input dropout
    allocation: str = "scale"            # scale | rank | none (ALLOCATIONS)
    gate: str = "token"                  # token | sequence | none (GATES)
    gate_scale: float = 0.5              # the gate is 1 + gate_scale · tanh(·)
    gate_l2: float = 0.0                 # weight of the L2 penalty on the gate's u
    unweighted_importance: bool = True   # score the branch without w (I / w)
    preserve_function: bool = True       # an event rescales B and its Adam moments so the output does not move
    beta: float = 0.95                   # EMA factor of the per-module importance
    n_events: int = 10                   # reallocations, spread evenly between warm-up and freeze
    realloc_interval: int | None = None  # ΔT in steps between reallocations instead of n_events
    warmup_frac: float = 0.1             # no reallocation during the first 10% of the steps
    freeze_frac: float = 0.2             # w (or the ranks) frozen for the last 20%
    tau: float = 1.0                     # temperature of the shares q = I^(1/tau) / sum I^(1/tau)
    w_min: float = 0.5                   # bounds of each module's scale weight w_l (mean(w) = 1 kept exactly)
    w_max: float = 2.0
    rho: float = 0.5                     # smoothing: w <- (1 - rho) w + rho w_target at each reallocation

    def validate(self) -> None:
        def bad(msg):
            raise ConfigError(f"dynamic_lora: {msg}")

        if self.gate not in GATES:
            bad(f"method.gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.allocation not in ALLOCATIONS:
            bad(f"method.allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if not 0 <= self.beta < 1:
            bad(f"method.beta must be in [0, 1), got {self.beta}")
        if self.realloc_interval is not None and self.realloc_interval < 1:
            bad(f"method.realloc_interval must be >= 1 or null, got {self.realloc_interval}")
        if self.n_events < 1:
            bad(f"method.n_events must be >= 1, got {self.n_events}")
        if not 0 < self.gate_scale <= 1:
            bad(f"method.gate_scale must be in (0, 1] (the gate 1 + gate_scale·tanh must stay positive), "
                f"got {self.gate_scale}")
        if self.gate_l2 < 0:
            bad(f"method.gate_l2 must be >= 0, got {self.gate_l2}")
        if not (0 <= self.warmup_frac <= 1 and 0 <= self.freeze_frac <= 1 and self.warmup_frac + self.freeze_frac <= 1):
            bad(f"need 0 <= warmup_frac, freeze_frac and warmup_frac + freeze_frac <= 1, got "
                f"{self.warmup_frac}, {self.freeze_frac}")
        if not self.tau > 0:
            bad(f"method.tau must be > 0, got {self.tau}")
        if not 0 < self.w_min <= 1 <= self.w_max:
            bad(f"need 0 < w_min <= 1 <= w_max (mean(w) = 1 must be reachable), got [{self.w_min}, {self.w_max}]")
        if not 0 < self.rho <= 1:
            bad(f"method.rho must be in (0, 1], got {self.rho}")


@register("dynamic_lora")
class DynamicLoRA(AdapterMethod):
    """Importance-driven scale (or rank) allocation plus an input gate (methods.md §6.2 [ours])."""

    Options = DynamicLoraOptions
    options: DynamicLoraOptions

    def __init__(self, config: dict[str, Any], budget) -> None:
        super().__init__(config, budget)
        o = self.options
        self.alpha, self.dropout, self.beta, self.n_events = o.alpha, o.dropout, o.beta, o.n_events
        self._interval_cfg = o.realloc_interval
        self.warmup_frac, self.freeze_frac, self.tau, self.rho = o.warmup_frac, o.freeze_frac, o.tau, o.rho
        self.w_min, self.w_max = o.w_min, o.w_max
        self.allocation, self.gate, self.gate_scale, self.gate_l2 = o.allocation, o.gate, o.gate_scale, o.gate_l2
        self.unweighted_importance, self.preserve_function = o.unweighted_importance, o.preserve_function
        # ΔT: set, or derived from n_events once the trainer says K (on_train_begin)
        self.realloc_interval = self._interval_cfg if self._interval_cfg is not None else 1
        self.scale = self.alpha / budget.rank  # s = α/r in both modes: a rank-mode component weighs as in LoRA
        self.n_components = budget.init_rank if self.allocation == "rank" else budget.rank
        self.mask_context = _MaskContext() if self.gate == "sequence" else None
        self._mask_hook = None
        self.total_steps: int | None = None
        self.weights = torch.ones(0, dtype=torch.float64)  # w per module (float64 master; layers hold fp32)
        self.ranks: list[int] = []
        self.importance: torch.Tensor | None = None
        self._w_cache: torch.Tensor | None = None
        self.n_realloc = 0
        self.last_realloc_step = 0
        self._shown: dict[str, Any] = {}

    # --- building -----------------------------------------------------------------------------------
    def make_layer(self, base: nn.Linear, target: TargetInfo) -> nn.Module:
        return DynamicLoRALinear(base, n_components=self.n_components, scale=self.scale, dropout=self.dropout,
                                 gate=self.gate, active_rank=self.budget.rank if self.allocation == "rank" else None,
                                 mask_context=self.mask_context, gate_scale=self.gate_scale)

    def after_attach(self, model: nn.Module) -> None:
        m = len(self.layers)
        self.weights = torch.ones(m, dtype=torch.float64)
        self.ranks = [layer.effective_rank() for layer in self.layers.values()]
        self.importance = None
        if self.mask_context is not None:
            self._mask_hook = model.register_forward_pre_hook(self.mask_context.capture, with_kwargs=True)
        self._refresh_shown()

    def set_total_steps(self, total_steps: int) -> None:
        """K is known: derive ΔT from n_events unless realloc_interval was set."""
        self.total_steps = int(total_steps)
        if self._interval_cfg is None:
            self.realloc_interval = spread_interval(self.total_steps, self.n_events, self.warmup_frac,
                                                    self.freeze_frac)

    @property
    def mergeable(self) -> bool:
        return self.gate == "none"

    def merge(self) -> None:
        if not self.mergeable:
            raise ConfigError(f"dynamic_lora with gate={self.gate} cannot be merged: the update g(x)·s·w·B A "
                              f"depends on the input; serve it unmerged or train with method.gate=none")
        super().merge()

    # --- importance and allocation ------------------------------------------------------------------
    def _kept_entries(self, device: torch.device) -> torch.Tensor:
        """Per module, the number of A/B entries of its kept components (the importance is their mean)."""
        return torch.tensor([r * (layer.in_features + layer.out_features)
                             for r, layer in zip(self.ranks, self.layers.values())], dtype=torch.float32,
                            device=device)

    @torch.no_grad()
    def update_importance(self) -> None:
        """I ← β I + (1−β) · mean |θ ⊙ ∂L/∂θ| over A and B, for all modules at once (one fused L1 norm)."""
        layers = list(self.layers.values())
        params = [layer.lora_A for layer in layers] + [layer.lora_B for layer in layers]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        sums = torch.stack(torch._foreach_norm(torch._foreach_mul(params, grads), 1))
        m = len(layers)
        device = sums.device
        if self.importance is None or self.importance.device != device:
            base = torch.zeros(m, device=device) if self.importance is None else self.importance.to(device)
            self.importance = base
            self._kept = self._kept_entries(device)
        current = (sums[:m] + sums[m:]) / self._kept
        if self.unweighted_importance and self.allocation == "scale":
            current = current / self._w_device(device)  # score s·g·BA, not w·s·g·BA (§6.4.1)
        self.importance.mul_(self.beta).add_(current, alpha=1.0 - self.beta)

    def _w_device(self, device: torch.device) -> torch.Tensor:
        """The allocation weights as an fp32 tensor on `device` (cached until the next event)."""
        if self._w_cache is None or self._w_cache.device != device:
            self._w_cache = self.weights.to(device=device, dtype=torch.float32)
        return self._w_cache

    def regularizer(self) -> torch.Tensor | None:
        """gate_l2 · Σ_ℓ ‖u_ℓ‖² (§6.4: keeps the gate near 1 on small data sets); None when off."""
        if self.gate == "none" or self.gate_l2 == 0:
            return None
        return self.gate_l2 * sum(layer.gate_u.square().sum() for layer in self.layers.values())

    def importance_now(self) -> torch.Tensor:
        if self.importance is None:
            return torch.zeros(len(self.layers), dtype=torch.float64)
        return self.importance.detach().double().cpu()

    @torch.no_grad()
    def reallocate(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """One reallocation event: new scale weights (scale mode) or new ranks (rank mode). In scale mode with
        `preserve_function`, B and its Adam moments (in `optimizer`) are rescaled so the output does not move."""
        imp = self.importance_now()
        if self.allocation == "scale":
            target = allocate_scale_weights(imp, self.tau, self.w_min, self.w_max)
            old = self.weights
            self.weights = (1.0 - self.rho) * self.weights + self.rho * target
            if self.preserve_function:
                self._preserve_function(old, self.weights, optimizer)
            self._write_weights()
        else:
            self.ranks = allocate_ranks(imp, self.budget.rank * len(self.layers), r_max=self.n_components)
            self._write_ranks()
        self.n_realloc += 1
        self.last_realloc_step = step
        self._refresh_shown()
        log.info("dynamic_lora realloc %d at step %d: %s", self.n_realloc, step, self.allocation_summary())

    def _preserve_function(self, old: torch.Tensor, new: torch.Tensor,
                           optimizer: torch.optim.Optimizer | None) -> None:
        """w_old → w_new without moving the output: B ← B·w_old/w_new; B's Adam moments follow ∂L/∂B, which
        scales by w_new/w_old (first moment × c, second × c², c = w_new/w_old)."""
        for w_old, w_new, layer in zip(old.tolist(), new.tolist(), self.layers.values()):
            if w_old == w_new:
                continue
            layer.lora_B.mul_(w_old / w_new)
            state = optimizer.state.get(layer.lora_B) if optimizer is not None else None
            if state:
                c = w_new / w_old
                if "exp_avg" in state:
                    state["exp_avg"].mul_(c)
                if "exp_avg_sq" in state:
                    state["exp_avg_sq"].mul_(c * c)

    def _write_weights(self) -> None:
        self._w_cache = None
        for w, layer in zip(self.weights.tolist(), self.layers.values()):
            layer.alloc_weight.fill_(w)

    def _write_ranks(self) -> None:
        for r, layer in zip(self.ranks, self.layers.values()):
            layer.set_rank(r)
        if self.importance is not None:
            self._kept = self._kept_entries(self.importance.device)

    def allocation_summary(self) -> str:
        """Compact per-module view: `w ∈ [min, max] | L0 q1.02 k0.88 ... | L1 ...` (or ranks)."""
        values = self.weights.tolist() if self.allocation == "scale" else self.ranks
        by_block: dict[int, list[str]] = {}
        for (name, t), v in zip(self.targets.items(), values):
            text = f"{v:.2f}" if self.allocation == "scale" else str(v)
            by_block.setdefault(t.layer_index, []).append(f"{ROLE_ABBREV.get(t.role, t.role)}{text}")
        key = "w" if self.allocation == "scale" else "r"
        lo, hi = min(values), max(values)
        head = f"{key} in [{lo:.3f}, {hi:.3f}]" if self.allocation == "scale" else f"{key} in [{lo}, {hi}]"
        return head + " | " + " | ".join(f"L{b} " + " ".join(v) for b, v in sorted(by_block.items()))

    def _refresh_shown(self) -> None:
        if self.allocation == "none":
            self._shown = {}
        elif self.allocation == "scale" and self.weights.numel():
            self._shown = {"w_min": round(float(self.weights.min()), 4), "w_max": round(float(self.weights.max()), 4)}
        elif self.ranks:
            self._shown = {"r_min": min(self.ranks), "r_max": max(self.ranks)}

    def progress(self) -> dict[str, Any]:
        return dict(self._shown)

    # --- the schedule (the trainer calls these through a ScheduleHook) ---------------------------------
    def on_train_begin(self, state: TrainState) -> None:
        self.set_total_steps(state.total_steps)
        if self.allocation == "none":
            log.info("dynamic_lora: allocation=none (w = 1) gate=%s", self.gate)
            return
        t_warm, t_end = realloc_window(state.total_steps, self.warmup_frac, self.freeze_frac)
        n_events = sum(is_realloc_step(t, state.total_steps, self.realloc_interval, self.warmup_frac,
                                       self.freeze_frac) for t in range(1, state.total_steps + 1))
        log.info("dynamic_lora: allocation=%s gate=%s; %d reallocations every %d steps in (%d, %d], frozen after",
                 self.allocation, self.gate, n_events, self.realloc_interval, t_warm, t_end)

    def after_optimizer_step(self, state: TrainState) -> None:
        """Update the importance EMA; at an event step, reallocate (B's Adam moments live in state.optimizer)."""
        _, t_end = realloc_window(state.total_steps, self.warmup_frac, self.freeze_frac)
        if state.step > t_end or self.allocation == "none":
            return  # allocation frozen (or off): the importance has no further use
        self.update_importance()
        if is_realloc_step(state.step, state.total_steps, self.realloc_interval, self.warmup_frac, self.freeze_frac):
            self.reallocate(state.step, state.optimizer)

    # --- overhead and ledger ------------------------------------------------------------------------
    def overhead(self) -> dict[str, int]:
        """Gate extras summed over modules (formulas in `gate_overhead`) next to the LoRA branch's own."""
        params = flops_tok = flops_seq = lora_flops = 0
        for r, layer in zip(self.ranks, self.layers.values()):
            p, ft, fs = gate_overhead(layer.in_features, r, self.gate)
            params, flops_tok, flops_seq = params + p, flops_tok + ft, flops_seq + fs
            lora_flops += 2 * r * (layer.in_features + layer.out_features)
        return {"gate_params": params, "gate_flops_per_token": flops_tok, "gate_flops_per_sequence": flops_seq,
                "lora_flops_per_token": lora_flops}

    def ledger_row(self, name: str, layer: nn.Module) -> LedgerRow:
        d_in, d_out, r = layer.in_features, layer.out_features, layer.effective_rank()
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        return LedgerRow(name=name, d_in=d_in, d_out=d_out, rank=r, trainable_now=trainable,
                         stored_at_end=r * (d_in + d_out),
                         extra_stored=(d_in + 1) if self.gate != "none" else 0)

    def ledger(self) -> Ledger:
        ledger = super().ledger()
        ledger.notes = {
            "design": "methods.md §6.2 + §6.4 revision 2 [ours]: importance-driven scale/rank allocation "
                      "(function-preserving events) + bounded input gate",
            "realloc_interval": self.realloc_interval if self.total_steps is not None else self._interval_cfg,
            "allocation": self.allocation,
            "gate": self.gate,
            "extra_stored": "gate u (d_in) and v (1) per module" if self.gate != "none" else "none",
            "alloc_weights": "w_l folds into the scale (PEFT alpha_pattern), not counted",
            "components_per_module": self.n_components,
            **self.overhead(),
            **self._shown,
        }
        return ledger

    # --- export and state ---------------------------------------------------------------------------
    def to_peft(self) -> PeftLoraExport | None:
        """LoRA with PEFT scale alpha_ℓ / r_ℓ = s·w_ℓ per module (alpha_pattern); None while a gate is on."""
        if self.gate != "none":
            return None
        tensors, rank_pattern, alpha_pattern = {}, {}, {}
        r = self.budget.rank
        for name, layer in self.layers.items():
            A, B = layer.lora_A.detach(), layer.lora_B.detach()
            r_l = layer.rank
            if layer.rank_mask is not None:
                kept = layer.rank_mask.detach().bool()
                A, B = A[kept], B[:, kept]
                r_l = int(kept.sum())
                rank_pattern[name] = r_l
            tensors[name] = {"lora_A": A.clone(), "lora_B": B.clone()}
            alpha_pattern[name] = self.scale * float(layer.alloc_weight) * r_l
        return PeftLoraExport(r=r, lora_alpha=self.alpha, tensors=tensors, rank_pattern=rank_pattern,
                              alpha_pattern=alpha_pattern)

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance_now().tolist(), "weights": self.weights.tolist(),
                "ranks": list(self.ranks), "n_realloc": self.n_realloc, "last_realloc_step": self.last_realloc_step,
                "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        device = next(iter(self.layers.values())).lora_A.device
        self.importance = torch.tensor(state["importance"], dtype=torch.float32, device=device)
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.ranks = [int(r) for r in state["ranks"]]
        self.n_realloc = int(state["n_realloc"])
        self.last_realloc_step = int(state["last_realloc_step"])
        if state.get("total_steps") is not None:
            self.set_total_steps(int(state["total_steps"]))
        self._write_weights()
        if self.allocation == "rank":
            self._write_ranks()
        self._kept = self._kept_entries(device)
        self._refresh_shown()

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state_dict(state)
        # the buffers came back with the tensors; keep the method's float64 master and ranks in step
        self.weights = torch.tensor([float(layer.alloc_weight) for layer in self.layers.values()], dtype=torch.float64)
        self.ranks = [layer.effective_rank() for layer in self.layers.values()]
        if self.importance is not None:
            self._kept = self._kept_entries(self.importance.device)
        self._refresh_shown()
