"""A small demo of the ops: each one run on random data, compared with its reference."""

from __future__ import annotations

import time

import torch

from unsloth_ext._extension import use_kernel
from unsloth_ext.ops import rms_norm, rms_norm_reference


def _timed(fn, device: torch.device, reps: int = 20) -> float:
    """Median milliseconds of fn() over reps calls."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run_op_demo() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(4096, 4096, device=device, dtype=dtype, generator=gen)
    w = torch.randn(4096, device=device, dtype=dtype, generator=gen)
    path = "CUDA kernel" if use_kernel("rms_norm", x) else "PyTorch reference"
    y = rms_norm(x, w)
    ref = rms_norm_reference(x.double(), w.double())
    err = ((y.double() - ref).norm() / ref.norm()).item()
    ms = _timed(lambda: rms_norm(x, w), device)
    print(f"rms_norm [4096, 4096] {str(dtype).removeprefix('torch.')} on {device.type} via {path}: "
          f"relative error vs fp64 {err:.2e}, {ms:.3f} ms per call")
