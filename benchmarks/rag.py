"""RAG at scale: index 100k generated chunks into the default store (one SQLite file: FTS5 + sqlite-vec) and time
queries in every mode.

    python benchmarks/rag.py                      # 100k chunks (1000 files x 100 sections), dim-128 encoder
    python benchmarks/rag.py --chunks 10000       # a quicker run
    python benchmarks/rag.py --write-readme       # also replace the results block in benchmarks/README.md

Data: Markdown files whose every `## ` section is one paragraph of 40-80 words drawn from a Zipf-distributed
vocabulary of 20k made-up words plus 100 common ones, so each section is exactly one chunk (budget 128 tokens).
Embedder: a random BERT-shaped encoder from `posttrain.rag.embed.init_encoder` (hidden `--dim`, 1 layer, WordPiece
vocabulary trained on the corpus): nothing is downloaded; its vectors are meaningless, but it costs per token and
per vector what an encoder of that width costs, and the vector search scans every vector whatever they mean.
Each phase runs in a fresh child process, which reports its wall time, its CPU time and its own peak RSS:
  1. index, BM25 only;  2. index with the embedder;  3. re-index after one file changed (incremental);
  4. queries: `--queries` questions (3-6 words, half taken from a chunk), each mode, p50 / p95 latency of
     `Retriever.search` (k = 5; the question's embedding included for dense and hybrid), after 5 warm-up queries.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ("the of and to in is for on with as at by from this that menu price open close kitchen order table "
          "guest room soup bread wine tea coffee cake fish meat rice salad sauce cheese fruit day night week "
          "hour time free card cash book party group child dog seat window terrace garden street city north "
          "south east west new old hot cold fresh sweet spicy small large special local season daily house "
          "chef staff service delivery takeaway parking music event private lunch dinner breakfast brunch "
          "vegan gluten nut dairy egg soy allergy").split()
SECTIONS_PER_FILE = 100
BEGIN, END = "<!-- posttrain benchmark: rag -->", "<!-- end: rag -->"


def vocabulary(rng: random.Random, size: int = 20000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = {"".join(rng.choice(letters) for _ in range(rng.randint(4, 9))) for _ in range(size)}
    return COMMON + sorted(words)


def write_corpus(folder: Path, chunks: int, seed: int) -> list[str]:
    """Files of SECTIONS_PER_FILE one-paragraph sections; returns the query set's source sentences."""
    rng = random.Random(seed)
    words = vocabulary(rng)
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))  # Zipf
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for f in range(max(1, chunks // SECTIONS_PER_FILE)):
        parts = [f"# Document {f}\n"]
        for s in range(min(SECTIONS_PER_FILE, chunks - f * SECTIONS_PER_FILE)):
            text = " ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(40, 80)))
            parts.append(f"\n## Section {s}\n\n{text.capitalize()}.\n")
            if rng.random() < 0.01:
                samples.append(text)
        (folder / f"doc{f:05d}.md").write_text("".join(parts))
    return samples


def queries(samples: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    words = vocabulary(random.Random(seed))
    out = []
    for i in range(n):
        if i % 2 == 0 and samples:
            source = rng.choice(samples).split()
            start = rng.randrange(max(1, len(source) - 6))
            out.append(" ".join(source[start:start + rng.randint(3, 6)]))
        else:
            out.append(" ".join(rng.choices(words[:2000], k=rng.randint(3, 6))))
    return out


# ------------------------------------------------------------------------------------------ child phases

def _usage() -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}


def child(spec: dict) -> dict:
    if spec["phase"] == "encoder":  # in a child too: the parent stays small (a child's peak RSS counts its
        from posttrain.rag.embed import init_encoder  # parent's at the fork: Linux keeps it across exec)

        files = sorted(Path(spec["docs"]).glob("*.md"))[:50]
        init_encoder([p.read_text() for p in files], spec["out"], hidden=spec["dim"], layers=1,
                     heads=max(1, spec["dim"] // 64), vocab_size=8000, max_length=256)
        return {}
    if spec["phase"] == "index":
        from posttrain.rag.index import build_index

        started = time.perf_counter()
        report = build_index([spec["docs"]], spec["index"], embedder=spec.get("embedder"), chunk_tokens=256,
                             overlap=32, batch_size=64)
        seconds = time.perf_counter() - started
        size = sum(Path(spec["index"] + suffix).stat().st_size for suffix in ("", "-wal")
                   if Path(spec["index"] + suffix).exists())
        return {"seconds": round(seconds, 2), "chunks": report.chunks, "new_chunks": report.new_chunks,
                "changed_files": len(report.changed), "db_mb": round(size / 2**20, 1), **_usage()}
    from posttrain.rag.retrieve import Retriever

    retriever = Retriever(spec["index"])
    results = {}
    for mode in ("bm25", "dense", "hybrid"):
        for question in spec["queries"][:5]:
            retriever.search(question, 5, mode)
        times = []
        for question in spec["queries"]:
            started = time.perf_counter()
            retriever.search(question, 5, mode)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        results[mode] = {"p50_ms": round(times[len(times) // 2], 2),
                         "p95_ms": round(times[min(len(times) - 1, int(len(times) * 0.95))], 2)}
    return {"modes": results, **_usage()}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}  # torch's thread count, read when it starts
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise SystemExit(f"child {spec['phase']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ parent

def markdown(spec: dict, r: dict, command: str) -> str:
    b, d, u, q = r["bm25_index"], r["dense_index"], r["reindex"], r["queries"]
    lines = [BEGIN, "", f"`{command}` — {spec['machine']}", "",
             f"{b['chunks']:,} chunks in {spec['files']:,} Markdown files ({spec['corpus_mb']} MB of text); "
             f"embedder: random BERT-shaped, hidden {spec['dim']}, 1 layer (vectors of {spec['dim']} float32).", "",
             "| phase | wall s | CPU s | index file | peak RSS |", "|---|---:|---:|---:|---:|",
             f"| index, BM25 only | {b['seconds']} | {b['cpu_s']} | {b['db_mb']} MB | {b['peak_rss_mb']} MB |",
             f"| index, BM25 + dense | {d['seconds']} | {d['cpu_s']} | {d['db_mb']} MB | {d['peak_rss_mb']} MB |",
             f"| re-index after 1 file changed ({u['new_chunks']} chunks re-embedded) | {u['seconds']} | "
             f"{u['cpu_s']} | {u['db_mb']} MB | {u['peak_rss_mb']} MB |", "",
             f"| query (k = 5, {spec['queries']} questions) | p50 ms | p95 ms |", "|---|---:|---:|"]
    for mode, m in q["modes"].items():
        lines.append(f"| {mode} | {m['p50_ms']} | {m['p95_ms']} |")
    lines += ["", f"Query process peak RSS (embedder loaded, index open): {q['peak_rss_mb']} MB.", "", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128, help="embedder hidden size = vector dimension")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each child (1: on a shared machine two threads wait on each other: "
                             "a one-query encode measured 97 ms with 2 threads under load, 2 ms with 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the corpus, encoder and index here")
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="posttrain-rag-bench-"))
    docs = work / "docs"
    samples = write_corpus(docs, args.chunks, args.seed)
    files = sorted(docs.glob("*.md"))
    common = {"docs": str(docs), "threads": args.threads}
    encoder = work / "encoder"
    run_child({**common, "phase": "encoder", "out": str(encoder), "dim": args.dim})
    results = {}
    print(f"corpus: {len(files)} files in {work}", flush=True)
    results["bm25_index"] = run_child({**common, "phase": "index", "index": str(work / "bm25.db")})
    print("bm25 index:", results["bm25_index"], flush=True)
    results["dense_index"] = run_child({**common, "phase": "index", "index": str(work / "dense.db"),
                                        "embedder": str(encoder)})
    print("dense index:", results["dense_index"], flush=True)
    text = files[0].read_text()
    files[0].write_text(text.replace("## Section 1\n", "## Section 1 (revised)\n"))
    results["reindex"] = run_child({**common, "phase": "index", "index": str(work / "dense.db")})
    print("re-index:", results["reindex"], flush=True)
    results["queries"] = run_child({**common, "phase": "query", "index": str(work / "dense.db"),
                                    "queries": queries(samples, args.queries, args.seed)})
    print("queries:", results["queries"], flush=True)
    cpu = platform.processor() or platform.machine()
    spec = {"files": len(files), "dim": args.dim, "queries": args.queries,
            "corpus_mb": round(sum(p.stat().st_size for p in files) / 2**20, 1),
            "machine": f"{os.cpu_count()} CPU cores ({cpu}), torch threads {args.threads}, Python "
                       f"{platform.python_version()}"}
    command = "python benchmarks/rag.py" + (f" --chunks {args.chunks}" if args.chunks != 100_000 else "")
    table = markdown(spec, results, command)
    print(table)
    (work / "results.json").write_text(json.dumps({"spec": spec, "results": results}, indent=2))
    if args.write_readme:
        readme = Path(__file__).with_name("README.md")
        current = readme.read_text()
        if BEGIN in current and END in current:
            current = current[:current.index(BEGIN)] + table + current[current.index(END) + len(END):]
        else:
            current += "\n" + table + "\n"
        readme.write_text(current)


if __name__ == "__main__":
    main()
