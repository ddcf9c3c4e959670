"""QLoRA training throughput and peak memory: stock transformers+PEFT+bitsandbytes against
unsloth_ext, on the same random-initialized model saved locally, in the same invocation.

    python benchmarks/bench_train.py --preset llama-3.1-8b [--seq 2048 --batch 4 --steps 5]

One identical loop for every mode: forward with labels, backward, AdamW step. Two stock modes,
both with SDPA and gradient checkpointing (torch.utils.checkpoint): "stock" keeps the model's
unquantized parts (norms, embeddings, lm_head) in bf16; "stock_kbit" first runs PEFT's
prepare_model_for_kbit_training, the usual QLoRA recipe, which casts them to fp32 (so the
residual stream and the logits are fp32). unsloth_ext uses FastLanguageModel with its "unsloth"
(offloaded) checkpointing. NF4 + double quantization, LoRA r=16 on the 7 projections, bf16
compute. Each mode runs in a process of its own. Reports tokens/s, s/step, peak allocated
memory and what the loaded model holds, how busy one more step keeps the GPU (Torch profiler:
the kernels and copies it runs on the GPU, the time at least one of them runs, and that step's
span from the first to the last), and the matrix products (cuBLAS) of one more: their GPU time
and rate, against the rate cuBLAS sustains on this GPU, measured in the same invocation (one
second of back-to-back [8192, 4096] x [4096, 14336] bf16 products, the MLP's shape: a GPU that
holds its power limit runs long GEMM streams at lower clocks than short ones). Results go to
benchmarks/results/train_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, write_results  # noqa: E402

PRESETS = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         rope_theta=500000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
                 max_position_embeddings=2048),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_random_model(preset: str, path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**PRESETS[preset], rms_norm_eps=1e-5, hidden_act="silu")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def stock_model(path: Path, kbit_recipe: bool = False):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map="cuda", attn_implementation="sdpa")
    if kbit_recipe:
        model = prepare_model_for_kbit_training(model)  # fp32 norms, embeddings, lm_head
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    torch.manual_seed(3407)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))


def unsloth_ext_model(path: Path):
    from unsloth_ext import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=8192, dtype=torch.bfloat16,
                                                 load_in_4bit=True)
    return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=TARGETS,
                                            use_gradient_checkpointing="unsloth",
                                            random_state=3407)


def gpu_busy(step) -> dict:
    """One call of `step` under the Torch profiler: the GPU's kernels and copies, the union of
    their run times, and the span from the first one's start to the last one's end (ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > 0)
    busy, end = 0.0, spans[0][0]
    for start, stop in spans:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return dict(gpu_ops=len(spans), busy_ms=busy / 1e3, span_ms=(end - spans[0][0]) / 1e3)


# cuBLAS matrix products as the profiler names them, and where their two operands sit among
# the recorded input shapes (`[..., M, K]` and `[..., K, N]`).
_GEMM_OPERANDS = {"aten::mm": 0, "aten::bmm": 0, "aten::addmm": 1, "aten::addmm_": 1,
                  "aten::baddbmm": 1}


