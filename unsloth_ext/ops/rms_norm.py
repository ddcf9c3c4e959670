"""RMSNorm over the last dimension, in the Llama form `w * round(norm(x))` and the Gemma form
`norm(x) * (1 + w)`, each computed exactly as transformers computes it."""

from __future__ import annotations

import torch

from unsloth_ext._extension import use_kernel
from unsloth_ext.ops._library import (acc_dtype, check_float, check_nonempty, check_pad,
                                      check_param_dtype, check_same_device, empty_padded, op,
                                      register_op)


def rms_norm_fwd_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                           gemma: bool, y_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, rstd). rstd = 1/sqrt(mean(x^2) + eps) per row, in the accumulator dtype. y's
    rows lie y_pad elements further apart than its width (see `rms_norm`)."""
    xa = x.to(acc_dtype(x.dtype))
    rstd = torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xa * rstd
    if gemma:
        y = (xhat * (1.0 + weight.to(xa.dtype))).to(x.dtype)
    else:
        y = weight * xhat.to(x.dtype)
    if y_pad:
        y = empty_padded(y.shape, y_pad, y, y.dtype).copy_(y)
    return y, rstd.squeeze(-1)


def rms_norm_bwd_reference(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           rstd: torch.Tensor, gemma: bool,
                           extra_grad_x: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_x, grad_weight) given the forward's rstd. extra_grad_x (a gradient reaching x
    by another path) is added before grad_x is rounded to x's dtype."""
    acc = acc_dtype(x.dtype)
    r = rstd.to(acc).unsqueeze(-1)
    xhat = x.to(acc) * r
    dy = grad_y.to(acc)
    g = dy * (weight.to(acc) + (1.0 if gemma else 0.0))
    grad_x = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if extra_grad_x is not None:
        grad_x = grad_x + extra_grad_x.to(acc)
    # Llama's weight multiplies the normalized row after rounding to x's dtype.
    xw = xhat if gemma else xhat.to(x.dtype).to(acc)
    grad_w = (dy * xw).reshape(-1, x.shape[-1]).sum(0)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       gemma: bool = False) -> torch.Tensor:
    return rms_norm_fwd_reference(x, weight, eps, gemma)[0]


def _check_args(x: torch.Tensor, weight: torch.Tensor, eps: float, y_pad: int) -> None:
    check_pad(y_pad, "y_pad")
    check_float(x, "x")
    check_float(weight, "weight")
    check_nonempty(x, "x")
    check_same_device(weight, x, "weight", "x")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) "
                         "(the hidden size of x)")
    check_param_dtype(weight, x, "weight")
    if eps < 0:
        raise ValueError(f"eps is {eps}; expected a non-negative number")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             gemma: bool = False, *, y_pad: int = 0) -> torch.Tensor:
    """RMSNorm over the last dimension of x `[..., H]` with weight `[H]`.

    gemma=False: `weight * (x * rstd).to(x.dtype)` (Llama, Mistral, Qwen; output dtype is the
    promotion of x and weight). gemma=True: `(x * rstd * (1 + weight)).to(x.dtype)`.
    x: bf16/fp16/fp32/fp64, any strides; weight: x's dtype, or fp32 beside 16-bit x.
    y_pad: the result is the first H columns of a new `[..., H + y_pad]` tensor; the y_pad
    columns after each row are left unwritten, room the caller may fill (the LoRA Functions'
    `spare_columns`).
    """
    _check_args(x, weight, eps, y_pad)
    if use_kernel("rms_norm", x):
        return op("rms_norm_fwd")(x, weight, eps, gemma, y_pad)[0]
    return rms_norm_fwd_reference(x, weight, eps, gemma, y_pad)[0]


def _fake_fwd(x, weight, eps, gemma, y_pad=0):
    y_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
    return (empty_padded(x.shape, y_pad, x, y_dtype),
            x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype)))


def _fake_bwd(grad_y, x, weight, rstd, gemma):
    return torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _eps, gemma, _y_pad = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.gemma = gemma


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_w = op("rms_norm_bwd")(grad_y, x, weight, rstd, ctx.gemma)
    return grad_x, grad_w, None, None, None


register_op("rms_norm_fwd", reference=rms_norm_fwd_reference, fake=_fake_fwd,
            backward=_backward, setup_context=_setup_context)
register_op("rms_norm_bwd", reference=rms_norm_bwd_reference, fake=_fake_bwd)
