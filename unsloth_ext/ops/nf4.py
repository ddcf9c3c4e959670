"""NF4 ops on bitsandbytes' 4-bit NormalFloat layout: dequantization into a caller's 16-bit
buffer, and the small-M product `x @ W^T (+ s * (x @ A^T) @ B^T)` that reads the packed weight
directly.

The state of a weight of `numel` values, as the ops take it:
  packed    uint8 [numel / 2]: code i of the flattened weight in byte i // 2, even i in the high
            nibble.
  absmax    fp32 [numel / blocksize], or uint8 codes of a double-quantized absmax, decoded as
            code2[absmax] * absmax2[block // 256] + offset (absmax2: fp32 [ceil(n_blocks / 256)],
            code2: fp32 [256]).
  blocksize a power of two from 32 to 4096 dividing numel.
Value i is NF4_LEVELS[code i] * absmax[i // blocksize], computed in fp32 and rounded once.
"""

from __future__ import annotations

import torch

from unsloth_ext._extension import use_kernel
from unsloth_ext.ops._library import op, register_op

# bitsandbytes' NF4 levels (quantiles of N(0, 1) scaled to [-1, 1]), in code order.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)
ABSMAX_BLOCK = 256  # absmax entries per second-level scale (bitsandbytes' nested blocksize)
BLOCKSIZES = tuple(2**i for i in range(5, 13))
GEMV_MAX_ROWS = 16  # rows of x the GEMV kernel takes
GEMV_SLAB = 64  # the GEMV kernel needs in_features and blocksize to be multiples of this
GEMV_MAX_VALUES = 1 << 36  # the GEMV kernel addresses the weight in 32-bit units of 16 values
# Dequantization targets; the kernels produce the 16-bit ones, fp32 (CPU training, checks) goes
# through the reference.
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def check_nf4_state(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                    code2: torch.Tensor | None, offset: float, blocksize: int, numel: int) -> None:
    """Raise a ValueError/TypeError naming the first field that does not describe a weight of
    `numel` values (no device synchronisation)."""
    for name, t in (("packed", packed), ("absmax", absmax), ("absmax2", absmax2),
                    ("code2", code2)):
        optional = name in ("absmax2", "code2")
        if not isinstance(t, torch.Tensor) and not (optional and t is None):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed has dtype {packed.dtype}; expected torch.uint8 (two NF4 codes "
                        "per byte)")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize is {blocksize}; expected a power of two from 32 to 4096")
    if numel <= 0 or numel % blocksize:
        raise ValueError(f"the weight has {numel} values; expected a positive multiple of "
                         f"blocksize {blocksize}")
    if packed.numel() * 2 != numel:
        raise ValueError(f"packed has {packed.numel()} bytes; expected {numel // 2} (two codes "
                         f"per byte for {numel} values)")
    n_blocks = numel // blocksize
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax has {absmax.numel()} entries; expected {n_blocks} (one per "
                         f"block of {blocksize} values)")
    for name, t in (("absmax", absmax), ("absmax2", absmax2), ("code2", code2)):
        if t is not None and t.device != packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
    if not isinstance(offset, (int, float)) or offset != offset or abs(offset) == float("inf"):
        raise ValueError(f"offset is {offset!r}; expected a finite float")
    if absmax.dtype == torch.float32:
        if absmax2 is not None or code2 is not None:
            raise ValueError("absmax2 and code2 are given but absmax is float32; they belong to "
                             "a double-quantized (uint8) absmax")
        return
    if absmax.dtype != torch.uint8:
        raise TypeError(f"absmax has dtype {absmax.dtype}; expected torch.float32, or "
                        "torch.uint8 codes of a double-quantized absmax")
    if absmax2 is None or code2 is None:
        raise ValueError("absmax is uint8 (double-quantized) but absmax2 or code2 is missing")
    groups = -(-n_blocks // ABSMAX_BLOCK)
    for name, t, expected in (("absmax2", absmax2, groups), ("code2", code2, 256)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} has dtype {t.dtype}; expected torch.float32")
        if t.numel() != expected:
            raise ValueError(f"{name} has {t.numel()} entries; expected {expected}")


def nf4_absmax_reference(absmax: torch.Tensor, absmax2: torch.Tensor | None,
                         code2: torch.Tensor | None, offset: float) -> torch.Tensor:
    """The fp32 absmax per block, double quantization decoded as bitsandbytes decodes it (a
    multiply and an add, each rounded)."""
    if absmax2 is None:
        return absmax.reshape(-1)
    scale2 = absmax2.repeat_interleave(ABSMAX_BLOCK)[:absmax.numel()]
    return code2[absmax.reshape(-1).long()] * scale2 + offset


def nf4_values_reference(packed: torch.Tensor, absmax: torch.Tensor,
                         absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: float,
                         blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """The flattened weight [numel] in `dtype`: fp32 level * fp32 absmax, rounded once."""
    flat = packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 15), dim=-1).reshape(-1, blocksize)
    levels = NF4_LEVELS.to(packed.device)[codes.int()]
    scale = nf4_absmax_reference(absmax, absmax2, code2, offset)
    return (levels * scale[:, None]).reshape(-1).to(dtype)


def nf4_dequantize_reference(packed: torch.Tensor, absmax: torch.Tensor,
                             absmax2: torch.Tensor | None, code2: torch.Tensor | None,
                             offset: float, blocksize: int, out: torch.Tensor) -> None:
    """Writes the weight into `out` (any shape with numel values; bf16 or fp16)."""
    out.copy_(nf4_values_reference(packed, absmax, absmax2, code2, offset, blocksize,
                                   out.dtype).view(out.shape))


