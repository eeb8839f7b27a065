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
    kind: str                          # examples: text | conversation | labeled | preference | feedback | prompt
    task: str                          # causal | classify | reward: which Auto class loads the model
    loss: Callable                     # (model, batch, ctx) -> (loss_sum, count, metric_sums)
    evaluate: Callable                 # (model, batches, autocast, ctx) -> {"eval_...": value};
                                       # online stages: (trainer, eval_units, ctx)
    count: Callable = count_items      # (batch) -> items the loss is averaged over
    encode: Callable | None = None     # (examples, tokenizer, config) -> (features, stats); None: data.encode
    collate: Callable | None = None    # (features, pad_id, ctx) -> batch; None: padding or packing
    setup: Callable | None = None      # (config, model, tokenizer, accelerator) -> ctx
    prepare: Callable | None = None    # (trainer, ctx) -> None, before the first step (e.g. reference log-probs)
    finish: Callable | None = None     # (trainer, ctx) -> dict for summary.json, after the last step
    length: Callable | None = None     # (feature) -> tokens it stands for; None: len(input_ids)
    # online stages (ppo, grpo): the loop hands `step` the prompts of each step instead of running `loss`
    load: Callable | None = None       # like data.formats.load_examples; None: load_examples
    step: Callable | None = None       # (trainer, units, ctx) -> {"loss", "grad_norm", "tokens", "metrics"}
    wrap: Callable | None = None       # (config, model, tokenizer) -> the module trained (e.g. policy + critic)
    unwrap: Callable | None = None     # (trained module) -> the model written to output_dir
