"""`posttrain serve` under load: N streaming clients at once versus the same N requests one after another, and a
1-token request sent while a long one decodes.

    python benchmarks/serve.py                          # small model, 64 clients x 64 tokens, a 300-token long request
    python benchmarks/serve.py --requests 16 --max-tokens 32 --size tiny   # quicker

Builds a randomly initialised Qwen2-shaped model (`--size`, BPE trained on the demo chats), starts the real server
in a subprocess (`--max-rows` rows decode together), warms it up, then with the official openai SDK (streaming
chat completions, greedy, `ignore_eos` so every answer has exactly `--max-tokens` tokens):

* sequential: the N requests, each sent when the previous one finished;
* concurrent: the same N from N threads at once (continuous batching: they join the running batch as they
  arrive). The answers must equal the sequential ones (checked);
* short behind long: a `--long-tokens` request streams; after its first chunk a 1-token request is sent; its
  latency is measured, and how many chunks the long one had received by then.

Printed: wall time and completion tokens/s of both runs and their ratio, p50/p95 time to first token (TTFT) and
total latency per request, the short request's latency. `--repeats` interleaves runs (best wall time kept).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def make_model(size: str, out: Path) -> Path:
    from posttrain.demo.data import make_sft_rows
    from posttrain.init_model import init_model

    corpus = [f"{m['role']}\n{m['content']}" for r in make_sft_rows(2000, seed="corpus") for m in r["messages"]]
    return init_model("qwen2", size, corpus, out, vocab_size=2048, seed=0)


def prompts(n: int) -> list[list[dict]]:
    from posttrain.demo.data import make_sft_rows

    return [[m for m in row["messages"] if m["role"] != "assistant"][:2] for row in make_sft_rows(n, seed="bench")]


def start_server(model: Path, log: Path, max_rows: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", "--model", str(model),
                                    "--port", str(port), "--max-rows", str(max_rows)],
                                   stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return process, url
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start:\n{log.read_text()}") from None
            time.sleep(0.2)


BIAS: dict[str, float] = {}  # set in main: token ids that are not a whole character, banned


def partial_bytes(model: Path) -> dict[str, float]:
    """logit_bias -100 for the byte tokens that decode to no whole character: a random model emits them, and a
    stream holds an incomplete UTF-8 character back, which would make time-to-first-token measure the model's
    byte soup rather than the server (every request gets the same bias, sequential and concurrent alike)."""
    from posttrain.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    return {str(i): -100.0 for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])}


def ask(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: its text, time to first content token and total latency."""
    start = time.perf_counter()
    first, text = None, ""
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, logit_bias=BIAS, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
    end = time.perf_counter()
    return {"text": text, "ttft": (first or end) - start, "latency": end - start}


def sequential(client, model, chats, max_tokens) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    answers = [ask(client, model, chat, max_tokens) for chat in chats]
    return time.perf_counter() - start, answers


def concurrent(client, model, chats, max_tokens) -> tuple[float, list[dict]]:
    answers: list[dict | None] = [None] * len(chats)
    barrier = threading.Barrier(len(chats))

    def run(index):
        barrier.wait()
        answers[index] = ask(client, model, chats[index], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(chats))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, answers


def short_behind_long(client, model, chats, long_tokens) -> dict:
    """The long request streams; after its first chunk the short one is sent. Returns the short one's latency and
    how many of the long one's chunks had arrived by the time the short one was answered (of all it sent)."""
    long_start = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=chats[0], max_tokens=long_tokens, temperature=0,
                                            stream=True, logit_bias=BIAS, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content)
    start = time.perf_counter()
    short = client.chat.completions.create(model=model, messages=chats[1], max_tokens=1, temperature=0)
    answered = time.perf_counter()
    for _ in chunks:
        pass
    if short.usage.completion_tokens != 1:
        raise SystemExit("the short request did not get one token")
    return {"latency": answered - start, "long_total": time.perf_counter() - long_start,
            "long_left": time.perf_counter() - answered}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=300)
    parser.add_argument("--size", choices=["tiny", "mini", "small", "base"], default="small")
    parser.add_argument("--max-rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import openai

    with tempfile.TemporaryDirectory() as work:
        model = make_model(args.size, Path(work) / "model")
        BIAS.update(partial_bytes(model))
        process, url = start_server(model, Path(work) / "server.log", args.max_rows)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
        name = str(model)
        try:
            chats = prompts(args.requests)
            ask(client, name, chats[0], 4)  # warm-up
            best = {"sequential": (float("inf"), None), "concurrent": (float("inf"), None)}
            for _ in range(args.repeats):
                for kind, run in (("sequential", sequential), ("concurrent", concurrent)):
                    seconds, answers = run(client, name, chats, args.max_tokens)
                    if seconds < best[kind][0]:
                        best[kind] = (seconds, answers)
            if [a["text"] for a in best["sequential"][1]] != [a["text"] for a in best["concurrent"][1]]:
                raise SystemExit("concurrent answers differ from sequential ones")
            behind = short_behind_long(client, name, chats, args.long_tokens)
            health = json.loads(urllib.request.urlopen(url + "/health").read())
        finally:
            process.terminate()
            process.wait(timeout=30)
    tokens = args.requests * args.max_tokens
    print(f"Command: `python benchmarks/serve.py {' '.join(sys.argv[1:])}`\n")
    print(f"Model: Qwen2-shaped `{args.size}` (2048-token BPE), {args.requests} streaming chat requests x "
          f"{args.max_tokens} tokens (greedy, ignore_eos, the {len(BIAS)} partial-byte tokens banned by logit_bias), "
          f"official openai SDK, --max-rows {args.max_rows}; "
          f"{os.cpu_count()} CPUs; largest batch {health['largest_batch']} rows.\n")
    print("| run | wall s | tokens/s | TTFT p50 / p95 s | latency p50 / p95 s |")
    print("|---|---:|---:|---:|---:|")
    for kind in ("sequential", "concurrent"):
        seconds, answers = best[kind]
        ttft = [a["ttft"] for a in answers]
        latency = [a["latency"] for a in answers]
        print(f"| {kind} | {seconds:.2f} | {tokens / seconds:.0f} | {percentile(ttft, 0.5):.2f} / "
              f"{percentile(ttft, 0.95):.2f} | {percentile(latency, 0.5):.2f} / {percentile(latency, 0.95):.2f} |")
    ratio = best["sequential"][0] / best["concurrent"][0]
    print(f"\nThroughput concurrent / sequential: **{ratio:.1f}x**")
    print(f"A 1-token request sent while a {args.long_tokens}-token one streams: answered in "
          f"**{behind['latency']:.2f} s**; the long one took {behind['long_total']:.2f} s in all and finished "
          f"{behind['long_left']:.2f} s after the short one was answered")


if __name__ == "__main__":
    main()
