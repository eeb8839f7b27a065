"""Batching: order examples into batches, pack short examples into rows, collate into tensors.

Packed rows need an explicit block-diagonal causal mask: with `position_ids` alone, transformers 5 (sdpa,
eager and flex on CPU) still lets the documents of a row attend to each other.
"""
from __future__ import annotations

import bisect
import random

import torch

from posttrain.data.encode import IGNORE
from posttrain.data.vision import pixel_batch

MEGABATCH = 50  # batches per length-sorted group when grouping by length


def batch_indices(lengths: list[int], batch_size: int, *, seed: int, epoch: int, group_by_length: bool,
                  drop_last: bool = False) -> list[list[int]]:
    """Indices of each batch, deterministic for (seed, epoch).

    Length grouping shuffles, cuts into mega-batches of MEGABATCH batches, sorts each by length (less
    padding, still random across the dataset), then shuffles the batch order with the longest batch first
    so that an out-of-memory error shows up at once instead of hours into training.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        size = batch_size * MEGABATCH  # a multiple of batch_size: only the very last batch can be short
        order = [i for start in range(0, len(order), size)
                 for i in sorted(order[start:start + size], key=lambda i: -lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    rng.shuffle(batches)
    if group_by_length and batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]) * len(batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group indices into rows of total length <= max_length (best-fit decreasing; deterministic)."""
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens > max_length {max_length}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row number)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))  # the fullest row that still fits
        if at == len(free):
            rows.append([])
            row = len(rows) - 1
            left = max_length
        else:
            left, row = free.pop(at)
        rows[row].append(i)
        bisect.insort(free, (left - lengths[i], row))
    return rows


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest feature: input_ids, attention_mask (2-D) and labels (-100 on padding);
    for classification features ("label") labels is a 1-D tensor of class ids. Features with images add the
    model's image inputs (data/vision.py: pixel_values, ...), the images in row order."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "label" in features[0]:
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
    else:
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        for row, f in enumerate(features):
            labels[row, :len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
        batch["labels"] = labels
    batch.update(pixel_batch([f.get("images") for f in features], input_ids))
    return batch


def block_causal_mask(doc_ids: torch.Tensor, attn_implementation: str = "sdpa",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """4-D mask (batch, 1, query, key) letting each token see earlier tokens of its own document only.

    transformers 5 passes a 4-D mask to the attention function as-is, and the two conventions differ:
    sdpa takes a bool mask (True = attend); eager *adds* the mask to the scores, so it needs a float mask
    (0 = attend, dtype's minimum = blocked), as transformers' own eager_mask builds it.
    `doc_ids` is (batch, length) with 0 for padding; padding attends to itself so no row is all-masked
    (an all-masked softmax row gives NaN).
    """
    length = doc_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] > 0)
    mask = (same_doc & causal) | torch.eye(length, dtype=torch.bool)
    mask = mask[:, None]
    if attn_implementation == "sdpa":
        return mask
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"packing with an explicit mask supports attn_implementation sdpa or eager, "
                     f"not '{attn_implementation}'")


def collate_packed(rows: list[list[dict]], pad_id: int, max_length: int | None = None, *,
                   attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Concatenate the features of each row: input_ids, labels (-100 on the first token of every document,
    so the shifted loss never predicts one document from another), position_ids restarting at 0 per
    document, and a block-diagonal causal 4-D attention_mask (see block_causal_mask; `dtype` is the model's
    dtype, used by eager). For flash_attention_* no mask is returned: transformers then finds the
    documents from position_ids."""
    width = max_length or max(sum(len(f["input_ids"]) for f in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for doc, f in enumerate(row, start=1):
            n = len(f["input_ids"])
            if start + n > width:
                raise ValueError(f"packed row {r} has more than {width} tokens")
            input_ids[r, start:start + n] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[r, start + 1:start + n] = torch.tensor(f["labels"][1:], dtype=torch.long)
            position_ids[r, start:start + n] = torch.arange(n)
            doc_ids[r, start:start + n] = doc
            start += n
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    batch.update(pixel_batch([f.get("images") for row in rows for f in row], input_ids))
    if not attn_implementation.startswith("flash_attention"):
        batch["attention_mask"] = block_causal_mask(doc_ids, attn_implementation, dtype)
    return batch
