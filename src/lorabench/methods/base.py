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
from ..training.hooks import ScheduleHook, TrainState


class _UpProjection(torch.autograd.Function):
    """`h Bᵀ` for a skinny hidden h (..., r) and B (d_out, r): F.linear(h, B), with a faster backward.

    Autograd's linear backward computes `∂B = gᵀ h` and `∂h = g B` with the activation-sized gradient g
    (tokens × d_out) on the transposed, slow side of the GEMM. Taken as `(hᵀ g)ᵀ` and `(Bᵀ gᵀ)ᵀ`, the same
    products run 3–6× faster on this project's CPU (MKL; r = 8, 2048 tokens, d_out 384 / 1536: ∂B 1.5 → 0.23 ms and
    7.9 → 1.7 ms). Same math; only the summation order of the fp reductions can differ.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        return F.linear(h, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_h = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_h = (weight.t() @ g.t()).t().reshape(h.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = (h.reshape(-1, h.shape[-1]).t() @ g).t()
        return grad_h, grad_weight


def up_project(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(h, weight)` for the r-wide hidden of an adapter (see `_UpProjection`); plain F.linear where no
    gradient is needed (eval), which saves the autograd node."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _UpProjection.apply(h, weight)
    return F.linear(h, weight)


class _FoldedLowRank(torch.autograd.Function):
    """`y = x (W0 + B diag(cs) A)ᵀ + b`, or with DoRA's gain g (None: no gain) `g ⊙ (x (W0 + B diag(cs) A)ᵀ) + b`:
    a low-rank adapter folded into the frozen weight for one fp32 call.

    Unfolded, the adapter costs two activation-sized passes in forward (the d_out-wide `h Bᵀ` and its add
    to the base output) and two in backward (`∂h A` and its add to ∂x). Folded, x meets one weight
    `W' = W0 + B diag(cs) A` (a d_out×d_in×r product, formed again in backward instead of stored), so forward
    and ∂x cost what the frozen backbone costs; the adapter's own gradients need only r-wide products:
        u = ∂Y B,  ∂A = (u ⊙ cs)ᵀ x,  ∂B = (hᵀ ∂Y)ᵀ diag(cs),  ∂cs = Σ_tokens u ⊙ h,   h = x Aᵀ.
    With a gain g (d_out,), g moves onto the weights in backward instead of writing `∂z = ∂Y ⊙ g`:
    ∂x = ∂Y (diag(g) W'), u = ∂Y diag(g) B, ∂B gets diag(g), and ∂g = Σ_tokens ∂Y ⊙ z with z = x W'ᵀ saved.
    Same function and gradients as the unfolded form up to fp32 rounding (W0 + ΔW is rounded once per call).
    Only used in fp32 without adapter dropout: under bf16/fp16 a small ΔW would be lost in the rounding of
    W0 + ΔW, and with dropout the base and the adapter see different inputs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, cs, gain):
        h = F.linear(x, lora_A)  # r-wide; kept for ∂B and ∂cs
        folded = torch.addmm(weight, lora_B * cs, lora_A)
        if gain is None:
            z, y = None, F.linear(x, folded, bias)
        else:
            z = F.linear(x, folded)
            y = z * gain if bias is None else torch.addcmul(bias, z, gain)
        ctx.save_for_backward(x, h, z, weight, lora_A, lora_B, cs, gain)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, z, weight, lora_A, lora_B, cs, gain = ctx.saved_tensors
        need_x, _, _, need_A, need_B, need_cs, need_gain = ctx.needs_input_grad
        g = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        h2 = h.reshape(-1, h.shape[-1])
        row_gain = None if gain is None else gain[:, None]
        grad_x = grad_A = grad_B = grad_cs = grad_gain = None
        if need_x:
            folded = torch.addmm(weight, lora_B * cs, lora_A)
            grad_x = (g @ (folded if row_gain is None else folded * row_gain)).reshape(x.shape)
        if need_A or need_cs:
            gained_B = lora_B if row_gain is None else lora_B * row_gain
            u = (gained_B.t() @ g.t()).t()  # ∂Y diag(g) B as (Bᵀ ∂Yᵀ)ᵀ: the fast side of the GEMM (_UpProjection)
            if need_A:
                grad_A = (u * cs).t() @ x2
            if need_cs:
                grad_cs = (u * h2).sum(dim=0)
        if need_B:
            grad_B = (h2.t() @ g).t() * cs
            if row_gain is not None:
                grad_B = grad_B * row_gain
        if need_gain:
            grad_gain = (g * z.reshape(-1, z.shape[-1])).sum(dim=0)
        return grad_x, None, None, grad_A, grad_B, grad_cs, grad_gain


