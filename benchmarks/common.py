"""Timing, ceilings and result files shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    """One op, one direction: the kernel, PyTorch eager and torch.compile of the reference, and
    the bytes the op must move (each input read once, each output written once). `bound`, for an
    op that mostly reads: a library kernel reading the same number of bytes with no decoding
    work, the rate a kernel of that size can stream at (a copy's rate is not reachable there)."""
    op: str
    direction: str  # "fwd" or "bwd"
    shape: str
    nbytes: int
    kernel: Callable[[], object]
    eager: Callable[[], object]
    compiled: Callable[[], object]
    bound: Callable[[], object] | None = None


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def backward_runner(fn: Callable, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor):
    """A callable that re-runs only the backward of fn(*inputs) (graph kept between calls).
    Inputs that are not floating point are passed through without gradients."""
    leaves = tuple(t.detach().requires_grad_(True) if t.is_floating_point() else t for t in inputs)
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    wrt = tuple(t for t in leaves if t.requires_grad)
    return lambda: torch.autograd.grad(out, wrt, grad, retain_graph=True)


def time_cuda_ms(fn, warmup: int = 5, reps: int = 40, warmup_ms: float = 25.0) -> float:
    """Median milliseconds of fn() on the current stream, timed with CUDA events per call.

    Warm-up runs fn() at least `warmup` times and for at least `warmup_ms` of wall time, so that
    a short kernel is timed on a busy device, not one coming out of an idle spell (compilation,
    setup), where the same short kernel measured up to 15% slower.
    """
    start = time.perf_counter()
    done = 0
    while done < warmup or (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
        done += 1
        if done % max(warmup, 1) == 0:  # keep the host from running far ahead of the clock
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_cuda_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    # Hand the buffers back to the driver: kept in the allocator's cache, they would hold every
    # later tensor of the run inside two large segments.
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """bf16 n×n×n matrix product rate through cuBLAS, on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda_ms(lambda: a @ b, warmup=3, reps=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def git_sha() -> str:
    """The commit measured: UNSLOTH_EXT_GIT_SHA when set (a copy of the tree without .git), else
    git's HEAD."""
    if os.environ.get("UNSLOTH_EXT_GIT_SHA"):
        return os.environ["UNSLOTH_EXT_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def gpu_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return name.lower().replace("nvidia ", "").replace(" ", "-")


def write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(name: str, payload: dict, table: str) -> Path:
    """benchmarks/results/<name>_<gpu>.json and .md; returns the json path."""
    stem = f"{name}_{gpu_slug()}"
    write_atomic(RESULTS_DIR / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
    env = payload["environment"]
    header = (f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, git {env['git_sha'][:12]}, "
              f"{env['date']}\n\n")
    write_atomic(RESULTS_DIR / f"{stem}.md", header + table + "\n")
    return RESULTS_DIR / f"{stem}.json"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
