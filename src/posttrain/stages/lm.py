"""Language-modelling stages: `pt` (continued pretraining on raw text) and `sft` (chat / instruction data).

Both minimise the token NLL of the trained positions; they differ only in how examples are encoded
(raw text chunks vs. chat-template rendering with loss on assistant turns).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..forward import selected_logits, selection
from ..losses import token_nll_sum


def lm_loss(model: nn.Module, batch: dict, ctx=None) -> tuple[torch.Tensor, int, dict]:
    """Summed NLL over the trained tokens of a batch, how many there are, no extra metrics."""
    positions, targets, _, _ = selection(batch)
    logits, _ = selected_logits(model, batch, positions)
    total, count = token_nll_sum(logits, targets)
    return total, count, {}


@torch.no_grad()
def lm_evaluate(model: nn.Module, batches, autocast, ctx=None) -> dict[str, float]:
    total, count = 0.0, 0
    for batch in batches:
        with autocast():
            loss_sum, n, _ = lm_loss(model, batch)
        total += float(loss_sum)
        count += n
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}
