"""`posttrain eval`: what a model does on held-out data, in numbers a report can put in a table.

One function, `evaluate`, computes every metric; the CLI, the recipe's `eval` step and the demo report
call it. Each metric needs its own input and is None when that input is not given:

* tasks (rows `{prompt, answer, kind}`, like the demo's tasks_eval.jsonl): one greedy answer per prompt
  from the generation engine; `task_accuracy` is the share the checker scores 1, `task_reward` the mean
  checker score, `task_accuracy_by_kind` the accuracy per `kind`; with `samples` K > 0, also K answers
  per prompt sampled at `temperature` (seeded): `sampled_accuracy` and `sampled_reward`, the same means over
  every sample, what RL optimises (it can sharpen the sampled answers without moving the greedy one);
* reward model (a `stage: rm` output): `rm_score`, the mean reward of those answers; with pairs
  (prompt/chosen/rejected), `rm_pairwise_accuracy` (share with r_chosen > r_rejected) and `rm_margin`;
* reference model: KL(policy || reference) on the policy's own answers, the k1 estimator summed over each
  answer's tokens (stop token included, as RL counts it) and averaged over answers:
      kl = mean_i sum_t [log pi(y_it | x_i, y_i<t) - log pi_ref(y_it | x_i, y_i<t)]
  and `kl_per_token` = the same sum over all answers / all answer tokens. Both models score the same
  tokens with the same teacher-forced forward, so a model against itself gives exactly 0. The answers are
  greedy, not samples from pi, so this is the log-ratio on what the model says, not an unbiased KL
  estimate: it can come out (slightly) negative;
* data (raw text or chats): `perplexity` = exp(`eval_loss`), the token-weighted mean NLL over the tokens
  training would train on (`encode`: every text token for pt, assistant turns for chats).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Callable

import torch

from .data.batching import collate
from .data.encode import IGNORE, encode_all
from .data.examples import Feedback
from .data.formats import detect_format, load_examples
from .data.pairs import encode_feedback, encode_preference
from .data.sources import read_rows
from .engine import Completion, Engine, SamplingParams
from .errors import ConfigError
from .generate import encode_prompts, read_image_prompts
from .forward import sequence_logps
from .stages.lm import lm_evaluate

log = logging.getLogger("posttrain")

METRICS = ("tasks", "task_accuracy", "task_reward", "task_accuracy_by_kind", "response_tokens", "truncated",
           "sampled_accuracy", "sampled_reward", "samples",
           "rm_score", "rm_pairwise_accuracy", "rm_margin", "rm_pairs", "kl", "kl_per_token",
           "perplexity", "eval_loss", "perplexity_tokens")


def evaluate(model: str, *, adapter: str | None = None, tasks: str | None = None, data: str | None = None,
             pairs: str | None = None, reward_model: str | None = None, reference: str | None = None,
             max_new_tokens: int = 64, n_samples: int | None = None, batch_size: int = 16,
             max_length: int = 1024, checker: str | Callable | None = None, chat_template: str | None = None,
             generations_out: str | None = None, samples: int = 0, temperature: float = 1.0,
             rag=None, seed: int = 0, quantize: str | None = None, device: str | None = None,
             dtype: str | None = None) -> dict:
    """Every metric the inputs allow (see the module docstring); the others are None. Every model (the evaluated
    one, the reference, the reward model) is loaded on `device` in `dtype` (None / "auto": a GPU in bf16 when
    there is one, else the CPU in fp32), one at a time."""
    if batch_size < 1 or (n_samples is not None and n_samples < 1):
        raise ConfigError("eval: batch_size and n_samples must be at least 1")
    if samples < 0 or not temperature > 0:
        raise ConfigError("eval: samples must be >= 0 and temperature > 0")
    if pairs and not reward_model:
        raise ConfigError("eval: pairwise accuracy on pairs needs a reward model (--reward-model)")
    if not (tasks or data or pairs):
        raise ConfigError("eval: nothing to evaluate; give tasks (--tasks), data (--data) or pairs (--pairs)")
    result: dict = {"model": str(model), "adapter": adapter and str(adapter), **dict.fromkeys(METRICS)}
    from .modeling import resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    engine = Engine.load(model, adapter, chat_template=chat_template, quantize=quantize, device=device, dtype=dtype)
    rows, prompts, completions, checks, scores, sampled = [], [], [], None, None, None
    if tasks:
        rows, prompts, completions, pictures = _answer(engine, tasks, max_new_tokens, n_samples, batch_size, rag)
        if any(pictures) and (reference or reward_model):
            raise ConfigError("eval: the KL to a reference and reward-model scores read text only; the tasks "
                              f"in {tasks} have images (leave out --reference / --reward-model)")
        metrics, checks = _task_metrics(rows, completions, _checker(checker))
        result.update(metrics)
        if samples:
            metrics, sampled = _sampled(engine, rows, prompts, pictures, _checker(checker), samples, temperature,
                                        seed, max_new_tokens, batch_size)
            result.update(metrics)
    policy_logps = _logps(engine.model, engine.tokenizer.pad_token_id, prompts, completions, batch_size) \
        if reference and completions else None
    if data:
        result.update(perplexity(engine.model, engine.tokenizer, data, max_length, batch_size))
    policy_vocab = engine.tokenizer.get_vocab()
    del engine  # one model in memory at a time
    if policy_logps is not None:
        result.update(_kl(reference, policy_vocab, prompts, completions, policy_logps, batch_size, device, dtype))
    if reward_model:
        from .score import load_reward_model

        rm, rm_tokenizer, offset = load_reward_model(reward_model, device, dtype)
        if completions:
            scores = _rm_scores(rm, rm_tokenizer, offset, [m for _, m in rows], [c.text for c in completions],
                                max_length, batch_size)
            result["rm_score"] = _mean(scores)
        if pairs:
            result.update(pairwise_accuracy(rm, rm_tokenizer, offset, pairs, max_length, batch_size))
    if generations_out and completions:
        _write_generations(generations_out, rows, completions, checks, scores, sampled)
    return result


# ---------------------------------------------------------------- task answers and the checker

def _answer(engine: Engine, path: str, max_new_tokens: int, n_samples: int | None, batch_size: int, rag=None):
    """Greedy answers for the task prompts, batched by prompt length (a row's answer does not depend on
    its neighbours), returned in file order. `rag` (a rag.prompt.Augmenter, `eval --rag INDEX`): each prompt's
    last user turn retrieves first and is answered in the serving template. A vision-language model's task rows
    may hold images, read as `generate` reads them; also returned: each prompt's Pictures (None: no image)."""
    read = read_image_prompts(path, images=engine.vision is not None)[:n_samples]
    if rag and any(images for _, _, images in read):
        raise ConfigError(f"eval --rag: the tasks in {path} have images; retrieval augments text prompts only")
    if rag:
        read = [(row, rag(messages)[0], images) for row, messages, images in read]
    rows = [(row, messages) for row, messages, _ in read]
    token_prompts, pictures = encode_prompts(engine, read)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    order = sorted(range(len(rows)), key=lambda i: len(token_prompts[i]))
    completions: list[Completion | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        for completion in engine.generate([token_prompts[i] for i in chosen], params,
                                          images=[pictures[i] for i in chosen]):
            completions[chosen[completion.prompt_index]] = completion
    log.info("eval: answered %d prompts (greedy, at most %d new tokens)", len(rows), max_new_tokens)
    return rows, token_prompts, completions, pictures


def _sampled(engine: Engine, rows, token_prompts, pictures, checker, samples: int, temperature: float, seed: int,
             max_new_tokens: int, batch_size: int) -> tuple[dict, list[float | None]]:
    """`samples` answers per prompt at `temperature`, each batch seeded (seed + its index): the checker's
    mean accuracy and score over all of them, and each prompt's mean score (None without an answer)."""
    per_prompt: list[list[float]] = [[] for _ in rows]
    for b, start in enumerate(range(0, len(rows), batch_size)):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=samples, seed=seed + b)
        chosen = range(start, min(start + batch_size, len(rows)))
        for c in engine.generate([token_prompts[i] for i in chosen], params, images=[pictures[i] for i in chosen]):
            i = chosen[c.prompt_index]
            answer = rows[i][0].data.get("answer")
            if answer is not None:
                per_prompt[i].append(float(checker(answer, c.text)))
    log.info("eval: %d sampled answers per prompt at temperature %g", samples, temperature)
    scores = [s for row in per_prompt for s in row]
    return ({"samples": samples, "sampled_accuracy": _mean([s >= 1.0 for s in scores]),
             "sampled_reward": _mean(scores)}, [_mean(row) for row in per_prompt])


