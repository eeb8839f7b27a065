"""Offline stages: each says which examples it reads, which model head it needs, its loss and its eval.

A stage's loss returns (summed loss, count) for one micro-batch; the loop divides by the count over the
whole optimizer step, so gradient accumulation gives the same update as one big batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .classify import classify_evaluate, classify_loss
from .lm import lm_evaluate, lm_loss


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str          # which canonical examples it reads: text | conversation | labeled
    task: str          # causal | classify (which Auto class loads the model)
    loss: Callable
    evaluate: Callable


STAGES = {
    "pt": Stage("pt", "text", "causal", lm_loss, lm_evaluate),
    "sft": Stage("sft", "conversation", "causal", lm_loss, lm_evaluate),
    "classify": Stage("classify", "labeled", "classify", classify_loss, classify_evaluate),
}
