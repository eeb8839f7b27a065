"""PPO throughput: posttrain (`stage: ppo`) vs TRL 0.29's PPOTrainer (the last TRL with PPO), same model, reward
model, prompts, generation length and 4 PPO epochs, with the time split (generate / score / logprobs / update).

    python benchmarks/ppo.py                   # small model, 8 prompts per step, 64 new tokens, 8 steps, fp32
    python benchmarks/ppo.py --repeats 2       # best of 2 interleaved runs
    python benchmarks/ppo.py --quick           # tiny model, 3 steps, 16 new tokens: a smoke test

TRL 0.29 is not what the project's venv holds (TRL 1.x deleted PPO): it runs in its own venv, `--trl-python`
(default /tmp/trl029/bin/python), made with

    python -m venv /tmp/trl029 && /tmp/trl029/bin/pip install "trl==0.29.*" torch==2.13.0 transformers==5.23.0

Each framework runs in a fresh child process with one torch thread (`--threads`). A step on both sides: one
response per prompt sampled from the current policy (temperature 1, no top-k / top-p, at most `--max-new-tokens`,
ending at <|im_end|>), scored by the reward model, no-grad passes for the reference log-probs and the values,
rewards = score on the last token - 0.05 x k1 KL per token, GAE (gamma 1, lambda 0.95), whitened advantages,
then 4 epochs of one clipped PPO update each (clip 0.2, value clip 0.2, vf_coef 0.1) over the whole rollout.

* models: the policy is `common.make_model` (Qwen2-shaped, `--size`, BPE trained on the demo chats, embedding not
  widened); the reward model is the same network with a one-output sequence-classification head (seeded init),
  written once; both sides load it as the reward model and initialise their critic (a separate value model) from
  it; the reference is a frozen copy of the policy;
* prompts: "What is A plus B?" chat-templated with the generation prompt, all the same token length (so TRL's
  shuffled batches and posttrain's hold prompts of one shape);
* optimisation: AdamW lr 5e-5 for policy and critic (posttrain `ppo.value_lr` = lr, TRL's one optimizer), constant
  schedule, no gradient clipping (TRL's PPO loop does not clip), no score normalisation (posttrain
  `ppo.normalize_scores: false`, TRL has none), dropout off on both;
* counted: response tokens per step, up to and with the first <|im_end|> (the engine's completions; TRL's
  truncated responses), over the wall time of the steps after `--warmup`.

Split: posttrain's own metrics (time/generate, time/score, time/logprobs, time/update); TRL's by timing its
module functions: `batch_generation` (generate), `get_reward` on the reward model (score), `forward` and
`get_reward` on the value model without gradients (logprobs: reference and values), the rest of the step (update).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common
from common import SEED, machine_line, make_model, summarize, versions

HERE = Path(__file__).resolve()
LR = 5e-5


# ------------------------------------------------------------------------------------------ children

def set_threads(spec: dict) -> None:
    import torch

    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])


def summary(spec, step_end, step_tokens, loop_start, split_rows) -> dict:
    result = summarize(step_end, step_tokens, [0.0] * len(step_end), step_end[-1] - loop_start, spec["warmup"])
    w = result["warmup_steps"]
    step_s = [b - a for a, b in zip([loop_start] + step_end[:-1], step_end)][w:]
    split = {k: sum(row[k] for row in split_rows[w:]) for k in ("generate_s", "score_s", "logprobs_s")}
    split["update_s"] = sum(step_s) - sum(split.values())
    result.update(split={k: round(v, 3) for k, v in split.items()},
                  mean_length=round(result["timed_tokens"] / (spec["batch_size"] * (len(step_end) - w)), 1))
    for key in ("losses", "final_loss", "final_loss_last5"):
        result.pop(key, None)
    return result


def child_posttrain(spec: dict) -> dict:
    import dataclasses

    import posttrain.rl.online as online
    from posttrain.config import build_config
    from posttrain.engine import Engine
    from posttrain.stages import STAGES
    from posttrain.train import run_training

    set_threads(spec)
    step_end, step_tokens, splits, loop = [], [], [], {}
    step = STAGES["ppo"].step
    current = {"tokens": 0}
    generate = Engine.generate

    def counted_generate(self, prompts, params, **kwargs):
        completions = generate(self, prompts, params, **kwargs)
        current["tokens"] += sum(len(c.token_ids) for c in completions)
        return completions

    def timed_step(trainer, units, ctx):
        loop.setdefault("start", time.perf_counter())
        result = step(trainer, units, ctx)
        step_end.append(time.perf_counter())
        common.CPU_AT_STEP_END.append(time.process_time())
        step_tokens.append(current["tokens"])
        current["tokens"] = 0
        m = result["metrics"]
        splits.append({"generate_s": m["time/generate"], "score_s": m["time/score"], "logprobs_s": m["time/logprobs"]})
        return result

    Engine.generate = counted_generate
    STAGES["ppo"] = dataclasses.replace(STAGES["ppo"], step=timed_step)
    config = {"stage": "ppo", "model": spec["model"], "output_dir": spec["out"],
              "data": {"train": spec["data"], "max_length": spec["max_length"]},
              "rewards": [{"model": spec["reward_model"]}],
              "generation": {"max_new_tokens": spec["max_new_tokens"], "temperature": 1.0, "top_p": 1.0, "top_k": 0},
              "ppo": {"epochs": 4, "mini_batches": 1, "kl_coef": 0.05, "gamma": 1.0, "lam": 0.95, "clip": 0.2,
                      "value_clip": 0.2, "vf_coef": 0.1, "value_model": "reward", "value_lr": LR,
                      "normalize_scores": False, "whiten_rewards": False, "reference": "copy"},
              "train": {"max_steps": spec["steps"], "batch_size": spec["batch_size"], "grad_accum": 1, "lr": LR,
                        "weight_decay": 0.0, "warmup_steps": 0, "scheduler": "constant", "max_grad_norm": None,
                        "seed": SEED, "log_steps": spec["steps"]}}
    run_training(build_config(config))
    return summary(spec, step_end, step_tokens, loop["start"], splits)


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    set_threads(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    rows = [{"input_ids": ids} for ids in spec["prompt_ids"]]
    dataset = Dataset.from_list(rows)

    def load(kind, path):
        cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
        return cls.from_pretrained(path, dtype=torch.float32, **({"num_labels": 1} if kind != "causal" else {}))

    B, M, stop = spec["batch_size"], spec["max_new_tokens"], spec["stop_id"]
    args = PPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=B, gradient_accumulation_steps=1, num_mini_batches=1,
        total_episodes=spec["steps"] * B, local_rollout_forward_batch_size=B, num_ppo_epochs=4,
        response_length=M, temperature=1.0, stop_token=None, stop_token_id=stop, missing_eos_penalty=None,
        kl_coef=0.05, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
        whiten_rewards=False, learning_rate=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        lr_scheduler_type="constant", warmup_steps=0, seed=SEED, num_sample_generations=0, use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0, eval_strategy="no",
        save_strategy="no", logging_strategy="no", report_to="none")

    step_end, step_tokens, splits, loop = [], [], [], {}
    current = {"tokens": 0, "generate_s": 0.0, "score_s": 0.0, "logprobs_s": 0.0}
    batch_generation, forward, get_reward = module.batch_generation, module.forward, module.get_reward

    def timed_generation(model, queries, *a, **k):
        loop.setdefault("start", time.perf_counter())
        t = time.perf_counter()
        query_responses, logits = batch_generation(model, queries, *a, **k)
        current["generate_s"] += time.perf_counter() - t
        responses = query_responses[:, queries.shape[1]:]
        for row in responses.tolist():
            current["tokens"] += row.index(stop) + 1 if stop in row else len(row)
        return query_responses, logits

    def timed_forward(model, *a, **k):
        if torch.is_grad_enabled():
            return forward(model, *a, **k)
        t = time.perf_counter()
        out = forward(model, *a, **k)
        current["logprobs_s"] += time.perf_counter() - t
        return out

    def timed_reward(model, *a, **k):
        t = time.perf_counter()
        out = get_reward(model, *a, **k)
        current["score_s" if model is reward_model else "logprobs_s"] += time.perf_counter() - t
        return out

    module.batch_generation, module.forward, module.get_reward = timed_generation, timed_forward, timed_reward

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end.append(time.perf_counter())
            common.CPU_AT_STEP_END.append(time.process_time())
            step_tokens.append(current["tokens"])
            splits.append({k: current[k] for k in ("generate_s", "score_s", "logprobs_s")})
            current.update(tokens=0, generate_s=0.0, score_s=0.0, logprobs_s=0.0)

    reward_model = load("reward", spec["reward_model"])
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=load("causal", spec["model"]),
                         ref_model=load("causal", spec["model"]), reward_model=reward_model,
                         value_model=load("reward", spec["reward_model"]), train_dataset=dataset,
                         eval_dataset=dataset.select(range(2)), callbacks=[StepTimer()])
    trainer.train()
    return summary(spec, step_end, step_tokens, loop["start"], splits)


# ------------------------------------------------------------------------------------------ parent

def prepare(args, work: Path) -> dict:
    import random

    import torch
    from transformers import AutoModelForSequenceClassification

    from posttrain.modeling import load_tokenizer

    model_dir = make_model(args, work)
    reward_dir = work / "reward-model"
    if not (reward_dir / "config.json").is_file():
        torch.manual_seed(SEED)
        reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        reward.config.pad_token_id = load_tokenizer(str(model_dir)).pad_token_id
        reward.save_pretrained(reward_dir)
        load_tokenizer(str(model_dir)).save_pretrained(reward_dir)
    tokenizer = load_tokenizer(str(model_dir))
    rng = random.Random(SEED)
    rows, ids = [], []
    for _ in range(args.steps * args.batch_size):
        messages = [{"role": "user", "content": f"What is {rng.randint(1, 9)} plus {rng.randint(1, 9)}?"}]
        rows.append({"prompt": messages})
        ids.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
    if len({len(i) for i in ids}) != 1:
        raise SystemExit("the prompts should all have one token length")
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from common import count_params

    params, vocab = count_params(model_dir)
    return {"model": str(model_dir), "reward_model": str(reward_dir), "data": str(data), "prompt_ids": ids,
            "steps": args.steps, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            "max_length": len(ids[0]) + args.max_new_tokens, "warmup": args.warmup, "torch_threads": args.threads,
            "stop_id": tokenizer.convert_tokens_to_ids("<|im_end|>"), "params": params, "vocab": vocab,
            "prompt_tokens": len(ids[0]), "size": args.size}


def run_child(python: str, name: str, spec: dict, work: Path) -> dict:
    out = work / f"out-{name}"
    spec_file, result_file, log_file = work / f"spec-{name}.json", work / f"result-{name}.json", work / f"log-{name}.txt"
    spec_file.write_text(json.dumps({**spec, "out": str(out)}))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    started = time.time()
    with log_file.open("w") as log:
        proc = subprocess.run([python, str(HERE), "--child", name, "--spec", str(spec_file), "--result",
                               str(result_file)], stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not result_file.is_file():
        raise SystemExit(f"{name} failed (exit {proc.returncode}); log {log_file}:\n{log_file.read_text()[-3000:]}")
    result = json.loads(result_file.read_text())
    result["process_s"] = round(time.time() - started, 1)
    return result


def child_main(args) -> None:
    import torch

    spec = json.loads(Path(args.spec).read_text())
    result = {"posttrain": child_posttrain, "trl": child_trl}[args.child](spec)
    result.update(peak_rss_mb=round(common.peak_rss_mb(), 1), threads=torch.get_num_threads())
    Path(args.result).write_text(json.dumps(result))


def trl_versions(python: str) -> str:
    code = ("from importlib.metadata import version as v; "
            "print(', '.join(f'{n} {v(n)}' for n in ('trl', 'torch', 'transformers', 'accelerate')))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def markdown(spec: dict, results: dict, command: str, trl_side: str) -> str:
    lines = ["| framework | response tokens/s (wall) | per CPU-second | mean response length | "
             "time: generate / score / logprobs / update | peak RSS (MiB) |", "|---|---:|---:|---:|---|---:|"]
    for name in [n for n in ("posttrain", "trl") if n in results]:
        r = results[name]
        total = sum(r["split"].values())
        parts = " / ".join(f"{100 * r['split'][k] / total:.0f}%" for k in ("generate_s", "score_s", "logprobs_s",
                                                                            "update_s"))
        label = {"posttrain": "posttrain (stage: ppo)", "trl": "TRL 0.29 PPOTrainer"}[name]
        lines.append(f"| {label} | {r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | {r['mean_length']:.1f} | "
                     f"{parts} | {r['peak_rss_mb']:.0f} |")
    if {"posttrain", "trl"} <= set(results):
        p, t = results["posttrain"], results["trl"]
        lines.append(f"| **posttrain / TRL** | **{p['tokens_per_s'] / t['tokens_per_s']:.2f}x** | "
                     f"{p['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x | | | "
                     f"{p['peak_rss_mb'] / t['peak_rss_mb']:.2f}x |")
    setup = (f"Model: Qwen2-shaped `{spec['size']}` ({spec['params'] / 1e6:.1f}M parameters, {spec['vocab']} embedding "
             f"rows); reward model and critics: the same network with a score head. {spec['batch_size']} prompts "
             f"({spec['prompt_tokens']} tokens) per step, one response each, at most {spec['max_new_tokens']} new "
             f"tokens, 4 PPO epochs; {spec['steps']} steps ({spec['warmup']} not timed); best of {spec['repeats']}.")
    return "\n".join([f"Command: `{command}`", "", machine_line(spec, versions()), f"TRL side: {trl_side}.", "",
                      setup, "", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--size", choices=("tiny", "small", "base"), default="small")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--frameworks", default="posttrain,trl")
    parser.add_argument("--trl-python", default="/tmp/trl029/bin/python")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir")
    parser.add_argument("--child", choices=("posttrain", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    args.embedding_rows = 0
    if args.quick:
        args.size, args.steps, args.max_new_tokens, args.warmup = "tiny", 3, 16, 1
    if not Path(args.trl_python).is_file():
        raise SystemExit(f"{args.trl_python} does not exist: make TRL 0.29's venv first (see the docstring)")
    command = "python benchmarks/ppo.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = {**prepare(args, work), "repeats": args.repeats}
        pythons = {"posttrain": sys.executable, "trl": args.trl_python}
        results: dict = {}
        for rep in range(args.repeats):
            for name in [f.strip() for f in args.frameworks.split(",") if f.strip()]:
                r = run_child(pythons[name], name, spec, work)
                spec["threads"] = r["threads"]
                if name not in results or r["tokens_per_s"] > results[name]["tokens_per_s"]:
                    results[name] = r
                print(f"{name} run {rep + 1}: {r['tokens_per_s']:.0f} tokens/s ({r['tokens_per_cpu_s']:.0f} per "
                      f"CPU-s), mean length {r['mean_length']}, split {r['split']} (process {r['process_s']}s)",
                      flush=True)
        print()
        print(markdown(spec, results, command.strip(), trl_versions(args.trl_python)))


if __name__ == "__main__":
    main()
