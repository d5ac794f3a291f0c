"""LoRA (Hu et al., 2021), methods.md §1.

`y = x W0ᵀ + b + s · (drop(x) Aᵀ) Bᵀ` with `s = α/r` (or `α/√r` with rsLoRA), A kaiming-uniform, B = 0.
The layer is the shared core itself; this file only decides rank, scale and dropout from the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import register
from .base import AdapterMethod, LowRankLinear, MethodOptions, PeftLoraExport, TargetInfo


@dataclass(frozen=True)
class LoraOptions(MethodOptions):
    """LoRA's options (also DoRA's: the same three numbers)."""

    alpha: float = 16.0       # s = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0      # adapter-input dropout
    use_rslora: bool = False


@register("lora")
class LoRA(AdapterMethod):
    Options = LoraOptions
    options: LoraOptions

    def make_layer(self, base: nn.Linear, target: TargetInfo) -> nn.Module:
        o = self.options
        return LowRankLinear(base, rank=self.budget.rank, alpha=o.alpha, dropout=o.dropout, use_rslora=o.use_rslora)

    def to_peft(self) -> PeftLoraExport:
        tensors = {name: {"lora_A": layer.lora_A.detach().clone(), "lora_B": layer.lora_B.detach().clone()}
                   for name, layer in self.layers.items()}
        return PeftLoraExport(r=self.budget.rank, lora_alpha=self.options.alpha, tensors=tensors,
                              use_rslora=self.options.use_rslora)
