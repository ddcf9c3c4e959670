"""LoRA and QLoRA projections with hand-written backward passes.

One projection computes `Y = X·Wᵀ + bias + s·(D(X)·Aᵀ)·Bᵀ` where W is the frozen base weight
(`[out, in]`, a 16-bit tensor or an `NF4Weight`), A `[r, in]` and B `[out, r]` the adapter, s its
scaling and D the adapter's dropout. Three autograd Functions are built from it:

- `matmul_lora` / `lora_linear`: one projection (O, or any other Linear);
- `lora_qkv`: q, k and v from one X, each with its own adapter and optional bias;
- `lora_mlp`: gate and up, SwiGLU or GEGLU, down; the backward recomputes the activation from
  the saved e and g and overwrites them in place with their gradients.

Backward passes return gradients for X, A, B (and a base bias that requires grad), never for W.
`docs/lora.md` lists what each Function saves and its size per token.

NF4 weights are dequantized into one buffer per device and dtype, in forward and again in
backward (see `clear_dequant_buffers`). `lora_parts(layer)` reads these pieces out of a PEFT
`LoraLayer` over `torch.nn.Linear` or bitsandbytes `Linear4bit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from unsloth_ext.checkpointing import checkpoint_memo, handover, memoized, stash, stashed
from unsloth_ext.nf4 import NF4Weight
from unsloth_ext.ops._library import (acc_dtype, check_float, check_nonempty, check_pad,
                                      check_same_device)
from unsloth_ext.ops.glu import geglu, geglu_backward_, swiglu, swiglu_backward_

__all__ = ["LoraParts", "base_weight", "clear_dequant_buffers", "dropout_keep_mask",
           "lora_linear", "lora_mlp", "lora_parts", "lora_qkv", "matmul_lora"]

Weight = Union[torch.Tensor, NF4Weight]


@dataclass
class LoraParts:
    """One LoRA-wrapped Linear: `Y = X·weightᵀ + bias + scaling·(D(X)·lora_Aᵀ)·lora_Bᵀ`.

    weight: `[out, in]`, a frozen float tensor in the activations' dtype (any float dtype under
    autocast) or an `NF4Weight`.
    bias: `[out]` or None, the activations' dtype or float32.
    lora_A `[r, in]`, lora_B `[out, r]`: the activations' dtype, or float32 beside 16-bit
    activations (gradients come back in their own dtype); None for a plain Linear.
    scaling: the adapter's scale (alpha/r, or alpha/sqrt(r) for rsLoRA).
    dropout_p: dropout on the adapter's input now in effect (0 when the dropout is in eval mode).
    active: False when adapters are disabled. merged: True when the adapter is already merged into
    weight. Either way the LoRA term is skipped.
    """

    weight: Weight
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    dropout_p: float = 0.0
    active: bool = True
    merged: bool = False

    @property
    def uses_lora(self) -> bool:
        """Whether the LoRA term is computed."""
        return self.lora_A is not None and self.active and not self.merged

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the base weight."""
        return tuple(self.weight.shape)

    def dense_weight(self) -> torch.Tensor:
        """The base weight `[out, in]` as a tensor of its own: the tensor itself, or the NF4
        weight dequantized into a new tensor (not the shared buffer) in its dtype."""
        if isinstance(self.weight, torch.Tensor):
            return self.weight
        return self.weight.dequantize()


# --- dequantization buffer ------------------------------------------------------------------------

# One flat buffer per (device, dtype), grown to the largest NF4 weight seen. The Functions use one
# dequantized weight at a time, in stream order, so every weight of a model can share it.
_DEQUANT_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def clear_dequant_buffers() -> None:
    """Free the dequantization buffers (the next NF4 projection allocates a new one)."""
    _DEQUANT_BUFFERS.clear()


def _dense(weight: Weight, dtype: torch.dtype, width: int = 0) -> torch.Tensor:
    """The weight as a dense `[out, in]` tensor in dtype; NF4 weights land in the shared buffer,
    which the next call for the same device and dtype overwrites, except in an offloaded
    checkpoint's recompute, which dequantizes into a tensor of its own and hands it to the
    backward through it (`checkpointing.handover`). A tensor in another dtype (under autocast) is
    cast anew at each call rather than kept from forward to backward.

    width > 0 (NF4 weights only): returns `[out, in + width]`, the weight followed in each row by
    `width` columns for the caller to fill (they hold whatever the buffer held)."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    rows, cols = weight.shape
    wide = handover(("dense weight", id(weight)),
                    lambda: _dequantize_into(weight, torch.empty(
                        rows, cols + width, dtype=weight.dtype, device=weight.packed.device)),
                    lambda: _dequantize_into(weight, _shared_buffer(weight, cols + width)))
    return wide if width else wide[:, :cols]


def _dequantize_into(weight: NF4Weight, wide: torch.Tensor) -> torch.Tensor:
    """wide `[out, in + extra]` with the weight dequantized into its first `in` columns."""
    weight.dequantize(out=wide[:, :weight.shape[1]])
    return wide


def _shared_buffer(weight: NF4Weight, cols: int) -> torch.Tensor:
    """`[out, cols]` over the shared buffer of the weight's device and dtype."""
    numel = weight.shape[0] * cols
    key = (weight.packed.device, weight.dtype)
    buffer = _DEQUANT_BUFFERS.get(key)
    if buffer is None or buffer.numel() < numel:
        _DEQUANT_BUFFERS.pop(key, None)
        del buffer  # free the smaller buffer before allocating the larger one
        buffer = torch.empty(numel, dtype=weight.dtype, device=weight.packed.device)
        _DEQUANT_BUFFERS[key] = buffer
    return buffer[:numel].view(weight.shape[0], cols)


# --- dropout --------------------------------------------------------------------------------------

