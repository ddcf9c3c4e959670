"""LayerNorm over the last dimension, `(x - mean) / sqrt(var + eps) * weight + bias`, computed as
torch.nn.functional.layer_norm computes it: statistics in fp32 (fp64 for fp64 x), the biased
variance, one rounding to x's dtype at the end."""

from __future__ import annotations

import torch

from unsloth_ext._extension import use_kernel
from unsloth_ext.ops._library import (acc_dtype, check_float, check_nonempty, check_param_dtype,
                                      check_same_device, op, register_op)


def layer_norm_fwd_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, mean, rstd); mean and rstd = 1/sqrt(var + eps) per row, in the accumulator
    dtype."""
    xa = x.to(acc_dtype(x.dtype))
    var, mean = torch.var_mean(xa, -1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    y = (xa - mean) * rstd * weight.to(xa.dtype)
    if bias is not None:
        y = y + bias.to(xa.dtype)
    return y.to(x.dtype), mean.squeeze(-1), rstd.squeeze(-1)


def layer_norm_bwd_reference(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (grad_x, grad_weight, grad_bias or None) given the forward's mean and rstd."""
    acc = acc_dtype(x.dtype)
    r = rstd.to(acc).unsqueeze(-1)
    xhat = (x.to(acc) - mean.to(acc).unsqueeze(-1)) * r
    dy = grad_y.to(acc)
    g = dy * weight.to(acc)
    grad_x = r * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    hidden = x.shape[-1]
    grad_w = (dy * xhat).reshape(-1, hidden).sum(0).to(weight.dtype)
    grad_b = dy.reshape(-1, hidden).sum(0).to(weight.dtype) if has_bias else None
    return grad_x.to(x.dtype), grad_w, grad_b


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         eps: float = 1e-5) -> torch.Tensor:
    """layer_norm in PyTorch: the CPU path and the test oracle (same arguments)."""
    return layer_norm_fwd_reference(x, weight, bias, eps)[0]


def _check_param(param: torch.Tensor, x: torch.Tensor, name: str) -> None:
    check_float(param, name)
    check_same_device(param, x, name, "x")
    if param.dim() != 1 or param.shape[0] != x.shape[-1]:
        raise ValueError(f"{name} has shape {tuple(param.shape)}, expected ({x.shape[-1]},) "
                         "(the hidden size of x)")
    check_param_dtype(param, x, name)


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                eps: float) -> None:
    check_float(x, "x")
    check_nonempty(x, "x")
    _check_param(weight, x, "weight")
    if bias is not None:
        _check_param(bias, x, "bias")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias has dtype {bias.dtype}, expected the weight's dtype "
                            f"{weight.dtype}")
    if eps < 0:
        raise ValueError(f"eps is {eps}; expected a non-negative number")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of x `[..., H]` with weight and optional bias `[H]`;
    matches `torch.nn.functional.layer_norm(x, (H,), weight, bias, eps)`.

    x: bf16/fp16/fp32/fp64, rows at any stride (contiguous elements are fastest); weight and
    bias: x's dtype, or both fp32 beside 16-bit x. Output: `[..., H]`, contiguous, x's dtype.
    """
    _check_args(x, weight, bias, eps)
    if use_kernel("layer_norm", x):
        return op("layer_norm_fwd")(x, weight, bias, eps)[0]
    return layer_norm_reference(x, weight, bias, eps)


def _fake_fwd(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype))
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


def _fake_bwd(grad_y, x, weight, mean, rstd, has_bias):
    grad_b = weight.new_empty(weight.shape) if has_bias else None
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape), grad_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_w, grad_b = op("layer_norm_bwd")(grad_y, x, weight, mean, rstd, ctx.has_bias)
    return grad_x, grad_w, grad_b, None


register_op("layer_norm_fwd", reference=layer_norm_fwd_reference, fake=_fake_fwd,
            backward=_backward, setup_context=_setup_context)
register_op("layer_norm_bwd", reference=layer_norm_bwd_reference, fake=_fake_bwd)
