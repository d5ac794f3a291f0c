"""The method interface and the low-rank layer core every method shares.

A method turns a frozen backbone into an adapted one: `attach` swaps each target `nn.Linear` for the method's
layer, and the trainer sees only `trainable_parameters()`, `regularizer()` and `hooks()`. Everything the
reporter needs (ledger, rank pattern) comes from here too, so the trainer never names a method.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..budget import Budget, Ledger, LedgerRow
from ..errors import ConfigError
from ..training.hooks import ScheduleHook, TrainState
from ..validate import check_field_types, did_you_mean


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


class FoldedLowRank(torch.autograd.Function):
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


# --- adapter dropout ----------------------------------------------------------------------------------------

def draw_keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str) -> torch.Tensor:
    """A bool mask of `shape`, each entry True (kept) with probability 1 − p, independently: dropout's mask.

    On the CPU the bits come from numpy's PCG64, seeded by one draw from torch's default generator (so
    `torch.manual_seed` and a checkpoint's RNG state decide the mask, as they do torch's dropout). torch's CPU
    `bernoulli_` costs ~14 ns an entry on this project's CPU (47% of a LoRA step at adapter dropout 0.1 on all
    36 maps); this costs ~0.5–1 ns. Each entry reads one random byte r: dropped when r < ⌊256·p⌋, kept
    when r > ⌊256·p⌋, and the tie (1/256 of the entries, found word by word) is decided by 32 more bits, so the
    keep probability is 1 − p to within 2⁻⁴⁰ (torch's float uniforms: 2⁻²⁴). A large mask is drawn in blocks on
    torch's threads (PCG64 jumps ahead to a block's start, so the mask does not depend on the threads), into a
    recycled buffer (`_mask_buffer`). Elsewhere (CUDA) the device's own generator draws.
    """
    device = torch.device(device)
    if p <= 0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if p >= 1:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)))
    n_words = (n + 7) // 8  # one random 64-bit word holds 8 entries' bytes; the tail of the last one is unused
    keep = _mask_buffer(8 * n_words)  # the mask outlives this call (until backward)
    is_tie = _scratch("tie", 8 * n_words).view(np.bool_)
    cut = p * 256.0
    whole = int(cut)
    frac = cut - whole

    # one block per thread: PCG64 jumps to a block's first word, so the split does not change the mask
    parts = max(1, min(torch.get_num_threads(), n_words // _MIN_BLOCK_WORDS))
    bounds = [n_words * k // parts for k in range(parts + 1)]

    def block(k: int) -> np.ndarray | None:
        lo, hi = bounds[k], bounds[k + 1]
        bits = np.random.PCG64(seed)
        bits.advance(lo)
        r = bits.random_raw(hi - lo).view(np.uint8)
        out, tie = keep[8 * lo:8 * hi], is_tie[8 * lo:8 * hi]
        if frac == 0.0:
            np.greater_equal(r, whole, out=out)
            return None
        np.equal(r, whole, out=tie)
        np.greater(r, whole, out=out)
        words = np.flatnonzero(tie.view(np.uint64) != 0)  # the words holding a tie: 8x fewer entries to scan
        at = np.flatnonzero(tie.view(np.uint64)[words].view(np.bool_))
        return (lo + words[at // 8]) * 8 + at % 8

    ties = [t for t in _map_on_threads(block, range(parts)) if t is not None]
    if ties and sum(t.size for t in ties):
        ties = np.concatenate(ties)
        bits = np.random.PCG64(seed)
        bits.advance(n_words)  # the words after the mask's: U = (r + V)/256 with V from 32 bits, kept when V >= frac
        keep[ties] = (bits.random_raw(ties.size) >> np.uint64(32)) >= math.ceil(frac * 2.0**32)
    return torch.from_numpy(keep[:n]).view(shape)


_MIN_BLOCK_WORDS = 1 << 14  # a mask is split over threads in blocks of at least 128 Ki entries
_mask_buffers: list[np.ndarray] = []  # the masks' buffers of recent steps, in use or free
_MASK_BUFFERS_KEPT = 128


def _mask_buffer(nbytes: int) -> np.ndarray:
    """A bool buffer of `nbytes` for a dropout mask, recycled: a mask lives from its forward to its backward, and
    fresh memory costs page faults here (~0.5 ns a byte, a third of drawing the mask). A buffer is free again
    when no array or tensor refers to it any more (its reference count is ours alone); one at most twice the
    size asked for is reused, so varying sequence lengths reuse the buffers of longer batches."""
    with _mask_lock:
        best = None
        for buf in _mask_buffers:
            # references: the list's, the loop variable's and getrefcount's argument
            if nbytes <= buf.size <= 2 * nbytes and sys.getrefcount(buf) <= 3 and (best is None or buf.size < best.size):
                best = buf
        if best is None:
            best = np.empty(nbytes, dtype=np.bool_)
            _mask_buffers.append(best)
            if len(_mask_buffers) > _MASK_BUFFERS_KEPT:  # forget the smallest free ones (sizes change with the data)
                free = sorted((b for b in _mask_buffers if sys.getrefcount(b) <= 3 and b is not best), key=len)
                forget = {id(b) for b in free[:len(_mask_buffers) - _MASK_BUFFERS_KEPT]}
                del free
                # by identity: list.remove would compare arrays with ==, element by element
                _mask_buffers[:] = [b for b in _mask_buffers if id(b) not in forget]
        return best[:nbytes]


_mask_lock = threading.Lock()
_threads = threading.local()
_pool: tuple[int, int, Any] | None = None  # (pid, workers, ThreadPoolExecutor)


def _map_on_threads(fn, items) -> list:
    """`[fn(i) for i in items]`, the first item on this thread and the others on a pool's threads at once. numpy
    releases the GIL in its random draws and elementwise loops, and torch's own threads idle meanwhile."""
    global _pool
    items = list(items)
    if len(items) < 2 or getattr(_threads, "in_pool", False):
        return [fn(i) for i in items]
    workers = len(items) - 1
    if _pool is None or _pool[0] != os.getpid() or _pool[1] < workers:  # a forked child does not inherit threads
        from concurrent.futures import ThreadPoolExecutor

        _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="lorabench-mask",
                                                          initializer=lambda: setattr(_threads, "in_pool", True)))
    others = [_pool[2].submit(fn, i) for i in items[1:]]
    first = fn(items[0])
    return [first] + [f.result() for f in others]


