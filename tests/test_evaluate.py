"""posttrain eval: every number checked against a direct computation on real tiny models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli, write_jsonl
from posttrain.config import build_config
from posttrain.data.encode import encode_all
from posttrain.data.formats import load_examples
from posttrain.demo.tasks import check
from posttrain.engine import Engine, SamplingParams
from posttrain.errors import ConfigError
from posttrain.evaluate import evaluate
from posttrain.modeling import load_model, load_tokenizer, save_pretrained
from posttrain.rl.rewards import model_source
from posttrain.score import score_file
from posttrain.train import run_training

WORDS = ["cat", "dog", "tea", "fish", "cake", "lamp", "tree", "book"]


def chat(word: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Reverse {word}"}, {"role": "assistant", "content": f"It is {word[::-1]}."}]}


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> Path:
    """The tiny model after a few SFT steps: it answers with short non-empty texts, unlike the random one."""
    root = tmp_path_factory.mktemp("eval")
    data = write_jsonl(root / "reverse.jsonl", [chat(w) for w in WORDS] * 4)
    run_training(build_config({"stage": "sft", "model": str(tiny_model), "output_dir": str(root / "sft"),
                               "data": {"train": str(data), "max_length": 32},
                               "train": {"max_steps": 30, "batch_size": 8, "lr": 5e-3, "seed": 0}}))
    return root / "sft"


def greedy(model_dir: Path, prompts: list[str], max_new_tokens: int = 8):
    engine = Engine.load(model_dir)
    return engine, engine.chat([[{"role": "user", "content": p}] for p in prompts],
                               SamplingParams(max_new_tokens=max_new_tokens, temperature=0))


def test_task_accuracy_against_a_hand_made_tasks_file(trained, tmp_path):
    prompts = [f"Reverse {w}" for w in WORDS]
    _, completions = greedy(trained, prompts)
    texts = [c.text for c in completions]
    assert sum(bool(t.strip()) for t in texts) >= 4, texts
    # even rows: the answer is what the model says (right unless it said nothing); odd rows: a wrong answer
    rows = [{"prompt": p, "answer": t if i % 2 == 0 else "zzz", "kind": "even" if i % 2 == 0 else "odd"}
            for i, (p, t) in enumerate(zip(prompts, texts))]
    tasks = write_jsonl(tmp_path / "tasks.jsonl", rows)
    result = evaluate(str(trained), tasks=str(tasks), max_new_tokens=8, batch_size=3,
                      generations_out=str(tmp_path / "gen.jsonl"))
    expected = [check(r["answer"], t) for r, t in zip(rows, texts)]
    assert result["tasks"] == len(rows)
    assert result["task_accuracy"] == pytest.approx(sum(expected) / len(rows))
    assert result["task_reward"] == pytest.approx(sum(expected) / len(rows))
    assert result["task_accuracy_by_kind"] == pytest.approx(
        {"even": sum(expected[0::2]) / 4, "odd": 0.0})
    assert result["task_accuracy_by_kind"]["even"] > 0
    written = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [w["response"] for w in written] == texts  # batched by length, returned in file order
    assert evaluate(str(trained), tasks=str(tasks), max_new_tokens=8, n_samples=2)["tasks"] == 2
    # sampled answers: near-zero temperature is greedy; a seed makes the sampled means reproducible
    cold = evaluate(str(trained), tasks=str(tasks), max_new_tokens=8, batch_size=3, samples=2, temperature=1e-4,
                    generations_out=str(tmp_path / "cold.jsonl"))
    assert cold["samples"] == 2 and cold["sampled_accuracy"] == pytest.approx(result["task_accuracy"])
    assert cold["sampled_reward"] == pytest.approx(result["task_reward"])
    # each prompt's sampled mean is written next to its greedy score (here the same: both answers are greedy)
    cold_rows = [json.loads(line) for line in (tmp_path / "cold.jsonl").read_text().splitlines()]
    assert [w["sampled_score"] for w in cold_rows] == pytest.approx(expected)
    assert all(w["sampled_score"] is None for w in written)  # not asked for
    hot = [evaluate(str(trained), tasks=str(tasks), max_new_tokens=8, batch_size=3, samples=3, temperature=2.0,
                    seed=7) for _ in range(2)]
    assert hot[0]["sampled_reward"] == hot[1]["sampled_reward"] and 0 <= hot[0]["sampled_accuracy"] <= 1
    assert result["sampled_reward"] is None  # not asked for
    with pytest.raises(ConfigError, match="temperature"):
        evaluate(str(trained), tasks=str(tasks), samples=2, temperature=0)


def direct_logps(model_dir: Path, sequences: list[tuple[list[int], list[int]]]) -> list[float]:
    """Sum of log p(response tokens), one unpadded sequence at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sums = []
    with torch.no_grad():
        for prompt, response in sequences:
            ids = torch.tensor([prompt + response])
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            token = logps.gather(-1, targets[:, None]).squeeze(-1)
            sums.append(float(token[len(prompt) - 1:].sum()))
    return sums


