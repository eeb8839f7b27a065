"""`posttrain demo`: the embedded default, end to end, offline on a CPU.

init-model (tokenizer + random model) -> pt on generated raw text -> sft on generated instruction data
(tasks and a restaurant helper persona) -> a few generations on held-out prompts, scored by the checker.
Every step writes its configs and outputs under OUT so the run can be inspected and repeated by hand.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import yaml

from ..config import load_config
from ..train import run_training
from .data import check, write_demo_data

log = logging.getLogger("posttrain")

FULL = dict(size="small", vocab=2048, pt_steps=250, sft_steps=500, batch=16, max_length=256, n_eval=40,
            data={"pretrain": 4000, "sft": 4000})
QUICK = dict(size="tiny", vocab=1024, pt_steps=40, sft_steps=60, batch=16, max_length=192, n_eval=12,
             data={"pretrain": 600, "sft": 800})


def _stage_config(out: Path, name: str, body: dict) -> Path:
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _train(out: Path, name: str, body: dict) -> dict:
    path = _stage_config(out, name, body)
    log.info("== %s: posttrain train %s", name, path)
    return run_training(load_config(path))


@torch.no_grad()
def generate_answers(model_dir: Path, prompts: list[list[dict]], max_new_tokens: int = 48) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    answers = []
    for start in range(0, len(texts), 16):
        batch = tokenizer(texts[start:start + 16], return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        for row in output[:, batch["input_ids"].shape[1]:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def run_demo(out: Path, quick: bool = False) -> dict:
    from ..init_model import init_model, read_corpus

    settings = QUICK if quick else FULL
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    files = write_demo_data(out / "data", seed=0, sizes=settings["data"])
    log.info("== init-model: %s tokenizer + random qwen2/%s model", settings["vocab"], settings["size"])
    init_model("qwen2", settings["size"], read_corpus([files["tokenizer_corpus"]]), out / "init",
               vocab_size=settings["vocab"], seed=0)
    common_train = dict(batch_size=settings["batch"], bf16=True, warmup_ratio=0.05, log_steps=5)
    _train(out, "pt", {"stage": "pt", "model": str(out / "init"), "output_dir": str(out / "pt"),
                       "data": {"train": str(files["pretrain"]), "max_length": settings["max_length"],
                                "packing": True, "eval_fraction": 0.02},
                       "train": {**common_train, "max_steps": settings["pt_steps"], "lr": 2e-3}})
    sft_summary = _train(out, "sft", {
        "stage": "sft", "model": str(out / "pt"), "output_dir": str(out / "sft"),
        "data": {"train": str(files["sft"]), "eval": str(files["sft_eval"]), "max_length": settings["max_length"]},
        "train": {**common_train, "max_steps": settings["sft_steps"], "lr": 1e-3,
                  "eval_steps": max(settings["sft_steps"] // 5, 1)}})

    tasks = [json.loads(line) for line in files["tasks_eval"].read_text().splitlines()][:settings["n_eval"]]
    prompts = [[{"role": "user", "content": t["prompt"]}] for t in tasks]
    answers = generate_answers(out / "sft", prompts)
    scores = [check(t["answer"], a) for t, a in zip(tasks, answers)]
    accuracy = sum(scores) / max(len(scores), 1)
    print("\nHeld-out prompts answered by the SFT model (greedy):")
    for task, answer, score in list(zip(tasks, answers, scores))[:8]:
        mark = "ok " if score >= 1 else "-- "
        print(f"  {mark}{task['prompt']!r}\n      -> {answer!r} (expected {task['answer']!r})")
    result = {"task_accuracy": accuracy, "sft_eval": sft_summary.get("final_eval"),
              "minutes": round((time.time() - started) / 60, 2), "model": str(out / "sft")}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print(f"\nheld-out task accuracy {accuracy:.0%} on {len(tasks)} prompts; "
          f"sft eval loss {result['sft_eval'].get('eval_loss', float('nan')):.3f}; "
          f"{result['minutes']} min. Model: {out / 'sft'}")
    return result