def _scratch(name: str, nbytes: int) -> np.ndarray:
    """A reused uint8 buffer of at least `nbytes` for a temporary that dies within one call (per thread): fresh
    activation-sized memory costs page faults on every call, a reused buffer does not."""
    buffers = _threads.__dict__
    buf = buffers.get(name)
    if buf is None or buf.size < nbytes:
        buf = buffers[name] = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


def float_mask(keep: torch.Tensor, like: torch.Tensor, temporary: bool = False) -> torch.Tensor:
    """`keep` as a 0/1 tensor of `like`'s dtype, for the caller to write into. `temporary`: a reused buffer
    (on the CPU), valid until the next call (a fused function's forward or backward uses it and lets go).

    Copied from the mask's bytes read as uint8: torch's uint8 → float copy is vectorized (~0.1 ns an entry here),
    its bool → float copy and `x * keep` with a bool or uint8 mask are not (~0.6–0.8 ns)."""
    if keep.device.type != "cpu":
        return keep.to(like.dtype)
    if temporary:
        out = torch.from_numpy(_scratch("float_mask", keep.numel() * like.element_size())).view(like.dtype)
    else:
        out = torch.empty(keep.numel(), dtype=like.dtype)
    return out.view(keep.shape).copy_(keep.view(torch.uint8))


def keep_scale(p: float) -> float:
    """1/(1 − p), what kept entries are multiplied by (0 when everything is dropped)."""
    return 0.0 if p >= 1 else 1.0 / (1.0 - p)


