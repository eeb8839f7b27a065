"""`classify`: text classification with AutoModelForSequenceClassification (accuracy and macro-F1)."""
from __future__ import annotations

import torch
from torch import nn

from ..losses import classification_loss_sum, macro_f1


def classify_loss(model: nn.Module, batch: dict, ctx=None) -> tuple[torch.Tensor, int, dict]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = classification_loss_sum(logits, batch["labels"])
    return total, count, {}


@torch.no_grad()
def classify_evaluate(model: nn.Module, batches, autocast, ctx=None) -> dict[str, float]:
    total, count, predictions, labels = 0.0, 0, [], []
    num_classes = 0
    for batch in batches:
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, n = classification_loss_sum(logits, batch["labels"])
        total += float(loss_sum)
        count += n
        num_classes = logits.size(-1)
        predictions += logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    accuracy = sum(p == y for p, y in zip(predictions, labels)) / max(len(labels), 1)
    return {"eval_loss": total / max(count, 1), "eval_accuracy": accuracy,
            "eval_macro_f1": macro_f1(predictions, labels, num_classes)}
