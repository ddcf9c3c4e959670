"""Gated activations of transformer MLPs: SwiGLU `silu(e) * g` (Llama, Mistral, Qwen) and GEGLU
`gelu(e) * g` (Gemma; exact erf form or tanh approximation), where e is the gate projection's
output and g the up projection's. Both directions give what transformers and autograd give:
act(e) is computed in fp32 (fp64 for fp64 inputs) and rounded to e's dtype before the product."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unsloth_ext._extension import use_kernel
from unsloth_ext.ops._library import (acc_dtype, check_float, check_nonempty, check_same_device, op,
                                      register_op)

GELU_APPROXIMATIONS = ("none", "tanh")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_KAPPA = 0.044715


# --- references: the CPU kernels of the ops, the fallback path and the test oracle --------------

def _silu_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _gelu_grad(x: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (x + _KAPPA * x * x * x))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _KAPPA * x * x)
    cdf = 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
    return cdf + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _glu_bwd(grad_h: torch.Tensor, e: torch.Tensor, g: torch.Tensor, act: torch.Tensor,
             act_grad) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_e, grad_g) of h = act * g, act = act(e) already rounded to e's dtype. grad_h * g is
    rounded to e's dtype before the product with act'(e), as autograd's mul backward rounds it."""
    acc = acc_dtype(e.dtype)
    grad_g = grad_h * act
    grad_e = ((grad_h * g).to(acc) * act_grad(e.to(acc))).to(e.dtype)
    return grad_e.contiguous(), grad_g.contiguous()


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b certainly share memory: the same first element, or overlapping bytes of two
    contiguous tensors of one storage. Strided views of one buffer (its two halves, say) pass."""
    if a.device != b.device or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.data_ptr() == b.data_ptr():
        return True
    if not (a.is_contiguous() and b.is_contiguous()):
        return False
    return (a.data_ptr() < b.data_ptr() + b.numel() * b.element_size()
            and b.data_ptr() < a.data_ptr() + a.numel() * a.element_size())


def _check_writable(t: torch.Tensor, name: str, others: dict[str, torch.Tensor]) -> None:
    if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
        raise ValueError(f"{name} has elements that share memory (an expanded view?); the in-place "
                         "backward writes every element of it")
    for other_name, other in others.items():
        if _shares_memory(t, other):
            raise ValueError(f"{name} and {other_name} share memory; the in-place backward "
                             f"overwrites {name}, expected separate buffers")


def _write_back(grads: tuple[torch.Tensor, torch.Tensor], grad_h: torch.Tensor, e: torch.Tensor,
                g: torch.Tensor, h: torch.Tensor | None) -> None:
    """grad_e into e, grad_g into g and, when h is given, h into grad_h."""
    _check_writable(e, "e", {"g": g, "grad_h": grad_h})
    _check_writable(g, "g", {"e": e, "grad_h": grad_h})
    if h is not None:
        _check_writable(grad_h, "grad_h", {})
    e.copy_(grads[0])
    g.copy_(grads[1])
    if h is not None:
        grad_h.copy_(h)


def swiglu_reference(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`silu(e) * g` exactly as transformers computes it (output contiguous)."""
    return (F.silu(e) * g).contiguous()


def swiglu_bwd_reference(grad_h: torch.Tensor, e: torch.Tensor,
                         g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_e, grad_g) of `swiglu(e, g)` for the output gradient grad_h."""
    return _glu_bwd(grad_h, e, g, F.silu(e), _silu_grad)


def swiglu_bwd_inplace_reference(grad_h: torch.Tensor, e: torch.Tensor, g: torch.Tensor,
                                 store_h: bool = False) -> None:
    """swiglu_bwd_reference, with grad_e written into e, grad_g into g and, with store_h,
    `swiglu(e, g)` into grad_h."""
    h = swiglu_reference(e, g) if store_h else None
    _write_back(swiglu_bwd_reference(grad_h, e, g), grad_h, e, g, h)


def geglu_reference(e: torch.Tensor, g: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`gelu(e, approximate) * g` exactly as transformers computes it (output contiguous)."""
    return (F.gelu(e, approximate=approximate) * g).contiguous()


