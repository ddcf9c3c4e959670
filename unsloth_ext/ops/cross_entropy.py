"""Cross-entropy over rows of logits, and lm_head + cross-entropy that never holds all the logits.

Per row, with z the logits after `logit_scale` and Gemma-2 soft-capping (z = softcap *
tanh(z / softcap)), eps the label smoothing and V the vocabulary size,

    loss = logsumexp(z) - (1 - eps) * z[label] - eps / V * sum(z)

as `torch.nn.functional.cross_entropy` computes it, in fp32 (fp64 for fp64 logits). Rows whose
label is `ignore_index` count for nothing. reduction="mean" divides the sum by the number of
counted rows, or by `num_items_in_batch` when given (transformers passes it so that gradient
accumulation matches one large batch). A denominator of 0 is taken as 1: a batch whose rows are all
ignored has loss 0 and zero gradients, where PyTorch gives NaN.

The ops compute per row `lse = logsumexp(z)` and `target = (1 - eps) * z[label] + eps / V *
sum(z)` (loss = lse - target), optionally over a window of the vocabulary; see
csrc/kernels/cross_entropy.h.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from unsloth_ext._extension import use_kernel
from unsloth_ext.ops._library import (acc_dtype, check_float, check_nonempty, check_same_device,
                                      op, register_op)

REDUCTIONS = ("mean", "sum", "none")
# fused_linear_cross_entropy keeps one chunk of logits at a time: at most this many bytes, and at
# most a quarter of the memory free on the device (free per the driver plus the caching
# allocator's unused blocks).
CHUNK_CAP_BYTES = 512 << 20
# Token chunks shorter than this make the matmuls read the whole lm_head for few rows: below it
# the vocabulary is split instead.
MIN_CHUNK_ROWS = 128
# Vocabulary windows are a multiple of this many columns.
VOCAB_WINDOW_ALIGN = 64


# --- references (the CPU kernels of the ops, and the test oracles) ------------------------------

def _logit_map(logits: torch.Tensor, logit_scale: float, softcap: float):
    """(z, dz/dx) in the accumulator dtype; dz/dx is a number without softcap."""
    z = logits.to(acc_dtype(logits.dtype)) * logit_scale
    if not softcap:
        return z, logit_scale
    t = torch.tanh(z / softcap)
    return softcap * t, logit_scale * (1 - t * t)


def _label_columns(labels: torch.Tensor, cols: int, vocab_start: int, vocab_size: int,
                   ignore_index: int):
    """(ignored, invalid, in_window, column) per row; column is 0 where not in_window."""
    ignored = labels == ignore_index
    invalid = ~ignored & ((labels < 0) | (labels >= vocab_size))
    col = labels - vocab_start
    in_window = ~ignored & ~invalid & (col >= 0) & (col < cols)
    return ignored, invalid, in_window, torch.where(in_window, col, 0)


def _mark_rows(values: torch.Tensor, ignored: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
    """0 for ignored rows, NaN for rows with an invalid label (values: per row, or rows of them)."""
    if values.dim() > ignored.dim():
        ignored, invalid = ignored.unsqueeze(-1), invalid.unsqueeze(-1)
    return torch.where(ignored, 0.0, torch.where(invalid, math.nan, values))


def cross_entropy_fwd_reference(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                                vocab_size: int, ignore_index: int, logit_scale: float,
                                softcap: float, label_smoothing: float):
    """(lse, target) per row over the columns of logits `[..., C]`, which are classes
    vocab_start .. vocab_start + C - 1 of a vocabulary of vocab_size; labels `[...]` int64.
    Differentiable."""
    z, _ = _logit_map(logits, logit_scale, softcap)
    ignored, invalid, in_window, col = _label_columns(labels, z.shape[-1], vocab_start,
                                                      vocab_size, ignore_index)
    z_label = z.gather(-1, col.unsqueeze(-1)).squeeze(-1)
    target = torch.where(in_window, (1 - label_smoothing) * z_label, 0.0)
    if label_smoothing:
        target = target + label_smoothing / vocab_size * z.sum(-1)
    lse = torch.logsumexp(z, -1)
    return _mark_rows(lse, ignored, invalid), _mark_rows(target, ignored, invalid)


def cross_entropy_bwd_reference(grad_lse: torch.Tensor, grad_target: torch.Tensor,
                                logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                                vocab_start: int, vocab_size: int, ignore_index: int,
                                logit_scale: float, softcap: float,
                                label_smoothing: float) -> torch.Tensor:
    """grad_lse * d(lse)/d(logits) + grad_target * d(target)/d(logits), softmax taken against
    the given lse; in logits' dtype."""
    z, slope = _logit_map(logits, logit_scale, softcap)
    ignored, invalid, in_window, col = _label_columns(labels, z.shape[-1], vocab_start,
                                                      vocab_size, ignore_index)
    g_target = grad_target.unsqueeze(-1)
    grad = grad_lse.unsqueeze(-1) * torch.exp(z - lse.unsqueeze(-1))
    grad = grad + g_target * (label_smoothing / vocab_size)
    on_label = torch.where(in_window.unsqueeze(-1), g_target * (1 - label_smoothing), 0.0)
    grad = grad.scatter_add(-1, col.unsqueeze(-1), on_label)
    return _mark_rows(grad * slope, ignored, invalid).to(logits.dtype)


