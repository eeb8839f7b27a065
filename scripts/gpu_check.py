"""The GPU check: every command on one GPU in a few minutes, with the placement and dtypes asserted.

    scripts/gpu_check.sh                 # make gpu-check: a Qwen2.5-0.5B-shaped model (random weights) on cuda
    scripts/gpu_check.sh --cpu-smoke     # the same stages with a tiny model on the CPU (a dry run of this script;
                                         # in fp32 where the CPU has no native bf16, as posttrain refuses it there)

Stages: sft (full, bf16 autocast over fp32 master weights), sft-lora (pure bf16 base, fp32 adapter), rm (prefix
sharing), dpo (a reference copy), grpo (a reference copy for the KL), ppo (a separate critic started from the
reward model, the reward model as the reward, a reference copy), eval, generate, serve (over HTTP). For each
it asserts that every model (the trained one, the reference, the reward model, the critic, the served one) has
all its weights on the device and in the dtype asked for, then prints tokens/s, peak device memory and the
model-FLOPs utilisation: 6 x parameters x tokens/s for full training (4x for LoRA: no weight gradients), 2 x
parameters x tokens/s for generation, over the device's own bf16 matmul rate measured at the start (MFU
against the datasheet peak is lower: a measured rate is what the device reaches, not its nominal number).
The table goes to stdout and to OUT/gpu_check.md.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "silver", "window",
         "candle", "forest", "button", "orange", "planet"]
ROWS: list[dict] = []


# ------------------------------------------------------------------------------------------ set-up

def build_model(out: Path, smoke: bool) -> Path:
    """A Qwen2-shaped model from a config (random weights) with a BPE tokenizer trained on the check's words."""
    from posttrain.init_model import init_model

    corpus = [f"Reverse the word {w}. The answer is {w[::-1]}. Count to {i % 9 + 1}." for i, w in
              enumerate(WORDS * 20)]
    small = init_model("qwen2", "tiny", corpus, out / "tiny", vocab_size=512, seed=0)
    if smoke:
        return small
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(small)
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_05B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig.from_pretrained(small)
    model.save_pretrained(out / "qwen2.5-0.5b-shape")
    tokenizer.save_pretrained(out / "qwen2.5-0.5b-shape")
    return out / "qwen2.5-0.5b-shape"


def write_data(out: Path, n: int) -> dict[str, Path]:
    def jsonl(name: str, rows: list[dict]) -> Path:
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    words = [WORDS[i % len(WORDS)] for i in range(n)]
    sft = [{"messages": [{"role": "user", "content": f"Reverse the word {w}."},
                         {"role": "assistant", "content": f"The answer is {w[::-1]}."}]} for w in words]
    pairs = [{"prompt": f"Reverse the word {w}.", "chosen": f"The answer is {w[::-1]}.",
              "rejected": f"The answer is {w}."} for w in words]
    prompts = [{"prompt": f"Reverse the word {w}.", "answer": w[::-1]} for w in words]
    return {"sft": jsonl("sft.jsonl", sft), "pairs": jsonl("pairs.jsonl", pairs),
            "prompts": jsonl("prompts.jsonl", prompts)}


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul on `device` in `dtype` (best of a few), the MFU denominator."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 4 * 2 * size ** 3 / (time.perf_counter() - start))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # the process's peak RSS (Linux: KiB)


# ------------------------------------------------------------------------------------------ assertions

def check_placement(name: str, module: torch.nn.Module, device: torch.device, trained=None, frozen=None) -> None:
    """Every weight of `module` on `device`; trained (requires_grad) ones in `trained`, frozen ones in `frozen`."""
    for param_name, param in module.named_parameters():
        if param.device.type != device.type:
            raise SystemExit(f"FAIL {name}: {param_name} is on {param.device}, not {device.type}")
        want = trained if param.requires_grad else frozen
        if want is not None and param.dtype != want:
            kind = "trained" if param.requires_grad else "frozen"
            raise SystemExit(f"FAIL {name}: {kind} weight {param_name} is {param.dtype}, not {want}")


def row(stage: str, tokens_per_s: float, peak: float, flops_per_token: float, rate: float, note: str) -> None:
    mfu = 100 * flops_per_token * tokens_per_s / rate if flops_per_token else float("nan")
    ROWS.append({"stage": stage, "tokens_per_s": tokens_per_s, "peak_gb": peak, "mfu": mfu, "note": note})
    print(f"ok {stage}: {tokens_per_s:,.0f} tokens/s, peak {peak:.2f} GB, MFU {mfu:.1f}% ({note})", flush=True)


# ------------------------------------------------------------------------------------------ stages