def geglu_bwd_reference(grad_h: torch.Tensor, e: torch.Tensor, g: torch.Tensor,
                        approximate: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_e, grad_g) of `geglu(e, g, approximate)` for the output gradient grad_h."""
    return _glu_bwd(grad_h, e, g, F.gelu(e, approximate=approximate),
                    lambda x: _gelu_grad(x, approximate))


def geglu_bwd_inplace_reference(grad_h: torch.Tensor, e: torch.Tensor, g: torch.Tensor,
                                approximate: str = "none", store_h: bool = False) -> None:
    """geglu_bwd_reference, with grad_e written into e, grad_g into g and, with store_h,
    `geglu(e, g, approximate)` into grad_h."""
    h = geglu_reference(e, g, approximate) if store_h else None
    _write_back(geglu_bwd_reference(grad_h, e, g, approximate), grad_h, e, g, h)


# --- public wrappers ------------------------------------------------------------------------------

def _check_operands(e: torch.Tensor, g: torch.Tensor) -> None:
    check_float(e, "e")
    check_float(g, "g")
    check_nonempty(e, "e")
    check_same_device(g, e, "g", "e")
    if g.shape != e.shape:
        raise ValueError(f"g has shape {tuple(g.shape)}, expected the shape of e {tuple(e.shape)}")
    if g.dtype != e.dtype:
        raise TypeError(f"g has dtype {g.dtype}, expected the dtype of e ({e.dtype})")


def _check_grad_h(grad_h: torch.Tensor, e: torch.Tensor) -> None:
    check_float(grad_h, "grad_h")
    check_same_device(grad_h, e, "grad_h", "e")
    if grad_h.shape != e.shape:
        raise ValueError(f"grad_h has shape {tuple(grad_h.shape)}, expected the shape of e "
                         f"{tuple(e.shape)}")
    if grad_h.dtype != e.dtype:
        raise TypeError(f"grad_h has dtype {grad_h.dtype}, expected the dtype of e ({e.dtype})")


def _check_approximate(approximate: str) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate is {approximate!r}; expected 'none' or 'tanh'")


def swiglu(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """SwiGLU `silu(e) * g`: Llama's `act_fn(gate_proj(x)) * up_proj(x)`.

    e (gate output) and g (up output): one shape `[..., I]`, one dtype (bf16, fp16, fp32, fp64),
    one device. Returns h `[..., I]` in that dtype, contiguous. Inputs whose last dimension is
    contiguous with one stride between rows (column slices of a wider buffer) are read in place;
    other layouts are copied to contiguous first. Differentiable in e and g.
    """
    _check_operands(e, g)
    if use_kernel("swiglu", e):
        return op("swiglu_fwd")(e, g)
    return swiglu_reference(e, g)


def swiglu_backward_(grad_h: torch.Tensor, e: torch.Tensor, g: torch.Tensor, *,
                     store_h: bool = False) -> None:
    """Backward of `swiglu` written over its inputs: e receives grad_e and g receives grad_g.

    e and g are overwritten (each element of the forward inputs is read before it is replaced),
    which spares a caller that owns them two allocations of their size. With store_h, grad_h is
    overwritten too, with h = `swiglu(e, g)` (the forward's values, bit for bit), for a caller
    that needs h after the backward and would otherwise run the forward again. grad_h, e and g:
    one shape, dtype and device, as in `swiglu`; e and g must not share memory with each other or
    with grad_h. Not differentiable: call it where autograd does not record, such as in a
    backward.
    """
    _check_operands(e, g)
    _check_grad_h(grad_h, e)
    if use_kernel("swiglu", e):
        op("swiglu_bwd_")(grad_h, e, g, store_h=store_h)
    else:
        swiglu_bwd_inplace_reference(grad_h, e, g, store_h)


def geglu(e: torch.Tensor, g: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GEGLU `gelu(e) * g`: Gemma's `act_fn(gate_proj(x)) * up_proj(x)`.

    approximate="none" is transformers' `gelu` (the exact erf form), "tanh" its
    `gelu_pytorch_tanh`. Shapes, dtypes, layouts and the output as in `swiglu`.
    """
    _check_operands(e, g)
    _check_approximate(approximate)
    if use_kernel("geglu", e):
        return op("geglu_fwd")(e, g, approximate)
    return geglu_reference(e, g, approximate)


def geglu_backward_(grad_h: torch.Tensor, e: torch.Tensor, g: torch.Tensor,
                    approximate: str = "none", *, store_h: bool = False) -> None:
    """Backward of `geglu` written over its inputs, as `swiglu_backward_`: e receives grad_e and g
    receives grad_g, both overwritten, and with store_h grad_h receives `geglu(e, g,
    approximate)`."""
    _check_operands(e, g)
    _check_grad_h(grad_h, e)
    _check_approximate(approximate)
    if use_kernel("geglu", e):
        op("geglu_bwd_")(grad_h, e, g, approximate, store_h=store_h)
    else:
        geglu_bwd_inplace_reference(grad_h, e, g, approximate, store_h)


# --- registration ---------------------------------------------------------------------------------

def _fake_fwd(e, g, *_approximate):
    return torch.empty_like(e, memory_format=torch.contiguous_format)


def _fake_bwd(grad_h, e, g, *_approximate):
    return (torch.empty_like(e, memory_format=torch.contiguous_format),
            torch.empty_like(g, memory_format=torch.contiguous_format))


def _fake_bwd_inplace(grad_h, e, g, *_approximate_store_h):
    return None


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.approximate = inputs[2] if len(inputs) > 2 else None


def _swiglu_backward(ctx, grad_h):
    e, g = ctx.saved_tensors
    return op("swiglu_bwd")(grad_h, e, g)


def _geglu_backward(ctx, grad_h):
    e, g = ctx.saved_tensors
    grad_e, grad_g = op("geglu_bwd")(grad_h, e, g, ctx.approximate)
    return grad_e, grad_g, None


register_op("swiglu_fwd", reference=swiglu_reference, fake=_fake_fwd, backward=_swiglu_backward,
            setup_context=_setup_context)
register_op("swiglu_bwd", reference=swiglu_bwd_reference, fake=_fake_bwd)
register_op("swiglu_bwd_", reference=swiglu_bwd_inplace_reference, fake=_fake_bwd_inplace)
register_op("geglu_fwd", reference=geglu_reference, fake=_fake_fwd, backward=_geglu_backward,
            setup_context=_setup_context)
register_op("geglu_bwd", reference=geglu_bwd_reference, fake=_fake_bwd)
register_op("geglu_bwd_", reference=geglu_bwd_inplace_reference, fake=_fake_bwd_inplace)
