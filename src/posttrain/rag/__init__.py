"""Retrieval-augmented generation: index documents, retrieve chunks, put them in the prompt, cite them.

chunk.py   files -> documents -> structure-aware chunks (.txt .md .jsonl .html .pdf)
store.py   the Store interface and its default: one SQLite file (FTS5 for BM25, sqlite-vec for vectors, WAL)
index.py   `posttrain rag index`: incremental by file hash, one write transaction per run
embed.py   local encoders: the embedder (mean/CLS pooling), the cross-encoder reranker, the ST layout
retrieve.py `posttrain rag query`: bm25 | dense | hybrid (reciprocal-rank fusion), optional reranking
prompt.py  the prompt template and the Augmenter that serve, chat, eval and the SFT data step share
evaluate.py `posttrain rag eval`: recall@k, MRR@k, nDCG@k, answer accuracy with and without retrieval
pairs.py   `posttrain rag pairs`: synthetic (question, chunk) pairs from a generator model (for `stage: embed`)
sft_data.py `posttrain rag sft-data`: RAFT-style SFT rows (context with distractors, "not in the context")
sample.py  a generated restaurant knowledge base with questions (tests, benchmark, demo)
"""
