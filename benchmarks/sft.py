"""SFT throughput and memory: posttrain vs TRL's SFTTrainer, same model, same data, same batches.

    python benchmarks/sft.py                      # fp32 and bf16, base model (41.6M params, 32000 embedding rows), 30 steps
    python benchmarks/sft.py --quick              # a few seconds per run, tiny model: a smoke test
    python benchmarks/sft.py --precision bf16 --steps 20 --batch-size 8 --max-length 256 --size base

What is compared (and kept identical on both sides):

* model: a randomly initialised Qwen2-shaped model written by `posttrain.init_model` (fp32 weights and
  optimizer state on both sides; `bf16` means bf16 autocast through accelerate on both sides);
* data: `posttrain.demo.data.make_sft_rows` rows (OpenAI "messages" form), the same file for both;
* trained tokens: the assistant turns, content plus the `<|im_end|>` that closes them (not the
  `<|im_start|>assistant\\n` header, not the newline after `<|im_end|>`). posttrain finds them from the
  tokenizer's own template; TRL gets the same template with `{% generation %}` tags around exactly those
  characters and `assistant_only_loss=True`. The parent process checks that both produce the same input_ids
  and the same trained positions, and the TRL child checks its tokenized dataset against them again;
* batches: posttrain's own batch order (`batch_indices`, length-grouped by default) is computed once and the
  TRL dataset is written in that order and read with `train_sampling_strategy="sequential"`, so every
  optimizer step sees the same examples on both sides (same padding, same tokens, comparable losses);
* optimisation: AdamW lr 5e-5 (betas 0.9/0.999, eps 1e-8, no weight decay), cosine schedule, no warmup,
  grad-norm clip 1.0, grad_accum 1, no packing, no padding-free, no gradient checkpointing, seed 42;
* no evaluation, no checkpoints during training, no logging integrations (TRL: report_to none,
  logging_strategy no; posttrain: one metrics line at the last step).

Measured in each child (a fresh subprocess per framework and precision):

* tokens/s: real (non-pad) input tokens of steps warmup+1..N divided by the wall time from the end of
  step `warmup` to the end of step N (model loading, data preparation, the first `--warmup` steps and
  saving are excluded). Also the loop's total time including the warmup steps;
* peak RSS: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the child at exit (whole process: imports,
  data, model, training, saving);
* loss: the mean trained-token NLL of the last step, and the mean over the last 5 steps.

TRL is a bench-only dependency: it is imported only inside the TRL child.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import (LR, SEED, add_arguments, child_main, count_params, machine_line, make_model, profiled,
                    run_repeats, summarize, time_posttrain_steps, timed_trl_trainer, versions)

HERE = Path(__file__).resolve().parent

# A turn of the tokenizer's ChatML template (posttrain.init_model.CHAT_TEMPLATE): header, body (content and tool
# calls), end. The TRL side gets the same template with {% generation %} tags around what posttrain trains in an
# assistant turn: the body plus the closing <|im_end|> (not the header, not the newline after <|im_end|>).
TURN_HEAD = "{{ '<|im_start|>' + message.role + '\\n' }}"
TURN_END = "{{ '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"


def generation_template() -> str:
    """posttrain.init_model.CHAT_TEMPLATE with generation tags around the assistant turns' trained text, so the
    two templates cannot drift apart (posttrain is imported lazily, as everywhere in this script)."""
    from posttrain.init_model import CHAT_TEMPLATE

    body = CHAT_TEMPLATE.partition(TURN_HEAD)[2].partition(TURN_END)[0]
    turn = TURN_HEAD + body + TURN_END
    tagged = (TURN_HEAD + "{%- if message.role == 'assistant' %}{% generation %}" + body
              + "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{%- else %}" + body + "{{ '<|im_end|>\\n' }}"
              + "{%- endif %}{%- endif %}{%- endfor %}")
    if not body or CHAT_TEMPLATE.count(turn) != 1:
        raise SystemExit("posttrain.init_model.CHAT_TEMPLATE changed shape: cannot add the generation tags")
    template = CHAT_TEMPLATE.replace(turn, tagged)
    assert template.count("{% generation %}") == 1 and template.count("{% endgeneration %}") == 1
    return template


# ------------------------------------------------------------------------------------------ children

def child_posttrain(spec: dict) -> dict:
    from posttrain.config import build_config
    from posttrain.train import run_training

    step_end, step_tokens, step_loss, loop = time_posttrain_steps()
    config = build_config(posttrain_raw_config(spec))
    profiled(lambda: run_training(config), spec)
    loop_s = step_end[-1] - loop["start"]
    return summarize(step_end, step_tokens, step_loss, loop_s, spec["warmup"], loss_digits=4,
                     with_step_tokens=False)


def posttrain_raw_config(spec: dict) -> dict:
    return {"stage": "sft", "model": spec["model"], "output_dir": spec["out"], "overwrite_output_dir": True,
            "data": {"train": spec["data"], "max_length": spec["max_length"], "packing": False},
            "train": {"max_steps": spec["steps"], "batch_size": spec["batch_size"], "grad_accum": 1, "lr": LR,
                      "weight_decay": 0.0, "warmup_steps": 0, "scheduler": "cosine", "max_grad_norm": 1.0,
                      "seed": SEED, "bf16": spec["precision"] == "bf16",
                      "group_by_length": spec["group_by_length"], "log_steps": spec["steps"]}}


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    order = spec["order"]  # posttrain's batches, flattened: TRL reads the dataset sequentially
    dataset = Dataset.from_list([rows[i] for i in order])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.chat_template = generation_template()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    args = SFTConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, seed=SEED,
        data_seed=SEED, bf16=spec["precision"] == "bf16", use_cpu=True,
        max_length=spec["max_length"], packing=False, padding_free=False, assistant_only_loss=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_drop_last=False,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
        gradient_checkpointing=False, dataset_num_proc=None)

    Trainer, step_timer, step_end, step_tokens, step_loss, loop = timed_trl_trainer(SFTTrainer)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[step_timer])
    # the tokenized dataset must be exactly what posttrain trains on
    expected = json.loads(Path(spec["features"]).read_text())
    ds = trainer.train_dataset
    for pos, i in enumerate(order):
        got_ids = ds[pos]["input_ids"]
        mask = ds[pos]["assistant_masks"] if "assistant_masks" in ds.column_names else None
        got_labels = ds[pos]["labels"] if "labels" in ds.column_names else [
            t if m else -100 for t, m in zip(got_ids, mask)]
        if got_ids != expected[i]["input_ids"] or got_labels != expected[i]["labels"]:
            raise SystemExit(f"TRL tokenized row {i} differently from posttrain")
    profiled(trainer.train, spec)
    loop_s = step_end[-1] - loop["start"]
    result = summarize(step_end, step_tokens, step_loss, loop_s, spec["warmup"], loss_digits=4,
                       with_step_tokens=False)
    result["checked_same_tokens_and_labels"] = True
    return result


# ------------------------------------------------------------------------------------------ parent

def prepare(args, work: Path) -> dict:
    """Data, model and posttrain's batch order, written once and shared by every child."""
    from posttrain.config import build_config
    from posttrain.data.batching import batch_indices
    from posttrain.demo.data import make_sft_rows
    from posttrain.modeling import load_tokenizer
    from posttrain.stages import STAGES
    from posttrain.train import prepare_data

    n_rows = args.steps * args.batch_size
    rows = make_sft_rows(n_rows, seed=SEED)
    data = work / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = make_model(args, work)

    spec = {"model": str(model_dir), "data": str(data), "steps": args.steps, "batch_size": args.batch_size,
            "max_length": args.max_length, "warmup": args.warmup, "group_by_length": args.group_by_length,
            "profile": args.profile}
    config = build_config(posttrain_raw_config({**spec, "out": str(work / "check"), "precision": "fp32"}))
    tokenizer = load_tokenizer(str(model_dir))
    features = prepare_data(config, STAGES["sft"], tokenizer)["train"]
    if len(features) != len(rows):
        raise SystemExit("posttrain dropped rows while encoding; the TRL order would not match")
    # the same check TRL's side will make, done here without TRL: template with generation tags -> masks
    gen_template = generation_template()
    for i, (row, feat) in enumerate(zip(rows, features)):
        enc = tokenizer.apply_chat_template(row["messages"], chat_template=gen_template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])[:args.max_length]  # both sides truncate to max_length
        labels = [t if m else -100 for t, m in zip(ids, enc["assistant_masks"])]
        if ids != feat["input_ids"] or labels != feat["labels"]:
            raise SystemExit(f"row {i}: the generation-tag template does not mark the tokens posttrain trains")
    feats = work / "features.json"
    feats.write_text(json.dumps([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]))
    lengths = [len(f["input_ids"]) for f in features]
    batches = batch_indices(lengths, args.batch_size, seed=SEED, epoch=0, group_by_length=args.group_by_length)
    order = [i for b in batches[:args.steps] for i in b]

    params, V = count_params(model_dir)
    trained = sum(sum(x != -100 for x in features[i]["labels"][1:]) for i in order)
    return {**spec, "features": str(feats), "order": order, "params": params, "vocab": V, "rows": len(rows),
            "mean_length": round(sum(lengths) / len(lengths), 1), "max_length_seen": max(lengths),
            "tokens_in_steps": sum(lengths[i] for i in order), "trained_tokens_in_steps": trained,
            "padded_tokens_in_steps": sum(max(lengths[i] for i in b) * len(b) for b in batches[:args.steps])}


