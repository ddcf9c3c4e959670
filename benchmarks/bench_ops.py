"""Per-op benchmark: achieved GB/s against a device-to-device copy measured in the same run, and
time against PyTorch eager and torch.compile of each op's reference.

    python benchmarks/bench_ops.py [--ops rms_norm,swiglu,...] [--tokens 16384]

Bytes count each input read once and each output written once. Cases live in
benchmarks/cases/<family>.py. Results go to benchmarks/results/ops_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases  # noqa: E402
from common import (copy_bandwidth_gbs, environment, markdown_table, time_cuda_ms,  # noqa: E402
                    write_results)


def all_cases() -> dict:
    found = {}
    for module in pkgutil.iter_modules(cases.__path__):
        found.update(importlib.import_module(f"cases.{module.name}").CASES)
    return found


def main() -> int:
    registry = all_cases()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(registry), help="comma-separated op names")
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_ops needs a CUDA GPU", file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth_gbs()
    rows, records = [], []
    for op in args.ops.split(","):
        for case in tqdm(registry[op](args.tokens), desc=op, leave=False):
            kernel_ms = time_cuda_ms(case.kernel)
            eager_ms = time_cuda_ms(case.eager)
            compiled_ms = time_cuda_ms(case.compiled)
            bound_ms = time_cuda_ms(case.bound) if case.bound else None
            gbs = case.nbytes / (kernel_ms * 1e-3) / 1e9
            record = dict(op=case.op, direction=case.direction, shape=case.shape,
                          bytes=case.nbytes, kernel_ms=kernel_ms, gbs=gbs,
                          pct_of_copy=100 * gbs / copy_gbs, eager_ms=eager_ms,
                          compiled_ms=compiled_ms, speedup_vs_eager=eager_ms / kernel_ms,
                          speedup_vs_compile=compiled_ms / kernel_ms, bound_ms=bound_ms)
            records.append(record)
            bound = [f"{bound_ms * 1e3:.1f}", f"{100 * bound_ms / kernel_ms:.0f}%"] if bound_ms \
                else ["", ""]
            rows.append([case.op, case.direction, case.shape, f"{kernel_ms * 1e3:.1f}",
                         f"{gbs:.0f}", f"{record['pct_of_copy']:.1f}%",
                         f"{eager_ms * 1e3:.1f}", f"{compiled_ms * 1e3:.1f}",
                         f"{record['speedup_vs_eager']:.2f}x",
                         f"{record['speedup_vs_compile']:.2f}x", *bound])
            torch.cuda.empty_cache()
    table = markdown_table(["op", "dir", "shape", "kernel µs", "GB/s", "% of copy", "eager µs",
                            "compile µs", "vs eager", "vs compile", "bound µs", "% of bound"],
                           rows)
    table += (f"\n\nDevice-to-device copy, same run: {copy_gbs:.0f} GB/s (read + write). "
              "bound: for the rows that read far more than they write, a library kernel "
              "reading as many bytes with no decoding work (see the op's case); % of bound is "
              "its time over the kernel's.")
    path = write_results("ops", {"environment": environment(), "copy_gbs": copy_gbs,
                                 "results": records}, table)
    print(f"results: {path}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
