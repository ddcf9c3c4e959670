"""Python-side registration for the ops that csrc/registration.cpp defines: the CPU kernel (the
reference), the fake (shape/dtype) implementation for torch.compile, and the autograd formula."""

from __future__ import annotations

from typing import Callable

import torch

from unsloth_ext._extension import STATE

NAMESPACE = "unsloth_ext"


def register_op(name: str, *, reference: Callable, fake: Callable,
                backward: Callable | None = None, setup_context: Callable | None = None) -> None:
    """Attach the Python pieces to op `unsloth_ext::name`. Nothing to do without the binary: the
    op does not exist then and callers use the reference directly."""
    if not STATE.loaded:
        return
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_kernel(qualname, "cpu", reference)
    torch.library.register_fake(qualname, fake)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def op(name: str):
    """The registered op `torch.ops.unsloth_ext.<name>`."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype of the kernels: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected bfloat16, float16, float32 or "
                        "float64")


def check_nonempty(t: torch.Tensor, name: str) -> None:
    if t.dim() == 0 or t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def check_same_device(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def empty_padded(shape: tuple, pad: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of `shape` whose rows (along the last dimension) lie pad elements further
    apart than its width: the leading columns of a `[..., width + pad]` allocation, like the
    kernels' `y_pad` outputs."""
    padded = like.new_empty((*shape[:-1], shape[-1] + pad), dtype=dtype)
    return padded[..., :shape[-1]]


def check_pad(pad: int, name: str) -> None:
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise ValueError(f"{name} is {pad!r}; expected a non-negative int")


def check_param_dtype(param: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """Parameters share x's dtype, or are fp32 beside 16-bit x (mixed-precision training)."""
    if param.dtype == x.dtype:
        return
    if param.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16):
        return
    raise TypeError(f"{name} has dtype {param.dtype} but x has dtype {x.dtype}; expected the "
                    "same dtype, or float32 with 16-bit x")
