import json

import pytest
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from unsloth_ext.data import (IGNORE_INDEX, DataError, as_rows, collate, pack, read_jsonl,
                              tokenize)


@pytest.fixture(scope="module")
def tokenizer():
    words = ["<pad>", "</s>", "<unk>", "###", "Instruction", "Input", "Response", ":", "hi",
             "there", "a", "b", "c", "<|user|>", "<|assistant|>", "<|system|>", "<", ">", "|"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_alpaca_and_chat_records(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "hi", "output": "there"}),
        "",
        json.dumps({"instruction": "hi", "input": "a", "output": "b"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "there"}]}),
    ])
    records = read_jsonl(path)
    assert [r.line for r in records] == [1, 3, 4]
    assert "### Input:\na" in records[1].prompt and records[1].response == "b"
    assert records[2].prompt.endswith("<|assistant|>\n") and records[2].response == "there"


@pytest.mark.parametrize("line,message", [
    ("{not json", "d.jsonl:2: invalid JSON"),
    ("[1, 2]", "d.jsonl:2: expected a JSON object"),
    (json.dumps({"text": "x"}), "d.jsonl:2: expected 'instruction'/'output'"),
    (json.dumps({"instruction": "x"}), "d.jsonl:2: 'output' must be a string"),
    (json.dumps({"instruction": "x", "output": 3}), "d.jsonl:2: 'output' must be a string"),
    (json.dumps({"messages": []}), "d.jsonl:2: 'messages' must be a non-empty list"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "d.jsonl:2: messages\\[0\\]"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "d.jsonl:2: the last message"),
])
def test_malformed_rows_name_the_line(tmp_path, line, message):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"instruction": "a", "output": "b"}), line])
    with pytest.raises(DataError, match=message):
        read_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(_write(tmp_path / "empty.jsonl", ["", "  "]))


def test_prompt_is_masked_and_eos_appended(tmp_path, tokenizer):
    records = read_jsonl(_write(tmp_path / "d.jsonl", [json.dumps({"instruction": "hi",
                                                                   "output": "there"})]))
    (example,) = tokenize(records, tokenizer, max_seq_length=64)
    prompt_len = len(tokenizer(records[0].prompt)["input_ids"])
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_overflow_truncates_or_rejects(tmp_path, tokenizer):
    records = read_jsonl(_write(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "hi", "output": " ".join(["a"] * 40)})]))
    with pytest.warns(UserWarning, match="1 examples were truncated"):
        (example,) = tokenize(records, tokenizer, max_seq_length=16)
    assert len(example.input_ids) == 16
    with pytest.raises(DataError, match="line 1: .* over max_seq_length 16"):
        tokenize(records, tokenizer, max_seq_length=16, overflow="error")


def test_pack_restarts_positions_and_collate_pads(tmp_path, tokenizer):
    records = read_jsonl(_write(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "hi", "output": "a b c"})] * 5))
    examples = tokenize(records, tokenizer, max_seq_length=32)
    rows = pack(examples, 32)
    n = len(examples[0].input_ids)
    assert len(rows) == -(-5 // (32 // n))
    assert rows[0]["position_ids"][:2 * n] == list(range(n)) * 2
    batch = collate(rows, tokenizer.pad_token_id)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    plain = collate(as_rows(examples[:2]), tokenizer.pad_token_id)
    assert plain["attention_mask"].sum() == 2 * n
