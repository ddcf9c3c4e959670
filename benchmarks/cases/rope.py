import torch

from common import Case, nbytes
from unsloth_ext.ops.rope import apply_rope_reference, rope_cache

# Llama-3-8B attention: 32 query heads, 8 key/value heads of 128 dims, theta 500000.
Q_HEADS, KV_HEADS, HEAD_DIM, BATCH = 32, 8, 128, 4
LLAMA3 = {"head_dim": HEAD_DIM, "rope_theta": 500000.0}


def _qk(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, S, D] and k [B, Hk, S, D] as transformers makes them: transposed views of the
    projections' outputs."""
    q = torch.randn(batch, seq, Q_HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, seq, KV_HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return (q.view(batch, seq, Q_HEADS, HEAD_DIM).transpose(1, 2),
            k.view(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2))


def _reference_backward(fn, q: torch.Tensor, k: torch.Tensor, grad_q: torch.Tensor,
                        grad_k: torch.Tensor):
    """A callable that re-runs only the backward of fn(q, k) -> (q_out, k_out)."""
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    outputs = fn(q, k)
    return lambda: torch.autograd.grad(outputs, (q, k), (grad_q, grad_k), retain_graph=True)


def _cases(seq: int, cache_dtype: torch.dtype, compiled, backward: bool) -> list[Case]:
    q, k = _qk(BATCH, seq)
    position_ids = torch.arange(seq, device="cuda").repeat(BATCH, 1)
    cos, sin = rope_cache(LLAMA3, seq, "cuda", cache_dtype)
    # The ops rotate in place and take [B, S, H, D] views.
    q_op, k_op = q.transpose(1, 2), k.transpose(1, 2)
    fwd, bwd = torch.ops.unsloth_ext.rope_fwd, torch.ops.unsloth_ext.rope_bwd

    def reference(a, b):
        return apply_rope_reference(a, b, cos, sin, position_ids)

    def reference_compiled(a, b):
        return compiled(a, b, cos, sin, position_ids)

    label = (f"[{BATCH * seq} tok, {Q_HEADS}+{KV_HEADS} heads, {HEAD_DIM}] bf16, "
             f"{str(cache_dtype).removeprefix('torch.')} cache")
    # Each input read once and each output written once: q and k both ways (in place), the
    # cache and the positions.
    cases = [Case("rope", "fwd", label, nbytes(q, k, q, k, cos, sin, position_ids),
                  kernel=lambda: fwd(q_op, k_op, cos, sin, position_ids),
                  eager=lambda: reference(q, k),
                  compiled=lambda: reference_compiled(q, k))]
    if backward:
        # Gradients as attention's backward hands them out: contiguous [B, H, S, D].
        grad_q, grad_k = torch.randn_like(q.contiguous()), torch.randn_like(k.contiguous())
        grad_q_op, grad_k_op = grad_q.transpose(1, 2), grad_k.transpose(1, 2)
        cases.append(Case("rope", "bwd", label,
                          nbytes(grad_q, grad_k, grad_q, grad_k, cos, sin, position_ids),
                          kernel=lambda: bwd(grad_q_op, grad_k_op, cos, sin, position_ids),
                          eager=_reference_backward(reference, q, k, grad_q, grad_k),
                          compiled=_reference_backward(reference_compiled, q, k, grad_q,
                                                       grad_k)))
    return cases


def rope_cases(tokens: int) -> list[Case]:
    """fwd and bwd with the fp32 cache; fwd with a bf16 cache (transformers' own cos/sin)."""
    compiled = torch.compile(apply_rope_reference)
    seq = tokens // BATCH
    return (_cases(seq, torch.float32, compiled, backward=True)
            + _cases(seq, torch.bfloat16, compiled, backward=False))


CASES = {"rope": rope_cases}