def dropout_keep_mask(shape: Sequence[int], p: float, dtype: torch.dtype,
                      device: torch.device | str) -> torch.Tensor:
    """Bool keep-mask (True = kept) of `nn.Dropout(p)` applied in training to a tensor of this
    shape, dtype and device, drawn from torch's RNG exactly as that module draws it: the same
    seed gives the same mask. PEFT applies the dropout after casting the input to lora_A's dtype,
    so pass that dtype to match a seeded PEFT run."""
    return F.dropout(torch.ones(tuple(shape), dtype=dtype, device=device), p, training=True) != 0


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float,
             inplace: bool = False) -> torch.Tensor:
    """D(x) = x·keep/(1-p), as nn.Dropout scales its output; in place when inplace (x is a
    temporary of the caller's)."""
    if keep is None:
        return x
    kept = x.mul_(keep) if inplace else x * keep
    return kept.mul_(1.0 / (1.0 - p))


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scaling: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """scaling·a·b (into out when given) in one GEMM: a scaling other than 1 is the GEMM's alpha
    (addmm with beta 0, which never reads what out held)."""
    if scaling == 1:
        return torch.mm(a, b, out=out)
    if out is None:
        out = a.new_empty(a.shape[0], b.shape[1])
    return out.addmm_(a, b, beta=0, alpha=scaling)


# --- one projection's pieces, inside the Functions ------------------------------------------------


@dataclass(frozen=True)
class _Static:
    """The non-differentiable part of one projection, passed to a Function as one argument."""
    weight: Weight
    scaling: float
    dropout_p: float


# Tensors per projection in a Function's argument list: bias, lora_A, lora_B, dropout keep-mask
# (their gradients come back in the same order).
_PER_PROJECTION = 4
_BIAS, _A, _B = 0, 1, 2


def _flatten(parts: Sequence[LoraParts], masks: Sequence[torch.Tensor | None]
             ) -> tuple[tuple[_Static, ...], list]:
    statics = tuple(_Static(p.weight, float(p.scaling), float(p.dropout_p)) for p in parts)
    tensors: list = []
    for p, keep in zip(parts, masks):
        lora = p.uses_lora
        tensors += [p.bias, p.lora_A if lora else None, p.lora_B if lora else None,
                    keep if lora else None]
    return statics, tensors


@dataclass
class _Projection:
    """One projection inside a Function, with bias, A and B cast to the compute dtype."""
    weight: Weight
    scaling: float
    dropout_p: float
    bias: torch.Tensor | None
    A: torch.Tensor | None
    B: torch.Tensor | None
    keep: torch.Tensor | None

    @property
    def lora(self) -> bool:
        return self.A is not None


