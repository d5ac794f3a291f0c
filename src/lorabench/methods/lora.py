"""LoRA (Hu et al., 2021), methods.md §1.

`y = x W0ᵀ + b + s · (drop(x) Aᵀ) Bᵀ` with `s = α/r` (or `α/√r` with rsLoRA), A kaiming-uniform, B = 0.
The layer is the shared core itself; this file only decides rank, scale and dropout from the config.
"""

from __future__ import annotations

from torch import nn

from . import register
from .base import AdapterMethod, LowRankLinear, TargetInfo


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

    def peft_config(self) -> dict:
        """The HF PEFT `LoraConfig` fields that reproduce this adapter (used by export)."""
        return {
            "peft_type": "LORA",
            "r": self.budget.rank,
            "lora_alpha": float(self.config.get("alpha", 16)),
            "lora_dropout": float(self.config.get("dropout", 0.0)),
            "use_rslora": bool(self.config.get("use_rslora", False)),
        }
