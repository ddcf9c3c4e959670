"""Rotary position embedding (RoPE) in the rotate_half convention of transformers: dim i of the
first rotary_dim dims of a head pairs with dim i + rotary_dim / 2. Query and key are rotated in
place by one kernel launch, with per-token positions into a cos/sin cache built here.

The cache reproduces transformers' rotary embeddings (`LlamaRotaryEmbedding` and the rope
initialisers of `transformers.modeling_rope_utils`) bit for bit for the default, linear,
dynamic-NTK, Llama-3 and YaRN rope types.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from unsloth_ext._extension import use_kernel
from unsloth_ext.ops._library import check_float, check_nonempty, check_same_device, op, register_op

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
LAYOUTS = ("bhsd", "bshd")  # q/k as [batch, heads, seq, head_dim] or [batch, seq, heads, head_dim]


# --- cos/sin cache -----------------------------------------------------------------------------

def _rope_settings(config_or_params: Any) -> tuple[dict, int, int | None]:
    """(rope parameters, head_dim, max_position_embeddings) from a transformers config or from
    a mapping of rope parameters that also holds `head_dim` (and `max_position_embeddings`
    where the rope type needs it)."""
    if isinstance(config_or_params, Mapping):
        params = dict(config_or_params)
        head_dim = params.pop("head_dim", None)
        max_pos = params.pop("max_position_embeddings", None)
        if head_dim is None:
            raise ValueError("rope parameters need 'head_dim'")
    else:
        config = config_or_params
        params = dict(getattr(config, "rope_parameters", None) or {})
        # Configs from before rope_parameters keep the type in rope_scaling and theta apart.
        params = params or dict(getattr(config, "rope_scaling", None) or {})
        if getattr(config, "rope_theta", None) is not None:
            params.setdefault("rope_theta", config.rope_theta)
        if getattr(config, "partial_rotary_factor", None) is not None:
            params.setdefault("partial_rotary_factor", config.partial_rotary_factor)
        head_dim = (getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
        max_pos = getattr(config, "max_position_embeddings", None)
    if params and all(isinstance(v, Mapping) or v is None for v in params.values()):
        raise ValueError(f"the config has rope parameters per layer type {sorted(params)}; pass "
                         "one of them as a mapping, with head_dim and max_position_embeddings")
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", 10000.0)
    if params["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"rope_type {params['rope_type']!r} is not supported; expected one of "
                         f"{ROPE_TYPES}")
    if params["rope_type"] != "default" and max_pos is None and (
            params["rope_type"] == "dynamic" or "original_max_position_embeddings" not in params):
        raise ValueError(f"rope_type {params['rope_type']!r} needs max_position_embeddings")
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", max_pos)
    return params, int(head_dim), max_pos


def _exponents(dim: int, device: torch.device | None = None) -> torch.Tensor:
    """2i / dim for i < dim / 2 in fp32, divided on `device` as transformers divides them."""
    return torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1: wavelengths beyond original_max / low_freq_factor are stretched by `factor`,
    those below original_max / high_freq_factor kept, and the band between interpolated."""
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    context = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    in_band = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(in_band, blended, stretched)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(params: dict, base: float, dim: int, max_pos: int | None) -> tuple[torch.Tensor, float]:
    """YaRN: frequencies interpolated by `factor` below a band of rotation counts over the
    original context, kept above it, ramped between; cos/sin scaled by the attention factor."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_pos / original
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention = _yarn_mscale(factor)

    def band_edge(rotations: float) -> float:
        # The dim index whose wavelength fits `rotations` times into the original context.
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = band_edge(params.get("beta_fast") or 32)
    high = band_edge(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    pos_freqs = base ** _exponents(dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, attention


def _inv_freq(params: dict, head_dim: int, max_pos: int | None, seq_len: int,
              device: torch.device) -> tuple[torch.Tensor, float]:
    """(fp32 inverse frequencies [rotary_dim / 2], attention scaling), each computed where and in
    the precision transformers computes it: on the CPU when the model is built, except the grown
    dynamic-NTK base, which transformers computes in the forward pass on the activations' device
    from a tensor (fp32) length."""
    rope_type = params["rope_type"]
    base = params["rope_theta"]
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if dim % 2 != 0 or dim <= 0:
        raise ValueError(f"rotary_dim is {dim} (head_dim {head_dim} times partial_rotary_factor); "
                         "expected a positive even number")
    if rope_type == "yarn":
        inv_freq, attention = _yarn(params, base, dim, max_pos)
        return inv_freq.to(device), attention
    if rope_type == "dynamic":
        factor = params["factor"]
        if seq_len > max_pos:
            length = torch.tensor(seq_len, dtype=torch.int64, device=device)
            grown = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            return 1.0 / (grown ** _exponents(dim, device)), 1.0
        base = base * ((factor * max_pos / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** _exponents(dim))
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params)
    return inv_freq.to(device), 1.0


@torch.no_grad()
def rope_cache(config_or_params: Any, max_positions: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32, *,
               seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin caches `[max_positions, rotary_dim]` for positions 0..max_positions-1.

    config_or_params: a transformers config (its `rope_parameters`, or `rope_scaling` and
    `rope_theta`, with `head_dim` or hidden_size / num_attention_heads, `partial_rotary_factor`
    and `max_position_embeddings`), or a mapping of rope parameters holding `head_dim` too.
    rope_type: default, linear, dynamic, llama3 or yarn (the default type applies
    partial_rotary_factor too, as the rotary embeddings of partial-rotary models do). Row p holds
    cos/sin of p times the inverse frequencies, the frequency list written twice (the
    rotate_half layout), times the type's attention scaling (YaRN's attention factor, else 1).
    With `dtype` the activation dtype the rows equal the cos/sin transformers computes for
    position p; fp32 keeps them unrounded.

    Dynamic NTK scales the base by the sequence length seen. transformers takes it as
    max(position_ids) + 1 of the batch and keeps the default frequencies until it exceeds
    max_position_embeddings; `seq_len` (default max_positions) plays that role here, so the cache
    matches transformers for a batch whose largest position is seq_len - 1. (transformers keeps a
    grown base for later, shorter batches that are still longer than max_position_embeddings;
    pass the longest length seen so far to follow it there.)
    """
    if max_positions < 1:
        raise ValueError(f"max_positions is {max_positions}; expected at least 1")
    params, head_dim, max_pos = _rope_settings(config_or_params)
    device = torch.device(device) if device is not None else torch.device("cpu")
    inv_freq, attention_scaling = _inv_freq(params, head_dim, max_pos, seq_len or max_positions,
                                            device)
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    # transformers forms the angles as a batched matmul of frequencies by positions, in fp32 with
    # autocast off; the same product here rounds the same way.
    with torch.autocast(device_type=device.type, enabled=False):
        freqs = (inv_freq[None, :, None] @ positions[None, None, :]).transpose(1, 2)[0]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * attention_scaling
        sin = angles.sin() * attention_scaling
    return cos.to(dtype), sin.to(dtype)