def markdown(spec: dict, results: dict, vers: dict, command: str) -> str:
    lines = ["| precision | framework | tokens/s (wall) | tokens per CPU-second | loop tokens/s (incl. warmup) | "
             "peak RSS (MiB) | final loss (last step / mean last 5) |", "|---|---|---:|---:|---:|---:|---|"]
    for precision, pair in results.items():
        for name in [n for n in ("posttrain", "trl") if n in pair]:
            r = pair[name]
            label = {"posttrain": "posttrain", "trl": "TRL SFTTrainer"}[name]
            lines.append(f"| {precision} | {label} | {r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | "
                         f"{r['loop_tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['final_loss']:.4f} / {r['final_loss_last5']:.4f} |")
        p, t = pair["posttrain"], pair["trl"]
        lines.append(f"| {precision} | **posttrain / TRL** | **{p['tokens_per_s'] / t['tokens_per_s']:.2f}x** | "
                     f"{p['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x | "
                     f"{p['loop_tokens_per_s'] / t['loop_tokens_per_s']:.2f}x | "
                     f"{p['peak_rss_mb'] / t['peak_rss_mb']:.2f}x | |")
    setup = (f"Model: Qwen2-shaped `{spec['size']}` from `posttrain.init_model` ({spec['params'] / 1e6:.1f}M "
             f"parameters, {spec['vocab']} embedding rows — the BPE vocabulary trained on the generated corpus, widened like a real model's vocabulary —, tied LM head). Data: {spec['rows']} `make_sft_rows` "
             f"conversations (mean {spec['mean_length']} tokens, max {spec['max_length_seen']}). Batch "
             f"{spec['batch_size']}, max_length {spec['max_length']}, {spec['steps']} steps "
             f"({spec['warmup']} warmup steps not timed; best of {spec['repeats']} interleaved runs), lr {LR}, no packing, group_by_length="
             f"{spec['group_by_length']} (posttrain's batches, replayed in order by TRL). The {spec['steps']} steps "
             f"cover {spec['tokens_in_steps']} real tokens ({spec['padded_tokens_in_steps']} with "
             f"padding), {spec['trained_tokens_in_steps']} of them trained (assistant turns).")
    return "\n".join([f"Command: `{command}`", "", machine_line(spec, vers), "", setup, "", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def sft_arguments(parser):
        parser.add_argument("--no-group-by-length", dest="group_by_length", action="store_false")
        parser.add_argument("--frameworks", default="posttrain,trl",
                            help="comma-separated: posttrain,trl")

    add_arguments(parser, batch_size_help=None, runs_of="framework", extra=sft_arguments)
    args = parser.parse_args()

    if args.child:
        child_main(args, {"posttrain": child_posttrain, "trl": child_trl})
        return

    if args.quick:
        args.size, args.steps, args.batch_size, args.max_length = "tiny", 6, 4, 128
        args.warmup = min(args.warmup, 1)
    command = "python benchmarks/sft.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = {**prepare(args, work), "size": args.size, "repeats": args.repeats}
        frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
        results = run_repeats(args, __file__, spec, frameworks, None, work,
                              lambda r: f"final loss {r['final_loss']:.4f}")
        if not {"posttrain", "trl"} <= set(frameworks):
            print(json.dumps(results, indent=1))
            return
        table = markdown(spec, results, versions(), command.strip())
        print()
        print(table)
        (work / "results.json").write_text(json.dumps({"spec": {k: v for k, v in spec.items() if k != "order"},
                                                       "results": results}, indent=1))


if __name__ == "__main__":
    main()
