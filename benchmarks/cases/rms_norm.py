import torch

from common import Case, backward_runner, nbytes
from unsloth_ext.ops.rms_norm import rms_norm_fwd_reference, rms_norm_reference

EPS = 1e-6


def rms_norm_cases(tokens: int, hidden: int = 4096) -> list[Case]:
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    fwd, bwd = torch.ops.unsloth_ext.rms_norm_fwd, torch.ops.unsloth_ext.rms_norm_bwd
    y, rstd = fwd(x, w, EPS, False)
    dy = torch.randn_like(y)
    dx, dw = bwd(dy, x, w, rstd, False)
    compiled = torch.compile(rms_norm_reference)
    shape = f"[{tokens}, {hidden}] bf16"
    return [
        Case("rms_norm", "fwd", shape, nbytes(x, w, y, rstd),
             kernel=lambda: fwd(x, w, EPS, False),
             eager=lambda: rms_norm_fwd_reference(x, w, EPS, False),
             compiled=lambda: compiled(x, w)),
        Case("rms_norm", "bwd", shape, nbytes(dy, x, w, rstd, dx, dw),
             kernel=lambda: bwd(dy, x, w, rstd, False),
             eager=backward_runner(rms_norm_reference, (x, w), dy),
             compiled=backward_runner(compiled, (x, w), dy)),
    ]


CASES = {"rms_norm": rms_norm_cases}
