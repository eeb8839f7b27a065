"""`posttrain rag sft-data INDEX --questions FILE --out sft.jsonl`: SFT rows that teach answering from context.

RAFT-style (Zhang et al., 2024): every row's user turn is the serving prompt (prompt.py's template) with `k`
numbered chunks, and its assistant turn is the target:

* with probability 1 - `no_answer`: the context holds one relevant chunk (the "oracle": the best-ranked relevant
  retrieved chunk, else a relevant chunk found anywhere in the index) and k - 1 distractors, in random order;
  the target is the question's `answer` followed by the oracle's number, "... [2]" (or its `response`, when the
  row has one, used as written);
* with probability `no_answer`: the context holds k distractors and no relevant chunk; the target is
  "The sources do not contain the answer." (prompt.NO_ANSWER), so the model learns to say so.

Distractors are the retrieved chunks that are not relevant (hard distractors, the ones retrieval confuses with
the answer), topped up with random chunks. Relevance is `rag eval`'s (source / chunk_id / answer). Question
rows need `question` and `answer`; a question whose answer is nowhere in the index is counted and left out.
Output rows are OpenAI `messages` (what `stage: sft` reads) plus `has_answer` and `sources`.
"""
from __future__ import annotations

import json
import os
import random

from ..errors import ConfigError, DataError
from .evaluate import read_questions, relevant
from .prompt import NO_ANSWER, load_template, render
from .retrieve import Retriever


def make_sft_data(index: str, questions_path: str, out: str, *, k: int = 3, no_answer: float = 0.2, seed: int = 0,
                  mode: str | None = None, template: str | None = None, depth: int = 10) -> dict:
    if k < 1 or not 0 <= no_answer <= 1:
        raise ConfigError("--k must be at least 1 and --no-answer in [0, 1]")
    template = load_template(template)
    questions = read_questions(questions_path)
    for q in questions:
        if not q.get("answer"):
            raise DataError("is required for SFT data (the target)", location=q["location"], field="answer")
    rng = random.Random(seed)
    retriever = Retriever(index)
    store = retriever.store
    counts = {"questions": len(questions), "rows": 0, "with_answer": 0, "no_answer": 0, "not_in_index": 0}
    try:
        with store.snapshot():
            everything = store.chunks(store.all_chunk_ids())
        if len(everything) < k + 1:
            raise ConfigError(f"{index} has {len(everything)} chunks; k = {k} needs at least {k + 1}")
        partial = f"{out}.partial"
        with open(partial, "w", encoding="utf-8") as handle:
            for q in questions:
                hits = [h.citation() for h in retriever.search(q["question"], max(depth, k + 1), mode)]
                oracle = next((h for h in hits if relevant(h, q)), None)
                if oracle is None:
                    oracle = next((c for c in everything.values() if relevant(c, q)), None)
                if oracle is None:
                    counts["not_in_index"] += 1
                    continue
                hard = [h for h in hits if not relevant(h, q)]
                others = [c for c in everything.values() if not relevant(c, q)
                          and c["id"] not in {h["chunk_id"] for h in hard}]
                pool = hard + rng.sample(others, min(len(others), k))
                has_answer = rng.random() >= no_answer
                context = pool[:k - 1 if has_answer else k]
                if has_answer:
                    context.insert(rng.randrange(len(context) + 1), oracle)
                    number = context.index(oracle) + 1
                    target = q.get("response") or f"{q['answer']} [{number}]"
                else:
                    rng.shuffle(context)
                    target = NO_ANSWER
                counts["with_answer" if has_answer else "no_answer"] += 1
                row = {"messages": [{"role": "user", "content": render(template, q["question"], context)},
                                    {"role": "assistant", "content": target}],
                       "has_answer": has_answer, "sources": [c["source"] for c in context]}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["rows"] += 1
        os.replace(partial, out)
    finally:
        retriever.close()
    return counts
