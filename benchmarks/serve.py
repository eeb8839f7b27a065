"""`posttrain serve` under concurrent load: N requests sent at once versus the same N one after another.

Builds a randomly initialised Qwen2-shaped model (`--size`, BPE trained on the generated demo chats), starts the
real server in a subprocess on a free port, warms it up, then times

* sequential: N chat completions, each sent when the previous answered;
* concurrent: the same N sent together from N threads (the batcher decodes them as one batch).

Requests are greedy with the same `max_tokens` and no stop tokens hit in practice, so both runs decode the same
tokens (checked: the answers must be identical). Prints both wall times, completion tokens/s and the ratio
sequential / concurrent; `--repeats` interleaves runs and reports the best of each.
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


def start_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", "--model", str(model),
                                    "--port", str(port)], stdout=handle, stderr=subprocess.STDOUT)
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


def ask(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def sequential(url, model, chats, max_tokens) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    answers = [ask(url, model, chat, max_tokens) for chat in chats]
    return time.perf_counter() - start, answers


def concurrent(url, model, chats, max_tokens) -> tuple[float, list[dict]]:
    answers: list[dict | None] = [None] * len(chats)

    def run(index):
        answers[index] = ask(url, model, chats[index], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(chats))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--size", choices=["tiny", "small", "base"], default="small")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as work:
        model = make_model(args.size, Path(work) / "model")
        process, url = start_server(model, Path(work) / "server.log")
        try:
            chats = prompts(args.requests)
            ask(url, str(model), chats[0], 4)  # warm-up
            best_seq, best_conc = float("inf"), float("inf")
            for _ in range(args.repeats):
                seq_s, seq_answers = sequential(url, str(model), chats, args.max_tokens)
                conc_s, conc_answers = concurrent(url, str(model), chats, args.max_tokens)
                best_seq, best_conc = min(best_seq, seq_s), min(best_conc, conc_s)
            texts = [a["choices"][0]["message"]["content"] for a in seq_answers]
            if texts != [a["choices"][0]["message"]["content"] for a in conc_answers]:
                raise SystemExit("concurrent answers differ from sequential ones")
            tokens = sum(a["usage"]["completion_tokens"] for a in seq_answers)
            health = json.loads(urllib.request.urlopen(url + "/health").read())
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"model: qwen2/{args.size}, {args.requests} chat requests x max_tokens {args.max_tokens}, greedy; "
          f"{tokens} completion tokens per run; {os.cpu_count()} CPUs, torch threads {_torch_threads()}")
    print(f"sequential: {best_seq:.2f} s ({tokens / best_seq:.0f} tokens/s)")
    print(f"concurrent: {best_conc:.2f} s ({tokens / best_conc:.0f} tokens/s); server: {health['batches']} batches, "
          f"largest {health['largest_batch']} rows")
    print(f"ratio sequential / concurrent: {best_seq / best_conc:.1f}x")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
