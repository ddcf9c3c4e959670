"""The finetune command line: the demo, real-checkpoint runs, outputs, bad inputs, interruption,
and the patched model inside transformers' Trainer and TRL's SFTTrainer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from unsloth_ext.cli import main
from unsloth_ext.finetune import build_demo_checkpoint

DEMO_ARGS = ["--seq-len", "64", "--batch-size", "4", "--lr", "3e-3", "--no-4bit"]


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "base")


@pytest.fixture(scope="module")
def demo_data():
    return str(Path(__file__).resolve().parents[1] / "unsloth_ext" / "demo" / "dataset.jsonl")


def _finetune(*args) -> int:
    return main(["finetune", *map(str, args)])


def test_demo_learns_the_task(tmp_path, capsys):
    """The full demo as the README runs it: the loss falls clearly and the answers become right."""
    assert _finetune("--output", tmp_path) == 0
    out = capsys.readouterr().out
    first, last = (float(x) for x in out.split("loss: first step ")[1].split("\n")[0]
                   .replace("last step ", "").split(", "))
    assert last < 0.3 * first
    assert "after training:  The capital of Zundteil is Krounstal" in out
    assert "after training:  People in Temfal speak Brathic" in out
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_checkpoint_and_merged_model(tmp_path, demo_checkpoint, demo_data):
    assert _finetune("--model", demo_checkpoint, "--data", demo_data, "--output", tmp_path,
                     "--max-steps", 4, "--save-every", 2, "--save-merged", *DEMO_ARGS) == 0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(tmp_path.glob(".*tmp*"))  # no leftovers of atomic writes
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.model_type == "llama" and not hasattr(merged.config, "quantization_config")


@pytest.mark.parametrize("line,message", [
    ("{oops", r"dataset.jsonl:2: invalid JSON"),
    (json.dumps({"prompt": "x"}), r"dataset.jsonl:2: expected 'instruction'/'output'"),
])
def test_malformed_data_names_the_line(tmp_path, demo_checkpoint, line, message):
    data = tmp_path / "dataset.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        _finetune("--model", demo_checkpoint, "--data", data, "--output", tmp_path / "out")


def test_missing_data_file(tmp_path, demo_checkpoint):
    with pytest.raises(ValueError, match="no such data file"):
        _finetune("--model", demo_checkpoint, "--data", tmp_path / "nope.jsonl", "--output",
                  tmp_path / "out")


def test_model_and_data_go_together(tmp_path, demo_data):
    with pytest.raises(SystemExit, match="--model and --data go together"):
        _finetune("--data", demo_data, "--output", tmp_path)


def test_unwritable_output_fails_before_training(tmp_path, demo_checkpoint, demo_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    start = time.perf_counter()
    with pytest.raises(SystemExit, match="not writable"):
        _finetune("--model", demo_checkpoint, "--data", demo_data, "--output", blocker / "out")
    assert time.perf_counter() - start < 10  # nothing was loaded or trained


def test_interrupt_keeps_the_last_complete_checkpoint(tmp_path, demo_checkpoint, demo_data):
    cmd = [sys.executable, "-m", "unsloth_ext", "finetune", "--model", str(demo_checkpoint),
           "--data", demo_data, "--output", str(tmp_path), "--max-steps", "10000",
           "--save-every", "1", *DEMO_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 300
    while not (tmp_path / "checkpoint-3").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "last complete checkpoint" in err
    kept = sorted(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert kept  # the newest checkpoints, complete (older ones pruned after each save)
    for checkpoint in kept:
        assert (checkpoint / "adapter_config.json").is_file()
        assert (checkpoint / "adapter_model.safetensors").stat().st_size > 0


def _tiny_peft(demo_checkpoint):
    from unsloth_ext import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(demo_checkpoint), max_seq_length=64,
                                                         load_in_4bit=False)
    return FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16), tokenizer


def _lora_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_inside_transformers_trainer(tmp_path, demo_checkpoint, demo_data):
    from transformers import Trainer, TrainingArguments

    from unsloth_ext.data import as_rows, collate, read_jsonl, tokenize

    model, tokenizer = _tiny_peft(demo_checkpoint)
    rows = as_rows(tokenize(read_jsonl(demo_data), tokenizer, 64))
    before = _lora_snapshot(model)
    trainer = Trainer(model=model, train_dataset=rows,
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
                      args=TrainingArguments(output_dir=str(tmp_path), max_steps=3,
                                             per_device_train_batch_size=4, learning_rate=1e-3,
                                             report_to=[], use_cpu=not torch.cuda.is_available(),
                                             remove_unused_columns=False))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = _lora_snapshot(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_inside_trl_sft_trainer(tmp_path, demo_checkpoint, demo_data):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    model, tokenizer = _tiny_peft(demo_checkpoint)
    texts = [json.loads(line) for line in Path(demo_data).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(
        [{"prompt": t["instruction"] + " " + t.get("input", ""), "completion": t["output"]}
         for t in texts])
    before = _lora_snapshot(model)
    trainer = trl.SFTTrainer(model=model, train_dataset=dataset, processing_class=tokenizer,
                             args=trl.SFTConfig(output_dir=str(tmp_path), max_steps=3,
                                                per_device_train_batch_size=4, learning_rate=1e-3,
                                                report_to=[], max_length=64,
                                                use_cpu=not torch.cuda.is_available()))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = _lora_snapshot(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
