"""`unsloth-ext finetune` (also `python -m unsloth_ext finetune`): QLoRA fine-tuning.

With no arguments it runs a demo: a small Llama built from a config shipped in the package
(random weights, nothing downloaded), NF4-quantized, LoRA attached, fine-tuned on a synthetic
instruction dataset shipped in the package. With `--model PATH --data FILE.jsonl` it fine-tunes
a local transformers checkpoint on alpaca- or chat-style JSONL (see unsloth_ext.data).

Outputs, each written to a temporary directory and renamed into place (a reader never sees a
half-written one; an interrupted run leaves the last complete checkpoint):
  OUTPUT/checkpoint-STEP   PEFT adapter every --save-every steps (the last two are kept)
  OUTPUT/adapter           the final PEFT adapter (+ tokenizer), loadable by stock PEFT
  OUTPUT/merged            with --save-merged: base weights (dequantized) + LoRA, 16-bit,
                           loadable by stock transformers
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_QUESTIONS = ("What is the capital of Zundteil?", "Which language do people speak in Temfal?")
# Options left unset on the command line take these values (the demo's are tuned for its task).
DEFAULTS = dict(max_steps=None, epochs=1.0, lr=2e-4, rank=16, alpha=16, seq_len=2048,
                batch_size=4)
DEMO_DEFAULTS = dict(max_steps=300, epochs=1.0, lr=3e-3, rank=16, alpha=32, seq_len=64,
                     batch_size=8)


# --- outputs ----------------------------------------------------------------------------------

def write_dir_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Write a directory through a temporary sibling and a rename. If target exists it is moved
    aside first and removed after, so a complete copy exists at every moment."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def check_output_dir(output: Path) -> None:
    """Fail before any training if the output directory cannot be written."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise SystemExit(f"error: output directory {output} is not writable: {exc}") from None


def save_adapter(model, tokenizer, target: Path) -> None:
    def write(tmp: Path):
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    write_dir_atomic(target, write)


