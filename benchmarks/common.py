"""Shared machinery of the preference benchmarks (`dpo.py`, `rm.py`): posttrain vs TRL on the same model, the
same pairs and the same batches, each framework in a fresh child process.

The method is the one of `sft.py` (see benchmarks/README.md):

* model: a randomly initialised Qwen2-shaped model from `posttrain.init_model`, its embedding (and tied LM
  head) widened to `--embedding-rows` (default 32000, a real vocabulary's size; 0 keeps the small BPE size).
  fp32 weights and optimizer state on both sides; `bf16` = bf16 autocast through accelerate on both sides.
  For `rm` the parent writes one sequence-classification checkpoint (posttrain's reward head init, seeded) that
  both sides load, so both start from the same reward head;
* data: preference pairs made from `posttrain.demo.data.make_sft_rows` (single-turn): the prompt is the
  conversation up to the user turn (the restaurant rows carry the system prompt), chosen is its right answer,
  rejected the answer of another row (a wrong answer). OpenAI-message form, one file for both sides;
* tokens: TRL tokenizes prompt and prompt+response with the chat template; its template is posttrain's ChatML
  with the newline after a conversation-final assistant `<|im_end|>` left out (posttrain's response ends at
  `<|im_end|>`). The parent checks that this gives exactly posttrain's prompt / chosen / rejected ids, and the
  TRL child checks its tokenized dataset against them again (it aborts otherwise). No example is truncated;
* batches: posttrain's own batch order (`batch_indices` over the pairs' token counts, length-grouped) is
  replayed to TRL with the dataset written in that order and `train_sampling_strategy="sequential"`;
* optimisation: AdamW lr 5e-5 (betas 0.9/0.999, eps 1e-8, no weight decay), cosine, no warmup, clip 1.0,
  grad_accum 1, no gradient checkpointing (TRL's configs default it on: set off), seed 42;
* tokens counted: the real (non-pad) tokens of the chosen and the rejected sequence of every pair (the prompt
  counted in each): posttrain's per-step token count, TRL's `attention_mask.sum()` of each batch.

TRL is a bench-only dependency, imported only inside the TRL children.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SEED = 42
LR = 5e-5
BETA = 0.1

# posttrain's ChatML turn end, and TRL's variant: no newline after a conversation-final assistant turn, so that
# TRL's prompt+response rendering ends where posttrain's response ends (at <|im_end|>)
TURN_END = "{{ '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
TRL_TURN_END = ("{{ '<|im_end|>' }}{%- if not (loop.last and message.role == 'assistant') %}{{ '\\n' }}"
                "{%- endif %}{%- endif %}{%- endfor %}")


def trl_template() -> str:
    from posttrain.init_model import CHAT_TEMPLATE

    if CHAT_TEMPLATE.count(TURN_END) != 1:
        raise SystemExit("posttrain.init_model.CHAT_TEMPLATE changed shape: cannot derive TRL's template")
    return CHAT_TEMPLATE.replace(TURN_END, TRL_TURN_END)


# ------------------------------------------------------------------------------------------ measuring

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


CPU_AT_STEP_END: list[float] = []  # process CPU time (all threads) at each step end: robust to other load


def summarize(step_end: list[float], step_tokens: list[int], step_loss: list[float], loop_s: float,
              warmup: int, *, loss_digits: int = 6, with_step_tokens: bool = True) -> dict:
    n = len(step_end)
    w = min(warmup, n - 1)
    timed_tokens = sum(step_tokens[w:])
    timed_s = step_end[-1] - step_end[w - 1] if w > 0 else loop_s
    cpu_s = CPU_AT_STEP_END[-1] - CPU_AT_STEP_END[w - 1] if w > 0 else float("nan")
    return {"steps": n, "warmup_steps": w, "timed_tokens": timed_tokens, "timed_s": round(timed_s, 3),
            "tokens_per_s": round(timed_tokens / max(timed_s, 1e-9), 1),
            "timed_cpu_s": round(cpu_s, 3), "tokens_per_cpu_s": round(timed_tokens / max(cpu_s, 1e-9), 1),
            "loop_s": round(loop_s, 3), "loop_tokens_per_s": round(sum(step_tokens) / max(loop_s, 1e-9), 1),
            **({"step_tokens": step_tokens} if with_step_tokens else {}), "final_loss": round(step_loss[-1], 4),
            "final_loss_last5": round(sum(step_loss[-5:]) / len(step_loss[-5:]), 4),
            "losses": [round(x, loss_digits) for x in step_loss]}


def time_posttrain_steps() -> tuple[list[float], list[int], list[float], dict]:
    """Wrap posttrain's `Trainer._train_step` to record each step's end (wall and CPU), tokens and loss; returns
    (step_end, step_tokens, step_loss, loop) with loop["start"] set when the first step begins."""
    import posttrain.trainer as trainer_mod

    step_end, step_tokens, step_loss = [], [], []
    original = trainer_mod.Trainer._train_step
    loop = {}

    def timed_step(self, step_batches):
        loop.setdefault("start", time.perf_counter())
        result = original(self, step_batches)
        step_end.append(time.perf_counter())
        CPU_AT_STEP_END.append(time.process_time())
        step_tokens.append(int(result["tokens"]))
        step_loss.append(float(result["loss"]))
        return result

    trainer_mod.Trainer._train_step = timed_step
    return step_end, step_tokens, step_loss, loop


def timed_trl_trainer(base):
    """A subclass of the TRL trainer class `base` that counts each step's real tokens and loss, and the callback
    that records them at each step end: returns (Trainer, callback, step_end, step_tokens, step_loss, loop)."""
    from transformers import TrainerCallback

    step_end, step_tokens, step_loss = [], [], []
    pending = {"tokens": 0, "loss": 0.0}
    loop = {}

    class Trainer(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loop.setdefault("start", time.perf_counter())
            pending["tokens"] += int(inputs["attention_mask"].sum())
            loss = super().training_step(model, inputs, num_items_in_batch)
            pending["loss"] += float(loss)
            return loss

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end.append(time.perf_counter())
            CPU_AT_STEP_END.append(time.process_time())
            step_tokens.append(pending["tokens"])
            step_loss.append(pending["loss"])
            pending.update(tokens=0, loss=0.0)

    return Trainer, StepTimer(), step_end, step_tokens, step_loss, loop


def profiled(fn, spec: dict):
    if not spec.get("profile"):
        return fn()
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    try:
        return fn()
    finally:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(45)


# ------------------------------------------------------------------------------------------ data

def make_pairs(n: int, seed=SEED) -> list[dict]:
    """`n` preference pairs {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}: a single-turn
    make_sft_rows conversation, its answer as chosen and another row's (different) answer as rejected."""
    from posttrain.demo.data import make_sft_rows

    rows = make_sft_rows(n + 8, seed=seed, multi_turn=False)
    answers = [r["messages"][-1]["content"] for r in rows]
    pairs = []
    for i, row in enumerate(rows[:n]):
        wrong = next(answers[j % len(rows)] for j in range(i + 1, i + len(rows)) if answers[j % len(rows)] != answers[i])
        pairs.append({"prompt": row["messages"][:-1], "chosen": [row["messages"][-1]],
                      "rejected": [{"role": "assistant", "content": wrong}]})
    return pairs