def gemm_time(step) -> dict:
    """One call of `step` under the Torch profiler, with input shapes: the GPU time of its
    matrix products (ms) and their work (TFLOP, 2·M·N·K each)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    us, flops = 0.0, 0
    for event in prof.events():
        first = _GEMM_OPERANDS.get(event.name)
        if first is None or event.self_device_time_total <= 0:
            continue
        a, b = event.input_shapes[first:first + 2]
        us += event.self_device_time_total
        flops += 2 * math.prod(a) * b[-1]
    return dict(ms=us / 1e3, tflop=flops / 1e12)


def sustained_gemm_tflops(seconds: float = 1.0) -> float:
    """The bf16 rate cuBLAS sustains on [8192, 4096] x [4096, 14336] products run back to back
    for `seconds`, after as long a warm-up (TFLOP/s)."""
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(8192, 14336, device="cuda", dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def products(count: int) -> float:
        start.record()
        for _ in range(count):
            torch.mm(x, w.t(), out=out)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    count = max(1, int(seconds / products(10) * 10))
    products(count)  # warm-up: the clocks settle at the power limit
    return 2 * 8192 * 4096 * 14336 * count / products(count) / 1e12


def run(mode: str, path: Path, seq: int, batch: int, steps: int, warmup: int) -> dict:
    """The same loop for every mode. Peak allocated memory is reported for the first step (which
    also allocates the optimizer state and every lazily made buffer) and for the timed steps;
    model_gib is what the loaded model holds before training."""
    model = BUILDERS[mode](path)
    model.train()  # gradient checkpointing and dropout act only in training mode
    model_gib = torch.cuda.memory_allocated() / 2**30
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
               for _ in range(warmup + steps)]
    losses, peaks = [], []

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i, ids in enumerate(batches):
        torch.cuda.synchronize()
        if i == warmup:
            start = time.perf_counter()
        torch.cuda.reset_peak_memory_stats()
        losses.append(step(ids).item())
        peaks.append(torch.cuda.max_memory_allocated() / 2**30)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return dict(s_per_step=seconds, tokens_per_s=batch * seq / seconds,
                peak_gib=max(peaks[warmup:]), first_step_peak_gib=peaks[0], model_gib=model_gib,
                losses=losses, profiled_step=gpu_busy(lambda: step(batches[-1])),
                gemms=gemm_time(lambda: step(batches[-1])))


def isolated(function, *args):
    """function(*args) in a process of its own, so that no mode's memory (cached modules,
    allocator state, anything a library keeps alive) is counted in another's peak."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


BUILDERS = {"stock": stock_model, "stock_kbit": functools.partial(stock_model, kbit_recipe=True),
            "unsloth_ext": unsloth_ext_model}
BASELINES = ("stock", "stock_kbit")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="llama-3.1-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--modes", default="stock,stock_kbit,unsloth_ext",
                        help=f"comma-separated, from {', '.join(BUILDERS)}")
    parser.add_argument("--model-dir", help="reuse a saved model directory")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_train needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("bench_train needs bitsandbytes for the stock baseline", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        path = Path(args.model_dir) if args.model_dir else Path(tmp) / args.preset
        if not (path / "config.json").exists():
            save_random_model(args.preset, path)
        ceiling = isolated(sustained_gemm_tflops)
        print(f"cuBLAS sustained: {ceiling:.0f} TFLOP/s", flush=True)
        results = {}
        for mode in args.modes.split(","):
            results[mode] = isolated(run, mode, path, args.seq, args.batch, args.steps,
                                     args.warmup)
            print(mode, {k: v for k, v in results[mode].items() if k != "losses"}, flush=True)
    rows = []
    baselines = [b for b in BASELINES if b in results]
    for mode, r in results.items():
        speedups = [f"{r['tokens_per_s'] / results[b]['tokens_per_s']:.2f}x" for b in baselines]
        busy, gemms = r["profiled_step"], r["gemms"]
        rate = gemms["tflop"] / gemms["ms"] * 1e3
        rows.append([mode, f"{r['s_per_step']:.3f}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['peak_gib']:.2f}", f"{r['first_step_peak_gib']:.2f}",
                     f"{r['model_gib']:.2f}", *speedups, f"{busy['gpu_ops']:,}",
                     f"{busy['busy_ms']:.0f} / {busy['span_ms']:.0f}",
                     f"{gemms['ms']:.0f} ms, {gemms['tflop']:.0f} TFLOP, {rate:.0f} TFLOP/s "
                     f"({rate / ceiling:.0%})"])
    table = markdown_table(["mode", "s/step", "tokens/s", "peak GiB (timed steps)",
                            "peak GiB (first step)", "model GiB",
                            *(f"vs {b}" for b in baselines), "GPU ops / step",
                            "profiled step: GPU busy / span, ms",
                            "GEMMs of a step (% of sustained cuBLAS)"], rows)
    table = (f"{args.preset}, seq {args.seq}, batch {args.batch}, {args.steps} timed steps after "
             f"{args.warmup} warm-up, QLoRA NF4 + double quant, r=16 on 7 projections, bf16. "
             f"cuBLAS sustains {ceiling:.0f} TFLOP/s on this GPU (bf16, 1 s of back-to-back "
             "[8192, 4096] x [4096, 14336] products, same invocation).\n\n" + table)
    path = write_results(f"train_{args.preset}", {"environment": environment(), "args": vars(args),
                                                  "sustained_gemm_tflops": ceiling,
                                                  "results": results}, table)
    print(f"results: {path}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