class SharedInputGroup:
    """Adapters that read one input tensor (q, k and v of an attention block) run their down-projections as one
    stacked matmul: `x [A_q; A_k; A_v]ᵀ` instead of three r-wide products [performance, same math].

    The first member called with a new x computes every member's hidden and caches it; the others take their
    slice when they are called with the *same tensor object* (identity, not equality) and compute their own
    otherwise, so an architecture where the members read different inputs is still exact, only not faster.
    The cache holds x and the hidden only until every member has taken its slice. Only used while no member's
    dropout is active: with dropout each member keeps its own mask, as in PEFT.
    """

    def __init__(self, layers: list["LowRankLinear"]) -> None:
        self.layers = layers
        self._x: torch.Tensor | None = None
        self._hidden: dict[int, torch.Tensor] = {}

    def down(self, layer: "LowRankLinear", x: torch.Tensor) -> torch.Tensor:
        if self._x is not x:
            weights = [member.down_weight() for member in self.layers]
            stacked = F.linear(x, torch.cat(weights).to(x.dtype))
            parts = stacked.split([w.shape[0] for w in weights], dim=-1)
            self._x = x
            self._hidden = {id(member): h for member, h in zip(self.layers, parts)}
        h = self._hidden.pop(id(layer), None)
        if h is None:  # this member already took its slice of this x: a second call, compute it afresh
            return F.linear(x, layer.down_weight().to(x.dtype))
        if not self._hidden:
            self._x = None  # all slices taken: hold no activation between calls
        return h


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
        self.shared_input: SharedInputGroup | None = None  # set by AdapterMethod.attach for q/k/v
        self.allow_fold = True  # AdapterMethod.attach sets it from the method's `fold_low_rank`
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # loralib / peft default: A ~ kaiming_uniform(a=√5) = U(±1/√d_in), B = 0, so ΔW = 0 at init.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # --- what subclasses override -------------------------------------------------------------------
    def component_scale(self) -> torch.Tensor | None:
        """Per-component multiplier of shape (r,), or None (plain LoRA)."""
        return None

    def down_weight(self) -> torch.Tensor:
        """The rows the input is multiplied by on the way down: A (r, d_in); a subclass may append rows."""
        return self.lora_A

    def dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """`drop(x) · down_weight()ᵀ`, through the shared-input group's stacked matmul when it can be used."""
        if self.dropout_active():
            return F.linear(self.dropout(x), self.down_weight().to(x.dtype))
        if self.shared_input is not None:
            return self.shared_input.down(self, x)
        # `.to(dtype)` is a no-op in fp32; it lets a low-precision backbone run without autocast, and under
        # autocast F.linear casts both operands itself.
        return F.linear(x, self.down_weight().to(x.dtype))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive contribution for input x (dropout applied here)."""
        # scale the r-wide hidden rather than the d_out-wide output: the same product for r/d_out of the work
        h = self.down(x)  # under autocast h is already low precision while x is not: cast to h's dtype
        h = h * self.hidden_scale().to(h.dtype)
        return up_project(h, self.lora_B.to(h.dtype))

    def hidden_scale(self) -> torch.Tensor:
        """`cs = s·c`, shape (r,): what multiplies the hidden `x Aᵀ` (c = 1 for plain LoRA)."""
        c = self.component_scale()
        if c is None:
            return self.lora_A.new_full((self.rank,), self.scale)
        return c * self.scale

    def can_fold(self) -> bool:
        """Whether this layer's update is `B diag(hidden_scale()) A` for every input (no input-dependent part);
        a subclass whose branch has one returns False."""
        return True

    def fp32_call(self, x: torch.Tensor) -> bool:
        """An fp32 call without autocast or active dropout: where the fused paths apply (training steps and
        unmerged evaluation alike; without a graph a fused function only runs its forward)."""
        return (self.allow_fold and x.dtype == torch.float32
                and self.base.weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
                and not self.dropout_active())

    def fold_now(self, x: torch.Tensor) -> bool:
        """Whether this call runs folded (`_FoldedLowRank`): fp32, no autocast, no active dropout."""
        return self.can_fold() and self.fp32_call(x)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (d_out, d_in) in fp32: what merge adds to the base weight."""
        B = self.lora_B.float()
        c = self.component_scale()
        if c is not None:
            B = B * c.float()
        return (B @ self.lora_A.float()) * self.scale

    # --- shared behaviour ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.fold_now(x):
            return _FoldedLowRank.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                                        self.hidden_scale(), None)
        return self.base(x) + self.branch(x)

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
        # overrides of the class defaults of the two speed paths (tests compare each with the plain path)
        for key in ("stack_shared_inputs", "fold_low_rank"):
            if key in self.config:
                setattr(self, key, bool(self.config[key]))
        self.layers: dict[str, nn.Module] = {}
        self.targets: dict[str, TargetInfo] = {}
        self._schedule_hook: ScheduleHook | None = None

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
            if isinstance(layer, LowRankLinear):
                layer.allow_fold = self.fold_low_rank
        if self.stack_shared_inputs:
            self.group_shared_inputs()
        self.after_attach(model)

    # Whether a layer may run fp32 calls through the fused paths (`_FoldedLowRank`, dynamic_lora's gated one).
    fold_low_rank: bool = True

    # q, k and v of one block read the same hidden states (true of every model config in conf/model)
    SHARED_INPUT_ROLES = ("query", "key", "value")
    # Whether `attach` groups those layers for one stacked down-projection (SharedInputGroup). A method whose
    # layers have no `down()` path (or a test comparing both paths) turns it off.
    stack_shared_inputs: bool = True

    def group_shared_inputs(self) -> None:
        by_block: dict[int, list[LowRankLinear]] = {}
        for name, t in self.targets.items():
            layer = self.layers[name]
            if t.role in self.SHARED_INPUT_ROLES and isinstance(layer, LowRankLinear):
                by_block.setdefault(t.layer_index, []).append(layer)
        for members in by_block.values():
            if len(members) > 1:
                group = SharedInputGroup(members)
                for layer in members:
                    layer.shared_input = group

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

    def on_train_begin(self, state: TrainState) -> None:
        """A schedule's start, with state.total_steps known (a method that overrides this or
        `after_optimizer_step` gets a ScheduleHook)."""

    def after_optimizer_step(self, state: TrainState) -> None:
        """A schedule's step: parameters post-update, gradients still present (pruning, boosting, allocation)."""

    def progress(self) -> dict[str, Any]:
        """A small dict shown in the progress bar and logged under train/ while the method trains."""
        return {}

    def hooks(self) -> list:
        """Objects the trainer calls at fixed points (see training/hooks.py): one ScheduleHook when the method has
        a schedule (overrides on_train_begin / after_optimizer_step)."""
        own = type(self)
        if own.on_train_begin is AdapterMethod.on_train_begin and \
                own.after_optimizer_step is AdapterMethod.after_optimizer_step:
            return []
        if self._schedule_hook is None:  # one hook per method: the trainer may ask twice
            self._schedule_hook = ScheduleHook(self)
        return [self._schedule_hook]

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

