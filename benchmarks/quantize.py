"""Quantised serving on a CPU: weight memory, process memory, decode tokens/s and perplexity of one model
in fp32, bf16, int8 weight-only (fp32 activations) and int8 weight-only with bf16 activations.

    .venv/bin/python benchmarks/quantize.py [--size small] [--steps 100] [--out bench-quantize]

Method:
* model: `posttrain init-model --arch qwen2 --size SIZE` (tokenizer trained on the demo's pretraining text),
  then `posttrain train` stage pt for STEPS steps on that text (fp32, lr 1e-3, batch 8 x 128 tokens), so the
  perplexity is that of a model that has learnt something;
* each variant runs in a fresh child process: `Engine.load(model, dtype=..., quantize=...)` (the code path
  of `posttrain serve|eval|chat --quantize int8 [--dtype bfloat16]`), then
  - weight MiB: parameters and buffers, int8 tensors counted by their int8 data and scales;
  - load MiB: how much the child's resident memory grew while loading the model (psutil RSS after
    `Engine.load` minus before it; torch and transformers are imported before);
  - decode tokens/s: greedy, 128 new tokens (EOS ignored), batch 1 and batch 8, on demo chat prompts;
    one warm-up call first, then the best of three calls in each of ROUNDS child processes per variant (the
    variants take turns); the table gives the range over the rounds;
  - perplexity on 200 held-out pretraining documents (`posttrain eval --data`'s own function).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("float32", "int8"),
            "int8 + bf16 activations": ("bfloat16", "int8")}


def prepare(out: Path, size: str, steps: int) -> tuple[Path, Path]:
    from posttrain.config import build_config
    from posttrain.demo.data import make_pretraining_text
    from posttrain.init_model import init_model
    from posttrain.train import run_training

    model_dir, held_out = out / "model" / "trained", out / "held_out.jsonl"
    if steps == 0:  # speed and memory only: the random model's perplexity means nothing
        model_dir = out / "model" / "init"
    if (model_dir / "config.json").is_file():
        return model_dir, held_out
    texts = make_pretraining_text(4000, seed=0)
    (out / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3800]))
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[3800:]))
    init_model("qwen2", size, texts[:3800], out / "model" / "init", vocab_size=2048, seed=0)
    if steps == 0:
        return model_dir, held_out
    run_training(build_config({"stage": "pt", "model": str(out / "model" / "init"), "output_dir": str(model_dir),
                               "data": {"train": str(out / "train.jsonl"), "max_length": 128, "packing": True},
                               "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "bf16": False,
                                         "seed": 0, "log_steps": 50}}))
    return model_dir, held_out


def measure(model_dir: str, held_out: str, dtype: str, quantize: str | None) -> dict:
    import psutil
    import torch

    from posttrain.demo.data import make_sft_rows
    from posttrain.engine import Engine, SamplingParams
    from posttrain.evaluate import perplexity
    from posttrain.quantize import _quiet_torchao_import, weight_bytes

    _quiet_torchao_import()  # every import is done before the memory baseline
    before = psutil.Process().memory_info().rss
    engine = Engine.load(model_dir, dtype=getattr(torch, dtype), quantize=quantize)
    loaded = psutil.Process().memory_info().rss - before
    prompts = [engine.chat_prompt(row["messages"][:2]) for row in make_sft_rows(9, seed=1)]
    engine.stop_token_ids = []  # every row decodes all 128 tokens: equal work in every variant
    params = SamplingParams(max_new_tokens=128, temperature=0)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=8, temperature=0))  # warm-up
    speeds = {}
    for batch in (1, 8):
        best = 0.0
        for _ in range(3):  # best of three: other jobs on the machine only ever slow a run down
            start = time.perf_counter()
            done = engine.generate(prompts[1:1 + batch], params)
            best = max(best, sum(len(c.token_ids) for c in done) / (time.perf_counter() - start))
        speeds[f"tokens/s batch {batch}"] = best
    with torch.no_grad():
        ppl = perplexity(engine.model, engine.tokenizer, held_out, max_length=256)["perplexity"]
    return {"weight MiB": weight_bytes(engine.model) / 2**20, "load MiB": loaded / 2**20, **speeds,
            "perplexity": ppl}


def summarise(rows: dict[str, dict]) -> str:
    """The Markdown table: memory and perplexity from the first round, speeds as the range over the rounds."""
    for row in rows.values():
        row.update({k: v for k, v in row["rounds"][0].items() if not k.startswith("tokens/s")})
        for k in row["rounds"][0]:
            if k.startswith("tokens/s"):
                row[k] = (min(r[k] for r in row["rounds"]), max(r[k] for r in row["rounds"]))
    base = rows["fp32"]
    columns = ["weight MiB", "load MiB", "tokens/s batch 1", "tokens/s batch 8", "perplexity"]
    lines = ["| variant | " + " | ".join(columns) + " | perplexity vs fp32 |", "|---" * (len(columns) + 2) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c][0]:.0f}-{row[c][1]:.0f}" if c.startswith("tokens/s") else f"{row[c]:.3f}"
                 if c == "perplexity" else f"{row[c]:.1f}" for c in columns]
        change = 100 * (row["perplexity"] / base["perplexity"] - 1)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {change:+.2f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="bench-quantize")
    parser.add_argument("--rounds", type=int, default=3, help="each variant measured this many times, in turns")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_dir, held_out, dtype, quantize = args.child
        print(json.dumps(measure(model_dir, held_out, dtype, None if quantize == "none" else quantize)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, held_out = prepare(out, args.size, args.steps)
    rows: dict[str, dict] = {}
    for _ in range(args.rounds):  # the variants take turns, so a burst of other work does not hit one alone
        for name, (dtype, quantize) in VARIANTS.items():
            result = subprocess.run([sys.executable, __file__, "--child", str(model_dir), str(held_out), dtype,
                                     quantize or "none"], capture_output=True, text=True, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            print(name, row, file=sys.stderr)
            rows.setdefault(name, {"rounds": []})["rounds"].append(row)
    table = summarise(rows)
    (out / "quantize.md").write_text(table + "\n")
    (out / "quantize.json").write_text(json.dumps(rows, indent=2))
    print(table)


if __name__ == "__main__":
    main()
