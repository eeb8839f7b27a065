"""`posttrain score`: a reward per row from a reward-model directory.

Preference rows (prompt/chosen/rejected, rankings expanded elsewhere) get `chosen_reward` and
`rejected_reward`; chat rows (messages, alpaca, sharegpt, prompt/completion) get `reward` for their last
assistant turn. Sequences are tokenized exactly as `stage: rm` tokenized them for training, and the
model's `reward_offset` (set by training so the mean reward on its training responses is 0) is added.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from .data.examples import Feedback, Preference
from .data.formats import load_examples
from .data.pairs import encode_feedback, encode_preference
from .data.sources import read_rows
from .errors import ConfigError, DataError
from .forward import sequence_scores
from .modeling import load_tokenizer, resolve_device, resolve_dtype, resolve_model_path


def load_reward_model(path: str, device=None, dtype=None):
    """(model, tokenizer, reward offset) of a reward-model directory, on `device` in `dtype` (None / "auto":
    modeling.resolve_device / resolve_dtype: a GPU when there is one, in bf16 there; the CPU in fp32)."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    path = resolve_model_path(path)
    placement = {"device_map": {"": device}} if device.type != "cpu" else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, **placement).eval()
    if model.config.num_labels != 1:
        raise ConfigError(f"{path} is not a reward model (it has {model.config.num_labels} outputs, not 1)")
    return model, load_tokenizer(path), float(getattr(model.config, "reward_offset", 0.0) or 0.0)


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_id: int, offset: float, batch_size: int = 16) -> list[float]:
    """The reward of each token sequence, read at its last token (forward.sequence_scores), plus `offset`."""
    device = next(model.parameters()).device
    rewards: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, seq in enumerate(chunk):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        scores = sequence_scores(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device)})
        rewards += (scores + offset).tolist()
    return rewards


def _sequence(tokenizer, example, max_length: int) -> list[list[int]]:
    if isinstance(example, Preference):
        f = encode_preference(tokenizer, example, max_length)
        return [f["prompt_ids"] + f["chosen_ids"], f["prompt_ids"] + f["rejected_ids"]]
    messages = example.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    f = encode_feedback(tokenizer, Feedback(messages[:last], [messages[last]], True, example.source), max_length)
    return [f["prompt_ids"] + f["completion_ids"]]


def score_file(model_dir: str, data: str, out: str, max_length: int = 1024, batch_size: int = 16,
               device: str | None = None, dtype: str | None = None) -> dict:
    model, tokenizer, offset = load_reward_model(model_dir, device, dtype)
    rows = read_rows(data)
    if not rows:
        raise DataError(f"{data}: no rows")
    kind = "preference" if {"chosen", "rejected"} <= set(rows[0].data) else "conversation"
    examples, _ = load_examples(data, kind=kind, skip_invalid=True)
    by_location = {e.source: e for e in examples}
    keys = ("chosen_reward", "rejected_reward") if kind == "preference" else ("reward",)
    scored = [(row, by_location.get(row.location)) for row in rows]
    sequences = [s for _, e in scored if e is not None for s in _sequence(tokenizer, e, max_length)]
    rewards = iter(score_sequences(model, sequences, tokenizer.pad_token_id, offset, batch_size))
    written, unscored = [], 0
    for row, example in scored:
        record = dict(row.data)
        for key in keys:  # a row the data layer skipped (e.g. chosen == rejected) is kept with null
            record[key] = next(rewards) if example is not None else None
        unscored += example is None
        written.append(record)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in written))
    partial.replace(out_path)
    return {"rows": len(written), "unscored": unscored, "kind": kind, "offset": offset}
