"""`embed`: contrastive fine-tuning of a text embedder (for RAG retrieval) on (query, positive[, negative]) rows.

Rows: `query` (or `question` / `anchor`), `positive` (the text that answers it), optional `negative` (a text that
looks relevant but is not: a hard negative, as `posttrain rag pairs` mines them). The model is an encoder loaded
with AutoModel (BERT-like, or any model whose last hidden state can be pooled); a text's vector is the mean of
its token states, or its first ([CLS]) token's state (`embed.pooling`). The loss is InfoNCE with in-batch
negatives (losses.info_nce): each query must pick its own positive among every positive and negative of the
micro-batch, at temperature `embed.temperature`. Under DDP the negatives are those of each process's
micro-batch (no all-gather). The output directory is a sentence-transformers model (modules.json,
1_Pooling/, 2_Normalize/) that `posttrain rag index --embedder` and `SentenceTransformer(out)` both load.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.sources import read_rows
from ..errors import DataError
from ..losses import info_nce
from ..rag.embed import pool, resolve_pooling
from .base import Stage

ALIASES = {"query": ("query", "question", "anchor"), "positive": ("positive",), "negative": ("negative",)}


@dataclass
class PairsReport:
    sources: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0

    def summary(self) -> str:
        lines = list(self.sources)
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} invalid rows, e.g. {self.skipped[0]}")
        if self.truncated:
            lines.append(f"{self.truncated} texts cut at data.max_length")
        return "\n".join(lines)


def _paths(sources) -> list[str]:
    items = sources if isinstance(sources, list) else [sources]
    return [item if isinstance(item, str) else item.path for item in items]


def _row(data: dict, location: str) -> dict:
    row = {}
    for key, names in ALIASES.items():
        name = next((n for n in names if n in data), None)
        value = data.get(name) if name else None
        if value is None and key == "negative":
            continue
        if not isinstance(value, str) or not value.strip():
            raise DataError("must be a non-empty string", location=location, field=name or key)
        row[key] = value
    return row


def load(sources, *, max_samples=None, skip_invalid=False, **_) -> tuple[list[dict], PairsReport]:
    report, examples = PairsReport(), []
    for path in _paths(sources):
        rows = read_rows(path)
        used = 0
        for row in rows:
            try:
                examples.append(_row(row.data, row.location))
                used += 1
            except DataError as exc:
                if not skip_invalid:
                    raise
                report.skipped.append(str(exc))
        report.sources.append(f"{path} (pairs): {used} examples from {len(rows)} rows")
    examples = examples[:max_samples] if max_samples else examples
    if not examples:
        raise DataError(f"no usable (query, positive) rows in {', '.join(_paths(sources))}")
    return examples, report


def encode(examples: list[dict], tokenizer, config) -> tuple[list[dict], PairsReport]:
    report = PairsReport()
    limit = config.data.max_length
    features = []
    for example in examples:
        feature = {}
        for key, text in example.items():
            ids = tokenizer(text, truncation=True, max_length=limit)["input_ids"]
            report.truncated += len(ids) >= limit
            feature[key] = ids
        features.append(feature)
    return features, report


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def collate(features: list[dict], pad_id: int, ctx=None) -> dict:
    batch = {}
    groups = {"query": [f["query"] for f in features], "positive": [f["positive"] for f in features],
              "negative": [f["negative"] for f in features if "negative" in f]}
    for key, rows in groups.items():
        if rows:
            batch[f"{key}_ids"], batch[f"{key}_mask"] = _pad(rows, pad_id)
    return batch


@dataclass
class EmbedContext:
    pooling: str
    temperature: float


def setup(config, model, tokenizer, accelerator) -> EmbedContext:
    return EmbedContext(resolve_pooling(config.model, config.embed.pooling), config.embed.temperature)


def embed(model, ids: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    return pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask, pooling)


def embed_loss(model, batch: dict, ctx: EmbedContext) -> tuple[torch.Tensor, int, dict]:
    queries = embed(model, batch["query_ids"], batch["query_mask"], ctx.pooling)
    candidates = [embed(model, batch["positive_ids"], batch["positive_mask"], ctx.pooling)]
    if "negative_ids" in batch:
        candidates.append(embed(model, batch["negative_ids"], batch["negative_mask"], ctx.pooling))
    losses, logits = info_nce(queries, torch.cat(candidates), ctx.temperature)
    targets = torch.arange(len(queries), device=logits.device)
    accuracy = (logits.detach().argmax(-1) == targets).float().sum()
    return losses.sum(), len(queries), {"accuracy": accuracy}


def count_queries(batch: dict) -> int:
    return int(batch["query_ids"].shape[0])


def length(feature: dict) -> int:
    return sum(len(ids) for ids in feature.values())


@torch.no_grad()
def evaluate(model, batches, autocast, ctx) -> dict:
    total, correct, count = 0.0, 0.0, 0
    for batch in batches:
        with autocast():
            loss, n, metrics = embed_loss(model, batch, ctx)
        total, correct, count = total + float(loss), correct + float(metrics["accuracy"]), count + n
    return {"eval_loss": total / max(count, 1), "eval_accuracy": correct / max(count, 1)}


STAGE = Stage("embed", "pairs", "embed", embed_loss, evaluate, count=count_queries, encode=encode, collate=collate,
              setup=setup, length=length, load=load)
