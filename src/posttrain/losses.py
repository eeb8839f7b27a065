"""Every loss in one place, each with its formula.

Conventions: `labels` are aligned with `input_ids` (Hugging Face style) and -100 marks positions that
are not trained; the shift (token t is predicted from positions < t) happens here. Losses return a
*sum* and a count so the training loop can normalise over all micro-batches of an optimizer step
(a token-level mean across gradient accumulation, not a mean of means).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """targets[t] = labels[t + 1]; the last position has no target."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Negative log-likelihood summed over trained positions.

    L = -sum_t [target_t != -100] * log softmax(logits_t)[target_t]

    `logits` (..., V) and `targets` (...) are already aligned (targets shifted). Computed in fp32.
    """
    logits = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    return total, int((targets != IGNORE).sum())


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over examples: L = -sum_i log softmax(logits_i)[label_i]."""
    return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())


def macro_f1(predictions: list[int], labels: list[int], num_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2PR / (P + R); a class absent from both counts as F1 = 0 only
    if it appears in labels or predictions (classes never seen are left out)."""
    scores = []
    for c in range(num_classes):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0
