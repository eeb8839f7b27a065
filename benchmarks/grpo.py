"""GRPO throughput and memory: posttrain (`stage: grpo`) vs TRL's GRPOTrainer, same model, prompts, group size,
generation length and reward function.

    python benchmarks/grpo.py                  # small model, 4 prompts x G=4, 64 new tokens, 10 steps, fp32
    python benchmarks/grpo.py --repeats 2 --precision both   # best of 2 interleaved runs; also bf16 autocast
    python benchmarks/grpo.py --threads 0      # torch's default thread count (only on a quiet machine)
    python benchmarks/grpo.py --quick          # tiny model, 3 steps, 32 new tokens: a smoke test (< 1 min)
    python benchmarks/grpo.py --num-generations 8 --max-new-tokens 128

A step on both sides: sample G completions for each of the step's prompts from the current policy (KV-cache
decoding, all rows of the step in one batch), score them with `digit_share` below (the same Python function on
both sides), group-normalised advantages, one policy-gradient update (one epoch, one mini-batch: ratio 1, no
clipping), no KL term and no reference model. Each framework runs in a fresh child process, with one torch
thread by default (`--threads`).

* model: `common.make_model` (Qwen2-shaped, `--size`, BPE tokenizer trained on the demo chats; `--embedding-rows`
  defaults to 0 here: sampled ids must be real tokens, so the embedding is not widened);
* prompts: `posttrain.demo.tasks.make_tasks` as single user messages, chat-templated with the generation prompt.
  The parent checks that TRL's tokenization (`apply_chat_template(tokenize=True)`) gives posttrain's prompt ids,
  and each child checks that every step samples for exactly the prompts of posttrain's batch order (TRL reads the
  dataset in that order: `shuffle_dataset=False`);
* sampling: temperature 1, top_p 1, top_k 0, at most `--max-new-tokens`; a completion ends at <|im_end|> or EOS;
* update: posttrain `grpo: {loss: token_mean, kl_coef: 0, track_kl: false, epochs: 1, mini_batches: 1}`; TRL
  `loss_type="dapo", beta=0, num_iterations=1`, `per_device_train_batch_size` = prompts x G, grad_accum 1;
  AdamW lr 5e-5 (betas 0.9/0.999, no weight decay), cosine, no warmup, clip 1.0, no gradient checkpointing;
* counted: completion tokens generated per step (the final <|im_end|>/EOS included when sampled): the lengths of
  the sampled token lists (posttrain: the engine's completions; TRL: the ids `_generate_single_turn` returns).

tokens/s = completion tokens of the steps after `--warmup` / the wall time of those steps (generation, scoring and
update together). Both sides sample, so completion lengths differ: the mean length is printed next to it.
TRL is a bench-only dependency, imported only inside the TRL child.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub look-ups, in this process and in the children

import common
from common import LR, SEED, add_arguments, machine_line, make_model, count_params, run_repeats, summarize, versions

HERE = Path(__file__).resolve()


def digit_share(prompts, completions, **_) -> list[float]:
    """The reward, the same function on both sides: the share of a completion's characters that are digits.
    posttrain passes completion strings; TRL passes [{"role": "assistant", "content": ...}] for chat prompts."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def summary(spec, step_end, step_tokens, step_loss, loop_start, per_step) -> dict:
    """common.summarize plus what GRPO adds: completions, lengths, time split, reward over the timed steps."""
    result = summarize(step_end, step_tokens, step_loss, step_end[-1] - loop_start, spec["warmup"],
                       with_step_tokens=True)
    w = result["warmup_steps"]
    timed = {k: sum(v[w:]) for k, v in per_step.items() if k != "reward"}
    step_s = [b - a for a, b in zip([loop_start] + step_end[:-1], step_end)][w:]
    update_s = sum(step_s) - timed["generate_s"] - timed["score_s"]
    result.update(completions=timed["completions"],
                  mean_length=round(result["timed_tokens"] / timed["completions"], 1),
                  hit_max=round(timed["hit_max"] / timed["completions"], 3),
                  split={k: round(v, 3) for k, v in (("generate_s", timed["generate_s"]),
                                                     ("score_s", timed["score_s"]), ("update_s", update_s))},
                  mean_reward=round(sum(per_step["reward"][w:]) / len(per_step["reward"][w:]), 4),
                  checked_same_prompts=True)
    return result


def set_threads(spec: dict) -> None:
    if spec.get("torch_threads"):
        import torch
        torch.set_num_threads(spec["torch_threads"])