class _KeepScale(torch.autograd.Function):
    """`x ⊙ keep / (1 − p)` that saves the bool mask (1 byte an entry) for backward, not a float copy."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.scale = scale
        ctx.save_for_backward(keep)
        return _masked_scaled(x, keep, scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _masked_scaled(grad, keep, ctx.scale), None, None


def _masked_scaled(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """`x ⊙ keep · scale` as a new tensor in one pass over x (`0 + scale·mask·x`: one rounding, also in bf16)."""
    return torch.addcmul(x.new_zeros(()), float_mask(keep, x, temporary=True), x, value=scale)


class AdapterDropout(nn.Dropout):
    """`nn.Dropout` on an adapter's input with a cheap mask (`draw_keep_mask`): same distribution, a
    different random stream than torch's dropout.

    `keep_mask(x)` is the one place a mask is drawn, by this module's forward and by the fused paths of
    `LowRankLinear` alike, so on the CPU both paths see the same mask for the same seed. When `shared` is set (a
    `SharedInputGroup` with `shared_dropout_mask`), the members reading one input take one mask.

    On a GPU the forward is torch's own dropout: one fused kernel each way, where drawing and applying a bool
    mask takes four or more launches (at MiniLM's size a step there is launch-bound: LoRA ran 1.38x PEFT's step
    time at dropout 0.1 that way, bench/results/step_time_cuda_bf16.md). Same distribution, another stream.
    """

    def __init__(self, p: float) -> None:
        super().__init__(p)
        self.shared: SharedInputGroup | None = None

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.shared.keep_mask(self, x)
        return draw_keep_mask(x.shape, self.p, x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" and self.shared is None:
            return super().forward(x)
        return _KeepScale.apply(x, self.keep_mask(x), keep_scale(self.p))


class _DroppedLowRank(torch.autograd.Function):
    """`y = x W0ᵀ + b + ((x ⊙ keep) Aᵀ ⊙ cs/(1 − p)) Bᵀ`: a low-rank adapter with active input dropout, for an fp32
    call. The base GEMM reads the clean x and the dropped input appears only on the r-wide side.

    Autograd's form writes and keeps a dropped copy of x per adapter (4 bytes an entry, plus dropout's own
    mask), a separate d_out-wide adapter output and its add, and in backward the d_in-wide dropout gradient and
    its add to ∂x. Here: 1/(1 − p) rides on the r-wide cs; the adapter output is the buffer the base GEMM
    accumulates into (β = 1); in backward `∂x = ((u ⊙ cs') A) ⊙ keep + ∂Y W0` is accumulated the same way; the
    dropped x is recomputed from x and the bool mask for ∂A. Saved: x (often saved anyway, and shared by
    q/k/v), the bool mask (1 byte an entry) and the r-wide hidden. With u = ∂Y B, cs' = cs/(1 − p):
        ∂A = (u ⊙ cs')ᵀ (x ⊙ keep),  ∂B = (hᵀ ∂Y)ᵀ diag(cs'),  ∂cs = Σ_tokens u ⊙ h / (1 − p),  h = (x ⊙ keep) Aᵀ.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, cs, keep, scale):
        x2 = x.reshape(-1, x.shape[-1])
        h = float_mask(keep, x2, temporary=True).view(x2.shape).mul_(x2) @ lora_A.t()  # the dropped x, for h only
        hs = h * (cs * scale)
        out = hs @ lora_B.t() if bias is None else torch.addmm(bias, hs, lora_B.t())
        out.addmm_(x2, weight.t())
        ctx.scale = scale
        ctx.save_for_backward(x, keep, h, weight, lora_A, lora_B, cs)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, keep, h, weight, lora_A, lora_B, cs = ctx.saved_tensors
        need_x, _, _, need_A, need_B, need_cs, _, _ = ctx.needs_input_grad
        scale = ctx.scale
        g = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        mask = float_mask(keep, x2, temporary=True).view(x2.shape)
        cs_scaled = cs * scale
        u = (lora_B.t() @ g.t()).t()  # ∂Y B on the fast side of the GEMM (_UpProjection)
        us = u * cs_scaled
        grad_x = grad_A = grad_B = grad_cs = None
        if need_x:
            grad_x = (us @ lora_A).mul_(mask).addmm_(g, weight).view(x.shape)
        if need_A:
            grad_A = us.t() @ mask.mul_(x2)  # the dropped x, recomputed (the mask is not needed after this)
        if need_B:
            grad_B = (h.t() @ g).t() * cs_scaled
        if need_cs:
            grad_cs = (u * h).sum(dim=0) * scale
        return grad_x, None, None, grad_A, grad_B, grad_cs, None, None


class _DroppedDown(torch.autograd.Function):
    """`h = (x ⊙ keep) Wᵀ / (1 − p)`: an adapter's down-projection of its dropped input, for an fp32 call of a layer
    that adds its branch itself (`branch()` / `down()`: xgblora's boosters, a gated dynamic_lora).

    `F.linear(dropout(x), W)` writes a dropped fp32 copy of x and keeps it (plus dropout's mask) for ∂W; here the
    copy is a reused buffer, gone after the r-wide product, and backward recomputes it from x and the bool mask:
        ∂x = (∂h W) ⊙ keep / (1 − p),  ∂W = ∂hᵀ (x ⊙ keep) / (1 − p).
    """

    @staticmethod
    def forward(ctx, x, weight, keep, scale):
        x2 = x.reshape(-1, x.shape[-1])
        h = (float_mask(keep, x2, temporary=True).view(x2.shape).mul_(x2) @ weight.t()).mul_(scale)
        ctx.scale = scale
        ctx.save_for_backward(x, weight, keep)
        return h.view(*x.shape[:-1], h.shape[-1])

    @staticmethod
    def backward(ctx, grad_h):
        x, weight, keep = ctx.saved_tensors
        need_x, need_w, _, _ = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        g = grad_h.reshape(-1, grad_h.shape[-1]) * ctx.scale
        mask = float_mask(keep, x2, temporary=True).view(x2.shape)
        grad_x = grad_w = None
        if need_x:
            grad_x = (g @ weight).mul_(mask).view(x.shape)
        if need_w:
            grad_w = g.t() @ mask.mul_(x2)
        return grad_x, grad_w, None, None


