"""NF4 weights in bitsandbytes' layout: reading them from bitsandbytes, quantizing, dequantizing
and multiplying.

The format (bitsandbytes' `quant_type="nf4"`) stores a [out_features, in_features] weight
flattened row-major, in blocks of `blocksize` values (64 by default). Each block is scaled by its
absolute maximum (absmax) and each scaled value stored as the index of the nearest of 16 levels
(NF4_LEVELS), two per byte with the even value in the high nibble. With double quantization the
fp32 absmax per block is itself stored as an 8-bit code: the mean over all blocks is subtracted
(`offset`), then blocks of 256 entries are scaled by their absmax (`absmax2`) and mapped to the
nearest value of bitsandbytes' signed dynamic 8-bit map (`code2`).

Rounding rule of the quantizer, that of bitsandbytes' PyTorch backend (which its CPU path runs)
and CUDA kernel: a value is multiplied by the fp32 reciprocal of its block's absmax, then mapped
to the nearest level; a value exactly halfway between two levels takes the lower one
(bitsandbytes' CUDA kernel compares `x > midpoint` against the same fp32 midpoints). The packed
bytes therefore equal bitsandbytes' on CPU; its CUDA build takes the reciprocal with fast math
(about an ulp off), so a value within an ulp or two of a midpoint may land on the other level
there. bitsandbytes' CPU library quantizes the 8-bit absmax codes with an approximate search that
sometimes picks a farther code; this module always picks the nearest (ties: the lower code).
Dequantization is bit-identical to bitsandbytes'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from unsloth_ext.ops.nf4 import (ABSMAX_BLOCK, BLOCKSIZES, COMPUTE_DTYPES, NF4_LEVELS,
                                 check_dequantize_out, check_lora, check_nf4_state,
                                 dequantize_checked, nf4_gemv, nf4_gemv_supported)

# Midpoints between consecutive NF4 levels, in fp32 (equal to bitsandbytes' CUDA thresholds).
NF4_MIDPOINTS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (its `create_dynamic_map()`): for decades
    10^-6 .. 10^0, the midpoints of 2^i equal bins over [0.1, 1] scaled by decade i, with both
    signs, plus 0 and 1; sorted. Computed in fp32 as bitsandbytes computes it."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        magnitudes = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (i - 6)
        values += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = _dynamic_map()
DYNAMIC_MIDPOINTS = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / 2

# NF4Weight.from_bnb's results by parameter: (quant_state, its absmax, (data_ptr, CPU-repacked
# flag), the NF4Weight), dropped with the parameter.
_BNB_VIEWS = WeakIdKeyDictionary()


@dataclass(frozen=True)
class NF4Weight:
    """An [out_features, in_features] weight in NF4 (see the module docstring).

    packed:  uint8 [numel / 2], bitsandbytes' byte layout.
    absmax:  fp32 [numel / blocksize], or uint8 codes [numel / blocksize] (double quantization).
    shape:   (out_features, in_features); numel must be a multiple of blocksize.
    dtype:   the compute dtype dequantization produces (bf16 or fp16; fp32 through the PyTorch
             reference).
    absmax2: fp32 [ceil(n_blocks / 256)] and code2: fp32 [256], with double quantization only.
    offset:  the mean subtracted from the absmax before its quantization.
    All tensors on one device. The fields are checked on construction (no device sync) and
    cannot be reassigned afterwards (a frozen dataclass; `dataclasses.replace` makes a new one).
    """
    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "shape", torch.Size(self.shape))
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"shape is {tuple(self.shape)}; expected (out_features, "
                             "in_features), both positive")
        if self.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"dtype is {self.dtype}; expected torch.bfloat16, torch.float16 or "
                            "torch.float32")
        check_nf4_state(self.packed, self.absmax, self.absmax2, self.code2, self.offset,
                        self.blocksize, self.shape.numel())

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @classmethod
    def from_bnb(cls, param) -> "NF4Weight":
        """The NF4Weight of a quantized bitsandbytes `Params4bit` (e.g. `linear.weight` of a
        model loaded with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`),
        sharing its tensors. Raises ValueError/TypeError when the quant state is not NF4, uses a
        layout this module does not read, or does not match the weight.

        Reading checks the quant state on the host (a device sync for a CUDA weight), so the
        result is kept with the parameter and returned again while the parameter keeps its
        data, its quant_state object and that state's absmax: a training step reads every
        projection's weight at each forward without syncing."""
        state = getattr(param, "quant_state", None)
        if state is None or not isinstance(param, torch.Tensor):
            raise ValueError(f"{type(param).__name__} has no quant_state; expected a quantized "
                             "bitsandbytes Params4bit (quantization happens when it is moved "
                             "to its device)")
        key = (param.data_ptr(), getattr(state, "packing_format_for_cpu", False))
        cached = _BNB_VIEWS.get(param)
        if cached is not None and cached[0] is state and cached[1] is state.absmax \
                and cached[2] == key:
            return cached[3]
        weight = cls._read_bnb(param, state)
        _BNB_VIEWS[param] = (state, state.absmax, key, weight)
        return weight

    @classmethod
    def _read_bnb(cls, param: torch.Tensor, state) -> "NF4Weight":
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("the quant state uses bitsandbytes' CPU-only repacked layout "
                             "(packing_format_for_cpu, set by a CPU forward pass); move the "
                             "weight to CUDA or save/reload it to restore the standard layout")
        if state.quant_type != "nf4":
            raise ValueError(f"quant_type is {state.quant_type!r}; only 'nf4' is supported "
                             "(fp4 uses a different 4-bit code)")
        if state.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize is {state.blocksize}; expected a power of two from 32 "
                             "to 4096")
        shape = torch.Size(state.shape)
        if len(shape) != 2:
            raise ValueError(f"quant_state.shape is {tuple(shape)}; expected a 2-D weight")
        code = state.code
        if code is None or code.numel() != 16 or not torch.equal(code.detach().float().cpu(),
                                                                  NF4_LEVELS):
            raise ValueError("quant_state.code is not bitsandbytes' NF4 table")
        packed = param.data
        if packed.dtype != torch.uint8:  # a wider quant_storage holds the same bytes
            packed = packed.contiguous().view(torch.uint8)
        packed = packed.reshape(-1)
        if not state.nested:
            return cls(packed=packed, absmax=state.absmax, shape=shape, dtype=state.dtype,
                       blocksize=state.blocksize)
        nested = state.state2
        if nested.blocksize != ABSMAX_BLOCK:
            raise ValueError(f"the nested absmax blocksize is {nested.blocksize}; expected "
                             f"{ABSMAX_BLOCK} (bitsandbytes' 4-bit double quantization)")
        return cls(packed=packed, absmax=state.absmax, shape=shape, dtype=state.dtype,
                   blocksize=state.blocksize, absmax2=nested.absmax, code2=nested.code,
                   offset=float(state.offset))

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight [out_features, in_features] in `dtype`; see `dequantize_nf4`."""
        return dequantize_nf4(self, out)


def _nearest(scaled: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest level for each value; exactly halfway goes to the lower."""
    return torch.bucketize(scaled, midpoints.to(scaled.device), out_int32=True).to(torch.uint8)


def _blockwise_codes(values: torch.Tensor, midpoints: torch.Tensor):
    """(codes, absmax) of values [blocks, blocksize]: each value times the fp32 reciprocal of its
    block's absmax, clamped to [-1, 1], mapped to the nearest level."""
    absmax = values.abs().amax(dim=1)
    scaled = values * (1.0 / absmax.clamp_min(1e-38))[:, None]
    return _nearest(scaled.clamp_(-1, 1), midpoints).reshape(-1), absmax


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None) -> NF4Weight:
    """Quantize a [out_features, in_features] bf16/fp16/fp32 weight to NF4, byte-compatible with
    bitsandbytes' `quantize_4bit(quant_type="nf4", compress_statistics=double_quant)`, on the
    weight's device. numel must be a multiple of blocksize (32..4096, a power of two).
    compute_dtype (bf16/fp16/fp32) defaults to the weight's dtype.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"weight has dtype {weight.dtype}; expected bfloat16, float16 or float32")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected a non-empty "
                         "[out_features, in_features] matrix")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize is {blocksize}; expected a power of two from 32 to 4096")
    if weight.numel() % blocksize:
        raise ValueError(f"weight has {weight.numel()} values; expected a multiple of blocksize "
                         f"{blocksize}")
    if compute_dtype is None:
        compute_dtype = weight.dtype
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite values; NF4 cannot represent them")
    codes, absmax = _blockwise_codes(weight.reshape(-1, blocksize).float(), NF4_MIDPOINTS)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Weight(packed=packed, absmax=absmax, shape=weight.shape, dtype=compute_dtype,
                         blocksize=blocksize)
    offset = absmax.mean()
    centered = absmax - offset
    # The last group of 256 may be partial: zeros leave its absmax unchanged.
    padded = torch.nn.functional.pad(centered, (0, -centered.numel() % ABSMAX_BLOCK))
    absmax_codes, absmax2 = _blockwise_codes(padded.view(-1, ABSMAX_BLOCK), DYNAMIC_MIDPOINTS)
    return NF4Weight(packed=packed, absmax=absmax_codes[:centered.numel()], shape=weight.shape,
                     dtype=compute_dtype, blocksize=blocksize, absmax2=absmax2,
                     code2=DYNAMIC_MAP.to(weight.device), offset=offset.item())


def dequantize_nf4(w: NF4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight [out_features, in_features] in w.dtype, bit-identical to bitsandbytes'
    `dequantize_4bit`. out: a buffer of that shape and dtype on w's device, contiguous or with
    contiguous rows at a larger distance (the first columns of a wider matrix), reused across
    calls (e.g. one buffer for every layer of a model); allocated when None."""
    if out is None:
        out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    elif not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    elif out.shape != w.shape or out.dtype != w.dtype:
        raise ValueError(f"out has shape {tuple(out.shape)} and dtype {out.dtype}; expected "
                         f"{tuple(w.shape)} and {w.dtype}")
    else:
        check_dequantize_out(out, w.device)
    # The state was checked when w was made (its fields cannot change since).
    dequantize_checked(w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.blocksize, out)
    return out


class LoRA(NamedTuple):
    """A LoRA adapter as PEFT stores it: a [r, in_features], b [out_features, r], and the
    scaling (lora_alpha / r). a and b: the compute dtype or fp32."""
    a: torch.Tensor
    b: torch.Tensor
    scale: float


def nf4_matmul(x: torch.Tensor, w: NF4Weight, lora: LoRA | tuple | None = None) -> torch.Tensor:
    """y [..., out_features] = x [..., in_features] @ W^T (+ scale * (x @ a^T) @ b^T).

    x has w.dtype. Up to 16 rows (decoding) with in_features and blocksize multiples of 64 (and a
    weight of at most 2^36 values) run the GEMV kernel, which reads the packed weight directly
    and sums in fp32; other shapes dequantize and use torch.matmul (the LoRA term as PEFT
    computes it). An inference op: inputs that require grad are rejected (training goes through
    the LoRA autograd functions).
    """
    if not isinstance(w, NF4Weight):
        raise TypeError(f"w must be an NF4Weight, got {type(w).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != w.dtype:
        raise TypeError(f"x has dtype {x.dtype}; expected {w.dtype} (the weight's compute dtype)")
    out_features, in_features = w.shape
    if x.dim() == 0 or x.shape[-1] != in_features or x.numel() == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected [..., {in_features}] with at "
                         "least one row")
    if lora is not None and (not isinstance(lora, tuple) or len(lora) != 3):
        raise TypeError("lora must be None or (a, b, scale), as LoRA(a, b, scale)")
    a, b, scale = (None, None, 1.0) if lora is None else lora
    check_lora(x, a, b, out_features)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, a, b)):
        raise ValueError("nf4_matmul does not propagate gradients; call it under "
                         "torch.no_grad() or use the LoRA autograd functions for training")
    rows = x.reshape(-1, in_features)
    if nf4_gemv_supported(rows.shape[0], w.shape[0], in_features, w.blocksize):
        y = nf4_gemv(rows, w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.blocksize,
                     out_features, a, b, scale)
    else:
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the weight is on {w.device}")
        y = rows @ dequantize_nf4(w).T
        if a is not None:
            hidden = torch.nn.functional.linear(rows.to(a.dtype), a)
            y = y + (torch.nn.functional.linear(hidden, b.to(a.dtype)) * scale).to(y.dtype)
    return y.reshape(*x.shape[:-1], out_features)