def cross_entropy_bwd_reference_(grad_lse, grad_target, logits, labels, lse, vocab_start,
                                 vocab_size, ignore_index, logit_scale, softcap,
                                 label_smoothing) -> None:
    """cross_entropy_bwd_reference written over logits."""
    logits.copy_(cross_entropy_bwd_reference(grad_lse, grad_target, logits, labels, lse,
                                             vocab_start, vocab_size, ignore_index, logit_scale,
                                             softcap, label_smoothing))


def cross_entropy_fwd_bwd_reference_(logits: torch.Tensor, labels: torch.Tensor,
                                     grad_scale: torch.Tensor, ignore_index: int,
                                     logit_scale: float, softcap: float,
                                     label_smoothing: float) -> torch.Tensor:
    """The loss per row over whole rows; logits are overwritten by grad_scale * d(loss)/dx."""
    settings = (0, logits.shape[-1], ignore_index, logit_scale, softcap, label_smoothing)
    lse, target = cross_entropy_fwd_reference(logits, labels, *settings)
    cross_entropy_bwd_reference_(grad_scale, -grad_scale, logits, labels, lse, *settings)
    return lse - target


def _mean_denominator(labels: torch.Tensor, ignore_index: int, num_items_in_batch,
                      dtype: torch.dtype) -> torch.Tensor:
    """The counted rows, or num_items_in_batch; 0 is taken as 1. No host sync."""
    if num_items_in_batch is None:
        count = (labels != ignore_index).sum()
    else:
        count = torch.as_tensor(num_items_in_batch, device=labels.device)
    return count.to(dtype).clamp_min(1)


def _reduce(row_loss: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str,
            num_items_in_batch) -> torch.Tensor:
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / _mean_denominator(labels, ignore_index, num_items_in_batch, total.dtype)


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor, *,
                            ignore_index: int = -100, reduction: str = "mean",
                            num_items_in_batch=None, logit_scale: float = 1.0,
                            softcap: float | None = None,
                            label_smoothing: float = 0.0) -> torch.Tensor:
    """`cross_entropy` in PyTorch operations (differentiable)."""
    lse, target = cross_entropy_fwd_reference(logits, labels, 0, logits.shape[-1], ignore_index,
                                              logit_scale, softcap or 0.0, label_smoothing)
    return _reduce(lse - target, labels, ignore_index, reduction, num_items_in_batch)


# --- checks ----------------------------------------------------------------------------------

def _check_settings(reduction: str, num_items_in_batch, logit_scale: float,
                    softcap: float | None, label_smoothing: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction is {reduction!r}; expected one of {REDUCTIONS}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch is the denominator of reduction='mean'; got it "
                         f"with reduction={reduction!r}")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale is {logit_scale}; expected a positive number")
    if softcap is not None and not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap is {softcap}; expected None, 0 (off) or a positive number")
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing is {label_smoothing}; expected a number in [0, 1]")


def _check_labels(labels: torch.Tensor, leading_shape: torch.Size, device: torch.device,
                  what: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels has dtype {labels.dtype}; expected torch.int64 class indices")
    if labels.shape != leading_shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected "
                         f"{tuple(leading_shape)} (the leading dimensions of {what})")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but {what} is on {device}")


def _bad_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))


