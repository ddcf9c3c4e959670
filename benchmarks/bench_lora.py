"""LoRA Functions against PEFT + bitsandbytes Linear4bit on the same layers, in one run: the
fused MLP (`lora_mlp`) and the QKV + O projections (`lora_qkv`, `lora_linear`) of Llama-3-8B
(hidden 4096, intermediate 14336, 32 query / 8 key-value heads of 128), NF4 base weights, bf16
activations and adapters, r = 16, 8192 tokens, forward + backward.

    PYTHONPATH=<bitsandbytes bundle> python benchmarks/bench_lora.py [--tokens 8192] [--rank 16]

Per block: time of forward + backward (gradients of the inputs and of every lora_A and lora_B),
the best of `--rounds` medians taken in turn with PEFT's (so that a slow spell of the host or the
GPU does not land on one side only), and its ratio to PEFT; the time of the block's base GEMMs
alone (cuBLAS on dense bf16 weights, forward X·Wᵀ and backward dY·W: the floor neither path can
go under); and the peak
activation memory, max_memory_allocated above what exists before the step (weights, adapters,
inputs, output gradients), the dequantization buffer included. The block's outputs end the graph
without being kept (as in a model, where the next op consumes them). O takes its own input, in
place of the attention output. Targets: at least 2x faster, at most 0.5x the peak activation
memory. Results go to benchmarks/results/lora_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, time_cuda_ms, write_results  # noqa: E402

HIDDEN, INTERMEDIATE, HEAD_DIM, Q_HEADS, KV_HEADS = 4096, 14336, 128, 32, 8
ADAPTER = "default"
DEVICE = "cuda"
SPEEDUP_TARGET, MEMORY_TARGET = 2.0, 0.5


class _Sink(torch.autograd.Function):
    """Ends a graph at the given outputs with fixed gradients, keeping none of them alive."""

    @staticmethod
    def forward(ctx, grads, *outputs):
        ctx.grads = grads
        return outputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        return (None, *ctx.grads)


def _nf4_lora(bnb, LoraLinear4bit, LoraConfig, in_features, out_features, rank):
    """A PEFT LoRA layer over an NF4 Linear4bit (double quantization) on the GPU, random weights;
    bf16 adapters with B nonzero."""
    base = bnb.nn.Linear4bit(in_features, out_features, bias=False,
                             compute_dtype=torch.bfloat16, compress_statistics=True,
                             quant_type="nf4")
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    base.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                    compress_statistics=True)
    base = base.to(DEVICE)
    layer = LoraLinear4bit(base, ADAPTER, config=LoraConfig(r=rank, lora_alpha=2 * rank),
                           r=rank, lora_alpha=2 * rank)
    for adapter in (layer.lora_A, layer.lora_B):
        adapter.to(device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B[ADAPTER].weight.normal_(std=0.02)
    return layer


def _adapter_params(layers):
    return [p for layer in layers for p in (layer.lora_A[ADAPTER].weight,
                                            layer.lora_B[ADAPTER].weight)]


def _dense_weights(bnb, layers):
    return [bnb.functional.dequantize_4bit(layer.get_base_layer().weight.data,
                                           layer.get_base_layer().weight.quant_state)
            for layer in layers]


def _step(forward, inputs, params, grads):
    """One forward + backward: gradients of inputs and params, outputs released after the sink."""
    def run():
        loss = _Sink.apply(grads, *forward(*inputs))
        return torch.autograd.grad(loss, [*inputs, *params])
    return run


def _peak_bytes(run, clear) -> int:
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def _max_rel_diff(a_outputs, b_outputs) -> float:
    return max(((a.float() - b.float()).norm() / b.float().norm()).item()
               for a, b in zip(a_outputs, b_outputs))


def _mlp_block(mods, tokens, rank):
    bnb, LoraLinear4bit, LoraConfig, LlamaConfig, LlamaMLP, lora = mods
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)
    with torch.device("meta"):
        mlp = LlamaMLP(config)
    for name, (i, o) in (("gate_proj", (HIDDEN, INTERMEDIATE)),
                         ("up_proj", (HIDDEN, INTERMEDIATE)),
                         ("down_proj", (INTERMEDIATE, HIDDEN))):
        setattr(mlp, name, _nf4_lora(bnb, LoraLinear4bit, LoraConfig, i, o, rank))
    layers = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    parts = [lora.lora_parts(layer) for layer in layers]
    X = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    dY = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, device=DEVICE)
    params = _adapter_params(layers)

    Wg, Wu, Wd = _dense_weights(bnb, layers)
    H = torch.randn(tokens, INTERMEDIATE, dtype=torch.bfloat16, device=DEVICE)
    dE, dG = torch.randn_like(H), torch.randn_like(H)

    def gemms():
        for a, w in ((X, Wg.t()), (X, Wu.t()), (H, Wd.t()), (dY, Wd), (dE, Wg), (dG, Wu)):
            torch.mm(a, w)

    with torch.no_grad():
        diff = _max_rel_diff([lora.lora_mlp(X, *parts)], [mlp(X)])
    return dict(
        block="MLP (gate, up, SwiGLU, down)",
        ours=_step(lambda x: (lora.lora_mlp(x, *parts, "swiglu"),), (X,), params, (dY,)),
        peft=_step(lambda x: (mlp(x),), (X,), params, (dY,)),
        gemms=gemms, rel_diff=diff)


def _attention_block(mods, tokens, rank):
    bnb, LoraLinear4bit, LoraConfig, _, _, lora = mods
    q_out, kv_out = Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = ((HIDDEN, q_out), (HIDDEN, kv_out), (HIDDEN, kv_out), (q_out, HIDDEN))
    layers = [_nf4_lora(bnb, LoraLinear4bit, LoraConfig, i, o, rank) for i, o in shapes]
    q, k, v, o = layers
    parts = [lora.lora_parts(layer) for layer in layers]
    X = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    Z = torch.randn(tokens, q_out, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    grads = tuple(torch.randn(tokens, n, dtype=torch.bfloat16, device=DEVICE)
                  for n in (q_out, kv_out, kv_out, HIDDEN))
    params = _adapter_params(layers)

    def ours(x, z):
        return (*lora.lora_qkv(x, *parts[:3]), lora.lora_linear(z, parts[3]))

    def peft(x, z):
        return q(x), k(x), v(x), o(z)

    weights = _dense_weights(bnb, layers)

    def gemms():
        for w, inp, grad in zip(weights, (X, X, X, Z), grads):
            torch.mm(inp, w.t())
            torch.mm(grad, w)

    with torch.no_grad():
        diff = _max_rel_diff(ours(X, Z), peft(X, Z))
    return dict(block="QKV + O", ours=_step(ours, (X, Z), params, grads),
                peft=_step(peft, (X, Z), params, grads), gemms=gemms, rel_diff=diff)


def _imports():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        print(f"bench_lora needs bitsandbytes with CUDA support ({exc}); put the CUDA 13 "
              "bitsandbytes bundle on PYTHONPATH", file=sys.stderr)
        return None
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from transformers.models.llama.configuration_llama import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from unsloth_ext import lora
    return bnb, LoraLinear4bit, LoraConfig, LlamaConfig, LlamaMLP, lora


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_lora needs a CUDA GPU", file=sys.stderr)
        return 2
    mods = _imports()
    if mods is None:
        return 2
    lora = mods[-1]
    torch.manual_seed(0)
    rows, records = [], []
    for build in (_mlp_block, _attention_block):
        block = build(mods, args.tokens, args.rank)
        rounds = {name: [] for name in ("ours", "peft", "gemms")}
        for _ in range(args.rounds):
            for name, times in rounds.items():
                times.append(time_cuda_ms(block[name], reps=args.reps))
        ours_ms, peft_ms, floor_ms = (min(rounds[name]) for name in ("ours", "peft", "gemms"))
        ours_peak = _peak_bytes(block["ours"], lora.clear_dequant_buffers)
        peft_peak = _peak_bytes(block["peft"], lambda: None)
        record = dict(block=block["block"], tokens=args.tokens, rank=args.rank,
                      rounds_ms=rounds, ours_ms=ours_ms, peft_ms=peft_ms, speedup=peft_ms / ours_ms,
                      gemm_floor_ms=floor_ms, floor_share=floor_ms / ours_ms,
                      ours_peak_mb=ours_peak / 1e6, peft_peak_mb=peft_peak / 1e6,
                      memory_ratio=ours_peak / peft_peak, output_rel_diff=block["rel_diff"])
        record["meets_speed_target"] = record["speedup"] >= SPEEDUP_TARGET
        record["meets_memory_target"] = record["memory_ratio"] <= MEMORY_TARGET
        records.append(record)
        rows.append([record["block"], f"{ours_ms:.2f}", f"{peft_ms:.2f}",
                     f"{record['speedup']:.2f}x", f"{floor_ms:.2f}",
                     f"{100 * record['floor_share']:.0f}%", f"{ours_peak / 1e6:.0f}",
                     f"{peft_peak / 1e6:.0f}", f"{record['memory_ratio']:.2f}x",
                     f"{block['rel_diff']:.1e}"])
        del block
        torch.cuda.empty_cache()
    table = markdown_table(["block", "ours ms", "PEFT ms", "speedup", "GEMM floor ms",
                            "floor / ours", "ours peak MB", "PEFT peak MB", "memory",
                            "output rel. diff"], rows)
    table += (f"\n\nLlama-3-8B shapes, {args.tokens} tokens, bf16, NF4 base weights, r = "
              f"{args.rank}; forward + backward. Targets: speedup >= {SPEEDUP_TARGET}x, memory "
              f"<= {MEMORY_TARGET}x. Times: best of {args.rounds} medians taken in turn. GEMM "
              "floor: the block's base GEMMs alone on dense bf16 weights (cuBLAS), same run.")
    path = write_results("lora", {"environment": environment(), "results": records}, table)
    print(f"results: {path}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
