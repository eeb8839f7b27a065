"""The `posttrain rag ...` commands: argument parsing and printing only (the work is in the other rag modules)."""
from __future__ import annotations

import json
import textwrap

MODES = ("bm25", "dense", "hybrid")


def _index(args) -> None:
    from .index import build_index

    report = build_index(args.paths, args.out, embedder=args.embedder, chunk_tokens=args.chunk_tokens,
                         overlap=args.overlap, rebuild=args.rebuild, batch_size=args.batch_size)
    print("\n".join(report.lines()))


def _query(args) -> None:
    from .retrieve import Retriever

    retriever = Retriever(args.index, embedder=args.embedder, reranker=args.reranker)
    try:
        empty = retriever.is_empty()
        hits = [] if empty else retriever.search(args.question, args.k, args.mode)
    finally:
        retriever.close()
    if args.json:
        print(json.dumps([h.citation() for h in hits], ensure_ascii=False, indent=2))
        return
    if empty:
        print(f"the index {args.index} is empty: no citations")
    elif not hits:
        print("no chunk matches the question: no citations")
    for n, hit in enumerate(hits, 1):
        heading = f" ({hit.heading})" if hit.heading else ""
        print(f"[{n}] {hit.score:.4f}  {hit.source}{heading}  chars {hit.start}-{hit.end}")
        print(textwrap.indent(textwrap.shorten(hit.text, 400, placeholder=" ..."), "    "))


def _eval(args) -> None:
    from .evaluate import evaluate_rag, format_result, write_result

    result = evaluate_rag(args.index, args.questions, k=args.k, modes=args.mode, model=args.model,
                          embedder=args.embedder, reranker=args.reranker, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, template=args.template)
    print(format_result(result))
    if args.out:
        print(f"-> {write_result(result, args.out)}")


def _pairs(args) -> None:
    from .pairs import make_pairs, pairs_from_questions

    if (args.model is None) == (args.questions is None):
        from ..errors import ConfigError

        raise ConfigError("rag pairs: give either --model (generate questions) or --questions (use these)")
    if args.questions:
        counts = pairs_from_questions(args.index, args.questions, args.out, negatives=not args.no_negatives)
        print(f"wrote {counts['pairs']} pairs for {counts['questions']} questions ({counts['with_negative']} with "
              f"a hard negative; {counts['not_in_index']} left out: no relevant chunk in the index) -> {args.out}")
        return
    counts = make_pairs(args.index, args.model, args.out, per_chunk=args.per_chunk, max_chunks=args.max_chunks,
                        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        negatives=not args.no_negatives, batch_size=args.batch_size)
    print(f"wrote {counts['pairs']} pairs from {counts['chunks']} chunks ({counts['with_negative']} with a hard "
          f"negative; {counts['empty']} empty generations left out) -> {args.out}")


def _sft_data(args) -> None:
    from .sft_data import make_sft_data

    counts = make_sft_data(args.index, args.questions, args.out, k=args.k, no_answer=args.no_answer, seed=args.seed,
                           mode=args.mode, template=args.template)
    print(f"wrote {counts['rows']} SFT rows ({counts['with_answer']} with the answer in the context, "
          f"{counts['no_answer']} without) -> {args.out}"
          + (f"; {counts['not_in_index']} questions left out: their answer is not in the index"
             if counts["not_in_index"] else ""))


def add_rag_commands(sub) -> None:
    rag = sub.add_parser("rag", help="retrieval-augmented generation: index, query, eval, pairs, sft-data")
    rag = rag.add_subparsers(dest="rag_command", required=True)

    p = rag.add_parser("index", help="chunk (and embed) files into an index; re-runs update only what changed")
    p.add_argument("paths", nargs="+", metavar="PATH", help=".txt .md .jsonl .html .pdf files or folders")
    p.add_argument("--out", required=True, metavar="INDEX", help="the index file (SQLite)")
    p.add_argument("--embedder", help="local encoder directory (HF / sentence-transformers layout); "
                                      "default: the index's own, or none (BM25 only)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="token budget of a chunk")
    p.add_argument("--overlap", type=int, default=32, help="tokens shared by the windows of a long paragraph")
    p.add_argument("--rebuild", action="store_true", help="start the index afresh (e.g. with another embedder)")
    p.add_argument("--batch-size", type=int, default=32, help="chunks per embedder batch")
    p.set_defaults(func=_index)

    p = rag.add_parser("query", help="the chunks that best answer a question")
    p.add_argument("index")
    p.add_argument("question")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--mode", choices=MODES, help="default: hybrid when the index has vectors, else bm25")
    p.add_argument("--json", action="store_true", help="print [{source, text, score, heading, ...}]")
    p.add_argument("--embedder", help="must be the embedder the index was built with (default: that one)")
    p.add_argument("--reranker", help="local cross-encoder directory: re-score the top 30 candidates")
    p.set_defaults(func=_query)

    p = rag.add_parser("eval", help="recall@k, MRR@k, nDCG@k on questions; answer accuracy with --model")
    p.add_argument("index")
    p.add_argument("--questions", required=True, help="rows {question, source? chunk_id? answer?}")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--mode", nargs="+", choices=MODES, help="one or more modes (default: the index's default)")
    p.add_argument("--model", help="also answer each question without and with retrieval (answer accuracy)")
    p.add_argument("--out", help="write the result as JSON")
    p.add_argument("--embedder")
    p.add_argument("--reranker")
    p.add_argument("--template", help="RAG prompt template (file or text with {context} and {question})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_eval)

    p = rag.add_parser("pairs", help="(question, chunk) pairs for `stage: embed`, from a generator model "
                                      "or from your questions")
    p.add_argument("index")
    p.add_argument("--model", help="generator model directory: it writes the questions")
    p.add_argument("--questions", help="or: your questions, rows {question, source? chunk_id? answer?}")
    p.add_argument("--out", required=True, help="JSONL of {query, positive, negative, source, chunk_id}")
    p.add_argument("--per-chunk", type=int, default=1, help="questions per chunk")
    p.add_argument("--max-chunks", type=int, help="use this many chunks, drawn with --seed (default: all)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-negatives", action="store_true", help="no BM25-mined hard negatives")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_pairs)

    p = rag.add_parser("sft-data", help="RAFT-style SFT rows: context with distractors, and 'not in the context'")
    p.add_argument("index")
    p.add_argument("--questions", required=True, help="rows {question, answer, source? chunk_id? response?}")
    p.add_argument("--out", required=True, help="JSONL of OpenAI messages for `stage: sft`")
    p.add_argument("--k", type=int, default=3, help="chunks in each context")
    p.add_argument("--no-answer", type=float, default=0.2, help="share of rows whose context lacks the answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--template", help="RAG prompt template (the one you will serve with)")
    p.set_defaults(func=_sft_data)


def add_rag_arguments(p) -> None:
    """`serve` and `chat`: retrieval from an index into the prompt."""
    p.add_argument("--rag", metavar="INDEX", help="retrieve from this index for the last user message; answers "
                                                  "carry `citations` (a request may send \"rag\": false)")
    p.add_argument("--rag-k", type=int, default=5, help="chunks put into the prompt")
    p.add_argument("--rag-mode", choices=MODES, help="default: hybrid when the index has vectors, else bm25")
    p.add_argument("--rag-template", help="prompt template (file or text with {context} and {question})")


def rag_augmenter(args):
    """The Augmenter `--rag INDEX` asks for (serve, chat, eval), or None."""
    if not getattr(args, "rag", None):
        return None
    from .prompt import load_augmenter

    return load_augmenter(args.rag, args.rag_k, args.rag_mode, args.rag_template)
