import torch

from common import Case, backward_runner, nbytes
from unsloth_ext.ops.glu import geglu_reference, swiglu_reference

INTERMEDIATE = 14336  # Llama-3-8B's MLP width


def _inputs(tokens: int):
    shape = (tokens, INTERMEDIATE)
    e = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 3
    g = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    grad_h = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    return e, g, grad_h, f"[{tokens}, {INTERMEDIATE}] bf16"


def _fwd_bwd_cases(label: str, reference, fwd, bwd, e, g, grad_h, shape) -> list[Case]:
    h = fwd(e, g)
    grad_e, grad_g = bwd(grad_h, e, g)
    compiled = torch.compile(reference)
    return [
        Case(label, "fwd", shape, nbytes(e, g, h), kernel=lambda: fwd(e, g),
             eager=lambda: reference(e, g), compiled=lambda: compiled(e, g)),
        Case(label, "bwd", shape, nbytes(grad_h, e, g, grad_e, grad_g),
             kernel=lambda: bwd(grad_h, e, g),
             eager=backward_runner(reference, (e, g), grad_h),
             compiled=backward_runner(compiled, (e, g), grad_h)),
    ]


def swiglu_cases(tokens: int) -> list[Case]:
    e, g, grad_h, shape = _inputs(tokens)
    ops = torch.ops.unsloth_ext
    cases = _fwd_bwd_cases("swiglu", swiglu_reference, ops.swiglu_fwd, ops.swiglu_bwd, e, g,
                           grad_h, shape)
    # Each call overwrites its e and g, so the values drift from call to call; the silu math is
    # branch-free, so its time does not depend on them. Baselines: stock autograd's backward.
    e_work, g_work = e.clone(), g.clone()
    bwd = cases[1]
    cases.append(Case("swiglu", "bwd in-place", shape, bwd.nbytes,
                      kernel=lambda: ops.swiglu_bwd_(grad_h, e_work, g_work),
                      eager=bwd.eager, compiled=bwd.compiled))
    return cases


def geglu_cases(tokens: int) -> list[Case]:
    e, g, grad_h, shape = _inputs(tokens)
    ops = torch.ops.unsloth_ext
    cases = []
    for label, approximate in (("geglu", "none"), ("geglu_tanh", "tanh")):
        cases += _fwd_bwd_cases(
            label, lambda a, b, approx=approximate: geglu_reference(a, b, approx),
            lambda a, b, approx=approximate: ops.geglu_fwd(a, b, approx),
            lambda dh, a, b, approx=approximate: ops.geglu_bwd(dh, a, b, approx),
            e, g, grad_h, shape)
    return cases


CASES = {"swiglu": swiglu_cases, "geglu": geglu_cases}
