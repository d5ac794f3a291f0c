"""The method interface and the low-rank layer core every method shares.

A method turns a frozen backbone into an adapted one: `attach` swaps each target `nn.Linear` for the method's
layer, and the trainer sees only `trainable_parameters()`, `regularizer()` and `hooks()`. Everything the
reporter needs (ledger, rank pattern) comes from here too, so the trainer never names a method.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..budget import Budget, Ledger, LedgerRow


class LowRankLinear(nn.Module):
    """`y = base(x) + s · ((drop(x) Aᵀ) ⊙ c) Bᵀ` around a frozen `nn.Linear`.

    `c` is an optional per-component multiplier (`component_scale()`); plain LoRA has none. DoRA-dynamic's
    gates and AdaLoRA's singular values are exactly such a vector, so those methods only override that.
    A is (r, d_in) and B is (d_out, r), the PyTorch layout of methods.md §0.1.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        if scale is None:
            scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.scale = float(scale)
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=weight.device, dtype=torch.float32))
        # Dropout on the adapter input only: the base path sees the clean x (methods.md §1.3).
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # loralib / peft default: A ~ kaiming_uniform(a=√5) = U(±1/√d_in), B = 0, so ΔW = 0 at init.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # --- what subclasses override -------------------------------------------------------------------
    def component_scale(self) -> torch.Tensor | None:
        """Per-component multiplier of shape (r,), or None (plain LoRA)."""
        return None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive contribution for input x (dropout applied here)."""
        # `.to(dtype)` is a no-op in fp32; it lets a low-precision backbone run without autocast, and under
        # autocast F.linear casts both operands itself.
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        # scale the r-wide hidden rather than the d_out-wide output: the same product for r/d_out of the work
        c = self.component_scale()
        h = h * self.scale if c is None else h * (c * self.scale).to(h.dtype)
        return F.linear(h, self.lora_B.to(h.dtype))

    def delta_weight(self) -> torch.Tensor:
        """ΔW (d_out, d_in) in fp32: what merge adds to the base weight."""
        B = self.lora_B.float()
        c = self.component_scale()
        if c is not None:
            B = B * c.float()
        return (B @ self.lora_A.float()) * self.scale

    # --- shared behaviour ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.branch(x)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def effective_rank(self) -> int:
        c = self.component_scale()
        if c is None:
            return self.rank
        return int((c.detach() != 0).sum().item())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, scale={self.scale:g}"


@dataclass
class PeftLoraExport:
    """An adapter expressed as an HF PEFT `LoraConfig` adapter (what export.py writes to adapter/).

    `tensors[module_path]` holds "lora_A" (r_i, d_in), "lora_B" (d_out, r_i) and, for DoRA, "magnitude"
    (d_out,). PEFT scales module i by alpha_i / r_i (or alpha_i / √r_i with rsLoRA), where r_i comes from
    `rank_pattern` (default `r`) and alpha_i from `alpha_pattern` (default `lora_alpha`); a method whose own
    scale differs folds it into B or sets alpha_pattern. A module with no kept component is left out.
    """

    r: int
    lora_alpha: float
    tensors: dict[str, dict[str, torch.Tensor]]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False


@dataclass
class TargetInfo:
    """One adapted matrix: its module path, transformer block index and role (q, k, v, ...)."""

    name: str
    layer_index: int
    role: str


class AdapterMethod(ABC):
    """Base class for a registered method. Subclasses implement `make_layer` and usually `ledger_row`.

    Life cycle: constructed from its config dict and the budget → `attach(model, targets)` → the trainer
    optimizes `trainable_parameters()` (plus the task head), adds `regularizer()` to the loss and calls
    `hooks()` → `rank_pattern()` / `ledger()` / `adapter_state_dict()` for the results contract.
    """

    name: str = "base"

    @property
    def mergeable(self) -> bool:
        """Whether `merge()` is an exact, reversible fold into the base weights in the current state.

        A method that cannot merge (e.g. an active input-dependent gate) returns False and its `merge()`
        raises `ConfigError` saying why.
        """
        return True

    def __init__(self, config: dict[str, Any], budget: Budget) -> None:
        self.config = dict(config)
        self.budget = budget
        self.layers: dict[str, nn.Module] = {}
        self.targets: dict[str, TargetInfo] = {}

    # --- building -----------------------------------------------------------------------------------
    @abstractmethod
    def make_layer(self, base: nn.Linear, target: TargetInfo) -> nn.Module:
        """The method's layer wrapping the frozen `base` of one target (what `attach` swaps in)."""

    def attach(self, model: nn.Module, targets: list[TargetInfo]) -> None:
        """Replace each target `nn.Linear` of `model` in place by the method's layer."""
        for t in targets:
            parent_name, _, child = t.name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, child)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"target {t.name} is {type(base).__name__}, not nn.Linear")
            layer = self.make_layer(base, t)
            setattr(parent, child, layer)
            self.layers[t.name] = layer
            self.targets[t.name] = t
        self.after_attach(model)

    def after_attach(self, model: nn.Module) -> None:
        """Called once all layers exist (e.g. to build global score buffers)."""

    # --- what the trainer uses ----------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            for p in layer.parameters():
                if p.requires_grad:
                    yield p

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for lname, layer in self.layers.items():
            for pname, p in layer.named_parameters():
                if p.requires_grad:
                    yield f"{lname}.{pname}", p

    def regularizer(self) -> torch.Tensor | None:
        """Extra loss term added to the task loss (None when the method has none)."""
        return None

    def hooks(self) -> list:
        """Objects the trainer calls at fixed points (see training/hooks.py)."""
        return []

    # --- what the results contract uses -------------------------------------------------------------
    def rank_pattern(self) -> dict[str, int]:
        return {name: layer.effective_rank() for name, layer in self.layers.items()}

    def ledger_row(self, name: str, layer: nn.Module) -> LedgerRow:
        d_in, d_out, r = layer.in_features, layer.out_features, layer.effective_rank()
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        return LedgerRow(name=name, d_in=d_in, d_out=d_out, rank=r, trainable_now=trainable,
                         stored_at_end=r * (d_in + d_out))

    def ledger(self) -> Ledger:
        return Ledger([self.ledger_row(n, layer) for n, layer in self.layers.items()])

    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge()

    # Whether evaluation may run through merged weights (`merged_for_eval`). A method whose merge has side effects
    # beyond the base weight (XGBLoRA accumulates merged boosters) turns it off.
    merge_for_eval: bool = True

    @contextmanager
    def merged_for_eval(self) -> Iterator[bool]:
        """Evaluate through merged weights, then give the training weights back bit for bit.

        An unmerged adapter costs extra matmuls on every forward; merged, inference costs what the backbone
        costs. Each adapted layer gets a merged *copy* of its base weight as a new Parameter and the original
        Parameter object is put back afterwards, untouched: no floating-point unmerge error, no in-place
        change the optimizer or a checkpoint could notice. Yields whether it merged (False when the method
        cannot merge in its current state, e.g. an active input gate).
        """
        if not (self.merge_for_eval and self.mergeable) or not self.layers:
            yield False
            return
        originals = {}
        try:
            with torch.no_grad():
                for name, layer in self.layers.items():
                    if layer.merged:
                        continue
                    original = layer.base.weight
                    originals[name] = (original, getattr(layer, "_merge_norm", None))
                    layer.base.weight = nn.Parameter(original.detach().clone(), requires_grad=False)
                    layer.merge()
            yield True
        finally:
            for name, (original, merge_norm) in originals.items():
                layer = self.layers[name]
                layer.base.weight = original
                layer.merged = False
                if hasattr(layer, "_merge_norm"):
                    layer._merge_norm = merge_norm

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (parameters and method buffers), keyed by module path."""
        out = {}
        for lname, layer in self.layers.items():
            for key, t in layer.state_dict().items():
                if key.startswith("base."):
                    continue
                out[f"{lname}.{key}"] = t.detach().clone()
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for lname, layer in self.layers.items():
            own = {k[len(lname) + 1:]: v for k, v in state.items() if k.startswith(lname + ".")}
            missing = [k for k in layer.state_dict() if not k.startswith("base.") and k not in own]
            if missing:
                raise KeyError(f"adapter state for {lname} lacks {missing}")
            layer.load_state_dict(own, strict=False)

    def to_peft(self) -> PeftLoraExport | None:
        """This adapter as an HF PEFT LoRA adapter, or None when the method has no such form."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Schedule state that is not a tensor of a layer (importance EMAs, masks, step counters)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> str:
        return self.name