def nf4_gemv_reference(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                       absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: float,
                       blocksize: int, out_features: int, lora_a: torch.Tensor | None,
                       lora_b: torch.Tensor | None, lora_scale: float) -> torch.Tensor:
    """x [M, K] @ W[out_features, K]^T (+ lora_scale * (x @ lora_a^T) @ lora_b^T): the weight
    dequantized to x's dtype as bitsandbytes does, the products summed in fp32, one rounding."""
    w = nf4_values_reference(packed, absmax, absmax2, code2, offset, blocksize, x.dtype)
    xf = x.float()
    y = xf @ w.view(out_features, -1).float().T
    if lora_a is not None:
        y = y + lora_scale * (xf @ lora_a.float().T) @ lora_b.float().T
    return y.to(x.dtype)


def _check_compute_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected torch.bfloat16, torch.float16 or "
                        "torch.float32")


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                   code2: torch.Tensor | None, offset: float, blocksize: int,
                   out: torch.Tensor) -> None:
    """Dequantize an NF4 weight (state as in the module docstring) into `out`: a bf16, fp16 or
    fp32 tensor with as many elements as the weight, on the weight's device, contiguous or a
    matrix of contiguous rows."""
    _check_compute_tensor(out, "out")
    check_nf4_state(packed, absmax, absmax2, code2, offset, blocksize, out.numel())
    check_dequantize_out(out, packed.device)
    dequantize_checked(packed, absmax, absmax2, code2, offset, blocksize, out)


def check_dequantize_out(out: torch.Tensor, device: torch.device) -> None:
    """out is on the weight's device and contiguous, or 2-D with contiguous rows at any distance
    (e.g. the first columns of a wider matrix)."""
    if out.device != device:
        raise ValueError(f"out is on {out.device} but packed is on {device}")
    if not (out.is_contiguous() or (out.dim() == 2 and out.stride(1) == 1
                                    and out.stride(0) >= out.shape[1])):
        raise ValueError(f"out is neither contiguous nor a matrix of contiguous rows (strides "
                         f"{out.stride()})")


def dequantize_checked(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                       code2: torch.Tensor | None, offset: float, blocksize: int,
                       out: torch.Tensor) -> None:
    """`nf4_dequantize` of arguments already checked: a state that passed `check_nf4_state` (an
    NF4Weight's) into an `out` that passed `check_dequantize_out` and holds as many values in a
    compute dtype."""
    if out.dtype in KERNEL_DTYPES and use_kernel("nf4", out):
        op("nf4_dequantize")(packed, absmax, absmax2, code2, offset, blocksize, out)
    else:
        nf4_dequantize_reference(packed, absmax, absmax2, code2, offset, blocksize, out)


def check_lora(x: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
               out_features: int) -> None:
    """lora_a [r, in_features] and lora_b [out_features, r], in x's dtype or fp32, on x's device;
    both or neither."""
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together")
    if lora_a is None:
        return
    rank = lora_a.shape[0] if isinstance(lora_a, torch.Tensor) and lora_a.dim() == 2 else 0
    expected = {"lora_a": (rank, x.shape[-1]), "lora_b": (out_features, rank)}
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} has dtype {t.dtype}; expected {x.dtype} (the dtype of x) "
                            "or torch.float32")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if rank < 1 or tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {expected[name]} "
                             "(lora_a [rank, in_features], lora_b [out_features, rank])")


def nf4_gemv_supported(m: int, out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether the GEMV kernel takes this problem (else dequantize and matmul)."""
    return (1 <= m <= GEMV_MAX_ROWS and in_features % GEMV_SLAB == 0 and blocksize >= GEMV_SLAB
            and out_features * in_features <= GEMV_MAX_VALUES)


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
             absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: float,
             blocksize: int, out_features: int, lora_a: torch.Tensor | None = None,
             lora_b: torch.Tensor | None = None, lora_scale: float = 1.0) -> torch.Tensor:
    """y [M, out_features] = x [M, K] @ W^T (+ lora_scale * (x @ lora_a^T) @ lora_b^T), fp32
    accumulation, for 1 <= M <= 16 and K, blocksize multiples of 64.

    x: bf16/fp16 (the kernel) or fp32 (the reference), any strides; W: NF4 state (module
    docstring) of an [out_features, K] weight; lora_a [r, K], lora_b [out_features, r]: x's dtype
    or fp32. y has x's dtype.
    """
    _check_compute_tensor(x, "x")
    if x.dim() != 2 or not nf4_gemv_supported(x.shape[0], out_features, x.shape[1], blocksize):
        raise ValueError(f"x has shape {tuple(x.shape)} with blocksize {blocksize} and "
                         f"out_features {out_features}; the NF4 GEMV needs [M, K] with "
                         f"1 <= M <= {GEMV_MAX_ROWS}, K and blocksize multiples of {GEMV_SLAB}, "
                         f"and at most 2^36 weight values")
    check_nf4_state(packed, absmax, absmax2, code2, offset, blocksize, out_features * x.shape[1])
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device} but packed is on {packed.device}")
    check_lora(x, lora_a, lora_b, out_features)
    args = (x, packed, absmax, absmax2, code2, offset, blocksize, out_features, lora_a, lora_b,
            lora_scale)
    if x.dtype in KERNEL_DTYPES and use_kernel("nf4", x):
        return op("nf4_gemv")(*args)
    return nf4_gemv_reference(*args)


def _fake_dequantize(packed, absmax, absmax2, code2, offset, blocksize, out):
    return None


def _fake_gemv(x, packed, absmax, absmax2, code2, offset, blocksize, out_features, lora_a, lora_b,
               lora_scale):
    return x.new_empty((x.shape[0], out_features))


register_op("nf4_dequantize", reference=nf4_dequantize_reference, fake=_fake_dequantize)
register_op("nf4_gemv", reference=nf4_gemv_reference, fake=_fake_gemv)