class SharedInputGroup:
    """Adapters that read one input tensor (q, k and v of an attention block) run their down-projections as one
    stacked matmul: `x [A_q; A_k; A_v]ᵀ` instead of three r-wide products [performance, same math].

    The first member called with a new x computes every member's hidden and caches it; the others take their
    slice when they are called with the *same tensor object* (identity, not equality) and compute their own
    otherwise, so an architecture where the members read different inputs is still exact, only not faster.
    The cache holds x and the hidden only until every member has taken its slice. Only used while no member's
    dropout is active: with dropout each member keeps its own mask, as in PEFT and the papers' code.

    `shared_dropout_mask` (opt-in, `+method.shared_dropout_mask=true`) gives the members one dropout mask per
    input instead: drawn by the first member called with a new x, taken by the others in the same way as the
    hidden. That correlates the noise of q, k and v (unlike PEFT and the reference code) for fewer random draws.
    """

    def __init__(self, layers: list["LowRankLinear"], shared_dropout_mask: bool = False) -> None:
        self.layers = layers
        self._x: torch.Tensor | None = None
        self._hidden: dict[int, torch.Tensor] = {}
        self._mask_x: torch.Tensor | None = None
        self._masks: dict[int, torch.Tensor] = {}
        if shared_dropout_mask:
            for member in layers:
                if isinstance(member.dropout, AdapterDropout):
                    member.dropout.shared = self

    def keep_mask(self, dropout: AdapterDropout, x: torch.Tensor) -> torch.Tensor:
        """The members' common dropout mask for input x (`AdapterDropout.keep_mask` of a member)."""
        if self._mask_x is not x:
            mask = draw_keep_mask(x.shape, dropout.p, x.device)
            self._mask_x = x
            self._masks = {id(member.dropout): mask for member in self.layers}
        mask = self._masks.pop(id(dropout), None)
        if mask is None:  # this member already took the mask of this x: a second call draws afresh
            return draw_keep_mask(x.shape, dropout.p, x.device)
        if not self._masks:
            self._mask_x = None
        return mask

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
        self.dropout = AdapterDropout(dropout) if dropout > 0 else nn.Identity()
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
            if isinstance(self.dropout, AdapterDropout) and self.fp32_any_dropout(x):  # no dropped copy kept
                return _DroppedDown.apply(x, self.down_weight(), self.dropout.keep_mask(x), keep_scale(self.dropout.p))
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

    def fp32_any_dropout(self, x: torch.Tensor) -> bool:
        """An fp32 call without autocast, with the fused paths allowed (`fold_low_rank`)."""
        return (self.allow_fold and x.dtype == torch.float32
                and self.base.weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type))

    def fp32_call(self, x: torch.Tensor) -> bool:
        """An fp32 call without autocast or active dropout: where the fused paths apply (training steps and
        unmerged evaluation alike; without a graph a fused function only runs its forward)."""
        return self.fp32_any_dropout(x) and not self.dropout_active()

    def fold_now(self, x: torch.Tensor) -> bool:
        """Whether this call runs folded (`FoldedLowRank`): fp32, no autocast, no active dropout."""
        return self.can_fold() and self.fp32_call(x)

    def fuse_dropout_now(self, x: torch.Tensor) -> bool:
        """Whether this call runs the fused dropout path (`_DroppedLowRank`, DoRA's `_DroppedDora`): an fp32 call
        with active `AdapterDropout` on a layer whose update has no input-dependent part."""
        return (self.can_fold() and isinstance(self.dropout, AdapterDropout) and self.dropout_active()
                and self.fp32_any_dropout(x))

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
            return FoldedLowRank.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                                       self.hidden_scale(), None)
        if self.fuse_dropout_now(x):
            return _DroppedLowRank.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                                         self.hidden_scale(), self.dropout.keep_mask(x), keep_scale(self.dropout.p))
        return self.base(x) + self.branch(x)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.base.weight
        w.copy_(self.merged_weight(w.float()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base.weight
        w.copy_(self.unmerged_weight(w.float()).to(w.dtype))
        self.merged = False

    def merged_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """The weight `merge()` writes, from the fp32 base weight W0 (a subclass with another merge overrides
        this pair)."""
        return w0 + self.delta_weight()

    def unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W0 back from the fp32 merged weight `w`."""
        return w - self.delta_weight()

    def forget_merge(self) -> None:
        """The unmerged base weight is back in place (an evaluation merged a copy of it): unmerged again, with
        nothing that `merge()` cached kept."""
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


@dataclass(frozen=True)
class MethodOptions:
    """A method's options: each method subclasses this with its own fields, and the subclass's defaults are the
    method's defaults (conf/method/<name>.yaml documents them; tests/test_registry.py checks that the two agree).

    The switches here are every method's: None keeps the method's class default (AdapterMethod below); comparison
    runs set them with `+method.fold_low_rank=false` and the like, so the YAMLs do not list them.
    """

    fold_low_rank: bool | None = None
    stack_shared_inputs: bool | None = None
    shared_dropout_mask: bool | None = None

    SWITCHES: ClassVar[tuple[str, ...]] = ("fold_low_rank", "stack_shared_inputs", "shared_dropout_mask")

    @classmethod
    def from_dict(cls, method: str, values: dict[str, Any]) -> "MethodOptions":
        """The options from a config group (its `name` ignored): unknown keys get a "did you mean", values of the
        wrong type one error naming the key, values in another form ("8", "true", 3.0 for 3) are converted, then
        the subclass's `validate` checks ranges."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key != "name" and key not in known:
                raise ConfigError(f"method {method} has no option {key!r}{did_you_mean(key, known)}; its options: "
                                  f"{', '.join(known)}")
        options = cls(**{k: v for k, v in values.items() if k != "name"})
        check_field_types(options, "method")
        dropout = getattr(options, "dropout", None)  # every method's adapter-input dropout, where it has one
        if dropout is not None and not 0.0 <= dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {dropout}")
        options.validate()
        return options

    def validate(self) -> None:
        """Raise ConfigError for a value out of range (subclasses; the types, and `dropout` where there is one,
        are checked already)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AdapterMethod(ABC):
    """Base class for a registered method. Subclasses implement `make_layer` and usually `ledger_row`.

    Life cycle: constructed from its config dict and the budget → `attach(model, targets)` → the trainer
    optimizes `trainable_parameters()` (plus the task head), adds `regularizer()` to the loss and calls
    `hooks()` → `rank_pattern()` / `ledger()` / `adapter_state_dict()` for the results contract.
    """

    name: str = "base"
    Options: type[MethodOptions] = MethodOptions  # the method's typed options (a subclass per method)

    @property
    def mergeable(self) -> bool:
        """Whether `merge()` is an exact, reversible fold into the base weights in the current state.

        A method that cannot merge (e.g. an active input-dependent gate) returns False and its `merge()`
        raises `ConfigError` saying why.
        """
        return True

    def __init__(self, config: dict[str, Any], budget: Budget) -> None:
        self.options = self.Options.from_dict(self.name, config)
        self.config = dict(config)  # as given (the run's config group); the values to use are in self.options
        self.budget = budget
        # overrides of the class defaults of the speed switches (tests compare each with the plain path)
        for key in MethodOptions.SWITCHES:
            if getattr(self.options, key) is not None:
                setattr(self, key, getattr(self.options, key))
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

    # Whether a layer may run fp32 calls through the fused paths (`FoldedLowRank`, dynamic_lora's gated one).
    fold_low_rank: bool = True

    # q, k and v of one block read the same hidden states (true of every model config in conf/model)
    SHARED_INPUT_ROLES = ("query", "key", "value")
    # Whether `attach` groups those layers for one stacked down-projection (SharedInputGroup). A method whose
    # layers have no `down()` path (or a test comparing both paths) turns it off.
    stack_shared_inputs: bool = True
    # Opt-in: the grouped q/k/v layers take one adapter-dropout mask per input instead of one each
    # (SharedInputGroup); off by default, as in the papers' code and PEFT.
    shared_dropout_mask: bool = False

    def group_shared_inputs(self) -> None:
        by_block: dict[int, list[LowRankLinear]] = {}
        for name, t in self.targets.items():
            layer = self.layers[name]
            if t.role in self.SHARED_INPUT_ROLES and isinstance(layer, LowRankLinear):
                by_block.setdefault(t.layer_index, []).append(layer)
        for members in by_block.values():
            if len(members) > 1:
                group = SharedInputGroup(members, shared_dropout_mask=self.shared_dropout_mask)
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
                    originals[name] = original
                    layer.base.weight = nn.Parameter(original.detach().clone(), requires_grad=False)
                    layer.merge()
            yield True
        finally:
            for name, original in originals.items():
                layer = self.layers[name]
                layer.base.weight = original
                layer.forget_merge()

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

