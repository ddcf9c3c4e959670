"""Per-op benchmark: achieved GB/s against a device-to-device copy measured in the same run, and
time against PyTorch eager and torch.compile of each op's reference.

    python benchmarks/bench_ops.py [--ops rms_norm,...] [--tokens 16384]

Bytes count each input read once and each output written once. Results go to
benchmarks/results/ops_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (copy_bandwidth_gbs, environment, markdown_table, time_cuda_ms,  # noqa: E402
                    write_results)

from unsloth_ext.ops.rms_norm import rms_norm_fwd_reference, rms_norm_reference  # noqa: E402


@dataclass
class Case:
    op: str
    direction: str  # "fwd" or "bwd"
    shape: str
    nbytes: int
    kernel: Callable[[], object]
    eager: Callable[[], object]
    compiled: Callable[[], object]


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def backward_runner(fn: Callable, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor):
    """A callable that re-runs only the backward of fn(*inputs) (graph kept between calls)."""
    leaves = tuple(t.detach().requires_grad_(True) for t in inputs)
    out = fn(*leaves)
    return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)


def rms_norm_cases(tokens: int, hidden: int = 4096) -> list[Case]:
    dtype = torch.bfloat16
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    y, rstd = torch.ops.unsloth_ext.rms_norm_fwd(x, w, 1e-6, False)
    dy = torch.randn_like(y)
    dx, dw = torch.ops.unsloth_ext.rms_norm_bwd(dy, x, w, rstd, False)
    compiled = torch.compile(rms_norm_reference)
    shape = f"[{tokens}, {hidden}] bf16"
    return [
        Case("rms_norm", "fwd", shape, nbytes(x, w, y, rstd),
             kernel=lambda: torch.ops.unsloth_ext.rms_norm_fwd(x, w, 1e-6, False),
             eager=lambda: rms_norm_fwd_reference(x, w, 1e-6, False),
             compiled=lambda: compiled(x, w)),
        Case("rms_norm", "bwd", shape, nbytes(dy, x, w, rstd, dx, dw),
             kernel=lambda: torch.ops.unsloth_ext.rms_norm_bwd(dy, x, w, rstd, False),
             eager=backward_runner(rms_norm_reference, (x, w), dy),
             compiled=backward_runner(compiled, (x, w), dy)),
    ]


CASES = {"rms_norm": rms_norm_cases}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(CASES), help="comma-separated op names")
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_ops needs a CUDA GPU", file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth_gbs()
    rows, records = [], []
    for op in args.ops.split(","):
        for case in CASES[op](args.tokens):
            kernel_ms = time_cuda_ms(case.kernel)
            eager_ms = time_cuda_ms(case.eager)
            compiled_ms = time_cuda_ms(case.compiled)
            gbs = case.nbytes / (kernel_ms * 1e-3) / 1e9
            record = dict(op=case.op, direction=case.direction, shape=case.shape,
                          bytes=case.nbytes, kernel_ms=kernel_ms, gbs=gbs,
                          pct_of_copy=100 * gbs / copy_gbs, eager_ms=eager_ms,
                          compiled_ms=compiled_ms, speedup_vs_eager=eager_ms / kernel_ms,
                          speedup_vs_compile=compiled_ms / kernel_ms)
            records.append(record)
            rows.append([case.op, case.direction, case.shape, f"{kernel_ms * 1e3:.1f}",
                         f"{gbs:.0f}", f"{record['pct_of_copy']:.1f}%",
                         f"{eager_ms * 1e3:.1f}", f"{compiled_ms * 1e3:.1f}",
                         f"{record['speedup_vs_eager']:.2f}x",
                         f"{record['speedup_vs_compile']:.2f}x"])
    table = markdown_table(["op", "dir", "shape", "kernel µs", "GB/s", "% of copy", "eager µs",
                            "compile µs", "vs eager", "vs compile"], rows)
    table += f"\n\nDevice-to-device copy, same run: {copy_gbs:.0f} GB/s (read + write)."
    path = write_results("ops", {"environment": environment(), "copy_gbs": copy_gbs,
                                 "results": records}, table)
    print(f"results: {path}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
