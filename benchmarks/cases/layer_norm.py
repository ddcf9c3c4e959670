import functools

import torch
import torch.nn.functional as F

from common import Case, backward_runner, nbytes
from unsloth_ext.ops.layer_norm import layer_norm_reference

EPS = 1e-5


def _torch_layer_norm(x, weight, bias, hidden):
    return F.layer_norm(x, (hidden,), weight, bias, EPS)


def layer_norm_cases(tokens: int, hidden: int = 4096) -> list[Case]:
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16) + 1.0
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    fwd, bwd = torch.ops.unsloth_ext.layer_norm_fwd, torch.ops.unsloth_ext.layer_norm_bwd
    y, mean, rstd = fwd(x, w, b, EPS)
    dy = torch.randn_like(y)
    dx, dw, db = bwd(dy, x, w, mean, rstd, True)
    # Eager is what torch.nn.LayerNorm runs: PyTorch's own fused LayerNorm kernels.
    eager = functools.partial(_torch_layer_norm, hidden=hidden)
    compiled = torch.compile(layer_norm_reference)
    shape = f"[{tokens}, {hidden}] bf16"
    return [
        Case("layer_norm", "fwd", shape, nbytes(x, w, b, y, mean, rstd),
             kernel=lambda: fwd(x, w, b, EPS),
             eager=lambda: eager(x, w, b),
             compiled=lambda: compiled(x, w, b)),
        Case("layer_norm", "bwd", shape, nbytes(dy, x, w, mean, rstd, dx, dw, db),
             kernel=lambda: bwd(dy, x, w, mean, rstd, True),
             eager=backward_runner(eager, (x, w, b), dy),
             compiled=backward_runner(compiled, (x, w, b), dy)),
    ]


CASES = {"layer_norm": layer_norm_cases}
