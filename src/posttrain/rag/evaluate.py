"""`posttrain rag eval INDEX --questions FILE`: how well retrieval finds what answers each question.

A question row is `{question, source?, chunk_id?, answer?}` (at least one of the last three). A retrieved chunk
is relevant when it meets every criterion the row gives: its id is `chunk_id`; its source is `source` (a path
suffix: "menu.md" matches "docs/menu.md", and "faq.jsonl" matches its rows "faq.jsonl#id"); `answer` occurs in
its text (case and spacing ignored). With R = the number of relevant chunks in the whole index and
rel_i = 1 when the chunk at rank i is relevant:

    recall@k = share of questions with a relevant chunk in the top k (the hit rate; with one relevant chunk
               per question, as for chunk_id rows, this is recall@k exactly)
    mrr@k    = mean of 1 / (rank of the first relevant chunk), 0 when none is in the top k
    ndcg@k   = mean of DCG / IDCG, DCG = sum_{i<=k} rel_i / log2(i + 1), IDCG = sum_{i<=min(R,k)} 1 / log2(i + 1)

A question with R = 0 cannot be answered from the index; it scores 0 and is counted as `unanswerable`.
With a model, each question with an `answer` is also answered greedily without and with retrieval (the same
prompt template as `serve --rag`), and `answer_accuracy_*` is the share whose answer contains the answer string.
"""
from __future__ import annotations

import json
import math
import os
import re

from ..data.sources import read_rows
from ..errors import ConfigError, DataError
from .retrieve import MODES, Retriever

KEYS = ("question", "source", "chunk_id", "answer")


def read_questions(path: str) -> list[dict]:
    rows = read_rows(path)
    if not rows:
        raise DataError("no questions in this file", location=str(path))
    questions = []
    for row in rows:
        data = row.data
        question = data.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError("must be a non-empty string", location=row.location, field="question")
        if all(data.get(key) in (None, "") for key in KEYS[1:]):
            raise DataError("needs at least one of 'source', 'chunk_id', 'answer' (what a relevant chunk is)",
                            location=row.location)
        for key in ("source", "answer"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise DataError("must be a string", location=row.location, field=key)
        if data.get("chunk_id") is not None and (isinstance(data["chunk_id"], bool)
                                                 or not isinstance(data["chunk_id"], int)):
            raise DataError("must be an integer (an id from `rag query --json`)", location=row.location,
                            field="chunk_id")
        questions.append({**{key: data.get(key) for key in KEYS}, "response": data.get("response"),
                          "location": row.location})
    return questions


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def source_matches(source: str, wanted: str) -> bool:
    candidates = {source, source.split("#", 1)[0]}
    wanted = os.path.normpath(wanted) if "#" not in wanted else wanted
    return any(c == wanted or c.endswith("/" + wanted) for c in candidates)


def relevant(chunk: dict, question: dict) -> bool:
    """chunk: a citation-like dict with chunk_id or id, source and text."""
    chunk_id = chunk.get("chunk_id", chunk.get("id"))
    if question.get("chunk_id") is not None and chunk_id != question["chunk_id"]:
        return False
    if question.get("source") and not source_matches(chunk["source"], question["source"]):
        return False
    return not question.get("answer") or _norm(question["answer"]) in _norm(chunk["text"])


def ranking_metrics(relevance: list[bool], total_relevant: int, k: int) -> dict:
    relevance = relevance[:k]
    first = next((i for i, r in enumerate(relevance, 1) if r), None)
    dcg = sum(1.0 / math.log2(i + 1) for i, r in enumerate(relevance, 1) if r)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(total_relevant, k) + 1))
    return {"recall@k": float(first is not None), "mrr@k": 1.0 / first if first else 0.0,
            "ndcg@k": dcg / ideal if ideal else 0.0}