# --- reference ---------------------------------------------------------------------------------

def _head_axis(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout is {layout!r}; expected one of {LAYOUTS}")
    return 1 if layout == "bhsd" else 2


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return (x * cos + _rotate_half(x) * sin).to(x.dtype)
    rot = x[..., :rotary_dim]
    out = rot * cos + _rotate_half(rot) * sin
    return torch.cat((out.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def _as_2d(position_ids: torch.Tensor) -> torch.Tensor:
    return position_ids.unsqueeze(0) if position_ids.dim() == 1 else position_ids


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         position_ids: torch.Tensor,
                         layout: str = "bhsd") -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place RoPE: transformers' `apply_rotary_pos_emb(q, k, cos[position_ids],
    sin[position_ids])` on the first rotary_dim dims, the rest passed through. Same arguments as
    `apply_rope_`; the results keep q's and k's dtypes."""
    axis = _head_axis(layout)
    position_ids = _as_2d(position_ids)
    c = cos[position_ids].unsqueeze(axis)
    s = sin[position_ids].unsqueeze(axis)
    return _rotate_reference(q, c, s), _rotate_reference(k, c, s)


def _adjoint_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sine cache of the transposed rotation: halves swapped and negated (for any cache whose
    halves match, simply -sin: the rotation by -theta)."""
    half = sin.shape[-1] // 2
    return -torch.cat((sin[..., half:], sin[..., :half]), dim=-1)


def rope_fwd_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       position_ids: torch.Tensor) -> None:
    """The op `rope_fwd` in PyTorch: rotates q and k `[batch, seq, heads, head_dim]` in place."""
    q_out, k_out = apply_rope_reference(q, k, cos, sin, position_ids, layout="bshd")
    q.copy_(q_out)
    k.copy_(k_out)


def rope_bwd_reference(grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, position_ids: torch.Tensor) -> None:
    """The op `rope_bwd` in PyTorch: applies the transpose of rope_fwd's rotation in place."""
    rope_fwd_reference(grad_q, grad_k, cos, _adjoint_sin(sin), position_ids)


# --- checks ------------------------------------------------------------------------------------

def _check_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor, layout: str) -> None:
    axis = _head_axis(layout)
    dims = "[batch, heads, seq, head_dim]" if layout == "bhsd" else "[batch, seq, heads, head_dim]"
    for t, name in ((q, "q"), (k, "k"), (cos, "cos"), (sin, "sin")):
        check_float(t, name)
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
    for t, name in ((q, "q"), (k, "k")):
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dimensions {dims}")
        check_nonempty(t, name)
    for t, name in ((k, "k"), (cos, "cos"), (sin, "sin"), (position_ids, "position_ids")):
        check_same_device(t, q, name, "q")
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has dtype {q.dtype}; expected the same dtype")
    seq_axis = 3 - axis
    batch, seq = q.shape[0], q.shape[seq_axis]
    if k.shape[0] != batch or k.shape[seq_axis] != seq:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected the batch and sequence sizes of "
                         f"q ({batch}, {seq}) in the layout {dims}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k has head_dim {k.shape[3]} but q has head_dim {q.shape[3]}")
    if cos.dim() != 2:
        raise ValueError(f"cos has shape {tuple(cos.shape)}; expected [max_positions, rotary_dim]")
    check_nonempty(cos, "cos")
    if sin.shape != cos.shape:
        raise ValueError(f"sin has shape {tuple(sin.shape)}, expected the shape of cos "
                         f"{tuple(cos.shape)}")
    rotary_dim = cos.shape[1]
    if rotary_dim % 2 != 0:
        raise ValueError(f"rotary_dim (the last size of cos) is {rotary_dim}; expected an even "
                         "number (dims pair up across its two halves)")
    if rotary_dim > q.shape[3]:
        raise ValueError(f"rotary_dim (the last size of cos) is {rotary_dim}; expected at most "
                         f"head_dim {q.shape[3]}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin has dtype {sin.dtype} but cos has dtype {cos.dtype}; expected the "
                        "same dtype")
    if cos.dtype != q.dtype and not (cos.dtype == torch.float32
                                     and q.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"cos has dtype {cos.dtype} but q has dtype {q.dtype}; expected the same "
                        "dtype, or float32 with 16-bit q")
    if position_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"position_ids has dtype {position_ids.dtype}; expected int64 or int32")
    rows = position_ids.shape[0] if position_ids.dim() == 2 else 1
    if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != seq or rows not in (batch, 1):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected "
                         f"[{batch}, {seq}], [1, {seq}] or [{seq}] (batch and sequence of q)")


def _check_positions(position_ids: torch.Tensor, cache_rows: int) -> None:
    """Positions index the cache: outside [0, cache_rows) is an error (one host sync on CUDA)."""
    low, high = position_ids.min().item(), position_ids.max().item()
    if low < 0 or high >= cache_rows:
        raise ValueError(f"position_ids holds positions from {low} to {high}, but the cos/sin "
                         f"cache has rows for positions 0 to {cache_rows - 1}")


def _check_rotatable(t: torch.Tensor, name: str) -> None:
    base = t if t._base is None else t._base
    if base.is_leaf and base.requires_grad:
        raise ValueError(f"{name} is a leaf tensor that requires grad, or a view of one; "
                         "apply_rope_ rotates it in place, so pass a computed tensor (e.g. the "
                         "projection's output) or a clone")


# --- in-place rotation and its autograd --------------------------------------------------------

def _rotate_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             position_ids: torch.Tensor, layout: str, inverse: bool) -> None:
    """Rotates q and k (in `layout`) in place; inverse applies the transpose."""
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    if use_kernel("rope", q):
        op("rope_bwd" if inverse else "rope_fwd")(q, k, cos, sin, position_ids)
    elif inverse:
        rope_bwd_reference(q, k, cos, sin, position_ids)
    else:
        rope_fwd_reference(q, k, cos, sin, position_ids)


def _writable(grad: torch.Tensor) -> torch.Tensor:
    """grad itself, or a copy where elements share memory (a broadcast gradient, as from sum())."""
    if any(stride == 0 and size > 1 for size, stride in zip(grad.shape, grad.stride())):
        return grad.contiguous()
    return grad


class _ApplyRope(torch.autograd.Function):
    """q and k rotated in place and returned. They are not marked dirty: autograd allows only
    one dirty output when inputs are views (q and k always are, of the projections' outputs),
    and rebasing those views would copy the gradients three times in the backward. So the
    outputs count as new tensors that share the inputs' memory, and the mutating op bumps the
    inputs' version counters: a saved copy of the unrotated values is caught at backward."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, layout):
        _rotate_(q, k, cos, sin, position_ids, layout, inverse=False)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.layout = layout
        return q, k

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q, grad_k):
        cos, sin, position_ids = ctx.saved_tensors
        grad_q, grad_k = _writable(grad_q), _writable(grad_k)
        if grad_k is grad_q:
            # One gradient tensor reaching both (e.g. from q + k): rotate each copy once.
            grad_k = grad_k.clone()
        _rotate_(grad_q, grad_k, cos, sin, position_ids, ctx.layout, inverse=True)
        return grad_q, grad_k, None, None, None, None


def apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor,
                layout: str = "bhsd") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k in place by RoPE and returns them (continue with the returned tensors:
    they carry the rotation's gradient).

    q `[B, Hq, S, D]`, k `[B, Hk, S, D]` (layout "bhsd", as transformers after its transpose) or
    `[B, S, Hq, D]`, `[B, S, Hk, D]` (layout "bshd"): bf16/fp16/fp32/fp64, one dtype, any strides
    (views of the projections need no copy), Hq and Hk free (GQA/MQA).
    cos, sin `[max_positions, rotary_dim]` from `rope_cache`: q's dtype, or fp32 beside 16-bit q.
    rotary_dim is even and at most D; dims past it are left as they are.
    position_ids `[B, S]`, `[1, S]` or `[S]`, int64/int32: the cache row of each token (packed
    sequences restart at 0 within a row).

    Equal to `apply_rope_reference` (transformers' apply_rotary_pos_emb), which is what runs off
    CUDA; the CUDA kernel computes in fp32 (fp64 for fp64) and rounds once. Positions outside
    the cache raise a ValueError on the PyTorch path; the CUDA kernel, to spare a host sync,
    never reads outside the cache and writes NaN into those tokens' rotary dims instead.

    The backward rotates the gradients it receives in place by the transposed rotation
    (-theta), saving a copy; those tensors are overwritten, including gradients passed by hand
    to backward() or torch.autograd.grad. Feed the rotated q and k to ops whose backward makes
    new gradients (attention, matmul, elementwise products): autograd hands one gradient tensor
    to every input of a sum, so `rotated_q + x` with x requiring grad would see x's gradient
    rotated too.
    """
    _check_args(q, k, cos, sin, position_ids, layout)
    position_ids = _as_2d(position_ids)
    if not use_kernel("rope", q) and not torch.compiler.is_compiling():
        _check_positions(position_ids, cos.shape[0])
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("cos/sin require grad; apply_rope_ does not differentiate the cache")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        _check_rotatable(q, "q")
        _check_rotatable(k, "k")
        return _ApplyRope.apply(q, k, cos, sin, position_ids, layout)
    _rotate_(q, k, cos, sin, position_ids, layout, inverse=False)
    return q, k


def _fake_rotate(q, k, cos, sin, position_ids):
    return None


register_op("rope_fwd", reference=rope_fwd_reference, fake=_fake_rotate)
register_op("rope_bwd", reference=rope_bwd_reference, fake=_fake_rotate)
