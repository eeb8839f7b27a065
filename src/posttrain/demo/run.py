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
from .data import check, normalize_answer, write_demo_data

log = logging.getLogger("posttrain")

FULL = dict(size="small", vocab=2048, pt_steps=250, sft_steps=500, batch=16, max_length=256, n_eval=40,
            data={"pretrain": 4000, "sft": 4000})
QUICK = dict(size="small", vocab=2048, pt_steps=60, sft_steps=150, batch=16, max_length=192, n_eval=16,
             data={"pretrain": 1500, "sft": 2000})


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
def generate_answers(model_dir: Path, prompts: list[list[dict]], max_new_tokens: int = 96) -> list[str]:
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


def persona_prompts(path: Path) -> list[dict]:
    """First turns of the held-out restaurant-bot chats: the system persona + a question, and the reference."""
    found = []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        if messages[0]["role"] == "system" and len(messages) >= 3 and messages[2]["role"] == "assistant":
            found.append({"messages": messages[:2], "reference": messages[2]["content"]})
    return found


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


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
    pt_summary = _train(out, "pt", {"stage": "pt", "model": str(out / "init"), "output_dir": str(out / "pt"),
                       "data": {"train": str(files["pretrain"]), "max_length": settings["max_length"],
                                "packing": True, "eval_fraction": 0.02},
                       "train": {**common_train, "max_steps": settings["pt_steps"], "lr": 2e-3}})
    sft_summary = _train(out, "sft", {
        "stage": "sft", "model": str(out / "pt"), "output_dir": str(out / "sft"),
        "data": {"train": str(files["sft"]), "eval": str(files["sft_eval"]), "max_length": settings["max_length"]},
        "train": {**common_train, "max_steps": settings["sft_steps"], "lr": 1e-3,
                  "eval_steps": max(settings["sft_steps"] // 5, 1)}})

    tasks = [json.loads(line) for line in files["tasks_eval"].read_text().splitlines()][:settings["n_eval"]]
    persona = persona_prompts(files["sft_eval"])[:settings["n_eval"]]
    task_answers = generate_answers(out / "sft", [[{"role": "user", "content": t["prompt"]}] for t in tasks])
    persona_answers = generate_answers(out / "sft", [p["messages"] for p in persona])
    task_scores = [check(t["answer"], a) for t, a in zip(tasks, task_answers)]
    persona_scores = [float(normalize_answer(a) == normalize_answer(p["reference"]))
                      for p, a in zip(persona, persona_answers)]
    print("\nHeld-out prompts answered by the SFT model (greedy decoding):")
    shown = list(zip([p["messages"][-1]["content"] for p in persona], persona_answers,
                     [p["reference"] for p in persona], persona_scores))[:4]
    shown += list(zip([t["prompt"] for t in tasks], task_answers, [t["answer"] for t in tasks], task_scores))[:6]
    for prompt, answer, expected, score in shown:
        print(f"  {'ok' if score >= 1 else '--'} {prompt!r}\n       -> {answer!r}" +
              ("" if score >= 1 else f" (expected {expected!r})"))
    result = {"task_accuracy": _mean(task_scores), "persona_exact_match": _mean(persona_scores),
              "held_out": {"tasks": len(tasks), "persona_questions": len(persona)},
              "pt_eval": pt_summary.get("final_eval"), "sft_eval": sft_summary.get("final_eval"),
              "minutes": round((time.time() - started) / 60, 2), "model": str(out / "sft")}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print(f"\nrestaurant-bot answers exactly right: {result['persona_exact_match']:.0%} of {len(persona)}; "
          f"held-out task accuracy: {result['task_accuracy']:.0%} of {len(tasks)}; "
          f"sft eval loss {result['sft_eval'].get('eval_loss', float('nan')):.3f}; {result['minutes']} min.")
    print(f"The model is a plain Hugging Face directory: {out / 'sft'} "
          f"(AutoModelForCausalLM.from_pretrained loads it; configs/ holds each stage's YAML).")
    return result
