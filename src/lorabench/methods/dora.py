"""DoRA, weight-decomposed LoRA (Liu et al., ICML 2024), methods.md §2.

`W' = diag(g) (W0 + s·B A)` with the per-output-unit gain `g = m / sg(‖W0 + s·B A‖_row)`: a trainable magnitude
`m ∈ R^{d_out}` (initialised to `‖W0‖_row`, so `g = 1` and `W' = W0` at init) times a unit-norm direction whose
change is a LoRA update. The bias is not scaled.

Forward (§2.2, the form peft and NVlabs compute):
    y = x W0ᵀ + b + (g − 1) ⊙ (x̃ W0ᵀ) + g ⊙ s·(x̃ Aᵀ Bᵀ),   x̃ = drop(x).
Without active dropout `x̃ = x` and the first base result (minus the bias) is reused, which equals `x W'ᵀ + b`
exactly; it is computed as `g ⊙ z + b` with `z = x W0ᵀ + s·x Aᵀ Bᵀ`, and in fp32 `z = x (W0 + s·B A)ᵀ` as one GEMM
(base.py's `FoldedLowRank` with the gain inside). With active dropout the base term of the correction is recomputed on the dropped input, as in both
reference implementations (the training-time function is then not exactly `x W'ᵀ + b`).

The row norm is detached (§2.3, paper §4.3): it is computed under `no_grad`, so `∂L/∂V'` carries no projection
term and no backward graph is kept for it. It is computed in fp32 from the factored form of §2.2,
    ‖V'_i‖² = ‖W0_i‖² + 2s·⟨b^{(i)}, (W0 Aᵀ)_i⟩ + s²·b^{(i)} (A Aᵀ) b^{(i)ᵀ},
with `‖W0_i‖²` cached once (W0 is frozen) [ours, §2.2 "optional"]. Measured on this project's 2-core CPU at
r = 8 (min of repeated runs, fp32, no grad): 384×384 both ≈150 µs; 1536×384 and 384×1536 the factored form
≈1.3–1.6× faster than forming `W0 + s·B A` densely and taking its row norms (it needs no d_out×d_in
temporaries, only the one `W0 Aᵀ` product). So the factored form is used.

Merge caches the norm it used, because it cannot be recomputed from the merged weight (§2.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..budget import LedgerRow
from . import register
from .base import (AdapterMethod, LowRankLinear, PeftLoraExport, TargetInfo, float_mask, FoldedLowRank,
                   keep_scale, up_project)
from .lora import LoraOptions


class _DroppedDora(torch.autograd.Function):
    """DoRA's training function under active dropout (§2.2 as written), for an fp32 call:
        y = x W0ᵀ + b + (g − 1) ⊙ (x̃ W0ᵀ) + g ⊙ s·(x̃ Aᵀ Bᵀ),   x̃ = x ⊙ keep / (1 − p),
    computed as `y = b + g ⊙ z̃ + (x − x̃) W0ᵀ` with `z̃ = x̃ (W0 + s·B A)ᵀ`: two GEMMs, the least this function
    allows (its base term reads the clean x, its correction the dropped one, both through the full W0), where
    autograd's form runs three (x W0ᵀ, x̃ W0ᵀ, and the adapter) plus four activation-sized elementwise passes.
    Backward, with M = diag(g)(W0 + s·B A) − W0 (formed again, not stored):
        ∂x = ∂Y W0 + (∂Y M) ⊙ keep / (1 − p),   ∂g = Σ_tokens ∂Y ⊙ z̃,
        u = (∂Y ⊙ g) B · s/(1 − p),  ∂A = uᵀ (x ⊙ keep),  ∂B = (hᵀ ∂Y)ᵀ diag-scaled by g·s/(1 − p),  h = (x ⊙ keep) Aᵀ.
    Saved: x, the bool mask and z̃ (d_out wide, what ∂g needs); the dropped copy of x is recomputed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, gain, keep, scale, lora_scale):
        x2 = x.reshape(-1, x.shape[-1])
        dropped = float_mask(keep, x2, temporary=True).view(x2.shape).mul_(x2)  # the 1/(1 − p) rides on the weights
        folded = torch.addmm(weight, lora_B, lora_A, alpha=lora_scale).mul_(scale)  # (W0 + s·B A)/(1 − p)
        z = dropped @ folded.t()
        rest = torch.add(x2, dropped, alpha=-scale, out=dropped)  # x − x̃, in the same buffer
        y = z * gain if bias is None else torch.addcmul(bias, z, gain)
        y.addmm_(rest, weight.t())
        ctx.scale, ctx.lora_scale = scale, lora_scale
        ctx.save_for_backward(x, keep, z, weight, lora_A, lora_B, gain)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, keep, z, weight, lora_A, lora_B, gain = ctx.saved_tensors
        need_x, _, _, need_A, need_B, need_gain, _, _, _ = ctx.needs_input_grad
        scale, s = ctx.scale, ctx.lora_scale
        g = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        mask = float_mask(keep, x2, temporary=True).view(x2.shape)
        grad_x = grad_A = grad_B = grad_gain = None
        if need_gain:
            grad_gain = (g * z).sum(dim=0)
        if need_x:
            folded = torch.addmm(weight, lora_B, lora_A, alpha=s)
            correction = (folded * gain[:, None]).sub_(weight).mul_(scale)  # M / (1 − p)
            grad_x = (g @ correction).mul_(mask).addmm_(g, weight).view(x.shape)
        if need_A or need_B:
            row = gain * (s * scale)  # g·s/(1 − p) per output unit
            dropped = mask.mul_(x2)  # the dropped x, recomputed (the mask is not needed after this)
            if need_A:
                u = ((lora_B * row[:, None]).t() @ g.t()).t()  # (∂Y ⊙ g) B s/(1 − p), fast side of the GEMM
                grad_A = u.t() @ dropped
            if need_B:
                h = dropped @ lora_A.t()
                grad_B = (h.t() @ g).t() * row[:, None]
        return grad_x, None, None, grad_A, grad_B, grad_gain, None, None, None


