"""Language-modelling stages: `pt` (continued pretraining on raw text) and `sft` (chat / instruction data).

Both minimise the token NLL of the trained positions; they differ only in how examples are encoded
(raw text chunks vs. chat-template rendering with loss on assistant turns).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..forward import token_logps


def lm_loss(model: nn.Module, batch: dict, ctx=None) -> tuple[torch.Tensor, int, dict]:
    """Summed NLL over the trained tokens of a batch (losses.token_nll_sum's formula, L = -sum_t log p(target_t),
    from forward.token_logps, which never holds [tokens, vocab] logits), how many there are, no extra metrics."""
    logps = token_logps(model, batch)["logps"]
    return -logps.sum(), int(logps.numel()), {}


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
