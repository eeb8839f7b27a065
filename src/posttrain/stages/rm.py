"""`rm`: a reward model from preference pairs (Bradley-Terry), a scalar head read at the last token.

The model is AutoModelForSequenceClassification with num_labels=1; its score head is read at each response's
last real token, found from the attention mask (forward.sequence_scores), on every path: training, prefix
sharing, `posttrain score` and reward models inside RL. After training, the mean reward over the training responses is measured and stored
as `reward_offset` in config.json; `posttrain score` adds it, so scored rewards have mean 0 on the
training data.
"""
from __future__ import annotations

import torch

from ..data.pairs import collate_pairs
from ..forward import prefix_sharing_on, sequence_scores, unwrap
from ..losses import bradley_terry
from .base import Stage
from .pairwise import StageContext, encode_pairs, evaluate_with_loss, pair_tokens
from .prefix import collate_shared_prefix


def setup(config, model, tokenizer, accelerator) -> StageContext:
    shared = prefix_sharing_on(config.rm.prefix_sharing, model, "rm.prefix_sharing")
    return StageContext(config, extra={"prefix_sharing": shared})


def collate(features, pad_id, ctx):
    if ctx is not None and ctx.extra.get("prefix_sharing"):
        return collate_shared_prefix(features, pad_id)
    return collate_pairs(features, pad_id)


def rewards(model, batch) -> torch.Tensor:
    """One scalar per sequence (chosen ones, then rejected ones), read at each one's last real token."""
    return sequence_scores(model, batch)


def rm_loss(model, batch, ctx) -> tuple[torch.Tensor, int, dict]:
    scores = rewards(model, batch)
    n = scores.shape[0] // 2
    chosen, rejected = scores[:n], scores[n:]
    losses = bradley_terry(chosen, rejected, margin=batch.get("margin"), center_coef=ctx.config.rm.center_coef)
    detached = (chosen.detach(), rejected.detach())
    metrics = {"accuracy": (detached[0] > detached[1]).float().sum(), "margin": (detached[0] - detached[1]).sum(),
               "rewards_chosen": detached[0].sum(), "rewards_rejected": detached[1].sum()}
    return losses.sum(), n, metrics


def count_pairs(batch: dict) -> int:
    return int(batch["pair_count"]) if "pair_count" in batch else batch["input_ids"].shape[0] // 2


def evaluate(model, batches, autocast, ctx):
    return evaluate_with_loss(rm_loss, model, batches, autocast, ctx)


@torch.no_grad()
def finish(trainer, ctx) -> dict:
    """Measure the mean reward over the training responses and store its negative as `reward_offset`."""
    model = unwrap(trainer.model)
    model.eval()
    total, count = 0.0, 0
    size = trainer.train_cfg.batch_size
    for start in range(0, len(trainer.units), size):
        units = trainer.units[start:start + size]
        batch = {k: v.to(trainer.accelerator.device) for k, v in trainer.collate(units).items()}
        with trainer.accelerator.autocast():
            scores = rewards(model, batch)
        total += float(scores.sum())
        count += scores.numel()
    mean = total / max(count, 1)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.reward_offset = -mean
    return {"reward_mean_on_train_responses": mean, "reward_offset": -mean}


STAGE = Stage("rm", "preference", "reward", rm_loss, evaluate, count=count_pairs, encode=encode_pairs,
              collate=collate, length=pair_tokens, setup=setup, finish=finish)