def new_per_step() -> dict:
    return {"completions": [], "hit_max": [], "generate_s": [], "score_s": [], "reward": []}


def expected_prompts(spec: dict, step: int) -> list[list[int]]:
    """The prompt ids of `step` in posttrain's batch order (each prompt once)."""
    features, B = spec["prompt_ids"], spec["batch_size"]
    return [features[i] for i in spec["order"][step * B:(step + 1) * B]]


# ------------------------------------------------------------------------------------------ children

def child_posttrain(spec: dict) -> dict:
    from posttrain.stages import STAGES
    import posttrain.rl.online as online
    from posttrain.config import build_config
    from posttrain.engine import Engine
    from posttrain.train import run_training

    set_threads(spec)
    step_end, step_tokens, step_loss, loop, per_step = [], [], [], {}, new_per_step()
    current = {"generate_s": 0.0, "score_s": 0.0, "completions": 0, "hit_max": 0, "tokens": 0}
    generate, score, step = Engine.generate, online.score, STAGES["grpo"].step

    def timed_generate(self, prompts, params, **kwargs):
        t = time.perf_counter()
        completions = generate(self, prompts, params, **kwargs)
        current["generate_s"] += time.perf_counter() - t
        current["completions"] += len(completions)
        current["hit_max"] += sum(len(c.token_ids) >= params.max_new_tokens for c in completions)
        current["tokens"] += sum(len(c.token_ids) for c in completions)
        return completions

    def timed_score(*args, **kwargs):
        t = time.perf_counter()
        values, metrics = score(*args, **kwargs)
        current["score_s"] += time.perf_counter() - t
        per_step["reward"].append(sum(values) / len(values))
        return values, metrics

    def timed_step(trainer, units, ctx):
        loop.setdefault("start", time.perf_counter())
        if [u["input_ids"] for u in units] != expected_prompts(spec, len(step_end)):
            raise SystemExit(f"posttrain step {len(step_end) + 1}: not the prompts of the planned batch order")
        result = step(trainer, units, ctx)
        step_end.append(time.perf_counter())
        if result["tokens"] != current["tokens"]:
            raise SystemExit(f"posttrain counted {result['tokens']} completion tokens, the engine sampled "
                             f"{current['tokens']}")
        common.CPU_AT_STEP_END.append(time.process_time())
        step_tokens.append(int(result["tokens"]))
        step_loss.append(float(result["loss"]))
        for key in ("generate_s", "score_s", "completions", "hit_max"):
            per_step[key].append(current[key])
        current.update(generate_s=0.0, score_s=0.0, completions=0, hit_max=0, tokens=0)
        return result

    Engine.generate, online.score = timed_generate, timed_score
    STAGES["grpo"] = dataclasses.replace(STAGES["grpo"], step=timed_step)
    common.profiled(lambda: run_training(build_config(posttrain_raw_config(spec))), spec)
    return summary(spec, step_end, step_tokens, step_loss, loop["start"], per_step)