def _check_label_values(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every label is a class or ignore_index (one device-to-host copy of a flag)."""
    bad = _bad_labels(labels, vocab_size, ignore_index)
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"labels{where} is {labels[tuple(where)].item()}; expected a class "
                         f"index in [0, {vocab_size}) or ignore_index ({ignore_index})")


def start_label_check(labels: torch.Tensor, vocab_size: int,
                      ignore_index: int = -100) -> Callable[[], None]:
    """The label check of `fused_linear_cross_entropy`, started now and finished by the function
    it returns, which raises the same error for a bad label. On CUDA the device computes a flag
    behind its queued work and copies it to pinned host memory; the returned function waits for
    that copy only. Started before a model's forward and finished after it, the check costs no
    wait, where a check at the end of the forward would wait for the copy engine behind the
    offloaded checkpoint's transfers. Pass check_labels=False to the loss after finishing it."""
    if not labels.is_cuda:
        return lambda: _check_label_values(labels, vocab_size, ignore_index)
    flag = torch.empty((), dtype=torch.bool, pin_memory=True)
    flag.copy_(_bad_labels(labels, vocab_size, ignore_index).any(), non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def finish() -> None:
        copied.synchronize()
        if flag.item():
            _check_label_values(labels, vocab_size, ignore_index)  # names the first bad label
    return finish


# --- cross_entropy ---------------------------------------------------------------------------

class _CrossEntropyGradInLogits(torch.autograd.Function):
    """cross_entropy_fwd whose backward writes the gradient over the saved logits."""

    @staticmethod
    def forward(ctx, logits, labels, *settings):
        lse, target = op("cross_entropy_fwd")(logits, labels, *settings)
        ctx.save_for_backward(logits, labels, lse)
        ctx.settings = settings
        return lse, target

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        logits, labels, lse = ctx.saved_tensors
        op("cross_entropy_bwd_")(grad_lse, grad_target, logits, labels, lse, *ctx.settings)
        return (logits, None) + (None,) * len(ctx.settings)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", num_items_in_batch=None, logit_scale: float = 1.0,
                  softcap: float | None = None, label_smoothing: float = 0.0,
                  inplace_backward: bool = False, check_labels: bool = True) -> torch.Tensor:
    """Cross-entropy of logits `[..., V]` (bf16/fp16/fp32/fp64, any strides) against labels
    `[...]` (int64 class indices or ignore_index); see the module docstring for the math.

    reduction: "mean", "sum" or "none" (the loss per row, shaped like labels). The loss is fp32
    (fp64 for fp64 logits). num_items_in_batch (int or tensor, reduction="mean" only) replaces
    the count of non-ignored rows as the mean's denominator. logit_scale multiplies the logits;
    softcap (None or 0: off) applies Gemma-2's `softcap * tanh(z / softcap)`.

    On CUDA the forward keeps only the fp32 logsumexp per row and the backward recomputes the
    softmax. inplace_backward=True writes the gradient over the logits' memory, saving a [T, V]
    buffer: the logits must be a computed tensor nobody reads after the backward.
    check_labels=True raises ValueError for a label outside [0, V) other than ignore_index at the
    cost of one device-to-host sync; with False such rows give NaN loss and gradients.
    """
    check_float(logits, "logits")
    check_nonempty(logits, "logits")
    _check_labels(labels, logits.shape[:-1], logits.device, "logits")
    _check_settings(reduction, num_items_in_batch, logit_scale, softcap, label_smoothing)
    if inplace_backward and logits.is_leaf and logits.requires_grad:
        raise ValueError("inplace_backward=True overwrites the logits with their gradient; the "
                         "logits must be computed by the model, not a leaf tensor")
    vocab_size = logits.shape[-1]
    if check_labels:
        _check_label_values(labels, vocab_size, ignore_index)
    if not use_kernel("cross_entropy", logits):
        return cross_entropy_reference(
            logits, labels, ignore_index=ignore_index, reduction=reduction,
            num_items_in_batch=num_items_in_batch, logit_scale=logit_scale, softcap=softcap,
            label_smoothing=label_smoothing)
    settings = (0, vocab_size, int(ignore_index), float(logit_scale), float(softcap or 0.0),
                float(label_smoothing))
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        lse, target = _CrossEntropyGradInLogits.apply(logits, labels, *settings)
    else:
        lse, target = op("cross_entropy_fwd")(logits, labels, *settings)
    return _reduce(lse - target, labels, ignore_index, reduction, num_items_in_batch)


# --- fused_linear_cross_entropy --------------------------------------------------------------

class _Ops(NamedTuple):
    fwd: Callable
    bwd_: Callable
    fwd_bwd_: Callable


def _ops(t: torch.Tensor) -> _Ops:
    """The cross-entropy ops for tensors on t's device: kernels, or their references."""
    if use_kernel("cross_entropy", t):
        return _Ops(op("cross_entropy_fwd"), op("cross_entropy_bwd_"),
                    op("cross_entropy_fwd_bwd_"))
    return _Ops(cross_entropy_fwd_reference, cross_entropy_bwd_reference_,
                cross_entropy_fwd_bwd_reference_)


@dataclass(frozen=True)
class _Settings:
    ignore_index: int
    reduction: str
    logit_scale: float
    softcap: float
    label_smoothing: float

    def op_args(self) -> tuple:
        return self.ignore_index, self.logit_scale, self.softcap, self.label_smoothing


@dataclass
class _Grads:
    """Gradient buffers of one pass; None where not wanted."""
    hidden: torch.Tensor | None  # [T, H], written
    weight: torch.Tensor | None  # [V, H], added to
    bias: torch.Tensor | None    # [V] accumulator dtype, added to


def chunk_shape(tokens: int, vocab_size: int, itemsize: int, budget: int) -> tuple[int, int]:
    """(tokens, vocabulary columns) of one chunk of logits within `budget` bytes: whole rows when
    MIN_CHUNK_ROWS of them fit (or all tokens do), else MIN_CHUNK_ROWS rows of a vocabulary window
    (a multiple of VOCAB_WINDOW_ALIGN columns)."""
    rows = budget // (vocab_size * itemsize)
    if rows >= min(tokens, MIN_CHUNK_ROWS):
        return min(tokens, rows), vocab_size
    rows = min(tokens, MIN_CHUNK_ROWS)
    cols = budget // (rows * itemsize) // VOCAB_WINDOW_ALIGN * VOCAB_WINDOW_ALIGN
    return rows, min(vocab_size, max(cols, VOCAB_WINDOW_ALIGN))


def _chunk_budget(device: torch.device, chunk_bytes: int | None) -> int:
    if chunk_bytes is not None:
        return chunk_bytes
    if device.type != "cuda":
        return CHUNK_CAP_BYTES
    free, _total = torch.cuda.mem_get_info(device)
    unused_cache = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return min(CHUNK_CAP_BYTES, (free + unused_cache) // 4)


def _logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
    if bias is None:
        torch.mm(h, weight.t(), out=out)
    else:
        torch.addmm(bias, h, weight.t(), out=out)


def _add_grads(grads: _Grads, grad_logits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
               rows: slice, cols: slice, hidden_sum: torch.Tensor | None = None) -> None:
    """Adds the contribution of grad_logits (rows x vocabulary columns cols) to every gradient.
    dHidden of the rows is written, or with vocabulary windows added to hidden_sum (accumulator
    dtype, so that many windows do not add many 16-bit roundings)."""
    if grads.hidden is not None:
        if hidden_sum is None:
            torch.mm(grad_logits, weight[cols], out=grads.hidden[rows])
        else:
            hidden_sum += torch.mm(grad_logits, weight[cols])
    if grads.weight is not None:
        grads.weight[cols].addmm_(grad_logits.t(), h[rows])
    if grads.bias is not None:
        grads.bias[cols] += grad_logits.sum(0, dtype=grads.bias.dtype)


def _linear_ce_pass(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    labels: torch.Tensor, settings: _Settings, chunk: tuple[int, int],
                    grad_scale: torch.Tensor | None = None,
                    grads: _Grads | None = None) -> torch.Tensor:
    """The loss per row of logits = h [T, H] @ weight [V, H]^T + bias, one chunk of logits at a
    time. With grad_scale [T] (accumulator dtype), also the gradients of sum(grad_scale * loss)
    into grads."""
    ops = _ops(h)
    tokens, vocab_size = h.shape[0], weight.shape[0]
    chunk_rows, chunk_cols = chunk
    args = settings.op_args()
    buffer = torch.empty(chunk_rows * chunk_cols, dtype=h.dtype, device=h.device)
    loss = torch.empty(tokens, dtype=acc_dtype(h.dtype), device=h.device)
    for t0 in range(0, tokens, chunk_rows):
        rows = slice(t0, min(tokens, t0 + chunk_rows))
        n, y = rows.stop - rows.start, labels[rows]
        windows = [slice(v0, min(vocab_size, v0 + chunk_cols))
                   for v0 in range(0, vocab_size, chunk_cols)]

        def logits_of(cols: slice) -> torch.Tensor:
            out = buffer[:n * (cols.stop - cols.start)].view(n, cols.stop - cols.start)
            _logits_into(out, h[rows], weight[cols], None if bias is None else bias[cols])
            return out

        if len(windows) == 1 and grad_scale is not None:
            logits = logits_of(windows[0])
            loss[rows] = ops.fwd_bwd_(logits, y, grad_scale[rows], *args)
            _add_grads(grads, logits, h, weight, rows, windows[0])
            continue
        # Vocabulary windows (or no gradients): merge the windows' logsumexps, then, for the
        # gradients, recompute each window's logits.
        lse, target = None, 0.0
        for cols in windows:
            lse_w, target_w = ops.fwd(logits_of(cols), y, cols.start, vocab_size, *args)
            lse = lse_w if lse is None else torch.logaddexp(lse, lse_w)
            target = target + target_w
        # The windows give ignored rows lse 0 each, so their merged lse is not 0.
        loss[rows] = torch.where(y == settings.ignore_index, 0.0, lse - target)
        if grad_scale is None:
            continue
        scale = grad_scale[rows]
        hidden_sum = None
        if grads.hidden is not None:
            hidden_sum = torch.zeros(n, h.shape[1], dtype=loss.dtype, device=h.device)
        for cols in windows:
            logits = logits_of(cols)
            ops.bwd_(scale, -scale, logits, y, lse, cols.start, vocab_size, *args)
            _add_grads(grads, logits, h, weight, rows, cols, hidden_sum)
        if hidden_sum is not None:
            grads.hidden[rows] = hidden_sum
    return loss


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of hidden @ weight.T + bias against labels, one chunk of logits at a time.

    For reduction "mean" and "sum" the forward computes the gradients chunk by chunk (logits chunk
    -> cross-entropy gradient written over it -> dHidden chunk = grad @ weight, dWeight +=
    grad.T @ hidden chunk, dBias += column sums) and keeps them; the backward scales them by
    grad_output (once: a second backward needs a second forward). For "none" the upstream
    gradient differs per row, so the backward recomputes the chunks with it.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, settings: _Settings, num_items_in_batch,
                chunk: tuple[int, int]):
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        ctx.settings, ctx.chunk, ctx.hidden_shape = settings, chunk, hidden.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        want = ctx.needs_input_grad[:3]
        if settings.reduction == "none":
            if any(want):
                ctx.save_for_backward(hidden, weight, bias, labels)
            loss = _linear_ce_pass(h, weight, bias, y, settings, chunk)
            return loss.view(labels.shape)
        grads = None
        if any(want):
            # The gradients of the sum: the mean's denominator goes with grad_output into the
            # backward, keeping 16-bit gradient chunks away from underflow.
            grads = _new_grads(h, weight, want)
            ones = torch.ones(h.shape[0], dtype=acc_dtype(h.dtype), device=h.device)
            loss = _linear_ce_pass(h, weight, bias, y, settings, chunk, ones, grads)
        else:
            loss = _linear_ce_pass(h, weight, bias, y, settings, chunk)
        total = loss.sum()
        ctx.inv_denominator = None
        if settings.reduction == "mean":
            ctx.inv_denominator = 1 / _mean_denominator(y, settings.ignore_index,
                                                        num_items_in_batch, total.dtype)
            total = total * ctx.inv_denominator
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.settings.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            h = hidden.reshape(-1, hidden.shape[-1])
            grads = _new_grads(h, weight, ctx.needs_input_grad[:3])
            scale = grad_output.reshape(-1).to(acc_dtype(h.dtype)).contiguous()
            with torch.autocast(h.device.type, enabled=False):
                _linear_ce_pass(h, weight, bias, labels.reshape(-1), ctx.settings, ctx.chunk,
                                scale, grads)
        else:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError("LinearCrossEntropy computes its gradients in the forward and "
                                   "hands them out once; run the forward again to backpropagate "
                                   "again")
            factor = grad_output
            if ctx.inv_denominator is not None:
                factor = grad_output * ctx.inv_denominator
            for g in (grads.hidden, grads.weight, grads.bias):
                if g is not None:
                    g.mul_(factor)
        grad_hidden = None if grads.hidden is None else grads.hidden.view(ctx.hidden_shape)
        grad_bias = None if grads.bias is None else grads.bias.to(ctx.bias_dtype)
        return grad_hidden, grads.weight, grad_bias, None, None, None, None


def _new_grads(h: torch.Tensor, weight: torch.Tensor, want: tuple[bool, bool, bool]) -> _Grads:
    return _Grads(
        hidden=torch.empty_like(h) if want[0] else None,
        weight=torch.zeros_like(weight) if want[1] else None,
        bias=torch.zeros(weight.shape[0], dtype=acc_dtype(weight.dtype), device=weight.device)
        if want[2] else None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                               reduction: str = "mean", num_items_in_batch=None,
                               logit_scale: float = 1.0, softcap: float | None = None,
                               label_smoothing: float = 0.0, chunk_bytes: int | None = None,
                               check_labels: bool = True) -> torch.Tensor:
    """`cross_entropy(hidden @ weight.T + bias, labels, ...)` without the `[T, V]` logits.

    hidden `[..., H]` and weight `[V, H]` (lm_head) of one float dtype (under autocast both are
    cast to its dtype, as F.linear would), bias `[V]` or None, labels `[...]` int64. Settings
    and result as in `cross_entropy`. Returns dHidden, dWeight and dBias for the inputs that
    require grad.

    The logits are computed one chunk at a time, in hidden's dtype: at most chunk_bytes per chunk,
    by default min(CHUNK_CAP_BYTES, a quarter of the free device memory). A chunk holds whole
    rows for min(T, MIN_CHUNK_ROWS) tokens or more; otherwise the vocabulary is split too (each
    window's logits are then computed twice). dWeight is accumulated chunk by chunk in weight's
    dtype.
    """
    for t, name in ((hidden, "hidden"), (weight, "weight")):
        check_float(t, name)
        check_nonempty(t, name)
    check_same_device(weight, hidden, "weight", "hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected (V, "
                         f"{hidden.shape[-1]}) (the hidden size of hidden)")
    vocab_size = weight.shape[0]
    if bias is not None:
        check_float(bias, "bias")
        check_same_device(bias, hidden, "bias", "hidden")
        if bias.shape != (vocab_size,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({vocab_size},)")
    _check_labels(labels, hidden.shape[:-1], hidden.device, "hidden")
    _check_settings(reduction, num_items_in_batch, logit_scale, softcap, label_smoothing)
    if chunk_bytes is not None and chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes is {chunk_bytes}; expected a positive number of bytes")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has dtype {hidden.dtype}; "
                            "expected the same dtype")
    if check_labels:
        _check_label_values(labels, vocab_size, ignore_index)
    settings = _Settings(int(ignore_index), reduction, float(logit_scale), float(softcap or 0.0),
                         float(label_smoothing))
    chunk = chunk_shape(hidden.numel() // hidden.shape[-1], vocab_size, hidden.element_size(),
                        _chunk_budget(hidden.device, chunk_bytes))
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropy.apply(hidden, weight, bias, labels, settings,
                                        num_items_in_batch, chunk)


# --- registration ------------------------------------------------------------------------------

def _fake_fwd(logits, labels, vocab_start, vocab_size, ignore_index, logit_scale, softcap,
              label_smoothing):
    acc = acc_dtype(logits.dtype)
    return logits.new_empty(labels.shape, dtype=acc), logits.new_empty(labels.shape, dtype=acc)


def _fake_bwd(grad_lse, grad_target, logits, *_settings):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_bwd_(*_args) -> None:
    return None


def _fake_fwd_bwd_(logits, labels, *_settings):
    return logits.new_empty(labels.shape, dtype=acc_dtype(logits.dtype))


def _setup_context(ctx, inputs, output):
    logits, labels, *settings = inputs
    ctx.save_for_backward(logits, labels, output[0])
    ctx.settings = settings


def _backward(ctx, grad_lse, grad_target):
    logits, labels, lse = ctx.saved_tensors
    grad = op("cross_entropy_bwd")(grad_lse, grad_target, logits, labels, lse, *ctx.settings)
    return (grad, None) + (None,) * len(ctx.settings)


register_op("cross_entropy_fwd", reference=cross_entropy_fwd_reference, fake=_fake_fwd,
            backward=_backward, setup_context=_setup_context)
register_op("cross_entropy_bwd", reference=cross_entropy_bwd_reference, fake=_fake_bwd)
register_op("cross_entropy_bwd_", reference=cross_entropy_bwd_reference_, fake=_fake_bwd_)
register_op("cross_entropy_fwd_bwd_", reference=cross_entropy_fwd_bwd_reference_,
            fake=_fake_fwd_bwd_)
