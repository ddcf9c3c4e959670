"""Residual add fused with RMSNorm, where a sublayer's output joins the residual stream right
before the next norm: `residual_out = x + residual` (x's dtype, rounded as PyTorch rounds the
sum), then `y = rms_norm(residual_out, weight, eps, gemma)` exactly as unsloth_ext.ops.rms_norm
defines it. One pass over the rows instead of an add and a norm."""

from __future__ import annotations

import torch

from unsloth_ext._extension import use_kernel
from unsloth_ext.ops._library import (acc_dtype, check_float, check_nonempty, check_pad,
                                      check_param_dtype, check_same_device, empty_padded, op,
                                      register_op)
from unsloth_ext.ops.rms_norm import rms_norm, rms_norm_bwd_reference, rms_norm_fwd_reference


def add_rms_norm_fwd_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float, gemma: bool, y_pad: int = 0
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, residual_out, rstd); rstd per row of residual_out, in the accumulator dtype;
    y's rows y_pad elements further apart than its width."""
    residual_out = x + residual
    y, rstd = rms_norm_fwd_reference(residual_out, weight, eps, gemma, y_pad)
    return y, residual_out, rstd


def add_rms_norm_bwd_reference(grad_y: torch.Tensor, grad_residual_out: torch.Tensor | None,
                               residual_out: torch.Tensor, weight: torch.Tensor,
                               rstd: torch.Tensor, gemma: bool
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_x, grad_weight); grad_x is also the residual's gradient. grad_residual_out
    is the gradient reaching residual_out from its later uses (None: unused)."""
    return rms_norm_bwd_reference(grad_y, residual_out, weight, rstd, gemma, grad_residual_out)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float = 1e-6, gemma: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm in PyTorch: the CPU path and the test oracle (same arguments)."""
    y, residual_out, _ = add_rms_norm_fwd_reference(x, residual, weight, eps, gemma)
    return y, residual_out


def _check_args(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float, y_pad: int) -> None:
    check_pad(y_pad, "y_pad")
    check_float(x, "x")
    check_float(residual, "residual")
    check_float(weight, "weight")
    check_nonempty(x, "x")
    check_same_device(residual, x, "residual", "x")
    check_same_device(weight, x, "weight", "x")
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected the shape of x "
                         f"{tuple(x.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual has dtype {residual.dtype}, expected x's dtype {x.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) "
                         "(the hidden size of x)")
    check_param_dtype(weight, x, "weight")
    if eps < 0:
        raise ValueError(f"eps is {eps}; expected a non-negative number")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6, gemma: bool = False, *, y_pad: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual_out = x + residual; y = rms_norm(residual_out, weight, eps, gemma)`; returns
    (y, residual_out).

    x, residual: `[..., H]`, one dtype of bf16/fp16/fp32/fp64, rows at any stride (contiguous
    elements are fastest); weight: `[H]`, x's dtype or fp32 beside 16-bit x. residual_out:
    contiguous, x's dtype. y: dtype as rms_norm's (Llama: promotion of x and weight; Gemma: x's
    dtype); contiguous, or with y_pad the first H columns of a `[..., H + y_pad]` tensor (see
    `rms_norm`).
    """
    _check_args(x, residual, weight, eps, y_pad)
    if use_kernel("add_rms_norm", x):
        y, residual_out, _ = op("add_rms_norm_fwd")(x, residual, weight, eps, gemma, y_pad)
        return y, residual_out
    y, residual_out, _ = add_rms_norm_fwd_reference(x, residual, weight, eps, gemma, y_pad)
    return y, residual_out


def _fake_fwd(x, residual, weight, eps, gemma, y_pad=0):
    y_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
    return (empty_padded(x.shape, y_pad, x, y_dtype), x.new_empty(x.shape),
            x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype)))


def _fake_bwd(grad_y, grad_residual_out, residual_out, weight, rstd, gemma):
    return (torch.empty_like(residual_out, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape))


def _setup_context(ctx, inputs, output):
    _x, _residual, weight, _eps, gemma, _y_pad = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.gemma = gemma
    # An output nobody used brings None instead of a tensor of zeros to read.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_residual_out, _grad_rstd):
    residual_out, weight, rstd = ctx.saved_tensors
    if grad_y is None:
        return grad_residual_out, grad_residual_out, None, None, None, None
    grad_x, grad_w = op("add_rms_norm_bwd")(grad_y, grad_residual_out, residual_out, weight,
                                            rstd, ctx.gemma)
    # The sum's gradient reaches x and the residual alike.
    return grad_x, grad_x, grad_w, None, None, None


register_op("add_rms_norm_fwd", reference=add_rms_norm_fwd_reference, fake=_fake_fwd,
            backward=_backward, setup_context=_setup_context)
register_op("add_rms_norm_bwd", reference=add_rms_norm_bwd_reference, fake=_fake_bwd)


class _NormKeepingResidual(torch.autograd.Function):
    """(rms_norm(x), x): see `rms_norm_and_residual`."""

    @staticmethod
    def forward(ctx, x, weight, eps, gemma, y_pad):
        y, rstd = op("rms_norm_fwd")(x, weight, eps, gemma, y_pad)
        ctx.save_for_backward(x, weight, rstd)
        ctx.gemma = gemma
        ctx.set_materialize_grads(False)
        return y, x

    @staticmethod
    def backward(ctx, grad_y, grad_residual):
        x, weight, rstd = ctx.saved_tensors
        if grad_y is None:
            return grad_residual, None, None, None, None
        # add_rms_norm's backward over x: the norm's gradient plus the residual's, one pass.
        grad_x, grad_w = op("add_rms_norm_bwd")(grad_y, grad_residual, x, weight, rstd,
                                                ctx.gemma)
        return grad_x, grad_w, None, None, None


def rms_norm_and_residual(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                          gemma: bool = False, *, y_pad: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x, weight, eps, gemma, y_pad=y_pad), x): the first norm of a pre-norm block,
    whose input also goes on as the residual (to `add_rms_norm`). Same values; in backward the
    residual's gradient is added to the norm's in the norm's own pass (add_rms_norm's backward
    over x), where autograd would sum the two in a pass of its own."""
    _check_args(x, x, weight, eps, y_pad)
    if not (use_kernel("rms_norm", x) and use_kernel("add_rms_norm", x)):
        return rms_norm(x, weight, eps, gemma, y_pad=y_pad), x
    return _NormKeepingResidual.apply(x, weight, eps, gemma, y_pad)