def merged_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base model's weights with every LoRA delta added, in `dtype`. NF4 base weights are
    dequantized first (the result is what the quantized model computes, not the original)."""
    from peft.tuners.lora import LoraLayer

    from unsloth_ext.lora import lora_parts

    base = model.get_base_model()
    state = {}
    lora_layers = {name: module for name, module in base.named_modules()
                   if isinstance(module, LoraLayer)}
    for name, module in lora_layers.items():
        parts = lora_parts(module)
        weight = parts.dense_weight().float()
        if parts.uses_lora:  # a merged adapter is in the weight already
            weight = weight + parts.scaling * (parts.lora_B.float() @ parts.lora_A.float())
        state[f"{name}.weight"] = weight.to(dtype).cpu()
        if parts.bias is not None:
            state[f"{name}.bias"] = parts.bias.to(dtype).cpu()
    skip = tuple(f"{name}." for name in lora_layers)
    for key, tensor in base.state_dict().items():
        if not key.startswith(skip):
            state[key] = tensor.to(dtype).cpu() if tensor.is_floating_point() else tensor.cpu()
    return state


def save_merged(model, tokenizer, target: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    config = model.get_base_model().config.to_dict()
    config.pop("quantization_config", None)
    config_class = type(model.get_base_model().config)

    def write(tmp: Path):
        with torch.device("meta"):
            merged = AutoModelForCausalLM.from_config(config_class.from_dict(config), dtype=dtype)
        merged.load_state_dict(merged_state_dict(model, dtype), assign=True, strict=True)
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_dir_atomic(target, write)


# --- training ---------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 5
    save_every: int = 0
    seed: int = 3407


def _memory_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}GiB"
    try:
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}GiB rss"
    except ImportError:
        return "n/a"


@contextmanager
def _interrupts_deferred():
    """Holds SIGINT until the block ends, so that Ctrl-C lands after a checkpoint's files are
    written and the stale ones removed (an interrupt inside shutil.rmtree can surface as an
    OSError instead of KeyboardInterrupt). A no-op off the main thread or without signal masks."""
    main = threading.current_thread() is threading.main_thread()
    if not main or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def train(model, rows: list[dict], pad_token_id: int, config: TrainConfig,
          output: Path | None = None, tokenizer=None) -> list[float]:
    """AdamW on the trainable parameters over `rows` (see unsloth_ext.data). Returns the loss of
    each optimizer step. Shows a progress bar with loss, tokens/s and peak memory."""
    from tqdm.auto import tqdm

    from unsloth_ext.data import IGNORE_INDEX, collate

    device = next(p for p in model.parameters()).device
    rng = random.Random(config.seed)
    per_step = config.batch_size * config.grad_accum
    steps = config.max_steps or max(1, math.ceil(len(rows) * config.epochs / per_step))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    def lr_factor(s: int) -> float:  # linear warmup, then linear decay to zero
        if s < config.warmup_steps:
            return (s + 1) / config.warmup_steps
        return max(0.0, 1 - (s - config.warmup_steps) / max(1, steps - config.warmup_steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order: list[int] = []
    losses, checkpoints = [], []
    bar = tqdm(range(steps), desc="finetune", dynamic_ncols=True)
    start, tokens = time.perf_counter(), 0
    model.train()
    for step in bar:
        micro = []
        for _ in range(config.grad_accum):
            if len(order) < config.batch_size:
                order += rng.sample(range(len(rows)), len(rows))
            micro.append(collate([rows[i] for i in order[:config.batch_size]], pad_token_id))
            del order[:config.batch_size]
        # The loss of one optimizer step is the mean over all its target tokens, whatever the split.
        items = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        step_loss = 0.0
        for batch in micro:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch, num_items_in_batch=torch.tensor(items, device=device)).loss
            loss.backward()
            step_loss += loss.item()
            tokens += int(batch["input_ids"].numel())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / elapsed:.0f}",
                        mem=_memory_text(device))
        if output is not None and config.save_every and (step + 1) % config.save_every == 0:
            checkpoint = output / f"checkpoint-{step + 1}"
            with _interrupts_deferred():
                save_adapter(model, tokenizer, checkpoint)
                checkpoints.append(checkpoint)
                for stale in checkpoints[:-2]:
                    shutil.rmtree(stale, ignore_errors=True)
                del checkpoints[:-2]
    bar.close()
    return losses


@torch.no_grad()
def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy continuation of a formatted prompt (model returned to training mode after)."""
    from unsloth_ext.fast_model import FastLanguageModel

    was_training = model.training
    FastLanguageModel.for_inference(model)
    device = next(p for p in model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    if was_training:
        FastLanguageModel.for_training(model)
    return text.strip()


# --- the demo model -----------------------------------------------------------------------------

def build_demo_checkpoint(target: Path, seed: int = 0) -> Path:
    """Save a random-initialized small Llama and a word-level tokenizer for the demo dataset."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from unsloth_ext.data import read_jsonl

    records = read_jsonl(DEMO_DIR / "dataset.jsonl")
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = sorted({w for r in records for text in (r.prompt, r.response)
                    for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)})
    tok.model = models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig.from_json_file(DEMO_DIR / "llama_config.json")
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)

    def write(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_dir_atomic(target, write)
    return target


# --- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local transformers checkpoint (omit with --data for the demo)")
    parser.add_argument("--data", help="alpaca- or chat-style JSONL")
    parser.add_argument("--output", default="unsloth-ext-output", help="output directory")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs)")
    parser.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    parser.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=int, help="LoRA alpha (default 16)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--seq-len", type=int, help="max_seq_length (default 2048)")
    parser.add_argument("--batch-size", type=int, help="examples per micro-batch (default 4)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--packing", action="store_true", help="pack examples into full rows")
    parser.add_argument("--overflow", choices=("truncate", "error"), default="truncate",
                        help="what to do with examples longer than --seq-len")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    parser.add_argument("--save-merged", action="store_true", help="also save a merged 16-bit model")
    parser.add_argument("--no-4bit", action="store_true", help="keep the base weights in 16-bit")
    parser.add_argument("--gradient-checkpointing", choices=("unsloth", "true", "false"),
                        default="unsloth")
    parser.add_argument("--seed", type=int, default=3407)


def run(args: argparse.Namespace) -> int:
    from unsloth_ext.data import ALPACA_PROMPT, as_rows, pack, read_jsonl, tokenize
    from unsloth_ext.fast_model import FastLanguageModel
    from unsloth_ext.patching import unwrap

    if (args.model is None) != (args.data is None):
        raise SystemExit("error: --model and --data go together (give neither for the demo)")
    demo = args.model is None
    output = Path(args.output)
    check_output_dir(output)
    for name, value in (DEMO_DEFAULTS if demo else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if demo:
        print("demo: a small Llama (random weights), NF4 + LoRA, on a synthetic instruction task")
        args.model = str(build_demo_checkpoint(output / "demo-base"))
        args.data = str(DEMO_DIR / "dataset.jsonl")
    records = read_jsonl(args.data)  # fail on bad data before loading the model
    model, tokenizer = FastLanguageModel.from_pretrained(
        args.model, max_seq_length=args.seq_len, load_in_4bit=not args.no_4bit)
    records = read_jsonl(args.data, tokenizer)
    examples = tokenize(records, tokenizer, args.seq_len, args.overflow)
    rows = pack(examples, args.seq_len) if args.packing else as_rows(examples)
    checkpointing = {"unsloth": "unsloth", "true": True, "false": False}[args.gradient_checkpointing]
    model = FastLanguageModel.get_peft_model(
        model, r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
        use_gradient_checkpointing=checkpointing, random_state=args.seed)
    questions = [ALPACA_PROMPT.format(instruction=q) for q in DEMO_QUESTIONS] if demo \
        else [records[0].prompt]
    before = [generate_answer(model, tokenizer, q) for q in questions]
    config = TrainConfig(max_steps=args.max_steps, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, grad_accum=args.grad_accum,
                         save_every=args.save_every, seed=args.seed)
    try:
        losses = train(model, rows, tokenizer.pad_token_id, config, output, tokenizer)
    except KeyboardInterrupt:
        kept = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        print(f"\ninterrupted; last complete checkpoint: {kept[-1] if kept else 'none'}",
              file=sys.stderr)
        return 130
    save_adapter(model, tokenizer, output / "adapter")
    print(f"loss: first step {losses[0]:.4f}, last step {losses[-1]:.4f}")
    print(f"adapter saved to {output / 'adapter'}")
    if args.save_merged:
        compute = unwrap(model).config.dtype
        save_merged(model, tokenizer, output / "merged",
                    torch.float16 if compute == torch.float16 else torch.bfloat16)
        print(f"merged model saved to {output / 'merged'}")
    for prompt, answer_before in zip(questions, before):
        print(f"prompt: {prompt.strip()}\n  before training: {answer_before}\n"
              f"  after training:  {generate_answer(model, tokenizer, prompt)}")
    return 0
