"""Instruction data for fine-tuning: JSONL reading with errors that name the line, prompt
formatting, tokenization with the prompt masked out of the loss, and packing.

Two record formats, one per line:
  alpaca: {"instruction": str, "input": str (optional), "output": str}
  chat:   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

Sequences longer than `max_seq_length` tokens are truncated from the right (`overflow="truncate"`,
the default; the number truncated is reported) or rejected with an error naming the line
(`overflow="error"`). An example left with no response token after truncation is dropped.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CHAT_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


@dataclass
class Record:
    line: int
    prompt: str    # text the model is given (no loss)
    response: str  # text the model learns to produce


def _alpaca(obj: dict, where: str) -> tuple[str, str]:
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            raise DataError(f"{where}: '{key}' must be a string")
    extra = obj.get("input", "")
    if not isinstance(extra, str):
        raise DataError(f"{where}: 'input' must be a string")
    template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT
    return template.format(instruction=obj["instruction"], input=extra), obj["output"]


def _chat(obj: dict, where: str, tokenizer) -> tuple[str, str]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{'role': one of {CHAT_ROLES}, "
                            "'content': str}")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (the response)")
    context, response = messages[:-1], messages[-1]["content"]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    else:
        prompt = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in context) + "<|assistant|>\n"
    return prompt, response


def read_jsonl(path: str | Path, tokenizer=None) -> list[Record]:
    """Read alpaca- or chat-style JSONL. Raises DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "messages" in obj:
                prompt, response = _chat(obj, where, tokenizer)
            elif "instruction" in obj or "output" in obj:
                prompt, response = _alpaca(obj, where)
            else:
                raise DataError(f"{where}: expected 'instruction'/'output' (alpaca) or 'messages' "
                                f"(chat); got keys {sorted(obj)}")
            records.append(Record(number, prompt, response))
    if not records:
        raise DataError(f"{path}: no examples")
    return records


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize(records: list[Record], tokenizer, max_seq_length: int,
             overflow: str = "truncate") -> list[Example]:
    """Token ids with the prompt masked out of the labels and EOS after the response."""
    if overflow not in ("truncate", "error"):
        raise ValueError(f"overflow must be 'truncate' or 'error', got {overflow!r}")
    eos = tokenizer.eos_token_id
    examples, truncated, dropped = [], 0, 0
    for record in records:
        prompt = tokenizer(record.prompt, add_special_tokens=True)["input_ids"]
        response = tokenizer(record.response, add_special_tokens=False)["input_ids"] + [eos]
        ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
        if len(ids) > max_seq_length:
            if overflow == "error":
                raise DataError(f"line {record.line}: {len(ids)} tokens, over max_seq_length "
                                f"{max_seq_length}")
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            truncated += 1
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(ids, labels))
    if truncated or dropped:
        warnings.warn(f"{truncated} examples were truncated to {max_seq_length} tokens; {dropped} "
                      "were dropped for having no response token left", stacklevel=2)
    if not examples:
        raise DataError(f"no example fits in max_seq_length {max_seq_length}")
    return examples


def pack(examples: list[Example], max_seq_length: int) -> list[dict]:
    """Concatenate examples into rows of at most max_seq_length tokens. position_ids restart at 0
    for each example, which transformers turns into a block-diagonal causal mask."""
    rows, current = [], {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        if current["input_ids"] and len(current["input_ids"]) + len(example.input_ids) > max_seq_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += example.input_ids
        current["labels"] += example.labels
        current["position_ids"] += list(range(len(example.input_ids)))
    rows.append(current)
    return rows


def collate(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. Unpacked rows get an attention mask; packed rows carry position_ids
    (and no mask, so the packed sequences stay apart)."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
    }
    packed = "position_ids" in rows[0]
    if packed:
        batch["position_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
    else:
        batch["attention_mask"] = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
        batch["labels"][i, :n] = torch.tensor(row["labels"])
        if packed:
            batch["position_ids"][i, :n] = torch.tensor(row["position_ids"])
            batch["position_ids"][i, n:] = torch.arange(width - n)
        else:
            batch["attention_mask"][i, :n] = 1
    return batch


def as_rows(examples: list[Example]) -> list[dict]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
