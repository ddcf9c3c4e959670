import torch

from common import Case, backward_runner, nbytes
from unsloth_ext.ops.cross_entropy import cross_entropy_reference

VOCAB = 128256  # Llama 3
# At most 8192 tokens: their bf16 logits are already 2.1 GB, and the fp32 baselines hold several
# fp32 copies.
MAX_TOKENS = 8192
IGNORE = -100


def cross_entropy_cases(tokens: int) -> list[Case]:
    """The ops on [T, 128256] bf16 logits, T = min(tokens, 8192), mean over the rows.

    fwd: logits -> (lse, target). bwd: the gradient from the saved lse. fwd+bwd: both (the
    autograd path: the logits are read twice). fwd+bwd 1-pass: cross_entropy_fwd_bwd_, loss and
    gradient in one read of the logits (fused_linear_cross_entropy's path). The fwd+bwd cases
    count the logits read once and the gradient written once.
    """
    tokens = min(tokens, MAX_TOKENS)
    ops = torch.ops.unsloth_ext
    logits = torch.randn(tokens, VOCAB, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, VOCAB, (tokens,), device="cuda")
    settings = (0, VOCAB, IGNORE, 1.0, 0.0, 0.0)
    lse, target = ops.cross_entropy_fwd(logits, labels, *settings)
    scale = torch.full_like(lse, 1.0 / tokens)  # d(mean)/d(loss row)
    grad = ops.cross_entropy_bwd(scale, -scale, logits, labels, lse, *settings)
    # Overwritten by its gradient at every call: the values stay finite, the work the same.
    fused_logits = logits.clone()
    one = torch.ones((), device="cuda")
    compiled = torch.compile(cross_entropy_reference)

    def fwd_bwd():
        lse, _ = ops.cross_entropy_fwd(logits, labels, *settings)
        return ops.cross_entropy_bwd(scale, -scale, logits, labels, lse, *settings)

    def reference_fwd_bwd(fn):
        leaf = logits.detach().requires_grad_(True)
        return lambda: torch.autograd.grad(fn(leaf, labels), leaf)

    shape = f"[{tokens}, {VOCAB}] bf16"
    return [
        Case("cross_entropy", "fwd", shape, nbytes(logits, labels, lse, target),
             kernel=lambda: ops.cross_entropy_fwd(logits, labels, *settings),
             eager=lambda: cross_entropy_reference(logits, labels),
             compiled=lambda: compiled(logits, labels)),
        Case("cross_entropy", "bwd", shape, nbytes(scale, scale, logits, labels, lse, grad),
             kernel=lambda: ops.cross_entropy_bwd(scale, -scale, logits, labels, lse, *settings),
             eager=backward_runner(cross_entropy_reference, (logits, labels), one),
             compiled=backward_runner(compiled, (logits, labels), one)),
        Case("cross_entropy", "fwd+bwd", shape, nbytes(logits, grad),
             kernel=fwd_bwd,
             eager=reference_fwd_bwd(cross_entropy_reference),
             compiled=reference_fwd_bwd(compiled)),
        Case("cross_entropy", "fwd+bwd 1-pass", shape, nbytes(logits, grad),
             kernel=lambda: ops.cross_entropy_fwd_bwd_(fused_logits, labels, scale, IGNORE, 1.0,
                                                       0.0, 0.0),
             eager=reference_fwd_bwd(cross_entropy_reference),
             compiled=reference_fwd_bwd(compiled)),
    ]


CASES = {"cross_entropy": cross_entropy_cases}
