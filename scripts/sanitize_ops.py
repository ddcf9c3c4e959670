"""Run every CUDA kernel once, forward and backward, on small aligned and unaligned shapes: a
short workload for compute-sanitizer (scripts/gpu_test.sh with SANITIZE=1).

    compute-sanitizer --tool memcheck python scripts/sanitize_ops.py
"""

import torch

import unsloth_ext  # noqa: F401  (loads the extension)
from unsloth_ext.nf4 import LoRA, nf4_matmul, quantize_nf4
from unsloth_ext.ops import (add_rms_norm, apply_rope_, cross_entropy, geglu, layer_norm,
                             rms_norm, swiglu)

ops = torch.ops.unsloth_ext


def rows_ops(dtype: torch.dtype, cols: int) -> None:
    x = torch.randn(5, cols, device="cuda", dtype=dtype, requires_grad=True)
    r = torch.randn(5, cols, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(cols, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(cols, device="cuda", dtype=dtype, requires_grad=True)
    # Offset rows take LayerNorm's second statistics pass.
    y = rms_norm(x, w) + layer_norm(x, w, b) + layer_norm(x + 1000.0, w, b)
    ya, ra = add_rms_norm(x, r, w)
    (y.float().sum() + ya.float().sum() + ra.float().sum()).backward()
    e, g = torch.randn(2, 3, cols, device="cuda", dtype=dtype, requires_grad=True).unbind(0)[:2]
    (swiglu(e, g).float().sum() + geglu(e, g, "tanh").float().sum()).backward()
    ops.swiglu_bwd_(torch.randn_like(e), e.detach().clone(), g.detach().clone())


def rope_op(dtype: torch.dtype, head_dim: int) -> None:
    q = torch.randn(2, 4, 7, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 7, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    cos = torch.randn(16, head_dim, device="cuda", dtype=torch.float32)
    sin = torch.randn(16, head_dim, device="cuda", dtype=torch.float32)
    pos = torch.randint(0, 16, (2, 7), device="cuda")
    q2, k2 = apply_rope_(q.clone(), k.clone(), cos, sin, pos)
    (q2.float().sum() + k2.float().sum()).backward()


def cross_entropy_op(dtype: torch.dtype, vocab: int, rows: int = 6) -> None:
    logits = torch.randn(rows, vocab, device="cuda", dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    labels[2] = -100
    cross_entropy(logits, labels, softcap=30.0).backward()
    ops.cross_entropy_fwd_bwd_(logits.detach().clone(), labels, torch.ones(rows, device="cuda"),
                               -100, 1.0, 0.0, 0.0)


def nf4_ops(dtype: torch.dtype) -> None:
    w = quantize_nf4(torch.randn(192, 256, device="cuda", dtype=dtype))
    out = torch.empty(192, 256, device="cuda", dtype=dtype)
    w.dequantize(out)
    a = torch.randn(8, 256, device="cuda", dtype=dtype)
    b = torch.randn(192, 8, device="cuda", dtype=dtype)
    # More 16-row tiles than SMs, fp32 absmax; K = 320: the slab layout with a ragged last group;
    # K = 384: the span layout with groups of one span (at M <= 4).
    wide = {k: quantize_nf4(torch.randn(4100, k, device="cuda", dtype=dtype), 128, False)
            for k in (320, 384)}
    with torch.no_grad():
        for m in (1, 3, 16):
            nf4_matmul(torch.randn(m, 256, device="cuda", dtype=dtype), w, LoRA(a, b, 0.5))
            for k, weight in wide.items():
                nf4_matmul(torch.randn(m, k, device="cuda", dtype=dtype), weight)

for dtype in (torch.bfloat16, torch.float32):
    for cols in (8, 769, 4096):  # vector paths, scalar path
        rows_ops(dtype, cols)
    for head_dim in (64, 80):
        rope_op(dtype, head_dim)
    for vocab in (1000, 32001):  # row kernels
        cross_entropy_op(dtype, vocab)
    cross_entropy_op(dtype, 32000, rows=400)  # cluster kernel, clusters taking several rows
nf4_ops(torch.bfloat16)
torch.cuda.synchronize()
print("all kernels ran")
