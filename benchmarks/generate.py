"""The generation engine vs Hugging Face `model.generate`: same model, prompts, lengths and sampling settings.

    python benchmarks/generate.py                      # mini model (32000 rows), batch 1/8/32, 64 and 256 tokens
    python benchmarks/generate.py --size base --new-tokens 64 --batches 32
    python benchmarks/generate.py --quick              # tiny model, batch 8, 16 tokens: a smoke test

For each (batch, new tokens): the same `batch` prompts (demo chat prompts, chat-templated, mixed lengths, left
padded by both) are decoded by `posttrain.engine.Engine.generate` and by `model.generate` (transformers' own
DynamicCache decoding), alternating, `--repeats` times; the best wall time of each is kept. Both decode exactly
`new tokens` per row (no stop tokens, `min_new_tokens` on HF's side), sample at temperature 1 with top-k and
top-p off (`--greedy`: argmax), one torch thread by default (`--threads`). Greedy tokens are checked to be
identical once per batch size before timing. Ratio = engine tokens/s / HF tokens/s (> 1: the engine is faster).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def load(args, work: Path):
    import torch
    from transformers import AutoModelForCausalLM

    import common
    from posttrain.demo.data import make_sft_rows
    from posttrain.engine import Engine
    from posttrain.modeling import load_tokenizer

    model_dir = common.make_model(args, work)
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # peaked, varied next-token distributions (a fresh init repeats one token)
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.1)
    rows = make_sft_rows(max(args.batches), seed="bench")
    prompts = [tokenizer.apply_chat_template([m for m in r["messages"] if m["role"] != "assistant"][:2],
                                             add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for r in rows]
    return Engine(model, tokenizer, stop_token_ids=[]), model, tokenizer, prompts


def run_engine(engine, prompts, new_tokens, greedy):
    from posttrain.engine import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0 if greedy else 1.0, seed=0)
    return [c.token_ids for c in engine.generate(prompts, params)]


def run_hf(model, tokenizer, prompts, new_tokens, greedy):
    import torch

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=not greedy, temperature=1.0, top_k=0, top_p=1.0,
                             eos_token_id=None, pad_token_id=pad)
    return out[:, width:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mini", choices=["tiny", "mini", "small", "base"])
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary trained on the demo text")
    parser.add_argument("--embedding-rows", type=int, default=32000, help="widen the embedding / head (0: keep)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", default="64,256")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling at temperature 1")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.new_tokens = [int(n) for n in args.new_tokens.split(",")]
    if args.quick:
        args.size, args.embedding_rows, args.batches, args.new_tokens, args.repeats = "tiny", 0, [8], [16], 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        engine, model, tokenizer, prompts = load(args, work)
        params = sum(p.numel() for p in model.parameters())
        lines = ["| batch | new tokens | engine tokens/s | HF generate tokens/s | engine / HF |", "|---:|---:|---:|---:|---:|"]
        for batch in args.batches:
            chosen = prompts[:batch]
            if run_engine(engine, chosen, 24, True) != run_hf(model, tokenizer, chosen, 24, True):
                raise SystemExit(f"batch {batch}: greedy tokens differ between the engine and HF generate")
            for new_tokens in args.new_tokens:
                best = {"engine": float("inf"), "hf": float("inf")}
                for _ in range(args.repeats):
                    for name in ("engine", "hf"):
                        start = time.perf_counter()
                        if name == "engine":
                            out = run_engine(engine, chosen, new_tokens, args.greedy)
                        else:
                            out = run_hf(model, tokenizer, chosen, new_tokens, args.greedy)
                        best[name] = min(best[name], time.perf_counter() - start)
                        if any(len(t) != new_tokens for t in out):
                            raise SystemExit(f"{name} did not decode {new_tokens} tokens per row")
                rates = {k: batch * new_tokens / v for k, v in best.items()}
                lines.append(f"| {batch} | {new_tokens} | {rates['engine']:.0f} | {rates['hf']:.0f} | "
                             f"**{rates['engine'] / rates['hf']:.2f}x** |")
                print(lines[-1], flush=True)
        mode = "greedy" if args.greedy else "sampling at temperature 1 (top-k, top-p off)"
        print(f"\nCommand: `python benchmarks/generate.py {' '.join(sys.argv[1:])}`\n")
        print(f"Model: Qwen2-shaped `{args.size}`, {params / 1e6:.1f}M parameters, {model.config.vocab_size} "
              f"embedding rows; {mode}; torch threads {torch.get_num_threads()}; best of {args.repeats} "
              f"interleaved runs; mean prompt {sum(map(len, prompts)) / len(prompts):.0f} tokens.\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
