"""`posttrain rag query`: the chunks that best answer a question, by BM25, by dense vectors, or both fused.

* bm25: SQLite FTS5's BM25 over the chunk's heading path and text (any of the question's words);
* dense: cosine similarity between the question's vector and each chunk's (exact search, sqlite-vec), with the
  embedder the index was built with (another one is an error: vectors from two encoders are not comparable);
* hybrid: reciprocal-rank fusion of the two rankings (top max(k, 30) of each):
      score(c) = sum over rankings r containing c of 1 / (60 + rank_r(c)),  rank counted from 1;
* with a reranker (a local cross-encoder directory), the top max(k, 30) candidates of the chosen mode are
  re-scored by it and its score decides the order.
The default mode is hybrid when the index has an embedder, else bm25. Both rankings are read inside one read
transaction, so a query never mixes two states of an index that is being re-indexed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .store import open_store

MODES = ("bm25", "dense", "hybrid")
RRF_K = 60
CANDIDATES = 30


@dataclass
class Hit:
    id: int
    source: str
    heading: str
    text: str
    score: float
    start: int
    end: int

    def citation(self) -> dict:
        return {"source": self.source, "text": self.text, "score": round(self.score, 6), "heading": self.heading,
                "start": self.start, "end": self.end, "chunk_id": self.id}


def reciprocal_rank_fusion(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: (-pair[1], pair[0]))


class Retriever:
    def __init__(self, index: str | Path, *, embedder: str | None = None, reranker: str | None = None,
                 device: str | None = None):
        self.index = str(index)
        self.store = open_store(index)
        recorded = self.store.meta().get("embedder")
        self.embedder = None
        if embedder or recorded or reranker:  # BM25 alone does not import torch
            from .embed import Embedder, Reranker, fingerprint
        if embedder is not None:
            if recorded is None:
                raise ConfigError(f"{index} has no vectors (it was built without an embedder): query it with "
                                  "--mode bm25, or rebuild it with --embedder")
            if fingerprint(embedder) != recorded["fingerprint"]:
                raise ConfigError(f"{index} was built with the embedder {recorded['path']}, not {embedder} (their "
                                  "vectors are not comparable): query with that embedder, or rebuild the index")
            self.embedder = Embedder(embedder, device=device)
        elif recorded is not None:
            if not Path(recorded["path"]).is_dir() or fingerprint(recorded["path"]) != recorded["fingerprint"]:
                raise ConfigError(f"{index} was built with the embedder {recorded['path']}, which is gone or has "
                                  "changed since: pass --embedder with the original, or rebuild the index")
            self.embedder = Embedder(recorded["path"], device=device)
        self.reranker = Reranker(reranker, device=device) if reranker else None

    @property
    def default_mode(self) -> str:
        return "hybrid" if self.embedder is not None else "bm25"

    def is_empty(self) -> bool:
        return self.store.count() == 0

    def search(self, query: str, k: int = 5, mode: str | None = None) -> list[Hit]:
        mode = mode or self.default_mode
        if mode not in MODES:
            raise ConfigError(f"unknown retrieval mode {mode!r} (choose from {', '.join(MODES)})")
        if mode != "bm25" and self.embedder is None:
            raise ConfigError(f"{self.index} has no vectors (built without an embedder): use --mode bm25, or "
                              "rebuild it with --embedder")
        if k < 1:
            raise ConfigError("k must be at least 1")
        depth = max(k, CANDIDATES) if (mode == "hybrid" or self.reranker) else k
        vector = self.embedder.encode([query])[0] if mode != "bm25" else None
        with self.store.snapshot():
            if mode == "bm25":
                ranked = self.store.bm25(query, depth)
            elif mode == "dense":
                ranked = self.store.dense(vector, depth)
            else:
                lexical, dense = self.store.bm25(query, depth), self.store.dense(vector, depth)
                ranked = reciprocal_rank_fusion([[i for i, _ in lexical], [i for i, _ in dense]])
            rows = self.store.chunks([i for i, _ in ranked])
        hits = [Hit(score=score, **rows[i]) for i, score in ranked if i in rows]
        if self.reranker and hits:
            scores = self.reranker.score(query, [f"{h.heading}\n{h.text}" if h.heading else h.text for h in hits])
            for hit, score in zip(hits, scores):
                hit.score = score
            hits.sort(key=lambda h: -h.score)
        return hits[:k]

    def close(self) -> None:
        self.store.close()
