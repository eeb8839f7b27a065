"""The Stage record every offline stage fills in (see stages/__init__.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def count_items(batch: dict) -> int:
    """What a loss is averaged over: trained (shifted) tokens for LMs, examples for classifiers."""
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else int(labels.numel())


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str                          # examples it reads: text | conversation | labeled | preference | feedback
    task: str                          # causal | classify | reward: which Auto class loads the model
    loss: Callable                     # (model, batch, ctx) -> (loss_sum, count, metric_sums)
    evaluate: Callable                 # (model, batches, autocast, ctx) -> {"eval_...": value}
    count: Callable = count_items      # (batch) -> items the loss is averaged over
    encode: Callable | None = None     # (examples, tokenizer, config) -> (features, stats); None: data.encode
    collate: Callable | None = None    # (features, pad_id, ctx) -> batch; None: padding or packing
    setup: Callable | None = None      # (config, model, tokenizer, accelerator) -> ctx
    prepare: Callable | None = None    # (trainer, ctx) -> None, before the first step (e.g. reference log-probs)
    finish: Callable | None = None     # (trainer, ctx) -> dict for summary.json, after the last step
    length: Callable | None = None     # (feature) -> tokens it stands for; None: len(input_ids)
