"""Shared test helpers: the per-dtype tolerance table, output poisoning and comparisons."""

from __future__ import annotations

import pytest
import torch

from unsloth_ext._extension import STATE

# Kernel against the PyTorch reference at the same dtype (the reference's own rounding included).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2),
}

DTYPES_16 = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Row shapes for the row-wise kernels (norms): 1x1, odd widths, the Llama/Mistral widths, widths
# past 64K, extra batch dims, and widths off and on the 16-byte vector boundary.
ROW_SHAPES = [(1, 1), (3, 7), (5, 769), (8, 4096), (4, 5120), (2, 65537), (2, 3, 4096),
              (3, 1, 5, 769), (6, 1032), (3, 16392), (2, 65536)]

needs_extension = pytest.mark.skipif(not STATE.loaded, reason="the compiled extension is not loaded")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0) -> None:
    """Compare within the tolerance of `dtype` (default: expected's), widened by `scale`."""
    tol = TOLERANCES[dtype or expected.dtype]
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=tol["atol"] * scale,
                               rtol=tol["rtol"] * scale)


def rel_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    """||actual - oracle|| / ||oracle|| in fp64; NaN never passes a `<=` check."""
    a, o = actual.double(), oracle.double()
    return ((a - o).norm() / o.norm().clamp_min(1e-300)).item()


def assert_no_worse_than_reference(kernel: torch.Tensor, reference: torch.Tensor,
                                   oracle: torch.Tensor, slack: float = 1e-6) -> None:
    """The kernel's error against a high-precision oracle is at most twice the error of the
    PyTorch reference computed at the kernel's precision."""
    k, r = rel_error(kernel, oracle), rel_error(reference, oracle)
    assert k <= 2 * r + slack, f"kernel error {k:.3e} vs reference error {r:.3e}"


def poison_cuda_allocator(nbytes: int, device: torch.device | str = "cuda") -> None:
    """Leave NaN bytes (0xFF) in freed blocks of the caching allocator, so that an output the
    next op allocates and fails to write shows up as NaN."""
    for size in (nbytes, nbytes // 2 + 1, 2 * nbytes):
        block = torch.empty(size, dtype=torch.uint8, device=device)
        block.fill_(0xFF)
        del block