def posttrain_raw_config(spec: dict, stage: str, variant: dict) -> dict:
    raw = {"stage": stage, "model": spec["model"], "output_dir": spec["out"], "overwrite_output_dir": True,
           "data": {"train": spec["data"], "max_length": spec["max_length"]},
           "train": {"max_steps": spec["steps"], "batch_size": spec["batch_size"], "grad_accum": 1, "lr": LR,
                     "weight_decay": 0.0, "warmup_steps": 0, "scheduler": "cosine", "max_grad_norm": 1.0,
                     "seed": SEED, "bf16": spec.get("precision") == "bf16", "group_by_length": True,
                     "log_steps": spec["steps"]}}
    if stage == "dpo":
        raw["dpo"] = {"loss": "sigmoid", "beta": BETA, "reference": variant.get("reference", "precompute"),
                      "prefix_sharing": bool(variant.get("prefix_sharing"))}
    else:
        raw["rm"] = {"center_coef": 0.0, "prefix_sharing": bool(variant.get("prefix_sharing"))}
    return raw


def make_model(args, work: Path) -> Path:
    """The randomly initialised Qwen2-shaped model (`--size`, BPE `--vocab-size` trained on the generated corpus,
    embedding widened to `--embedding-rows`), written once under `work`; returns its directory."""
    from posttrain.demo.data import make_sft_rows
    from posttrain.init_model import init_model

    corpus = [f"{m['role']}\n{m['content']}" for r in make_sft_rows(2000, seed="corpus") for m in r["messages"]]
    model_dir = work / f"model-{args.size}-{args.embedding_rows}"
    if args.size in REAL_SHAPES and not (model_dir / "config.json").is_file():
        return real_shape_model(args.size, corpus, args.vocab_size, model_dir)
    if not (model_dir / "config.json").is_file():
        init_model("qwen2", args.size, corpus, model_dir, vocab_size=args.vocab_size, seed=0)
        if args.embedding_rows:
            # Real models carry 32k-150k embedding rows; the generated corpus only supports a small BPE
            # vocabulary, so the embedding (and tied LM head) is widened to a realistic size. The extra rows
            # are never produced by the tokenizer but cost what they cost in a real model's head.
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dir)
            model.resize_token_embeddings(args.embedding_rows, mean_resizing=False)
            model.save_pretrained(model_dir)
    return model_dir