def test_kl_is_zero_against_itself_and_matches_a_direct_computation(trained, tiny_model, tmp_path):
    prompts = [f"Reverse {w}" for w in WORDS[:5]]
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": p, "answer": "x"} for p in prompts])
    same = evaluate(str(trained), tasks=str(tasks), reference=str(trained), max_new_tokens=6, batch_size=2)
    assert same["kl"] == 0.0 and same["kl_per_token"] == 0.0

    result = evaluate(str(trained), tasks=str(tasks), reference=str(tiny_model), max_new_tokens=6, batch_size=2)
    engine, completions = greedy(trained, prompts, max_new_tokens=6)
    sequences = [(engine.chat_prompt([{"role": "user", "content": p}]), c.token_ids)
                 for p, c in zip(prompts, completions)]
    policy, reference = direct_logps(trained, sequences), direct_logps(tiny_model, sequences)
    per_answer = [p - r for p, r in zip(policy, reference)]
    tokens = sum(len(c.token_ids) for c in completions)
    assert result["kl"] == pytest.approx(sum(per_answer) / len(per_answer), abs=1e-4)
    assert result["kl_per_token"] == pytest.approx(sum(per_answer) / tokens, abs=1e-4)
    assert result["kl"] > 0.1  # trained vs random: far apart


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_perplexity_is_exp_of_the_directly_computed_loss(trained, tmp_path, kind):
    if kind == "chat":
        path = write_jsonl(tmp_path / "chats.jsonl", [chat(w) for w in WORDS])
        examples, _ = load_examples(str(path), kind="conversation")
    else:
        path = tmp_path / "text.txt"
        path.write_text("\n\n".join(f"The word {w} reversed is {w[::-1]}." for w in WORDS))
        examples, _ = load_examples(str(path), kind="text")
    tokenizer = load_tokenizer(str(trained))
    features, _ = encode_all(examples, tokenizer, "sft" if kind == "chat" else "pt", max_length=64)
    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for f in features:  # HF's own loss: mean NLL over shifted labels != -100
            n = sum(label != -100 for label in f["labels"][1:])
            loss = model(torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss
            total, count = total + float(loss) * n, count + n
    result = evaluate(str(trained), data=str(path), max_length=64, batch_size=3)
    assert result["perplexity_tokens"] == count
    assert result["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    if kind == "chat":  # only the assistant turns are scored
        assert count < sum(len(f["input_ids"]) for f in features) / 2


def test_reward_model_score_and_pairwise_accuracy(trained, tiny_model, tmp_path):
    rm_dir = tmp_path / "rm"
    tokenizer = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    save_pretrained(load_model(str(tiny_model), "reward", tokenizer=tokenizer), tokenizer, rm_dir, "reward")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Reverse {w}", "chosen": w[::-1], "rejected": f"{w} {w}"} for w in WORDS])
    prompts = [f"Reverse {w}" for w in WORDS[:4]]
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": p, "answer": "x"} for p in prompts])
    result = evaluate(str(trained), tasks=str(tasks), reward_model=str(rm_dir), pairs=str(pairs), max_new_tokens=6)

    score_file(str(rm_dir), str(pairs), str(tmp_path / "scored.jsonl"))
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    margins = [r["chosen_reward"] - r["rejected_reward"] for r in scored]
    assert result["rm_pairs"] == len(WORDS)
    assert result["rm_pairwise_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert result["rm_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    _, completions = greedy(trained, prompts, max_new_tokens=6)
    rewards = model_source(str(rm_dir))(prompts, [c.text for c in completions])
    assert result["rm_score"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)


def test_eval_cli_writes_json(tiny_model, tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "Reverse cat", "answer": "tac", "kind": "reverse"}])
    data = write_jsonl(tmp_path / "chats.jsonl", [chat("cat")])
    out = tmp_path / "eval.json"
    shown = run_cli("eval", "--model", tiny_model, "--tasks", tasks, "--data", data, "--reference", tiny_model,
                    "--max-new-tokens", "4", "--out", out).stdout
    result = json.loads(out.read_text())
    assert result["tasks"] == 1 and result["task_accuracy_by_kind"] == {"reverse": result["task_accuracy"]}
    assert result["kl"] == 0.0 and result["perplexity"] > 1 and result["rm_score"] is None
    assert "perplexity:" in shown and "kl:" in shown
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate(str(tiny_model))
