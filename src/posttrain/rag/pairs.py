"""`posttrain rag pairs INDEX --model GEN --out pairs.jsonl`: training pairs for `stage: embed` from an index.

For each chunk (all, or `max_chunks` drawn with `seed`), the generator model is asked for questions the chunk
answers (the prompt below, through the chat template when the tokenizer has one; sampled at `temperature`).
Each question becomes a row `{query, positive, negative?, source, chunk_id}`: `positive` is the chunk as it is
indexed (heading path + text); `negative`, a hard negative, is the best BM25 match for the question that is
another chunk (it may occasionally be a second chunk that also answers: such false negatives are the usual
price of mined negatives). Empty generations are counted and left out. The file is written to a temporary
name and renamed when complete.

With `--questions FILE` instead of a model (rows like `rag eval`'s: `question` plus `source`, `chunk_id` and/or
`answer`), the queries are those questions: the positive is the best BM25-ranked relevant chunk (else the first
relevant chunk in the index), the negative the best-ranked chunk that is not relevant. Questions whose answer is
nowhere in the index are counted and left out.
"""
from __future__ import annotations

import json
import os
import random

from ..errors import ConfigError
from .evaluate import read_questions, relevant
from .retrieve import Retriever

PROMPT = "Write one short question that the following passage answers.\n\nPassage:\n{passage}\n\nQuestion:"


def indexed_text(chunk: dict) -> str:
    return f"{chunk['heading']}\n{chunk['text']}" if chunk["heading"] else chunk["text"]


def make_pairs(index: str, model: str, out: str, *, per_chunk: int = 1, max_chunks: int | None = None,
               temperature: float = 0.7, max_new_tokens: int = 48, seed: int = 0, negatives: bool = True,
               batch_size: int = 8) -> dict:
    from ..engine import Engine, SamplingParams
    from ..generate import prompt_token_ids

    if per_chunk < 1 or batch_size < 1 or (max_chunks is not None and max_chunks < 1):
        raise ConfigError("--per-chunk, --batch-size and --max-chunks must be at least 1")
    retriever = Retriever(index)
    store = retriever.store
    with store.snapshot():
        ids = store.all_chunk_ids()
        if max_chunks is not None and max_chunks < len(ids):
            ids = sorted(random.Random(seed).sample(ids, max_chunks))
        chunks = store.chunks(ids)
    if not chunks:
        raise ConfigError(f"{index} is empty: there is nothing to make pairs from")
    engine = Engine.load(model)
    counts = {"chunks": len(ids), "pairs": 0, "empty": 0, "with_negative": 0}
    partial = f"{out}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        for b, start in enumerate(range(0, len(ids), batch_size)):
            batch = ids[start:start + batch_size]
            prompts = [prompt_token_ids(engine, [{"role": "user", "content": PROMPT.format(passage=indexed_text(chunks[i]))}])
                       for i in batch]
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=per_chunk,
                                    seed=seed + b)
            for completion in engine.generate(prompts, params):
                chunk = chunks[batch[completion.prompt_index]]
                query = completion.text.strip().split("\n", 1)[0].strip()
                if not query:
                    counts["empty"] += 1
                    continue
                row = {"query": query, "positive": indexed_text(chunk), "source": chunk["source"],
                       "chunk_id": chunk["id"]}
                if negatives:
                    other = next((i for i, _ in store.bm25(query, 5) if i != chunk["id"]), None)
                    if other is not None:
                        row["negative"] = indexed_text(store.chunks([other])[other])
                        counts["with_negative"] += 1
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["pairs"] += 1
    os.replace(partial, out)
    retriever.close()
    return counts


def pairs_from_questions(index: str, questions_path: str, out: str, *, negatives: bool = True,
                         depth: int = 30) -> dict:
    questions = read_questions(questions_path)
    retriever = Retriever(index)
    store = retriever.store
    counts = {"questions": len(questions), "pairs": 0, "with_negative": 0, "not_in_index": 0}
    try:
        with store.snapshot():
            everything = store.chunks(store.all_chunk_ids())
        partial = f"{out}.partial"
        with open(partial, "w", encoding="utf-8") as handle:
            for q in questions:
                ranked = [everything[i] for i, _ in store.bm25(q["question"], depth) if i in everything]
                positive = next((c for c in ranked if relevant(c, q)), None) or \
                    next((c for c in everything.values() if relevant(c, q)), None)
                if positive is None:
                    counts["not_in_index"] += 1
                    continue
                row = {"query": q["question"], "positive": indexed_text(positive), "source": positive["source"],
                       "chunk_id": positive["id"]}
                negative = next((c for c in ranked if not relevant(c, q)), None) if negatives else None
                if negative is not None:
                    row["negative"] = indexed_text(negative)
                    counts["with_negative"] += 1
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["pairs"] += 1
        os.replace(partial, out)
    finally:
        retriever.close()
    return counts
