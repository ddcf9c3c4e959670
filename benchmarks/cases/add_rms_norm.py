import torch

from common import Case, nbytes
from unsloth_ext.ops.add_rms_norm import add_rms_norm_fwd_reference, add_rms_norm_reference

EPS = 1e-6


def _backward_runner(fn, inputs: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, ...]):
    """A callable that re-runs only the backward of fn(*inputs), with a gradient for each of its
    outputs (y and residual_out; the graph is kept between calls)."""
    leaves = tuple(t.detach().requires_grad_(True) for t in inputs)
    outputs = fn(*leaves)
    return lambda: torch.autograd.grad(outputs, leaves, grads, retain_graph=True)


def add_rms_norm_cases(tokens: int, hidden: int = 4096) -> list[Case]:
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    fwd, bwd = torch.ops.unsloth_ext.add_rms_norm_fwd, torch.ops.unsloth_ext.add_rms_norm_bwd
    y, s, rstd = fwd(x, r, w, EPS, False)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    dx, dw = bwd(dy, ds, s, w, rstd, False)
    compiled = torch.compile(add_rms_norm_reference)
    shape = f"[{tokens}, {hidden}] bf16"
    return [
        Case("add_rms_norm", "fwd", shape, nbytes(x, r, w, y, s, rstd),
             kernel=lambda: fwd(x, r, w, EPS, False),
             eager=lambda: add_rms_norm_fwd_reference(x, r, w, EPS, False),
             compiled=lambda: compiled(x, r, w)),
        # grad_residual_out comes from the residual stream's later layers.
        Case("add_rms_norm", "bwd", shape, nbytes(dy, ds, s, w, rstd, dx, dw),
             kernel=lambda: bwd(dy, ds, s, w, rstd, False),
             eager=_backward_runner(add_rms_norm_reference, (x, r, w), (dy, ds)),
             compiled=_backward_runner(compiled, (x, r, w), (dy, ds))),
    ]


CASES = {"add_rms_norm": add_rms_norm_cases}
