"""LoRA (Hu et al., 2021), methods.md §1.

`y = x W0ᵀ + b + s · (drop(x) Aᵀ) Bᵀ` with `s = α/r` (or `α/√r` with rsLoRA), A kaiming-uniform, B = 0.
The layer is the shared core itself; this file only decides rank, scale and dropout from the config.
"""

from __future__ import annotations

from torch import nn

from . import register
from .base import AdapterMethod, LowRankLinear, PeftLoraExport, TargetInfo


@register("lora")
class LoRA(AdapterMethod):
    def make_layer(self, base: nn.Linear, target: TargetInfo) -> nn.Module:
        return LowRankLinear(
            base,
            rank=self.budget.rank,
            alpha=float(self.config.get("alpha", 16)),
            dropout=float(self.config.get("dropout", 0.0)),
            use_rslora=bool(self.config.get("use_rslora", False)),
        )

    def to_peft(self) -> PeftLoraExport:
        tensors = {name: {"lora_A": layer.lora_A.detach().clone(), "lora_B": layer.lora_B.detach().clone()}
                   for name, layer in self.layers.items()}
        return PeftLoraExport(r=self.budget.rank, lora_alpha=float(self.config.get("alpha", 16)), tensors=tensors,
                              use_rslora=bool(self.config.get("use_rslora", False)))