class DoraLinear(LowRankLinear):
    """A LoRA core plus a magnitude vector `lora_magnitude` (d_out,) and the detached row-norm gain."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__(base, rank, alpha, dropout=dropout, use_rslora=use_rslora)
        with torch.no_grad():
            w0_row_sq = base.weight.detach().float().pow(2).sum(dim=1)
        # ‖W0_i‖², derived from the frozen base weight: not part of the adapter's state.
        self.register_buffer("w0_row_sq", w0_row_sq, persistent=False)
        # m = ‖W0‖_row, taken as sqrt of the cached squares so that g = m / norm is exactly 1 at init.
        self.lora_magnitude = nn.Parameter(w0_row_sq.sqrt().clone())
        self._merge_norm: torch.Tensor | None = None

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s·B A‖_row in fp32, without gradient (the detach of §2.3), from the factored formula."""
        weight = self.base.weight
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            w0 = weight.float()
            a = self.lora_A.float()
            b = self.lora_B.float()
            cross = (w0 @ a.T).mul_(b).sum(dim=1)  # ⟨b^(i), (W0 Aᵀ)_i⟩
            quad = (b @ (a @ a.T)).mul_(b).sum(dim=1)  # b^(i) (A Aᵀ) b^(i)ᵀ
            s = self.scale
            # clamp: rounding may push a tiny row norm a hair below zero
            return (self.w0_row_sq.float() + 2.0 * s * cross + (s * s) * quad).clamp_min_(0.0).sqrt_()

    def gain(self) -> torch.Tensor:
        """g = m / sg(‖W0 + s·B A‖_row), shape (d_out,); differentiable in m only."""
        return self.lora_magnitude / self.weight_norm()

    def branch(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """What DoRA adds to `base(x)`: `(g − 1) ⊙ (x̃ W0ᵀ) + g ⊙ s·(x̃ Aᵀ Bᵀ)` (§2.2).

        `base_out = base(x)` is reused (minus the bias) when dropout is inactive; otherwise, or when it is not
        given, the bias-free base term is computed on the dropped input.
        """
        gain = self.gain()
        if self.dropout_active() or base_out is None:
            x_adapter = self.dropout(x)
            base_term = F.linear(x_adapter, self.base.weight.to(x.dtype))
        else:
            x_adapter = x
            bias = self.base.bias
            base_term = base_out if bias is None else base_out - bias.to(base_out.dtype)
        h = F.linear(x_adapter, self.lora_A.to(x_adapter.dtype))
        lora_out = up_project(h, self.lora_B.to(h.dtype)) * self.scale
        gain = gain.to(base_term.dtype)
        return (gain - 1.0) * base_term + gain * lora_out.to(base_term.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.dropout_active():
            # the base term of the correction sees the dropped input: the §2.2 form as written
            if self.fuse_dropout_now(x):
                return _DroppedDora.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.gain(),
                                          self.dropout.keep_mask(x), keep_scale(self.dropout.p), self.scale)
            return self.base(x) + self.branch(x, None)
        # Without dropout, base(x) + (g − 1) ⊙ x W0ᵀ + g ⊙ s x Aᵀ Bᵀ = g ⊙ (x W0ᵀ + s x Aᵀ Bᵀ) + bias: the same
        # function with two activation-sized elementwise passes (and one saved tensor) instead of five.
        weight, bias = self.base.weight, self.base.bias
        if self.fold_now(x):  # z = x (W0 + s B A)ᵀ as one GEMM, the gain inside the function (fp32 call)
            return FoldedLowRank.apply(x, weight, bias, self.lora_A, self.lora_B, self.hidden_scale(), self.gain())
        h = self.down(x) * self.scale  # scale the r-wide hidden, not the output
        z = F.linear(x, weight.to(x.dtype)) + up_project(h, self.lora_B.to(h.dtype))
        gain = self.gain().to(z.dtype)
        return z * gain if bias is None else torch.addcmul(bias.to(z.dtype), z, gain)

    def direction_update(self) -> torch.Tensor:
        """s·B A in fp32 (the LoRA update of the direction V = W0)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """W' − W0 = diag(g)(W0 + s·B A) − W0 in fp32 (valid while unmerged: W0 is the base weight)."""
        w0 = self.base.weight.float()
        return self.gain().float()[:, None] * (w0 + self.direction_update()) - w0

    def merged_weight(self, w0: torch.Tensor) -> torch.Tensor:
        norm = self.weight_norm()
        self._merge_norm = norm  # the merged weight no longer holds W0, so unmerge needs this norm
        return (self.lora_magnitude.float() / norm)[:, None] * (w0 + self.direction_update())

    def unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        gain = self.lora_magnitude.float() / self._merge_norm
        self._merge_norm = None
        return w / gain[:, None] - self.direction_update()

    def forget_merge(self) -> None:
        super().forget_merge()
        self._merge_norm = None


@register("dora")
class DoRA(AdapterMethod):
    """DoRA on every target: rank `budget.rank`, scale α/r (or α/√r with rsLoRA), A kaiming, B = 0, m = ‖W0‖_row."""

    Options = LoraOptions  # LoRA's three options
    options: LoraOptions

    def make_layer(self, base: nn.Linear, target: TargetInfo) -> nn.Module:
        o = self.options
        layer = DoraLinear(base, rank=self.budget.rank, alpha=o.alpha, dropout=o.dropout, use_rslora=o.use_rslora)
        return layer.train(base.training)  # a new module starts in train mode; keep the model's mode (dropout)

    def ledger_row(self, name: str, layer: nn.Module) -> LedgerRow:
        # The magnitude trains and is stored, but it is not part of the rank budget: shown separately.
        row = super().ledger_row(name, layer)
        row.extra_stored = layer.lora_magnitude.numel()
        return row

    def to_peft(self) -> PeftLoraExport:
        tensors = {name: {"lora_A": layer.lora_A.detach().clone(), "lora_B": layer.lora_B.detach().clone(),
                          "magnitude": layer.lora_magnitude.detach().clone()}
                   for name, layer in self.layers.items()}
        return PeftLoraExport(r=self.budget.rank, lora_alpha=self.options.alpha, tensors=tensors,
                              use_rslora=self.options.use_rslora, use_dora=True)