def _checker(spec: str | Callable | None) -> Callable[[str, str], float]:
    """(answer, completion) -> score in [0, 1]: an exact match of the normalised answer (rl.rewards.exact_answer:
    first line, "Answer:" prefix and edge punctuation dropped) unless a callable or 'module:function' /
    'file.py:function' is given."""
    from .rl.rewards import exact_answer, load_callable

    if spec is None:
        return exact_answer
    return spec if callable(spec) else load_callable(spec)


def _task_metrics(rows, completions: list[Completion], checker) -> tuple[dict, list[float | None] | None]:
    """The metrics, and each answer's checker score (None for a row without an answer)."""
    metrics = {"tasks": len(rows), "response_tokens": _mean([len(c.token_ids) for c in completions]),
               "truncated": _mean([c.finish_reason == "length" for c in completions])}
    checks = [float(checker(row.data["answer"], c.text)) if row.data.get("answer") is not None else None
              for (row, _), c in zip(rows, completions)]
    answered = [(row.data.get("kind"), score) for (row, _), score in zip(rows, checks) if score is not None]
    if not answered:
        return metrics, None
    by_kind: dict[str, list[float]] = {}
    for kind, score in answered:
        by_kind.setdefault(str(kind), []).append(score)
    metrics.update(task_accuracy=_mean([s >= 1.0 for _, s in answered]), task_reward=_mean([s for _, s in answered]),
                   task_accuracy_by_kind={k: _mean([s >= 1.0 for s in v]) for k, v in sorted(by_kind.items())
                                          if k != "None"} or None)
    return metrics, checks


