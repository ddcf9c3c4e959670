"""lm_head + cross-entropy: fused_linear_cross_entropy against what transformers does (bf16
logits = hidden @ weight.T, then F.cross_entropy on their fp32 copy), measured in the same run.

    python benchmarks/bench_linear_ce.py [--tokens 8192] [--vocab 128256] [--hidden 4096]

Two cases, bf16: the lm_head frozen (LoRA/QLoRA: dHidden only) and trainable (dHidden and
dWeight). For each method, one forward+backward:
  extra peak   torch.cuda.max_memory_allocated during it, minus what was allocated before (the
               inputs and weights); it includes the gradients that stay afterwards.
  beyond grads the same minus those gradients (hidden.grad, weight.grad), which both methods keep.
  time         median milliseconds, and the matmuls' rate against a bf16 cuBLAS matmul measured in
               the same run.
Targets: fused extra peak <= 1 GiB on the frozen case and beyond the gradients on the trainable
one (stock: > 8 GiB); fused time <= 1.1x stock. Results go to
benchmarks/results/linear_ce_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (environment, markdown_table, matmul_tflops, time_cuda_ms,  # noqa: E402
                    write_results)
from unsloth_ext.ops.cross_entropy import fused_linear_cross_entropy  # noqa: E402

IGNORE = -100
GIB = 1 << 30
TARGET_EXTRA_GIB = 1.0
TARGET_TIME_RATIO = 1.1


def stock_loss(hidden, weight, labels):
    """transformers' causal-LM loss on precomputed labels: fp32 upcast of the bf16 logits."""
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


def fused_loss(hidden, weight, labels):
    return fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE)


def forward_backward(method, hidden, weight, labels) -> torch.Tensor:
    hidden.grad = None
    weight.grad = None
    loss = method(hidden, weight, labels)
    loss.backward()
    return loss


def extra_peak_bytes(method, hidden, weight, labels) -> tuple[int, int]:
    """(extra peak, extra peak beyond the gradients kept) of one forward+backward, in bytes."""
    forward_backward(method, hidden, weight, labels)  # warm-up: cuBLAS workspaces, kernels
    hidden.grad = None
    weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward(method, hidden, weight, labels)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    kept = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight)
               if t.grad is not None)
    return peak, peak - kept


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_linear_ce needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    tokens, vocab, hidden_size = args.tokens, args.vocab, args.hidden
    hidden = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16)
    weight /= hidden_size**0.5
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    labels[torch.rand(tokens, device="cuda") < 0.05] = IGNORE  # some masked positions
    cublas_tflops = matmul_tflops()
    methods = {"stock": stock_loss, "fused": fused_loss}

    records, rows = [], []
    for case, trainable in (("frozen lm_head", False), ("trainable lm_head", True)):
        weight.requires_grad_(trainable)
        matmuls = 3 if trainable else 2  # logits, dHidden, dWeight
        flops = 2 * tokens * vocab * hidden_size * matmuls
        results = {}
        for name, method in methods.items():
            loss = forward_backward(method, hidden, weight, labels).detach()
            grads = [t.grad.clone() for t in (hidden, weight) if t.grad is not None]
            peak, beyond = extra_peak_bytes(method, hidden, weight, labels)
            ms = time_cuda_ms(lambda: forward_backward(method, hidden, weight, labels),
                              warmup=3, reps=10)
            tflops = flops / (ms * 1e-3) / 1e12
            results[name] = dict(loss=loss, grads=grads)
            record = dict(case=case, method=name, extra_peak_gib=peak / GIB,
                          extra_peak_beyond_grads_gib=beyond / GIB, ms=ms, matmul_tflops=tflops,
                          pct_of_cublas=100 * tflops / cublas_tflops, loss=loss.item())
            records.append(record)
            torch.cuda.empty_cache()
        fused, stock = records[-1], records[-2]
        fused["time_vs_stock"] = fused["ms"] / stock["ms"]
        fused["loss_rel_error_vs_stock"] = relative_error(results["fused"]["loss"],
                                                          results["stock"]["loss"])
        fused["grad_rel_errors_vs_stock"] = [
            relative_error(f, s) for f, s in zip(results["fused"]["grads"],
                                                 results["stock"]["grads"])]
        memory = fused["extra_peak_beyond_grads_gib" if trainable else "extra_peak_gib"]
        fused["meets_memory_target"] = memory <= TARGET_EXTRA_GIB
        fused["meets_time_target"] = fused["time_vs_stock"] <= TARGET_TIME_RATIO
        for r in (stock, fused):
            rows.append([case, r["method"], f"{r['extra_peak_gib']:.2f}",
                         f"{r['extra_peak_beyond_grads_gib']:.2f}", f"{r['ms']:.1f}",
                         f"{r['matmul_tflops']:.0f} ({r['pct_of_cublas']:.0f}%)",
                         f"{r['loss']:.5f}"])
        rows[-1].append(f"{fused['time_vs_stock']:.2f}x")
        rows[-2].append("")
    weight.requires_grad_(False)

    table = markdown_table(["case", "method", "extra peak GiB", "beyond grads GiB", "ms",
                            "matmul TFLOP/s (% of cuBLAS)", "loss", "time vs stock"], rows)
    table += (f"\n\nT = {tokens}, V = {vocab}, H = {hidden_size}, bf16. cuBLAS bf16 8192^3 "
              f"matmul, same run: {cublas_tflops:.0f} TFLOP/s. Targets: fused extra peak <= "
              f"{TARGET_EXTRA_GIB:.0f} GiB (frozen; trainable beyond its gradients), time <= "
              f"{TARGET_TIME_RATIO}x stock.")
    path = write_results("linear_ce", {"environment": environment(), "tokens": tokens,
                                       "vocab": vocab, "hidden": hidden_size,
                                       "cublas_tflops": cublas_tflops, "results": records}, table)
    print(f"results: {path}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