def train_stage(name: str, raw: dict, ctx: dict, checks, flops_factor: float, keep: bool = False) -> Path:
    """Build the run as `posttrain train` does, assert placement before any step, train, measure."""
    from posttrain.config import build_config
    from posttrain.stages import STAGES
    from posttrain.train import build_trainer, save_output

    device, out = ctx["device"], ctx["out"] / name
    reset_peak(device)
    config = build_config({"output_dir": str(out), "overwrite_output_dir": True, "device": ctx["device_setting"],
                           **raw})
    trainer, run = build_trainer(config, out)
    checks(trainer)
    result = trainer.fit()
    stage = STAGES[config.stage]
    if stage.finish is not None:
        stage.finish(trainer, trainer.ctx)
    sync(device)
    tokens_per_s = result["tokens_seen"] / max(result["runtime_s"], 1e-9)
    row(name, tokens_per_s, peak_gb(device), flops_factor * ctx["params"], ctx["rate"], f"{result['steps']} steps")
    if keep:
        written = stage.unwrap(trainer.raw_model) if stage.unwrap else trainer.raw_model
        save_output(written, run["tokenizer"], config, stage, out)
    del trainer
    return out


def run_stages(ctx: dict) -> None:
    device, data, model = ctx["device"], ctx["data"], str(ctx["model"])
    half, fp32 = ctx["half"], torch.float32  # bf16; fp32 only in a smoke run on a CPU without native bf16
    steps, batch = ctx["steps"], ctx["batch"]
    train = {"max_steps": steps, "batch_size": batch, "bf16": half == torch.bfloat16, "lr": 1e-5, "log_steps": steps,
             "max_grad_norm": 1.0}
    base = {"model": model, "data": {"train": str(data["sft"]), "max_length": 128}, "train": train}

    def trained_fp32(trainer):  # full fine-tuning under bf16 autocast: fp32 master weights on the device
        check_placement("sft", trainer.raw_model, device, trained=fp32)
        want = "bf16" if half == torch.bfloat16 else "no"
        assert trainer.accelerator.mixed_precision == want, f"sft: mixed precision is not {want}"

    train_stage("sft", {**base, "stage": "sft"}, ctx, trained_fp32, 6)

    def lora_bf16(trainer):  # the frozen base in bf16, the adapter in fp32
        check_placement("sft-lora", trainer.raw_model, device, trained=fp32, frozen=half)

    train_stage("sft-lora", {**base, "stage": "sft", "dtype": ctx["half_name"], "adapter": {"type": "lora", "r": 16}},
                ctx, lora_bf16, 4)

    pairs = {"model": model, "data": {"train": str(data["pairs"]), "max_length": 128}, "train": train}
    rm_init = ctx["out"] / "rm-init"
    from posttrain.modeling import load_model, load_tokenizer

    load_model(model, "reward").save_pretrained(rm_init)
    load_tokenizer(model).save_pretrained(rm_init)

    def rm_checks(trainer):
        check_placement("rm", trainer.raw_model, device, trained=fp32)
        assert trainer.ctx.extra["prefix_sharing"], "rm: prefix sharing is off by default"

    rm_dir = train_stage("rm", {**pairs, "model": str(rm_init), "stage": "rm"}, ctx, rm_checks, 6, keep=True)

    def dpo_checks(trainer):
        check_placement("dpo", trainer.raw_model, device, trained=fp32)
        check_placement("dpo reference", trainer.ctx.reference.model, device, frozen=half)

    train_stage("dpo", {**pairs, "stage": "dpo", "dpo": {"reference": "copy"}}, ctx, dpo_checks, 6 + 2)

    rl_train = {**train, "batch_size": max(1, batch // 4)}
    prompts = {"model": model, "data": {"train": str(data["prompts"]), "max_length": 128}, "train": rl_train,
               "generation": {"max_new_tokens": ctx["new_tokens"], "temperature": 1.0}}

    def grpo_checks(trainer):
        check_placement("grpo", trainer.raw_model, device, trained=fp32)
        check_placement("grpo reference", trainer.ctx.reference.model, device, frozen=half)

    train_stage("grpo", {**prompts, "stage": "grpo", "rewards": [{"builtin": "length", "target": 20}],
                         "grpo": {"num_generations": 4, "kl_coef": 0.01, "reference": "copy"}}, ctx, grpo_checks, 0)

    def ppo_checks(trainer):
        actor = trainer.raw_model
        check_placement("ppo policy", actor.policy, device, trained=fp32)
        check_placement("ppo critic", actor.critic, device, trained=fp32)
        assert actor.critic.is_gradient_checkpointing, "ppo: the critic is not checkpointed"
        check_placement("ppo reference", trainer.ctx.reference.model, device, frozen=half)
        check_placement("ppo reward model", trainer.ctx.sources[0].fn.model, device, frozen=half)

    train_stage("ppo", {**prompts, "stage": "ppo", "rewards": [{"model": str(rm_dir)}],
                        "train": {**rl_train, "gradient_checkpointing": True},
                        "ppo": {"value_model": "reward", "reference": "copy"}}, ctx, ppo_checks, 0)
    inference_stages(ctx, rm_dir)


def inference_stages(ctx: dict, rm_dir: Path) -> None:
    from posttrain.engine import Engine, SamplingParams
    from posttrain.evaluate import evaluate

    device, model, data = ctx["device"], str(ctx["model"]), ctx["data"]
    dtype, half = ctx["half"], ctx["half_name"]
    reset_peak(device)
    started = time.perf_counter()
    result = evaluate(model, tasks=str(data["prompts"]), data=str(data["sft"]), reward_model=str(rm_dir),
                      reference=model, max_new_tokens=ctx["new_tokens"], batch_size=16, device=ctx["device_setting"],
                      dtype=half)
    sync(device)
    answered = result["tasks"] * result["response_tokens"]  # generated tokens (the scoring passes come on top)
    row("eval", answered / (time.perf_counter() - started), peak_gb(device), 0, ctx["rate"],
        f"{result['tasks']} tasks answered, perplexity, rm score, KL to a reference")

    reset_peak(device)
    engine = Engine.load(model, device=ctx["device_setting"], dtype=half)
    check_placement("generate", engine.model, device, frozen=dtype)
    prompts = [engine.chat_prompt([{"role": "user", "content": f"Reverse the word {w}."}]) for w in WORDS]
    params = SamplingParams(max_new_tokens=ctx["new_tokens"], temperature=1.0, seed=0, n=4)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    sync(device)
    started = time.perf_counter()
    completions = engine.generate(prompts, params)
    sync(device)
    tokens = sum(len(c.token_ids) for c in completions)
    row("generate", tokens / (time.perf_counter() - started), peak_gb(device), 2, ctx["rate"],
        f"{len(prompts)} prompts x 4, {ctx['new_tokens']} new tokens")
    del engine

    from posttrain.serve import load_engine

    served = load_engine(model, {}, str(dtype).removeprefix("torch."), device=ctx["device_setting"])
    check_placement("serve", served.model, device, frozen=dtype)
    del served
    row("serve", *serve_over_http(ctx), 2, ctx["rate"], "8 concurrent HTTP requests")


def serve_over_http(ctx: dict) -> tuple[float, float]:
    """`posttrain serve --device D --dtype bf16` (or the smoke run's fp32) in a subprocess, 8 concurrent
    completions over HTTP."""
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", "--model", str(ctx["model"]),
                               "--port", str(port), "--device", ctx["device_setting"], "--dtype", ctx["half_name"]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"FAIL serve: the server did not start: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)

        def complete(i: int) -> int:
            body = json.dumps({"model": str(ctx["model"]), "prompt": f"Reverse the word {WORDS[i]}.",
                               "max_tokens": ctx["new_tokens"], "temperature": 1.0, "seed": i}).encode()
            request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())["usage"]["completion_tokens"]

        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            tokens = sum(pool.map(complete, range(8)))
        return tokens / (time.perf_counter() - started), float("nan")  # its memory is the server process's
    finally:
        server.terminate()
        server.wait(timeout=60)


# ------------------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU: a dry run of the check")
    parser.add_argument("--out", default="gpu-check-out", help="models, data and the result table")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per training stage")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run `scripts/gpu_check.sh --cpu-smoke` for the CPU dry run")
    device = torch.device("cpu" if smoke else "cuda")
    half = torch.bfloat16
    if smoke:
        from posttrain.modeling import fast_bf16

        if not fast_bf16():
            half = torch.float32
            print("this CPU has no native bf16 (AMX / AVX512-BF16), where posttrain refuses bf16: the smoke run "
                  "checks placement with fp32 everywhere bf16 is asked", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model_dir = build_model(out, smoke)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    params = count_parameters(model_dir)
    ctx = {"device": device, "device_setting": device.type, "out": out, "model": model_dir,
           "data": write_data(out, 64 if smoke else 256), "params": params,
           "half": half, "half_name": "bf16" if half == torch.bfloat16 else "fp32",
           "rate": matmul_rate(device, half), "steps": 3 if smoke else args.steps,
           "batch": 4 if smoke else 16, "new_tokens": 8 if smoke else 64}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    print(f"{name}: {ctx['half_name']} matmul {ctx['rate'] / 1e12:.1f} TFLOP/s measured; model "
          f"{config.model_type} {params / 1e6:.1f}M parameters, vocabulary {config.vocab_size}", flush=True)
    run_stages(ctx)
    half = ctx["half_name"]
    lines = [f"GPU check on {name}, {time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s in all; model "
             f"{params / 1e6:.1f}M parameters ({config.vocab_size} vocabulary), {half}; MFU against the measured "
             f"{half} matmul rate {ctx['rate'] / 1e12:.1f} TFLOP/s. Every model's weights were on {device.type} in "
             f"the dtype asked for.", "",
             "| stage | tokens/s | peak memory (GB) | MFU | run |", "|---|---:|---:|---:|---|"]
    for r in ROWS:
        peak = "-" if r["peak_gb"] != r["peak_gb"] else f"{r['peak_gb']:.2f}"
        mfu = "-" if r["mfu"] != r["mfu"] else f"{r['mfu']:.1f}%"
        lines.append(f"| {r['stage']} | {r['tokens_per_s']:,.0f} | {peak} | {mfu} | {r['note']} |")
    table = "\n".join(lines)
    (out / "gpu_check.md").write_text(table + "\n")
    print("\n" + table)


def count_parameters(model_dir: Path) -> int:
    """Parameters in the checkpoint (a tied LM head is stored, and counted, once)."""
    import math

    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


if __name__ == "__main__":
    main()