def posttrain_raw_config(spec: dict) -> dict:
    return {"stage": "grpo", "model": spec["model"], "output_dir": spec["out"], "overwrite_output_dir": True,
            "data": {"train": spec["data"], "max_length": spec["max_length"]},
            "rewards": [{"function": f"{HERE}:digit_share"}],
            "generation": {"max_new_tokens": spec["max_new_tokens"], "temperature": 1.0, "top_p": 1.0, "top_k": 0},
            "grpo": {"num_generations": spec["num_generations"], "loss": "token_mean", "kl_coef": 0.0,
                     "track_kl": False, "epochs": 1, "mini_batches": 1, "baseline": "grpo", "scale": "group",
                     "missing_eos_penalty": None},
            "train": {"max_steps": spec["steps"], "batch_size": spec["batch_size"], "grad_accum": 1, "lr": LR,
                      "weight_decay": 0.0, "warmup_steps": 0, "scheduler": "cosine", "max_grad_norm": 1.0,
                      "seed": SEED, "bf16": spec.get("precision") == "bf16", "log_steps": spec["steps"]}}


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    set_threads(spec)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([rows[i] for i in spec["order"]])  # posttrain's batches, read sequentially
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    G, M = spec["num_generations"], spec["max_new_tokens"]
    args = GRPOConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"] * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=M, temperature=1.0, top_p=1.0,
        top_k=0, beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group", epsilon=0.2,
        mask_truncated_completions=False, use_vllm=False, shuffle_dataset=False, disable_dropout=True,
        learning_rate=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, seed=SEED, data_seed=SEED,
        bf16=spec["precision"] == "bf16", use_cpu=True, gradient_checkpointing=False, dataloader_num_workers=0,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", log_completions=False)

    step_end, step_tokens, step_loss, loop, per_step = [], [], [], {}, new_per_step()
    current = {"generate_s": 0.0, "score_s": 0.0, "completions": 0, "hit_max": 0, "tokens": 0, "loss": 0.0}

    class Trainer(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            want = [ids for ids in expected_prompts(spec, len(step_end)) for _ in range(G)]
            if [list(ids) for ids in prompt_ids] != want:
                raise SystemExit(f"TRL step {len(step_end) + 1}: not the prompts of posttrain's batch order")
            t = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            current["generate_s"] += time.perf_counter() - t
            current["completions"] += len(completion_ids)
            current["hit_max"] += sum(len(ids) >= M for ids in completion_ids)
            current["tokens"] += sum(len(ids) for ids in completion_ids)
            return completion_ids, logprobs

        def _calculate_rewards(self, *args, **kwargs):
            t = time.perf_counter()
            rewards = super()._calculate_rewards(*args, **kwargs)
            current["score_s"] += time.perf_counter() - t
            per_step["reward"].append(float(rewards.sum(dim=1).mean()))
            return rewards

        def training_step(self, model, inputs, num_items_in_batch=None):
            loop.setdefault("start", time.perf_counter())
            loss = super().training_step(model, inputs, num_items_in_batch)
            current["loss"] += float(loss)
            return loss

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end.append(time.perf_counter())
            common.CPU_AT_STEP_END.append(time.process_time())
            step_tokens.append(current["tokens"])
            step_loss.append(current["loss"])
            for key in ("generate_s", "score_s", "completions", "hit_max"):
                per_step[key].append(current[key])
            current.update(generate_s=0.0, score_s=0.0, completions=0, hit_max=0, tokens=0, loss=0.0)

    trainer = Trainer(model=model, reward_funcs=[digit_share], args=args, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[StepTimer()])
    if trainer.use_vllm or trainer.ref_model is not None or trainer.beta != 0:
        raise SystemExit("TRL is not set up as intended (vLLM, a reference model or beta != 0)")
    common.profiled(trainer.train, spec)
    return summary(spec, step_end, step_tokens, step_loss, loop["start"], per_step)


# ------------------------------------------------------------------------------------------ parent

def prepare(args, work: Path) -> dict:
    """Prompts, model and posttrain's batch order, written once and shared by both children."""
    from posttrain.config import build_config
    from posttrain.data.batching import batch_indices
    from posttrain.demo.tasks import make_tasks
    from posttrain.modeling import load_tokenizer
    from posttrain.stages import STAGES
    from posttrain.train import prepare_data

    tasks = make_tasks(args.steps * args.batch_size, seed=SEED)
    rows = [{"prompt": [{"role": "user", "content": t.prompt}], "answer": t.answer} for t in tasks]
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = make_model(args, work)
    spec = {"model": str(model_dir), "data": str(data), "steps": args.steps, "batch_size": args.batch_size,
            "num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens,
            "max_length": args.max_length, "warmup": args.warmup, "profile": args.profile,
            "torch_threads": args.threads}
    config = build_config(posttrain_raw_config({**spec, "out": str(work / "check")}))
    tokenizer = load_tokenizer(str(model_dir))
    features = prepare_data(config, STAGES["grpo"], tokenizer)["train"]
    if len(features) != len(rows):
        raise SystemExit("posttrain dropped prompts while encoding")
    for i, (row, feat) in enumerate(zip(rows, features)):  # TRL's own tokenization of the prompt
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        if list(ids) != feat["input_ids"]:
            raise SystemExit(f"prompt {i}: TRL's chat-template tokenization differs from posttrain's")
        if len(feat["input_ids"]) + args.max_new_tokens > args.max_length:
            raise SystemExit(f"prompt {i} + --max-new-tokens exceeds --max-length (posttrain would truncate it)")
    lengths = [len(f["input_ids"]) for f in features]
    # posttrain's own batch plan (its grpo default draws prompt batches at random, not grouped by length)
    batches = batch_indices(lengths, args.batch_size, seed=SEED, epoch=0, group_by_length=config.train.group_by_length)
    params, V = count_params(model_dir)
    return {**spec, "order": [i for b in batches[:args.steps] for i in b],
            "prompt_ids": [f["input_ids"] for f in features], "params": params, "vocab": V,
            "mean_prompt": round(sum(lengths) / len(lengths), 1), "max_prompt": max(lengths)}


def markdown(spec: dict, results: dict, command: str) -> str:
    lines = ["| precision | framework | completion tokens/s (wall) | per CPU-second | loop tokens/s (incl. warmup) | "
             "mean completion length | hit max_new_tokens | time: generate / score / update | peak RSS (MiB) | "
             "mean reward |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for precision, pair in results.items():
        for name in [n for n in ("posttrain", "trl") if n in pair]:
            r = pair[name]
            split = r["split"]
            total = sum(split.values())
            parts = " / ".join(f"{100 * split[k] / total:.0f}%" for k in ("generate_s", "score_s", "update_s"))
            label = {"posttrain": "posttrain (stage: grpo)", "trl": "TRL GRPOTrainer"}[name]
            lines.append(f"| {precision} | {label} | {r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | "
                         f"{r['loop_tokens_per_s']:.0f} | {r['mean_length']:.1f} | {100 * r['hit_max']:.0f}% | "
                         f"{parts} | {r['peak_rss_mb']:.0f} | {r['mean_reward']:.4f} |")
        if {"posttrain", "trl"} <= set(pair):
            p, t = pair["posttrain"], pair["trl"]
            lines.append(f"| {precision} | **posttrain / TRL** | **{p['tokens_per_s'] / t['tokens_per_s']:.2f}x** | "
                         f"{p['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x | "
                         f"{p['loop_tokens_per_s'] / t['loop_tokens_per_s']:.2f}x | | | | "
                         f"**{p['peak_rss_mb'] / t['peak_rss_mb']:.2f}x** | |")
    B, G = spec["batch_size"], spec["num_generations"]
    setup = (f"Model: Qwen2-shaped `{spec['size']}` ({spec['params'] / 1e6:.1f}M parameters, {spec['vocab']} "
             f"embedding rows, tied head). {B} prompts x G={G} = {B * G} completions per step, at most "
             f"{spec['max_new_tokens']} new tokens, temperature 1; {spec['steps']} steps ({spec['warmup']} warmup "
             f"steps not timed; best of {spec['repeats']} interleaved runs), lr {LR}. Prompts: "
             f"{len(spec['order'])} `make_tasks` prompts (mean {spec['mean_prompt']} tokens, max "
             f"{spec['max_prompt']}).")
    return "\n".join([f"Command: `{command}`", "", machine_line(spec, versions()), "", setup, "", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def grpo_arguments(parser):
        parser.add_argument("--num-generations", type=int, default=4, help="G: completions per prompt")
        parser.add_argument("--max-new-tokens", type=int, default=64)
        parser.add_argument("--frameworks", default="posttrain,trl", help="comma-separated: posttrain,trl")
        parser.add_argument("--threads", type=int, default=1,
                            help="torch threads in the children (0: torch's default). Default 1: with 2 threads on a "
                                 "2-core machine that other processes also use, steps ran 20x slower")

    add_arguments(parser, batch_size_help="prompts per step (x G completions)", runs_of="framework",
                  extra=grpo_arguments)
    # fp32 by default: bf16 autocast is emulated (several times slower) on CPUs without AVX512-BF16 / AMX
    parser.set_defaults(size="small", steps=10, batch_size=4, embedding_rows=0, precision="fp32")
    next(a for a in parser._actions if a.dest == "quick").help = "tiny model, 3 steps, 32 new tokens: a smoke test"
    args = parser.parse_args()
    if args.child:
        common.child_main(args, {"posttrain": child_posttrain, "trl": child_trl})
        return
    if args.quick:
        args.size, args.steps, args.precision, args.max_new_tokens = "tiny", 3, "fp32", 32
        args.warmup = min(args.warmup, 1)
    command = "python benchmarks/grpo.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = {**prepare(args, work), "size": args.size, "repeats": args.repeats}
        frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
        results = run_repeats(args, str(HERE), spec, frameworks, None, work,
                              lambda r: f"mean length {r['mean_length']}, split {r['split']}")
        table = markdown(spec, results, command.strip())
        print()
        print(table)
        (work / "results.json").write_text(json.dumps({"spec": {k: v for k, v in spec.items()
                                                                if k not in ("order", "prompt_ids")},
                                                       "results": results}, indent=1))


if __name__ == "__main__":
    main()
