"""What the pairwise and preference stages (rm, dpo, kto) share: their context, the precomputed reference
log-probs (reference.py has the strategies), pair encoding and evaluation."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..reference import Reference


@dataclass
class StageContext:
    config: object
    reference: Reference | None = None
    extra: dict = field(default_factory=dict)


def precompute_reference(trainer, ctx: StageContext, row_keys: tuple[str, ...], collate) -> None:
    """Store the reference log-probs of every train and eval unit in the unit itself (keys `row_keys`).

    `collate(units)` builds a batch whose rows are the units' sequences for each key in turn (e.g. all
    chosen rows, then all rejected rows). Units are scored in order of length (the stage's unit length), in
    batches twice the training batch (a forward without gradients holds less than a training step), so
    little of the pass is padding. With several processes each scores every world-th batch and the values
    are exchanged, so the pass costs 1 / processes of a single process's time."""
    if ctx.reference is None or ctx.reference.strategy != "precompute":
        return
    acc, size = trainer.accelerator, 2 * trainer.train_cfg.batch_size
    rank, world = acc.process_index, acc.num_processes
    for units in (trainer.units, trainer.eval_units):
        units = sorted(units, key=trainer.unit_length)  # the same unit objects: values are written into them
        starts = list(range(0, len(units), size))
        mine = starts[rank::world]
        found: dict[int, list[list[float]]] = {}
        # every process runs the same number of forwards (FSDP and ZeRO-3 gather weights collectively in each):
        # one with a batch fewer scores a batch again and drops the result
        for i in range(math.ceil(len(starts) / world)):
            start = mine[i] if i < len(mine) else starts[0]
            chunk = units[start:start + size]
            batch = {k: v.to(acc.device) for k, v in collate(chunk).items()}
            with acc.autocast():
                values = ctx.reference.sequence_logps(trainer.model, batch).float().cpu()
            if i < len(mine):
                found[start] = [part.tolist() for part in values.split(len(chunk))]
        if world > 1:
            from accelerate.utils import gather_object

            found = {start: parts for shard in gather_object([found]) for start, parts in shard.items()}
        for start, parts in found.items():
            for key, part in zip(row_keys, parts):
                for unit, value in zip(units[start:start + size], part):
                    unit[key] = value


def encode_pairs(examples, tokenizer, config, vision=None):
    """Preference pairs for rm and dpo, under the data section's length limits (`vision`: dpo's images)."""
    from ..data.pairs import encode_preferences

    return encode_preferences(examples, tokenizer, max_length=config.data.max_length,
                              max_prompt_length=config.data.max_prompt_length, skip_invalid=config.data.skip_invalid,
                              vision=vision)


def pair_tokens(feature: dict) -> int:
    """Tokens a feature stands for (the prompt counts once per sequence it is part of)."""
    return 2 * len(feature["prompt_ids"]) + len(feature["chosen_ids"]) + len(feature["rejected_ids"])


@torch.no_grad()
def evaluate_with_loss(loss_fn, model, batches, autocast, ctx) -> dict[str, float]:
    """Eval metrics of a pairwise stage: its loss and metrics averaged over all eval items."""
    totals: dict[str, float] = {}
    count = 0
    for batch in batches:
        with autocast():
            loss_sum, n, metrics = loss_fn(model, batch, ctx)
        count += n
        totals["loss"] = totals.get("loss", 0.0) + float(loss_sum)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return {f"eval_{k}": v / max(count, 1) for k, v in totals.items()}