def evaluate_retrieval(retriever: Retriever, questions: list[dict], k: int, mode: str) -> dict:
    store = retriever.store
    with store.snapshot():
        everything = list(store.chunks(store.all_chunk_ids()).values())
    sums = {"recall@k": 0.0, "mrr@k": 0.0, "ndcg@k": 0.0}
    unanswerable = 0
    for question in questions:
        total = sum(relevant(c, question) for c in everything)
        unanswerable += total == 0
        hits = retriever.search(question["question"], k, mode)
        metrics = ranking_metrics([relevant(h.citation(), question) for h in hits], total, k)
        for key in sums:
            sums[key] += metrics[key]
    n = max(len(questions), 1)
    return {**{key: round(value / n, 4) for key, value in sums.items()}, "unanswerable": unanswerable}


def answer_accuracy(model: str, retriever: Retriever, questions: list[dict], k: int, mode: str,
                    max_new_tokens: int = 64, batch_size: int = 8, template: str | None = None) -> dict:
    from ..engine import Engine, SamplingParams
    from ..generate import prompt_token_ids
    from .prompt import Augmenter

    rows = [q for q in questions if q.get("answer")]
    if not rows:
        raise ConfigError("--model: answer accuracy needs questions with an 'answer' string")
    engine = Engine.load(model)
    augment = Augmenter(retriever, k, mode, template)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    result = {"answered": len(rows)}
    for label, use_rag in (("without_rag", False), ("with_rag", True)):
        prompts = []
        for row in rows:
            messages = [{"role": "user", "content": row["question"]}]
            prompts.append(prompt_token_ids(engine, augment(messages)[0] if use_rag else messages))
        correct = 0
        for start in range(0, len(prompts), batch_size):
            batch = rows[start:start + batch_size]
            for completion in engine.generate(prompts[start:start + batch_size], params):
                correct += _norm(batch[completion.prompt_index]["answer"]) in _norm(completion.text)
        result[f"answer_accuracy_{label}"] = round(correct / len(rows), 4)
    return result


def evaluate_rag(index: str, questions_path: str, *, k: int = 5, modes: list[str] | None = None,
                 model: str | None = None, embedder: str | None = None, reranker: str | None = None,
                 max_new_tokens: int = 64, batch_size: int = 8, template: str | None = None) -> dict:
    if k < 1:
        raise ConfigError("--k must be at least 1")
    questions = read_questions(questions_path)
    retriever = Retriever(index, embedder=embedder, reranker=reranker)
    try:
        modes = modes or [retriever.default_mode]
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise ConfigError(f"unknown mode {unknown[0]!r} (choose from {', '.join(MODES)})")
        by_mode = {mode: evaluate_retrieval(retriever, questions, k, mode) for mode in modes}
        first = by_mode[modes[0]]
        result = {"index": str(index), "questions": len(questions), "k": k, "mode": modes[0],
                  "recall@k": first["recall@k"], "mrr@k": first["mrr@k"], "ndcg@k": first["ndcg@k"],
                  "unanswerable": first["unanswerable"], "chunks": retriever.store.count(),
                  "by_mode": {m: {key: v[key] for key in ("recall@k", "mrr@k", "ndcg@k")} for m, v in by_mode.items()}}
        if model:
            result["model"] = model
            result.update(answer_accuracy(model, retriever, questions, k, modes[0], max_new_tokens, batch_size,
                                          template))
    finally:
        retriever.close()
    return result


def format_result(result: dict) -> str:
    lines = [f"{result['questions']} questions, {result['chunks']} chunks, k = {result['k']}"
             + (f" ({result['unanswerable']} not answerable from the index)" if result["unanswerable"] else ""),
             f"  {'mode':<8} {'recall@k':>9} {'mrr@k':>7} {'ndcg@k':>7}"]
    for mode, m in result["by_mode"].items():
        lines.append(f"  {mode:<8} {m['recall@k']:>9.3f} {m['mrr@k']:>7.3f} {m['ndcg@k']:>7.3f}")
    if "answer_accuracy_with_rag" in result:
        lines.append(f"answer accuracy on {result['answered']} questions ({result['model']}): without retrieval "
                     f"{result['answer_accuracy_without_rag']:.3f}, with retrieval ({result['mode']}) "
                     f"{result['answer_accuracy_with_rag']:.3f}")
    return "\n".join(lines)


def write_result(result: dict, out: str) -> str:
    partial = f"{out}.partial"
    with open(partial, "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(partial, out)
    return out