def _adapter_copies(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The adapter tensors (a Function's A's, then its B's) in `dtype`: views, in that order, of
    one new 1-D buffer made in two launches whatever their number (concatenate, convert), so that
    consecutive A's stack into one matrix as a view (`_stack`). Inside an offloaded checkpoint the
    recompute reuses the forward's copies (`checkpointing.memoized`)."""
    def make():
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
        return [piece.view(t.shape)
                for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    return memoized(("lora adapter copies", dtype, *map(id, tensors)), make)


def _projections(statics: Sequence[_Static], tensors: Sequence, dtype: torch.dtype
                 ) -> list[_Projection]:
    """The projections with bias, A and B in `dtype`; A's and B's in another dtype (fp32
    adapters beside 16-bit activations) are copied together (`_adapter_copies`)."""
    per = [tensors[_PER_PROJECTION * i:_PER_PROJECTION * (i + 1)] for i in range(len(statics))]
    lora = [i for i, (_, A, _, _) in enumerate(per) if A is not None]
    adapters = [per[i][_A] for i in lora] + [per[i][_B] for i in lora]
    if any(t.dtype != dtype for t in adapters):
        adapters = _adapter_copies(adapters, dtype)
    As, Bs = dict(zip(lora, adapters[:len(lora)])), dict(zip(lora, adapters[len(lora):]))
    return [_Projection(st.weight, st.scaling, st.dropout_p,
                        None if bias is None else bias.to(dtype), As.get(i), Bs.get(i), keep)
            for i, (st, (bias, _, _, keep)) in enumerate(zip(statics, per))]


def _param_dtypes(tensors: Sequence) -> list:
    """dtype of every tensor argument (None for None): the dtypes their gradients come back in."""
    return [None if t is None else t.dtype for t in tensors]


def _needs(ctx, first: int, count: int) -> list[tuple[bool, bool, bool]]:
    """needs_input_grad of (bias, A, B) per projection; the first projection's bias is argument
    `first` of forward."""
    flags = ctx.needs_input_grad
    return [tuple(flags[first + _PER_PROJECTION * i + k] for k in (_BIAS, _A, _B))
            for i in range(count)]


def _adjacent_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 2-D tensors stacked along dim 0 as a view, when they lie one after another in one 1-D
    buffer (as `_adapter_copies` lays out A's); None otherwise."""
    first = tensors[0]
    base = first._base
    if base is None or base.dim() != 1:
        return None
    end = first.storage_offset()
    for t in tensors:
        if (t._base is not base or t.storage_offset() != end or not t.is_contiguous()
                or t.shape[1] != first.shape[1]):
            return None
        end += t.numel()
    start = first.storage_offset() - base.storage_offset()
    return base[start:start + end - first.storage_offset()].view(-1, first.shape[1])


def _stack(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat(tensors, dim); along dim 0, a view when the tensors are adjacent rows."""
    if len(tensors) == 1:
        return tensors[0]
    rows = _adjacent_rows(tensors) if dim == 0 else None
    return torch.cat(tensors, dim) if rows is None else rows


def _lora_down(X: torch.Tensor, projs: Sequence[_Projection],
               out: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """s·D(X)·Aᵀ `[T, r]` per projection (None without LoRA). Projections without dropout share
    one GEMM over X with their A's stacked, which writes into out (`[T, Σr]`) when given."""
    result: list[torch.Tensor | None] = [None] * len(projs)
    plain = [i for i, p in enumerate(projs) if p.lora and p.keep is None]
    if plain:
        ranks = [projs[i].A.shape[0] for i in plain]

        def products() -> torch.Tensor:
            scalings = {projs[i].scaling for i in plain}
            common = scalings.pop() if len(scalings) == 1 else 1.0
            xa = _scaled_mm(X, _stack([projs[i].A for i in plain], 0).t(), common, out=out)
            for i, part in zip(plain, xa.split(ranks, dim=1)):
                if projs[i].scaling != common:
                    part.mul_(projs[i].scaling)
            return xa

        xa = _computed_once(("lora down", *(id(projs[i].A) for i in plain)), products, out)
        for i, part in zip(plain, xa.split(ranks, dim=1)):
            result[i] = part
    for i, p in enumerate(projs):
        if p.lora and p.keep is not None:
            result[i] = _computed_once(
                ("lora down, dropped", id(p.A)),
                lambda p=p: _scaled_mm(_dropped(X, p.keep, p.dropout_p), p.A.t(), p.scaling))
    return result


def _computed_once(key, make, out: torch.Tensor | None = None) -> torch.Tensor:
    """make(), a rank-r product of an activation; inside an offloaded checkpoint its forward's
    value, kept in the checkpoint memo until the backward (a compact copy where make writes into
    out, a view of the caller's tensor) and copied into out when given: the recompute sees the
    same input and parameters, so it runs no GEMM for it."""
    memo = checkpoint_memo()
    if memo is None:
        return make()
    held = memo.get(key)
    if held is None:
        value = make()
        memo[key] = value if out is None else value.clone()
        return value
    return held if out is None else out.copy_(held)


def _project(X: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None,
             sxa: torch.Tensor | None, B: torch.Tensor | None,
             out: torch.Tensor | None = None, addend: torch.Tensor | None = None) -> torch.Tensor:
    """addend + X·Wᵀ + bias + sxa·Bᵀ (addend: None or a tensor of the output's shape), into out
    (a new tensor when None)."""
    if bias is not None:
        addend = bias if addend is None else addend + bias
    if sxa is None:
        if addend is None:
            return torch.mm(X, W.t(), out=out)
        return torch.addmm(addend, X, W.t(), out=out)
    # The rank-r product writes Y (onto the addend); the base GEMM then accumulates onto it,
    # reading Y in its epilogue rather than in a separate elementwise pass.
    if addend is None:
        Y = torch.mm(sxa, B.t(), out=out)
    else:
        Y = torch.addmm(addend, sxa, B.t(), out=out)
    return Y.addmm_(X, W.t())


def _widened_input(X: torch.Tensor, projs: Sequence[_Projection],
                   spare: int) -> torch.Tensor | None:
    """X `[T, in]` widened over the first Σr of its `spare` columns, `[T, in + Σr]`, where the
    projections' B's can be folded into their base GEMMs (`_project_all`): every LoRA projection
    is without dropout and some has an NF4 weight (a tensor weight would be copied whole to
    widen it). None otherwise."""
    lora = [p for p in projs if p.lora]
    width = sum(p.A.shape[0] for p in lora)
    if (not lora or width > spare or any(p.keep is not None for p in lora)
            or not any(isinstance(p.weight, NF4Weight) for p in lora)):
        return None
    # A tensor of its own over X's storage: writing the scratch columns leaves X's version (and
    # the autograd views X may be) untouched, as X's values are.
    return X.new_empty(0).set_(X.untyped_storage(), X.storage_offset(),
                               (X.shape[0], X.shape[1] + width), (X.stride(0), 1))


def _project_all(X: torch.Tensor, projs: Sequence[_Projection], spare: int, skip: int = 0
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """(outputs of projs[skip:], s·D(X)·Aᵀ of every projection): the projections of one X.

    spare: how many columns after each row of X (in its allocation) are the caller's scratch.
    Where they hold every s·X·Aᵀ (`_widened_input`), an NF4 projection's LoRA term rides in its
    base GEMM: `[X | s·X·Aᵢᵀ | ...]·[W | 0 | Bᵢ | 0]ᵀ`, K widened by Σr, in place of a separate
    rank-r product that writes the whole `[T, out]` output for the base GEMM to read back."""
    # With every output skipped no GEMM reads the widened input.
    wide = _widened_input(X, projs, spare) if skip < len(projs) else None
    cols = X.shape[1]
    sxas = _lora_down(X, projs, None if wide is None else wide[:, cols:])
    outs, slot = [], 0
    for i, (p, sxa) in enumerate(zip(projs, sxas)):
        rank = p.A.shape[0] if p.lora else 0
        if i >= skip:
            if wide is not None and p.lora and isinstance(p.weight, NF4Weight):
                W = _dense(p.weight, X.dtype, wide.shape[1] - cols)
                tail = W[:, cols:]
                if tail.shape[1] > rank:
                    tail.zero_()
                tail[:, slot:slot + rank].copy_(p.B)
                outs.append(_project(wide, W, p.bias, None, None))
            else:
                outs.append(_project(X, _dense(p.weight, X.dtype), p.bias, sxa, p.B))
        slot += rank
    return outs, sxas


def _grad_mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a·b as a gradient in `dtype`. On CUDA, the 16-bit product for an fp32 parameter comes out
    of the GEMM's fp32 accumulator (no 16-bit rounding, no conversion kernel); elsewhere the
    product is converted."""
    if dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).to(dtype)


def _projections_backward(X: torch.Tensor | None, projs: Sequence[_Projection],
                          sxas: Sequence[torch.Tensor | None], dYs: Sequence[torch.Tensor],
                          needs: Sequence[tuple[bool, bool, bool]], dtypes: Sequence,
                          need_dX: bool) -> tuple[torch.Tensor | None, list]:
    """Gradients of projections that share the input X, from their output gradients dYs.
    Returns dX (None unless need_dX) and the gradients of the projections' tensor arguments,
    (dbias, dA, dB, None) each, in the dtypes `dtypes` of those arguments."""
    grads = [None] * (_PER_PROJECTION * len(projs))
    # dz = s·dY·B `[T, r]`, the gradient of D(X)·Aᵀ. Those of the projections without dropout
    # are written side by side into one `[T, Σr]` tensor, which dA and dX take whole.
    with_dz = [p.lora and (needs[i][1] or need_dX) for i, p in enumerate(projs)]
    plain = [i for i, p in enumerate(projs) if with_dz[i] and p.keep is None]
    dz_plain = (dYs[0].new_empty(dYs[0].shape[0], sum(projs[i].B.shape[1] for i in plain))
                if len(plain) > 1 else None)
    dzs: list[torch.Tensor | None] = [None] * len(projs)
    column = 0
    for i, (p, sxa, dY) in enumerate(zip(projs, sxas, dYs)):
        need_bias, _, need_B = needs[i]
        at = _PER_PROJECTION * i
        if need_bias:
            grads[at + _BIAS] = dY.sum(0).to(dtypes[at + _BIAS])
        if need_B:
            grads[at + _B] = _grad_mm(dY.t(), sxa, dtypes[at + _B])
        if with_dz[i]:
            out = None
            if dz_plain is not None and i in plain:
                out = dz_plain[:, column:column + p.B.shape[1]]
                column += p.B.shape[1]
            dzs[i] = _scaled_mm(dY, p.B, p.scaling, out=out)
    if plain and dz_plain is None:
        dz_plain = dzs[plain[0]]

    # dA = dzᵀ·D(X); projections without dropout share one GEMM over X.
    if any(needs[i][1] for i in plain):
        a_dtypes = {dtypes[_PER_PROJECTION * i + _A] for i in plain if needs[i][1]}
        dA = _grad_mm(dz_plain.t(), X, a_dtypes.pop() if len(a_dtypes) == 1 else X.dtype)
        for i, part in zip(plain, dA.split([dzs[i].shape[1] for i in plain], dim=0)):
            if needs[i][1]:
                grads[_PER_PROJECTION * i + _A] = part.to(dtypes[_PER_PROJECTION * i + _A])
    dropped = [i for i, p in enumerate(projs) if dzs[i] is not None and p.keep is not None]
    for i in dropped:
        p = projs[i]
        if needs[i][1]:
            dropped_X = _dropped(X, p.keep, p.dropout_p)
            grads[_PER_PROJECTION * i + _A] = _grad_mm(dzs[i].t(), dropped_X,
                                                       dtypes[_PER_PROJECTION * i + _A])

    dX = None
    if need_dX:
        if plain:
            dX = torch.mm(dz_plain, _stack([projs[i].A for i in plain], 0))
        for i in dropped:
            p = projs[i]
            term = _dropped(torch.mm(dzs[i], p.A), p.keep, p.dropout_p, inplace=True)
            dX = term if dX is None else dX.add_(term)
        for p, dY in zip(projs, dYs):
            W = _dense(p.weight, dY.dtype)
            dX = torch.mm(dY, W) if dX is None else dX.addmm_(dY, W)
    return dX, grads


def _saved_projection_tensors(projs, sxas, needs) -> list:
    """What backward needs of each projection: A and B as forward used them (in the compute
    dtype: fp32 adapters beside 16-bit activations are saved as their 16-bit copies, so backward
    does not convert them again), s·D(X)·Aᵀ when B needs a gradient, and the keep-mask."""
    saved = []
    for i, p in enumerate(projs):
        saved += [p.A, p.B, sxas[i] if needs[i][2] else None, p.keep]
    return saved


def _unpack_projection_tensors(saved: Sequence) -> tuple[list, list]:
    """Inverse of `_saved_projection_tensors`: the Function's tensor arguments (bias omitted) and
    the s·D(X)·Aᵀ per projection."""
    tensors, sxas = [], []
    for i in range(0, len(saved), 4):  # A, B, s·D(X)·Aᵀ, keep-mask per projection
        A, B, sxa, keep = saved[i:i + 4]
        tensors += [None, A, B, keep]
        sxas.append(sxa)
    return tensors, sxas


# --- Functions ------------------------------------------------------------------------------------

class LoraLinears(torch.autograd.Function):
    """Projections of one X `[T, in]`: `Yᵢ = X·Wᵢᵀ + biasᵢ + sᵢ·(Dᵢ(X)·Aᵢᵀ)·Bᵢᵀ`.

    apply(X, statics, spare, *tensors): statics holds each projection's weight, scaling and
    dropout p; spare the number of scratch columns after X's rows (`_project_all`); tensors holds
    each projection's (bias, A, B, keep-mask). Saves X (when some A needs a gradient) and per
    projection A and B in the compute dtype, s·D(X)·Aᵀ `[T, r]` (when B needs a gradient) and
    the keep-mask; never W, which backward dequantizes again."""

    @staticmethod
    def forward(ctx, X, statics, spare, *tensors):
        with torch.autocast(X.device.type, enabled=False):
            projs = _projections(statics, tensors, X.dtype)
            outs, sxas = _project_all(X, projs, spare)
        needs = _needs(ctx, 3, len(projs))
        ctx.statics, ctx.dtypes = statics, _param_dtypes(tensors)
        ctx.save_for_backward(X if any(n[1] for n in needs) else None,
                              *_saved_projection_tensors(projs, sxas, needs))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dYs):
        X, *saved = ctx.saved_tensors
        tensors, sxas = _unpack_projection_tensors(saved)
        with torch.autocast(dYs[0].device.type, enabled=False):
            projs = _projections(ctx.statics, tensors, dYs[0].dtype)
            dX, grads = _projections_backward(X, projs, sxas, dYs,
                                              _needs(ctx, 3, len(projs)), ctx.dtypes,
                                              ctx.needs_input_grad[0])
        return (dX, None, None, *grads)


@dataclass(frozen=True)
class _Activation:
    """h = act(e)·g: "swiglu" (SiLU) or "geglu" (GELU, approximate "none" or "tanh")."""
    name: str
    approximate: str = "none"

    def forward(self, e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.name == "swiglu":
            return swiglu(e, g)
        return geglu(e, g, self.approximate)

    def backward_(self, grad_h: torch.Tensor, e: torch.Tensor, g: torch.Tensor,
                  store_h: bool) -> None:
        """Overwrites e with de, g with dg and, with store_h, grad_h with h."""
        if self.name == "swiglu":
            swiglu_backward_(grad_h, e, g, store_h=store_h)
        else:
            geglu_backward_(grad_h, e, g, self.approximate, store_h=store_h)


# The MLP runs its down projection over row blocks so that h and its gradient exist one block at
# a time: at most _ROW_BLOCKS blocks, each of at least _MIN_BLOCK_ELEMENTS elements of h (smaller
# GEMMs lose efficiency). On the H200 at Llama-3-8B shapes and 8192 tokens, forward + backward
# took 10.04, 9.99, 10.10 and 10.70 ms with 4, 5, 6 and 8 blocks: 5 holds a smaller block of h
# than 4 at the same speed.
_ROW_BLOCKS = 5
_MIN_BLOCK_ELEMENTS = 1 << 24


def _row_blocks(rows: int, cols: int) -> list[slice]:
    count = max(1, min(_ROW_BLOCKS, rows * cols // _MIN_BLOCK_ELEMENTS))
    step = -(-rows // count)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _mlp_down_forward(X: torch.Tensor, e: torch.Tensor, g: torch.Tensor, activation: _Activation,
                      down: _Projection, residual: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Y, s·D(h)·A_downᵀ or None without LoRA): the down projection of h = act(e)·g, plus the
    residual when given, over row blocks of h."""
    rows_total = X.shape[0]
    Y = X.new_empty(rows_total, down.weight.shape[0])
    sha = X.new_empty(rows_total, down.A.shape[0]) if down.lora else None
    W = _dense(down.weight, X.dtype)
    for rows in _row_blocks(rows_total, e.shape[1]):
        h = activation.forward(e[rows], g[rows])
        sha_rows = None
        if down.lora:
            hd = _dropped(h, _rows(down.keep, rows), down.dropout_p)
            sha_rows = _scaled_mm(hd, down.A.t(), down.scaling, out=sha[rows])
            del hd
        _project(h, W, down.bias, sha_rows, down.B, out=Y[rows], addend=_rows(residual, rows))
        del h  # freed before the next block's h is allocated: one block exists at a time
    return Y, sha


_STASH_NAME = "lora mlp: gate and up outputs"


class LoraMLP(torch.autograd.Function):
    """`Y = down(act(gate(X)) · up(X))` with X `[T, H]`, each projection a LoRA projection.

    apply(X, residual, statics, activation, compute_output, spare, *tensors): residual None or
    `[T, H_out]` in X's dtype, added to Y by the down projection's GEMMs (no pass of its own);
    statics holds (gate, up, down) weights, scalings and dropout p's; spare the number of scratch
    columns after X's rows (`_project_all`); tensors holds each projection's (bias, A, B,
    keep-mask); the down projection's keep-mask is `[T, I]`. Saves X (when gate's or up's A
    needs a gradient),
    e = gate(X) and g = up(X) `[T, I]`, and per projection A and B in the compute dtype, the LoRA
    intermediate s·D(input)·Aᵀ `[T, r]` (when B needs a gradient) and the keep-mask. h is
    recomputed in backward, one row block at a time, and backward overwrites the saved e and g
    with their gradients: the graph cannot be backpropagated twice (autograd reports the in-place
    change).

    compute_output False (the caller backpropagates through Y but never reads its values, as in
    a checkpointed layer's recompute): forward stops after e and g and returns zeros (one element,
    expanded), and backward computes down's s·D(h)·Aᵀ from the h it recomputes.

    Inside an offloaded checkpoint the forward stashes e and g, or e alone, as the link allows
    (`checkpointing.stash`), and the recompute takes them back instead of running their GEMMs
    again."""

    @staticmethod
    def forward(ctx, X, residual, statics, activation, compute_output, spare, *tensors):
        with torch.autocast(X.device.type, enabled=False):
            gate, up, down = _projections(statics, tensors, X.dtype)
            # An offloaded checkpoint's recompute gets e, or e and g, back from its forward's
            # stash, and computes the rest.
            restored = stashed(_STASH_NAME)
            computed, (sxa_g, sxa_u) = _project_all(X, (gate, up), spare, skip=len(restored))
            e, g = (*restored, *computed)
            if not restored:
                stash(_STASH_NAME, e, g)
            # Inside an offloaded checkpoint the forward keeps s·D(h)·A_downᵀ in the memo, as
            # `_computed_once` keeps the other rank-r products, and the recompute (compute_output
            # False) takes it from there; elsewhere the backward rebuilds it.
            memo, sha_key = checkpoint_memo(), ("lora mlp down", id(down.A))
            if not compute_output:
                Y = X.new_zeros(()).expand(X.shape[0], down.weight.shape[0])
                sha = None if memo is None else memo.get(sha_key)
            else:
                Y, sha = _mlp_down_forward(X, e, g, activation, down, residual)
                if memo is not None and sha is not None:
                    memo[sha_key] = sha
        needs = _needs(ctx, 6, 3)
        ctx.statics, ctx.activation = statics, activation
        ctx.dtypes = _param_dtypes(tensors)
        ctx.save_for_backward(X if needs[0][1] or needs[1][1] else None, e, g,
                              *_saved_projection_tensors((gate, up, down), (sxa_g, sxa_u, sha),
                                                         needs))
        return Y

    @staticmethod
    def backward(ctx, dY):
        X, e, g, *saved = ctx.saved_tensors
        tensors, (sxa_g, sxa_u, sha) = _unpack_projection_tensors(saved)
        needs = _needs(ctx, 6, 3)
        gate_up_dtypes, down_dtypes = (ctx.dtypes[:2 * _PER_PROJECTION],
                                       ctx.dtypes[2 * _PER_PROJECTION:])
        with torch.autocast(dY.device.type, enabled=False):
            gate, up, down = _projections(ctx.statics, tensors, dY.dtype)
            need_bias, need_A, need_B = needs[2]
            dbias = dY.sum(0).to(down_dtypes[_BIAS]) if need_bias else None
            # Without the forward's s·D(h)·Aᵀ (compute_output False), it is rebuilt from h below.
            rebuild_sha = need_B and sha is None
            if rebuild_sha:
                sha = dY.new_empty(dY.shape[0], down.A.shape[0])
            dz = _scaled_mm(dY, down.B, down.scaling) if down.lora else None
            dA = None  # summed over the row blocks in fp32
            W = _dense(down.weight, dY.dtype)
            need_h = need_A or rebuild_sha
            for rows in _row_blocks(e.shape[0], e.shape[1]):
                keep = _rows(down.keep, rows)
                if dz is None:
                    dh = torch.mm(dY[rows], W)
                else:
                    dh = _dropped(torch.mm(dz[rows], down.A), keep, down.dropout_p, inplace=True)
                    dh.addmm_(dY[rows], W)
                # The activation's backward also recomputes h (when needed) into dh's block:
                # one [rows, I] block at a time, and e and g are read once.
                ctx.activation.backward_(dh, e[rows], g[rows], store_h=need_h)
                if need_h:
                    h = _dropped(dh, keep, down.dropout_p, inplace=True)
                    if need_A:
                        part = _grad_mm(dz[rows].t(), h, acc_dtype(dY.dtype))
                        dA = part if dA is None else dA.add_(part)
                    if rebuild_sha:
                        _scaled_mm(h, down.A.t(), down.scaling, out=sha[rows])
                    del h
                del dh
            dB = _grad_mm(dY.t(), sha, down_dtypes[_B]) if need_B else None
            # e and g now hold their gradients.
            dX, grads = _projections_backward(X, (gate, up), (sxa_g, sxa_u), (e, g), needs[:2],
                                              gate_up_dtypes, ctx.needs_input_grad[0])
        dA = None if dA is None else dA.to(down_dtypes[_A])
        dresidual = dY if ctx.needs_input_grad[1] else None
        return (dX, dresidual, None, None, None, None, *grads, dbias, dA, dB, None)


# --- wrappers -------------------------------------------------------------------------------------

def _is_16bit_beside(dtype: torch.dtype, compute: torch.dtype) -> bool:
    return dtype == torch.float32 and compute in (torch.float16, torch.bfloat16)


def _check_param(t, name: str, shape: tuple, X: torch.Tensor) -> None:
    """t is a float tensor of this shape on X's device, in X's dtype or float32 beside 16-bit X."""
    check_float(t, name)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.device != X.device:
        raise ValueError(f"{name} is on {t.device} but X is on {X.device}")
    if t.dtype != X.dtype and not _is_16bit_beside(t.dtype, X.dtype):
        raise TypeError(f"{name} has dtype {t.dtype} but X has dtype {X.dtype}; expected the "
                        "same dtype, or float32 with 16-bit X")


def _check_parts(p: LoraParts, in_features: int, X: torch.Tensor, names: dict,
                 autocast: bool = False) -> None:
    """Validate one projection whose input has `in_features` features and X's device and dtype
    (a tensor weight may have another dtype under autocast: it is cast as F.linear would). names
    maps each LoraParts field to the name the error messages use."""
    W = p.weight
    if isinstance(W, NF4Weight):
        device, dtype = W.packed.device, W.dtype
    elif isinstance(W, torch.Tensor):
        check_float(W, names["weight"])
        device, dtype = W.device, W.dtype
        if W.requires_grad:
            raise ValueError(f"{names['weight']} requires grad; the base weight is frozen here "
                             "(no gradient is computed for it)")
    else:
        raise TypeError(f"{names['weight']} is a {type(W).__name__}; expected a torch.Tensor or "
                        "an NF4Weight")
    if len(W.shape) != 2 or W.shape[1] != in_features:
        raise ValueError(f"{names['weight']} has shape {tuple(W.shape)}, expected "
                         f"[out_features, {in_features}] (in_features = the input's last "
                         "dimension)")
    if device != X.device:
        raise ValueError(f"{names['weight']} is on {device} but X is on {X.device}")
    if dtype != X.dtype and not (autocast and isinstance(W, torch.Tensor)):
        raise TypeError(f"{names['weight']} has dtype {dtype} but X has dtype {X.dtype}; "
                        "expected the same dtype")
    out_features = W.shape[0]
    if p.bias is not None:
        _check_param(p.bias, names["bias"], (out_features,), X)
    if not isinstance(p.scaling, Real) or not math.isfinite(p.scaling):
        raise TypeError(f"{names['scaling']} is {p.scaling!r}; expected a finite number")
    if not isinstance(p.dropout_p, Real) or not 0.0 <= p.dropout_p < 1.0:
        raise ValueError(f"{names['dropout_p']} is {p.dropout_p!r}; expected 0 <= p < 1")
    if not p.uses_lora:
        return
    A, B = p.lora_A, p.lora_B
    check_float(A, names["lora_A"])
    if A.dim() != 2 or A.shape[0] < 1:
        raise ValueError(f"{names['lora_A']} has shape {tuple(A.shape)}, expected [r, "
                         f"{in_features}] with r >= 1")
    rank = A.shape[0]
    _check_param(A, names["lora_A"], (rank, in_features), X)
    if B is None:
        raise ValueError(f"{names['lora_B']} is None but {names['lora_A']} is given")
    _check_param(B, names["lora_B"], (out_features, rank), X)


def _names(prefix: str) -> dict:
    fields = ("weight", "bias", "lora_A", "lora_B", "scaling", "dropout_p")
    return {f: f"{prefix}{f}" for f in fields}


def _keep_masks(parts: Sequence[LoraParts], masks, shapes: Sequence[tuple], X: torch.Tensor,
                labels: Sequence[str]) -> list[torch.Tensor | None]:
    """Per projection the keep-mask flattened to `[T, in]`: the given one, or one drawn as
    nn.Dropout would when the projection's dropout_p > 0 (None without LoRA or dropout)."""
    if masks is None:
        masks = [None] * len(parts)
    if len(masks) != len(parts):
        raise ValueError(f"dropout masks: got {len(masks)}, expected {len(parts)} (one per "
                         "projection, None for none)")
    result = []
    for p, keep, shape, label in zip(parts, masks, shapes, labels):
        if not p.uses_lora:
            result.append(None)
            continue
        if keep is None and p.dropout_p > 0:
            keep = dropout_keep_mask(shape, p.dropout_p, p.lora_A.dtype, X.device)
        if keep is not None:
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
                raise TypeError(f"{label} must be a bool tensor (True = kept), got "
                                f"{getattr(keep, 'dtype', type(keep).__name__)}")
            if tuple(keep.shape) != tuple(shape):
                raise ValueError(f"{label} has shape {tuple(keep.shape)}, expected "
                                 f"{tuple(shape)} (the shape of the adapter's input)")
            if keep.device != X.device:
                raise ValueError(f"{label} is on {keep.device} but X is on {X.device}")
            if p.dropout_p == 0:
                raise ValueError(f"{label} is given but dropout_p is 0; pass the p the mask was "
                                 "drawn with")
            keep = keep.reshape(-1, shape[-1])
        result.append(keep)
    return result


def _autocast(X: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(X in the autocast dtype, True) under autocast, as F.linear would compute; else (X, False).
    The Functions then run with autocast off, casting tensor weights to X's dtype themselves."""
    device_type = X.device.type
    if not (X.is_floating_point() and torch.is_autocast_enabled(device_type)):
        return X, False
    return X.to(torch.get_autocast_dtype(device_type)), True


def _check_input(X: torch.Tensor) -> None:
    check_float(X, "X")
    check_nonempty(X, "X")


def _rows_2d(X: torch.Tensor, spare: int) -> tuple[torch.Tensor, int]:
    """(X as `[T, in]`, the scratch columns after its rows that stay usable): spare when the
    reshape is a view, else 0 (callers pass 0 under autocast, where X is a converted copy).
    Raises ValueError where X's storage does not hold `spare` columns after every row."""
    X2 = X.reshape(-1, X.shape[-1])
    if not spare or X2.data_ptr() != X.data_ptr():
        return X2, 0
    end = X2.storage_offset() + (X2.shape[0] - 1) * X2.stride(0) + X2.shape[1] + spare
    # (one row's stride is meaningless: only its end counts)
    if (X2.stride(1) != 1 or (X2.shape[0] > 1 and X2.stride(0) < X2.shape[1] + spare)
            or end * X2.element_size() > X2.untyped_storage().nbytes()):
        raise ValueError(f"spare_columns is {spare} but X (shape {tuple(X.shape)}, strides "
                         f"{X.stride()}) does not have that many columns of its storage after "
                         "each row")
    return X2, spare


def _linears(X: torch.Tensor, parts: Sequence[LoraParts], masks, prefixes: Sequence[str],
             names: Sequence[dict] | None = None, spare: int = 0) -> tuple[torch.Tensor, ...]:
    _check_input(X)
    check_pad(spare, "spare_columns")
    X, autocast = _autocast(X)
    names = names or [_names(prefix) for prefix in prefixes]
    for p, n in zip(parts, names):
        _check_parts(p, X.shape[-1], X, n, autocast)
    labels = [f"{prefix}dropout_mask" for prefix in prefixes]
    keeps = _keep_masks(parts, masks, [tuple(X.shape)] * len(parts), X, labels)
    statics, tensors = _flatten(parts, keeps)
    lead = X.shape[:-1]
    X2, spare = _rows_2d(X, 0 if autocast else spare)
    outs = LoraLinears.apply(X2, statics, spare, *tensors)
    return tuple(Y.view(*lead, Y.shape[-1]) for Y in outs)


def matmul_lora(X: torch.Tensor, W: Weight, A: torch.Tensor | None, B: torch.Tensor | None,
                s: float, dropout_mask: torch.Tensor | None = None, *,
                bias: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """`X·Wᵀ + bias + s·(D(X)·Aᵀ)·Bᵀ`, differentiable in X, A, B (and bias); never in W.

    X `[..., in]` float (bf16/fp16/fp32/fp64, any strides); W `[out, in]`: a frozen tensor in X's
    dtype or an `NF4Weight` of X's dtype; A `[r, in]`, B `[out, r]`: X's dtype or float32 beside
    16-bit X (None for no LoRA term); bias `[out]` or None. D is the adapter's dropout:
    dropout_mask is its bool keep-mask shaped like X and dropout_p the probability it was drawn
    with, D(X) = X·mask/(1-p); with dropout_p > 0 and no mask one is drawn as nn.Dropout would
    (`dropout_keep_mask`). Returns `[..., out]` in X's dtype (autocast's dtype under autocast).
    """
    names = {"weight": "W", "bias": "bias", "lora_A": "A", "lora_B": "B", "scaling": "s",
             "dropout_p": "dropout_p"}
    parts = LoraParts(W, bias, A, B, s, dropout_p)
    return _linears(X, [parts], [dropout_mask], [""], [names])[0]


def lora_linear(X: torch.Tensor, parts: LoraParts,
                dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One LoRA-wrapped Linear (`parts`, e.g. from `lora_parts`) applied to X `[..., in]`;
    `[..., out]`. See `matmul_lora` for dtypes and the dropout mask."""
    return _linears(X, [parts], [dropout_mask], [""])[0]


def lora_qkv(X: torch.Tensor, q: LoraParts, k: LoraParts, v: LoraParts,
             dropout_masks: Sequence[torch.Tensor | None] | None = None, *,
             spare_columns: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v projections of one X `[..., hidden]`, each with its own adapter, scaling,
    dropout and optional bias (Qwen2). Returns `([..., q_out], [..., k_out], [..., v_out])`.
    dropout_masks: None, or one bool keep-mask shaped like X (or None) per projection; masks not
    given are drawn in the order q, k, v (the order of the model's own forward). spare_columns:
    as `lora_mlp`'s."""
    return _linears(X, [q, k, v], dropout_masks, ["q.", "k.", "v."], spare=spare_columns)


_ACTIVATIONS = ("swiglu", "geglu")
_APPROXIMATIONS = ("none", "tanh")


def lora_mlp(X: torch.Tensor, gate: LoraParts, up: LoraParts, down: LoraParts,
             activation: str = "swiglu", approximate: str = "none",
             dropout_masks: Sequence[torch.Tensor | None] | None = None, *,
             compute_output: bool = True, residual: torch.Tensor | None = None,
             spare_columns: int = 0) -> torch.Tensor:
    """`down(act(gate(X)) · up(X))` for X `[..., H]`: gate and up `[I, H]`, down `[H_out, I]`.

    activation "swiglu" (act = SiLU: Llama, Mistral, Qwen) or "geglu" (act = GELU with
    `approximate` "none" or "tanh": Gemma uses "tanh"). dropout_masks: None, or (gate, up, down)
    bool keep-masks (or None): gate's and up's shaped like X, down's `[..., I]`; masks not given
    are drawn in the order gate, up, down. Returns `[..., H_out]` in X's dtype.

    compute_output=False is for a caller that backpropagates through the result but never reads
    its values (a checkpointed layer recomputed in backward, whose output only carries the
    gradient): the down projection's forward is skipped and the result holds zeros; the gradients
    are those of the full computation.

    residual (`[..., H_out]`, or None): returns `residual + down(...)`. In X's compute dtype the
    down projection's GEMMs add it as they write their output (no pass of its own); in another
    dtype it is added afterwards, in the promoted dtype, as `residual + mlp(x)` computes it.

    spare_columns: how many columns after each row of X, in X's storage, are scratch this call
    may overwrite (as `rms_norm(..., y_pad=n)` leaves them). With room for the adapters' ranks
    side by side and no dropout, the LoRA term of an NF4 projection is computed inside its base
    GEMM, which then reads s·X·Aᵀ from those columns (no separate pass over the output). Ignored
    under autocast.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation is {activation!r}; expected one of {_ACTIVATIONS}")
    if approximate not in _APPROXIMATIONS or (activation == "swiglu" and approximate != "none"):
        raise ValueError(f"approximate is {approximate!r}; expected 'none' or 'tanh' (GEGLU "
                         "only)")
    _check_input(X)
    check_pad(spare_columns, "spare_columns")
    X, autocast = _autocast(X)
    _check_parts(gate, X.shape[-1], X, _names("gate."), autocast)
    _check_parts(up, X.shape[-1], X, _names("up."), autocast)
    if tuple(up.shape) != tuple(gate.shape):
        raise ValueError(f"up.weight has shape {tuple(up.shape)}, expected {tuple(gate.shape)} "
                         "(the shape of gate.weight)")
    intermediate = gate.shape[0]
    _check_parts(down, intermediate, X, _names("down."), autocast)
    lead = tuple(X.shape[:-1])
    keeps = _keep_masks((gate, up, down), dropout_masks,
                        (tuple(X.shape), tuple(X.shape), lead + (intermediate,)), X,
                        ("gate.dropout_mask", "up.dropout_mask", "down.dropout_mask"))
    out_shape = lead + (down.shape[0],)
    if residual is not None:
        check_float(residual, "residual")
        check_same_device(residual, X, "residual", "X")
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {out_shape}")
    fold = residual is not None and residual.dtype == X.dtype
    statics, tensors = _flatten((gate, up, down), keeps)
    X2, spare = _rows_2d(X, 0 if autocast else spare_columns)
    Y = LoraMLP.apply(X2, residual.reshape(-1, out_shape[-1]) if fold else None, statics,
                      _Activation(activation, approximate), bool(compute_output), spare, *tensors)
    Y = Y.view(out_shape)
    return residual + Y if residual is not None and not fold else Y


# --- PEFT -----------------------------------------------------------------------------------------

def _bnb_linear4bit():
    """bitsandbytes' Linear4bit class, or None without bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def base_weight(base: torch.nn.Module) -> Weight:
    """The weight of a `torch.nn.Linear` (the tensor itself, `[out, in]`) or of a bitsandbytes
    NF4 `Linear4bit` (an `NF4Weight` sharing its packed data), as `LoraParts.weight` takes it."""
    linear4bit = _bnb_linear4bit()
    if linear4bit is not None and isinstance(base, linear4bit):
        quant_type = getattr(base.weight, "quant_type", None)
        if quant_type != "nf4":
            raise ValueError(f"the base Linear4bit is quantized as {quant_type!r}; only 'nf4' is "
                             "supported")
        return NF4Weight.from_bnb(base.weight)
    if isinstance(base, torch.nn.Linear):
        return base.weight
    raise TypeError(f"the base layer is a {type(base).__name__}; expected torch.nn.Linear or "
                    "bitsandbytes Linear4bit")


def lora_parts(layer: torch.nn.Module) -> LoraParts:
    """The pieces of a PEFT `LoraLayer` (over `torch.nn.Linear` or bitsandbytes `Linear4bit`)
    that its forward uses now: base weight (the tensor, or an `NF4Weight` over the packed data),
    base bias, the active adapter's lora_A/lora_B weights (the Parameters themselves), scaling,
    dropout p (0 in eval mode) and the disabled/merged state.

    Like PEFT's forward, a layer whose adapters are disabled while merged is unmerged first.
    Raises ValueError for what these Functions do not compute: more than one active adapter in the
    layer, LoRA variants (DoRA and others), lora_bias, fan_in_fan_out, non-NF4 4-bit weights.
    """
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer):
        raise TypeError(f"layer is a {type(layer).__name__}; expected a PEFT LoraLayer")
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError("layer has fan_in_fan_out=True (Conv1D-style weight); expected a Linear "
                         "layout [out_features, in_features]")
    if layer.disable_adapters and layer.merged:
        layer.unmerge()
    base = layer.get_base_layer()
    weight = base_weight(base)
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(adapters) > 1:
        raise ValueError(f"layer has {len(adapters)} active adapters {adapters}; expected one")
    if not adapters:
        return LoraParts(weight, base.bias, active=False, merged=layer.merged)
    name = adapters[0]
    if name in layer.lora_variant:
        raise ValueError(f"adapter {name!r} is a {type(layer.lora_variant[name]).__name__} "
                         "(DoRA or another LoRA variant); expected plain LoRA")
    if layer.lora_bias.get(name, False):
        raise ValueError(f"adapter {name!r} has lora_bias=True; expected lora_B without bias")
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return LoraParts(weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                     layer.scaling[name], p, active=not layer.disable_adapters,
                     merged=layer.merged)