# published models' shapes, built with random weights: the tokenizer is the BPE trained on the generated corpus
# (its ids are the first rows of the real-size embedding)
REAL_SHAPES = {"qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                    num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                    tie_word_embeddings=True)}


def real_shape_model(size: str, corpus: list[str], vocab_size: int, model_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from posttrain.init_model import init_model

    small = init_model("qwen2", "tiny", corpus, model_dir.with_name(model_dir.name + "-tokenizer"),
                       vocab_size=vocab_size, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(small)
    torch.manual_seed(0)
    config = Qwen2Config(**REAL_SHAPES[size], eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig.from_pretrained(small)  # the chat template's stop tokens
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def count_params(model_dir) -> tuple[int, int]:
    """(parameters, embedding rows) of the Qwen2-shaped model in `model_dir`, LM head tied."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model_dir)
    h, L, inter, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    params = V * h + L * (h * h * 2 + h * kv * 2 + h + 2 * kv + 3 * h * inter + 2 * h) + h  # tied head
    return params, V


def prepare(args, work: Path, stage: str) -> dict:
    """Pairs, model and posttrain's batch order, written once and shared by every child."""
    from posttrain.config import build_config
    from posttrain.data.batching import batch_indices
    from posttrain.modeling import load_tokenizer
    from posttrain.stages import STAGES
    from posttrain.stages.pairwise import pair_tokens
    from posttrain.train import prepare_data

    pairs = make_pairs(args.steps * args.batch_size)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    model_dir = make_model(args, work)
    tokenizer = load_tokenizer(str(model_dir))
    if stage == "rm":  # one reward-model start for both sides: posttrain's head init, seeded as in a run
        import torch
        from posttrain.modeling import load_model

        rm_dir = work / f"rm-init-{args.size}-{args.embedding_rows}"
        if not (rm_dir / "config.json").is_file():
            torch.manual_seed(SEED)
            load_model(str(model_dir), "reward", tokenizer=tokenizer).save_pretrained(rm_dir)
            tokenizer.save_pretrained(rm_dir)
        model_dir = rm_dir

    spec = {"stage": stage, "model": str(model_dir), "data": str(data), "steps": args.steps,
            "batch_size": args.batch_size, "max_length": args.max_length, "warmup": args.warmup,
            "profile": args.profile}
    config = build_config(posttrain_raw_config({**spec, "out": str(work / "check")}, stage, {}))
    features = prepare_data(config, STAGES[stage], tokenizer)["train"]
    if len(features) != len(pairs):
        raise SystemExit("posttrain dropped pairs while encoding; the TRL order would not match")
    if any(f["truncated"] for f in features):
        raise SystemExit(f"some pairs exceed --max-length {args.max_length}: raise it (truncation rules differ)")
    # the check TRL's side will make, done here without TRL: its template renders posttrain's ids
    template = trl_template()

    def ids(messages, generation_prompt=False):
        return list(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                                  add_generation_prompt=generation_prompt)["input_ids"])

    for i, (pair, feat) in enumerate(zip(pairs, features)):
        prompt = ids(pair["prompt"], True)
        for side in ("chosen", "rejected"):
            full = ids(pair["prompt"] + pair[side])
            if prompt != feat["prompt_ids"] or full != feat["prompt_ids"] + feat[f"{side}_ids"]:
                raise SystemExit(f"pair {i}: TRL's template does not give posttrain's {side} tokens")
    feats = work / "features.json"
    feats.write_text(json.dumps([{k: f[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for f in features]))
    lengths = [pair_tokens(f) for f in features]
    batches = batch_indices(lengths, args.batch_size, seed=SEED, epoch=0, group_by_length=True)
    order = [i for b in batches[:args.steps] for i in b]
    widths = [max(len(features[i]["prompt_ids"]) + max(len(features[i]["chosen_ids"]), len(features[i]["rejected_ids"]))
                  for i in b) for b in batches[:args.steps]]

    params, V = count_params(model_dir)
    prompt_tokens = sum(2 * len(features[i]["prompt_ids"]) for i in order)
    response_tokens = sum(len(features[i]["chosen_ids"]) + len(features[i]["rejected_ids"]) for i in order)
    return {**spec, "features": str(feats), "order": order, "params": params, "vocab": V, "pairs": len(pairs),
            "mean_pair_tokens": round(sum(lengths) / len(lengths), 1), "max_sequence": max(
                len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) for f in features),
            "tokens_in_steps": prompt_tokens + response_tokens, "prompt_tokens_in_steps": prompt_tokens,
            "response_tokens_in_steps": response_tokens,
            "padded_tokens_in_steps": sum(2 * w * len(b) for w, b in zip(widths, batches[:args.steps]))}


# ------------------------------------------------------------------------------------------ children

def child_posttrain(spec: dict) -> dict:
    from posttrain.config import build_config
    from posttrain.train import run_training

    step_end, step_tokens, step_loss, loop = time_posttrain_steps()
    pre = {"s": 0.0}
    if spec["stage"] == "dpo":  # time the reference pass (before the first step, outside the step timing)
        import posttrain.stages.dpo as dpo_mod
        precompute = dpo_mod.precompute_reference

        def timed_precompute(*a, **k):
            t = time.perf_counter()
            precompute(*a, **k)
            pre["s"] += time.perf_counter() - t

        dpo_mod.precompute_reference = timed_precompute
    config = build_config(posttrain_raw_config(spec, spec["stage"], spec["variant"]))
    profiled(lambda: run_training(config), spec)
    result = summarize(step_end, step_tokens, step_loss, step_end[-1] - loop["start"], spec["warmup"])
    result["precompute_s"] = round(pre["s"], 3)
    return result


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    stage, variant = spec["stage"], spec["variant"]
    pairs = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    order = spec["order"]  # posttrain's batches, flattened: TRL reads the dataset sequentially
    dataset = Dataset.from_list([pairs[i] for i in order])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.chat_template = trl_template()
    common = dict(output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
                  gradient_accumulation_steps=1, learning_rate=LR, weight_decay=0.0, adam_beta1=0.9,
                  adam_beta2=0.999, adam_epsilon=1e-8, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0,
                  seed=SEED, data_seed=SEED, bf16=spec["precision"] == "bf16", use_cpu=True,
                  max_length=spec["max_length"], train_sampling_strategy="sequential", dataloader_num_workers=0,
                  dataloader_drop_last=False, eval_strategy="no", save_strategy="no", logging_strategy="no",
                  report_to="none", gradient_checkpointing=False, dataset_num_proc=None)
    pre = {"s": 0.0}
    if stage == "dpo":
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer as Base

        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        args = DPOConfig(beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=variant["reference"] == "precompute",
                         **common)
    else:
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer as Base

        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
        args = RewardConfig(center_rewards_coefficient=None, **common)

    Timed, step_timer, step_end, step_tokens, step_loss, loop = timed_trl_trainer(Base)

    class Trainer(Timed):
        def _precompute_ref_logps(self, *a, **k):  # DPO only: runs inside __init__
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            pre["s"] += time.perf_counter() - t
            return out

    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[step_timer])
    # the tokenized dataset must be exactly what posttrain trains on
    expected = json.loads(Path(spec["features"]).read_text())
    ds = trainer.train_dataset
    if len(ds) != len(order):
        raise SystemExit(f"TRL kept {len(ds)} of {len(order)} pairs")
    for pos, i in enumerate(order):
        row, want = ds[pos], expected[i]
        if stage == "dpo":
            same = all(row[k] == want[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        else:
            same = all(row[f"{s}_ids"] == want["prompt_ids"] + want[f"{s}_ids"] for s in ("chosen", "rejected"))
        if not same:
            raise SystemExit(f"TRL tokenized pair {i} differently from posttrain")
    if stage == "dpo" and variant["reference"] == "precompute" and "ref_chosen_logps" not in ds.column_names:
        raise SystemExit("TRL did not precompute the reference log-probs")
    profiled(trainer.train, spec)
    trainer.save_model(spec["out"])  # a real job keeps its model (posttrain's run saves it): whole jobs compare both
    result = summarize(step_end, step_tokens, step_loss, step_end[-1] - loop["start"], spec["warmup"])
    result.update(precompute_s=round(pre["s"], 3), checked_same_tokens=True,
                  reference_model_in_memory=getattr(trainer, "ref_model", None) is not None)
    return result


# ------------------------------------------------------------------------------------------ parent

def run_child(script: str, name: str, precision: str, spec: dict, variants: dict | None, work: Path) -> dict:
    """Run `script --child` for variant `name` (without `variants`: `name` is the framework, no variant) in a
    fresh process; its log and result files go to `work`."""
    framework = variants[name]["framework"] if variants is not None else name
    variant = variants[name] if variants is not None else None
    out = work / f"out-{name}-{precision}"
    spec_file = work / f"spec-{name}-{precision}.json"
    spec_file.write_text(json.dumps({**spec, "precision": precision, "out": str(out), "variant": variant}))
    result_file = work / f"result-{name}-{precision}.json"
    result_file.unlink(missing_ok=True)
    log_file = work / f"log-{name}-{precision}.txt"
    started = time.time()
    with log_file.open("w") as log:
        proc = subprocess.run([sys.executable, script, "--child", framework, "--spec", str(spec_file),
                               "--result", str(result_file)], stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_file.is_file():
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"{name} {precision} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    result = json.loads(result_file.read_text())
    result["process_s"] = round(time.time() - started, 1)
    return result


def child_main(args, children: dict | None = None) -> None:
    """The child process: run `children[args.child]` (default: this module's posttrain / TRL children) on the
    spec, add the peak RSS and torch's thread count, write the result."""
    children = children or {"posttrain": child_posttrain, "trl": child_trl}
    spec = json.loads(Path(args.spec).read_text())
    result = children[args.child](spec)
    import torch
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(peak_rss_mb=round(peak_rss_mb(), 1), threads=torch.get_num_threads(),
                  process_cpu_s=round(usage.ru_utime + usage.ru_stime, 1))  # the whole child, start-up included
    Path(args.result).write_text(json.dumps(result))
    if args.child == "posttrain":  # end as the `posttrain` command ends (cli.finish), as part of the whole job
        from posttrain.cli import finish

        finish(0)


def versions() -> dict:
    from importlib.metadata import version
    out = {"python": platform.python_version()}
    for name in ("posttrain", "torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001
            out[name] = "?"
    return out


def machine_line(spec: dict, vers: dict) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.machine()}), torch threads {spec.get('threads', '?')}"
    return f"Machine: {cpu}. Versions: {', '.join(f'{k} {v}' for k, v in vers.items())}."


def add_arguments(parser, batch_size_help: str | None = "pairs per step (2x sequences)", runs_of: str = "variant",
                  extra=None) -> None:
    """The benchmarks' common flags; `extra(parser)` adds a script's own flags after --warmup."""
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help=batch_size_help)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--size", choices=("tiny", "small", "base", *REAL_SHAPES), default="base",
                        help="qwen2.5-0.5b: that model's shape and vocabulary (151936 rows), random weights")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary trained on the corpus")
    parser.add_argument("--embedding-rows", type=int, default=32000,
                        help="widen the embedding / LM head to this many rows, like a real model's vocabulary "
                             "(0: keep the BPE size)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps excluded from the timing")
    if extra is not None:
        extra(parser)
    parser.add_argument("--repeats", type=int, default=1,
                        help=f"run each {runs_of} this many times (interleaved) and report the fastest run")
    parser.add_argument("--quick", action="store_true", help="tiny model, 6 steps, batch 4: a smoke test")
    parser.add_argument("--profile", action="store_true", help="cProfile each child (printed into its log)")
    parser.add_argument("--workdir", help="keep data, model, logs and results here (default: a temp dir)")
    parser.add_argument("--child", choices=("posttrain", "trl"), help=argparse_suppress())
    parser.add_argument("--spec", help=argparse_suppress())
    parser.add_argument("--result", help=argparse_suppress())


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def run_repeats(args, script: str, spec: dict, selected: list[str], variants: dict | None, work: Path,
                describe) -> dict:
    """{precision: {name: fastest result}} over `args.repeats` interleaved runs of every selected name (see
    run_child for `variants`); prints a line per run, ending with `describe(result)` and the process time."""
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    results: dict = {}
    for precision in precisions:
        results[precision] = {}
        for rep in range(args.repeats):  # interleaved, so a burst of load on the machine hits every variant
            for name in selected:
                r = run_child(script, name, precision, spec, variants, work)
                spec["threads"] = r["threads"]
                best = results[precision].get(name)
                runs = (best or {}).get("runs_tokens_per_s", []) + [r["tokens_per_s"]]
                if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                    best = r
                best["runs_tokens_per_s"] = runs
                results[precision][name] = best
                print(f"{precision} {name} run {rep + 1}: {r['tokens_per_s']:.0f} tokens/s "
                      f"({r['tokens_per_cpu_s']:.0f} per CPU-s), peak RSS {r['peak_rss_mb']:.0f} MiB, "
                      f"{describe(r)} (process {r['process_s']}s)", flush=True)
    return results


def run_all(args, script: str, stage: str, variants: dict, selected: list[str], work: Path) -> tuple[dict, dict]:
    """Every selected variant for every precision, interleaved over repeats; the fastest run of each is kept."""
    spec = {**prepare(args, work, stage), "size": args.size, "repeats": args.repeats}
    results = run_repeats(args, script, spec, selected, variants, work,
                          lambda r: f"precompute {r['precompute_s']}s, loss step 1 {r['losses'][0]:.4f} "
                                    f"last {r['final_loss']:.4f}")
    (work / "results.json").write_text(json.dumps({"spec": {k: v for k, v in spec.items() if k != "order"},
                                                   "results": results}, indent=1))
    return spec, results


def markdown(spec: dict, results: dict, variants: dict, comparisons: list[tuple[str, str]], command: str) -> str:
    lines = ["| precision | run | tokens/s (wall) | tokens per CPU-second | loop tokens/s (incl. warmup) | "
             "reference pass (s) | peak RSS (MiB) | loss step 1 / last / mean last 5 |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for precision, runs in results.items():
        for name, r in runs.items():
            pre = f"{r['precompute_s']:.1f}" if variants[name].get("reference") == "precompute" else "-"
            lines.append(f"| {precision} | {variants[name]['label']} | {r['tokens_per_s']:.0f} | "
                         f"{r['tokens_per_cpu_s']:.0f} | {r['loop_tokens_per_s']:.0f} | {pre} | "
                         f"{r['peak_rss_mb']:.0f} | {r['losses'][0]:.4f} / {r['final_loss']:.4f} / "
                         f"{r['final_loss_last5']:.4f} |")
        for a, b in comparisons:
            if a not in runs or b not in runs:
                continue
            p, t = runs[a], runs[b]
            diff = max(abs(x - y) for x, y in zip(p["losses"], t["losses"]))
            lines.append(f"| {precision} | **{variants[a]['short']} / {variants[b]['short']}** | "
                         f"**{p['tokens_per_s'] / t['tokens_per_s']:.2f}x** | "
                         f"{p['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x | "
                         f"{p['loop_tokens_per_s'] / t['loop_tokens_per_s']:.2f}x | | "
                         f"**{p['peak_rss_mb'] / t['peak_rss_mb']:.2f}x** | max per-step loss diff {diff:.1e} |")
    setup = (f"Model: Qwen2-shaped `{spec['size']}` ({spec['params'] / 1e6:.1f}M parameters, {spec['vocab']} "
             f"embedding rows, tied head). Data: {spec['pairs']} pairs (mean {spec['mean_pair_tokens']} tokens per "
             f"pair, chosen + rejected with the prompt in each; longest sequence {spec['max_sequence']}). Batch "
             f"{spec['batch_size']} pairs, max_length {spec['max_length']}, {spec['steps']} steps ({spec['warmup']} "
             f"warmup steps not timed; best of {spec['repeats']} interleaved runs), lr {LR}. The steps cover "
             f"{spec['tokens_in_steps']} real tokens ({spec['prompt_tokens_in_steps']} prompt, "
             f"{spec['response_tokens_in_steps']} response; {spec['padded_tokens_in_steps']} with padding).")
    return "\n".join([f"Command: `{command}`", "", machine_line(spec, versions()), "", setup, "", *lines])


def main(script: str, stage: str, variants: dict, comparisons: list[tuple[str, str]], doc: str) -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--variants", default=",".join(variants),
                        help=f"comma-separated, from: {', '.join(variants)}")
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if args.quick:
        args.size, args.steps, args.batch_size, args.max_length = "tiny", 6, 4, 256
        args.warmup = min(args.warmup, 1)
    selected = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(selected) - set(variants)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(variants)}")
    command = f"python benchmarks/{Path(script).name} " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec, results = run_all(args, script, stage, variants, selected, work)
        table = markdown(spec, results, variants, comparisons, command.strip())
        print()
        print(table)
        (work / "table.md").write_text(table + "\n")