# ---------------------------------------------------------------- KL to a reference model

@torch.no_grad()
def _logps(model, pad_id: int, prompts: list[list[int]], completions: list[Completion],
           batch_size: int) -> tuple[list[float], list[int]]:
    """Per answer: the summed log-prob of its tokens given the prompt (teacher-forced), and its length."""
    features = [{"input_ids": p + c.token_ids, "labels": [IGNORE] * len(p) + c.token_ids}
                for p, c in zip(prompts, completions)]
    sums, counts = [0.0] * len(features), [0] * len(features)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate([features[i] for i in chosen], pad_id).items()}
        row_sums, row_counts = sequence_logps(model, batch)
        for i, s, n in zip(chosen, row_sums.tolist(), row_counts.tolist()):
            sums[i], counts[i] = s, n
    model.train(was_training)
    return sums, counts


def _kl(reference: str, policy_vocab: dict, prompts, completions, policy_logps, batch_size: int, device=None,
        dtype=torch.float32) -> dict:
    from .modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(reference))
    if tokenizer.get_vocab() != policy_vocab:
        raise ConfigError(f"eval: the reference model {reference} has a different tokenizer than the policy; "
                          "KL needs both to score the same token ids")
    ref_model = load_model(str(reference), tokenizer=tokenizer, dtype=dtype, device=device).eval()
    ref_sums, _ = _logps(ref_model, tokenizer.pad_token_id, prompts, completions, batch_size)
    sums, counts = policy_logps
    per_answer = [p - r for p, r in zip(sums, ref_sums)]
    return {"kl": _mean(per_answer), "kl_per_token": sum(per_answer) / max(sum(counts), 1)}


