"""Offline stages: each says which examples it reads, which model head it needs, its loss and its eval.

A stage's loss returns (summed loss, count, summed metrics) for one micro-batch; the loop divides by the
count over the whole optimizer step, so gradient accumulation gives the same update as one big batch.
Stages that need more than the model (a reference model, a config section) build a context in `setup`,
which the loop passes back to `loss`, `evaluate` and `prepare`.
"""
from __future__ import annotations

from .base import Stage, count_items
from .classify import classify_evaluate, classify_loss
from .lm import lm_evaluate, lm_loss
from .dpo import STAGE as DPO
from .kto import STAGE as KTO
from .rm import STAGE as RM
from .online import GRPO, PPO
from .embed import STAGE as EMBED

STAGES = {
    "pt": Stage("pt", "text", "causal", lm_loss, lm_evaluate),
    "sft": Stage("sft", "conversation", "causal", lm_loss, lm_evaluate),
    "classify": Stage("classify", "labeled", "classify", classify_loss, classify_evaluate),
    "rm": RM,
    "dpo": DPO,
    "kto": KTO,
    "ppo": PPO,
    "grpo": GRPO,
    "embed": EMBED,
}

__all__ = ["STAGES", "Stage", "count_items"]
