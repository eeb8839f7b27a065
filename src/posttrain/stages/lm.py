"""Language-modelling stages: `pt` (continued pretraining on raw text) and `sft` (chat / instruction data).

Both minimise the token NLL of the trained positions; they differ only in how examples are encoded
(raw text chunks vs. chat-template rendering with loss on assistant turns).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..losses import IGNORE, shift_labels, token_nll_sum
from ..modeling import plain_head_parts

def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def trained_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a trained token, their targets, and each one's row.

    For plain-head models the LM head runs on those positions only: prompt and padding rows of the
    logits are never built (with a 32k-150k vocabulary that is most of an SFT step's memory and time)."""
    targets = shift_labels(batch["labels"])
    selected = targets != IGNORE
    rows = selected.nonzero()[:, 0]
    parts = plain_head_parts(model)
    if parts is None:
        logits = model(**_model_inputs(batch), use_cache=False).logits
        return logits[selected], targets[selected], rows
    body, head = parts
    hidden = body(**_model_inputs(batch), use_cache=False).last_hidden_state
    return head(hidden[selected]), targets[selected], rows


def lm_loss(model: nn.Module, batch: dict, ctx=None) -> tuple[torch.Tensor, int, dict]:
    """Summed NLL over the trained tokens of a batch, how many there are, no extra metrics."""
    logits, targets, _ = trained_logits(model, batch)
    total, count = token_nll_sum(logits, targets)
    return total, count, {}


def response_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(trained tokens) and the number of trained tokens per row ([N], [N])."""
    logits, targets, rows = trained_logits(model, batch)
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    n = batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.bincount(rows, minlength=n)
    return sums, counts


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