# ---------------------------------------------------------------- reward model

def _rm_scores(rm, tokenizer, offset: float, prompts: list[list[dict]], texts: list[str], max_length: int,
               batch_size: int) -> list[float]:
    """Each answer scored after its prompt messages, tokenized as stage rm tokenized its training data."""
    from .score import score_sequences

    sequences = []
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        f = encode_feedback(tokenizer, Feedback(prompt, [{"role": "assistant", "content": text}], True,
                                                f"answer {i}"), max_length)
        sequences.append(f["prompt_ids"] + f["completion_ids"])
    return score_sequences(rm, sequences, tokenizer.pad_token_id, offset, batch_size)


def pairwise_accuracy(rm, tokenizer, offset: float, pairs: str, max_length: int = 1024,
                      batch_size: int = 16) -> dict:
    """Share of pairs the reward model orders right (r_chosen > r_rejected; a tie counts as wrong)."""
    from .score import score_sequences

    examples, _ = load_examples(pairs, kind="preference")
    sequences = []
    for example in examples:
        f = encode_preference(tokenizer, example, max_length)
        sequences += [f["prompt_ids"] + f["chosen_ids"], f["prompt_ids"] + f["rejected_ids"]]
    rewards = score_sequences(rm, sequences, tokenizer.pad_token_id, offset, batch_size)
    margins = [c - r for c, r in zip(rewards[0::2], rewards[1::2])]
    return {"rm_pairwise_accuracy": _mean([m > 0 for m in margins]), "rm_margin": _mean(margins),
            "rm_pairs": len(margins)}


# ---------------------------------------------------------------- perplexity

def data_stage(path: str) -> str:
    """"pt" for raw text (a .txt file or `text` rows), "sft" for chats."""
    rows = read_rows(path)
    fmt = detect_format(rows, str(path)) if rows else "text"
    return "pt" if fmt in ("text", "classification") else "sft"


@torch.no_grad()
def perplexity(model, tokenizer, path: str, max_length: int = 1024, batch_size: int = 16) -> dict:
    """exp of the mean NLL over the tokens `encode` trains on (the same numbers as training's eval_loss)."""
    stage = data_stage(path)
    examples, _ = load_examples(path, kind="text" if stage == "pt" else "conversation")
    features, _ = encode_all(examples, tokenizer, stage, max_length=max_length)
    features.sort(key=lambda f: len(f["input_ids"]))
    device = next(model.parameters()).device
    batches = ({k: v.to(device) for k, v in collate(features[i:i + batch_size], tokenizer.pad_token_id).items()}
               for i in range(0, len(features), batch_size))
    metrics = lm_evaluate(model, batches, contextlib.nullcontext)
    return {"eval_loss": metrics["eval_loss"], "perplexity": math.exp(min(metrics["eval_loss"], 50.0)),
            "perplexity_tokens": metrics["eval_tokens"]}


# ---------------------------------------------------------------- output

def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def _write_generations(path: str, rows, completions, checks, scores, sampled=None) -> None:
    """One row per prompt: its greedy answer, the answer's checker score and reward-model score, and the
    mean checker score of its sampled answers (`sampled_score`, with --samples)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for i, ((row, _), c) in enumerate(zip(rows, completions)):
            record = {**row.data, "response": c.text, "finish_reason": c.finish_reason,
                      "score": checks[i] if checks else None, "rm_score": scores[i] if scores else None,
                      "sampled_score": sampled[i] if sampled else None}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_result(result: dict, out: str) -> Path:
    """The result as JSON, written to a temporary name and renamed (never half-written)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(path)
    return path


def format_result(result: dict) -> str:
    """One line per metric that was computed."""
    lines = []
    for key in METRICS:
        value = result.get(key)
        if value is None:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.3f}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"{key}: {value}")
    return "\n".join(lines)
