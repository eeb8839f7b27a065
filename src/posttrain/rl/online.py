"""What ppo and grpo share: prompts, the policy (+ critic) module, rollouts, token log-probs, evaluation.

An online step runs inside the one training loop (trainer.py): the loop hands the stage the prompts of a
step (train.batch_size x train.grad_accum per process), and the stage

  1. samples completions with the engine (KV cache, batched, left padded) from the current policy;
  2. scores them with the reward sources (rl/rewards.py);
  3. computes, without gradients and once per rollout, what the update needs (old log-probs, reference
     log-probs, values);
  4. runs `epochs` passes of `mini_batches` optimizer updates over the rollout, forward passes in
     micro-batches of train.batch_size prompts' completions;
and returns the step's metrics. The learning-rate schedule advances once per step (rollout).

Token tensors are flat: the positions that predict a response token, row after row (the order of
`selected.nonzero()`), so per-token quantities of a sequence are contiguous and the LM head runs on those
positions only.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.batching import collate
from ..data.examples import Prompt
from ..data.formats import LoadReport, as_sources
from ..engine import Engine, SamplingParams
from ..errors import ConfigError
from ..forward import scores_at, selection, token_logps, unwrap
from ..losses import IGNORE, logprob_mismatch, truncated_importance_weights
from ..modeling import disable_dropout
from ..reference import Reference
from .rewards import build_sources, score

# ------------------------------------------------------------------------------------------- prompts


def load_prompts(sources, *, kind="prompt", dataset_info=None, skip_invalid=False, text_split="paragraph",
                 max_samples=None) -> tuple[list[Prompt], LoadReport]:
    """Rows with `prompt` (a string or messages) or `messages`, and an optional `system`; every other
    column is kept for the reward functions. A bad row is an error naming its file, line and field."""
    from ..generate import read_prompts

    if dataset_info:
        raise ConfigError("ppo/grpo read prompt files directly; data.dataset_info is not supported here")
    report, prompts = LoadReport(), []
    for source in as_sources(sources):
        rows = read_prompts(source.path)[:source.max_samples]
        for row, messages in rows:
            key = "prompt" if "prompt" in row.data or "messages" not in row.data else "messages"
            columns = {k: v for k, v in row.data.items() if k not in (key, "system")}
            prompts.append(Prompt(messages, columns, source=str(row.location)))
        report.sources.append({"path": source.path, "format": "prompts", "rows": len(rows), "used": len(rows)})
    return prompts[:max_samples], report


@dataclass
class PromptStats:
    prompts: int = 0
    truncated: int = 0
    max_prompt_length: int = 0

    def summary(self) -> str:
        return (f"{self.prompts} prompts; {self.truncated} longer than {self.max_prompt_length} tokens kept "
                f"their last {self.max_prompt_length} tokens")


def encode_prompts(examples: list[Prompt], tokenizer, config) -> tuple[list[dict], PromptStats]:
    """Chat-template each prompt (with the generation prompt). Rule for long prompts: keep the last
    data.max_prompt_length tokens (default max_length - generation.max_new_tokens), counted."""
    limit = config.data.max_prompt_length or config.data.max_length - config.generation.max_new_tokens
    if limit < 1:
        raise ConfigError(f"data.max_length ({config.data.max_length}) leaves no room for a prompt next to "
                          f"generation.max_new_tokens ({config.generation.max_new_tokens})")
    stats = PromptStats(max_prompt_length=limit)
    features = []
    for example in examples:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(example.messages, add_generation_prompt=True, tokenize=False)
        elif len(example.messages) == 1:
            text = example.messages[0]["content"]
        else:
            raise ConfigError("this tokenizer has no chat template; set `chat_template:` for message prompts")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > limit:
            ids, stats.truncated = ids[-limit:], stats.truncated + 1
        user = [m["content"] for m in example.messages if m["role"] in ("user", "tool")]
        features.append({"input_ids": ids, "prompt": user[-1] if user else "", "columns": example.columns,
                         "location": example.source})
    stats.prompts = len(features)
    return features, stats


# ------------------------------------------------------------------------------------------- the module


class PolicyWithValue(nn.Module):
    """The policy and, for PPO, its critic in one module: one optimizer, one DDP wrapper, one checkpoint.

    forward(batch, temperature) returns the flat per-token log-probs of the trained (response) tokens under
    logits / temperature, the entropy there (no gradient; forward.token_logps never holds [tokens, vocab]
    logits) and, with a critic, the values at those positions: V_t is read at the position that predicts token
    t, i.e. the value of the prefix before it."""

    def __init__(self, policy: nn.Module, value_head: nn.Module | None = None, critic: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic = critic

    @property
    def config(self):  # the policy's: what the loop and the checks read
        return self.policy.config

    def forward(self, batch: dict, temperature: float = 1.0, values: bool = True):
        want_hidden = values and self.value_head is not None
        out = token_logps(self.policy, batch, temperature, with_hidden=want_hidden, with_entropy=True)
        value = None
        if want_hidden:
            value = self.value_head(out["hidden"]).squeeze(-1).float()
        elif values and self.critic is not None:  # a sequence classifier's head at every response position
            value = scores_at(self.critic, batch, selection(batch)[0])
        return out["logps"], out["entropy"], value


# ------------------------------------------------------------------------------------------- context


@dataclass
class OnlineContext:
    config: object
    tokenizer: object
    sources: list
    engine: Engine
    reference: Reference | None = None   # None: no KL to a reference is computed
    extra: dict = field(default_factory=dict)


def reference_logps(ctx: OnlineContext, actor: PolicyWithValue, batch: dict, temperature: float) -> torch.Tensor:
    return ctx.reference.token_logps(actor.policy, batch, temperature)


def setup_online(config, model, tokenizer, accelerator, options, need_reference: bool) -> OnlineContext:
    from accelerate.utils import DistributedType

    from ..modeling import frozen_dtype

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and
                                        accelerator.state.deepspeed_plugin.zero_stage == 3):
        raise ConfigError(f"stage {config.stage} samples with the whole policy on every process, which FSDP and "
                          f"DeepSpeed ZeRO-3 shard; launch it with examples/accelerate/ddp.yaml or zero2.yaml")
    # a reward model is frozen: on the training device, in the compute dtype
    sources = build_sources(config.rewards, device=accelerator.device, dtype=frozen_dtype(config))
    actor = unwrap(model)
    disable_dropout(actor)  # RL compares log-probs of the same tokens across passes: whatever train.disable_dropout
    reference = None
    if need_reference:
        reference = Reference.build(options.reference, config, tokenizer, accelerator.device, online=True)
    engine = Engine(actor.policy, tokenizer)
    if config.generation.backend == "vllm":  # same interface; the policy's weights are synced before each rollout
        from ..backends.vllm import VLLMGenerator

        engine = VLLMGenerator(config.model, tokenizer, engine.stop_token_ids, seed=config.train.seed,
                               gpu_memory_utilization=config.generation.vllm_gpu_memory_utilization,
                               max_model_len=config.data.max_length)
    return OnlineContext(config, tokenizer, sources, engine, reference)


# ------------------------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """Sequences (prompt + sampled response) and what was measured about them."""

    prompts: list[dict]            # the prompt features, one per sequence (repeated for each sample)
    sequences: list[dict]          # {"input_ids", "labels"}: labels are the response tokens, -100 elsewhere
    response_tokens: list[int]
    finish_reasons: list[str]
    texts: list[str]
    scores: torch.Tensor           # [N] reward sum (plus the missing-EOS penalty)
    metrics: dict
    sampler_logps: list[torch.Tensor] | None = None  # per sequence, the sampler's log-probs of its response tokens


def sampling_params(config, n: int, seed: int | None) -> SamplingParams:
    g = config.generation
    return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                          top_k=g.top_k, stop=list(g.stop), seed=seed, n=n)


def rollout(trainer, ctx: OnlineContext, prompts: list[dict], n: int, missing_eos_penalty: float | None,
            greedy: bool = False) -> Rollout:
    """n completions per prompt from the current policy, scored. Sampling is seeded by (seed, step, rank),
    so a resumed run samples what the uninterrupted one did; each sample has its own random stream (keyed by
    its index), so `generation.batch_size` changes how many decode at once, not what is sampled."""
    config = ctx.config
    seed = config.train.seed * 1_000_003 + trainer.state.step * 7919 + trainer.accelerator.process_index
    params = sampling_params(config, n, seed)
    if greedy:
        params.temperature, params.n = 0.0, 1
    started = time.perf_counter()
    if hasattr(ctx.engine, "sync"):  # vLLM holds its own copy of the weights: bring it up to date
        ctx.engine.sync(unwrap(trainer.model).policy)
    max_rows = config.generation.batch_size * params.n if config.generation.batch_size else None
    with trainer.accelerator.autocast():
        completions = ctx.engine.generate([p["input_ids"] for p in prompts], params, max_rows=max_rows)
    expanded = [prompts[c.prompt_index] for c in completions]
    sequences = [{"input_ids": p["input_ids"] + c.token_ids, "labels": [IGNORE] * len(p["input_ids"]) + c.token_ids}
                 for p, c in zip(expanded, completions)]
    columns = {k: [p["columns"].get(k) for p in expanded] for k in expanded[0]["columns"]}
    texts = [c.text for c in completions]
    names = [f"prompt {p['location']}" + (f" (sample {i % n + 1} of {n})" if n > 1 else "")
             for i, p in enumerate(expanded)]
    generated = time.perf_counter()
    values, metrics = score(ctx.sources, [p["prompt"] for p in expanded], texts, columns, names=names,
                            skip_invalid=getattr(getattr(config, config.stage), "skip_invalid_rewards", False))
    no_eos = [c.finish_reason == "length" for c in completions]
    scores = torch.tensor(values, dtype=torch.float32)
    if missing_eos_penalty:
        scores = scores + missing_eos_penalty * torch.tensor(no_eos, dtype=torch.float32)
    lengths = [len(c.token_ids) for c in completions]
    metrics = {k: v for k, v in metrics.items() if v is not None}
    metrics.update(response_length=sum(lengths) / len(lengths), no_eos_fraction=sum(no_eos) / len(no_eos),
                   **{"time/generate": generated - started, "time/score": time.perf_counter() - generated})
    return Rollout(expanded, sequences, lengths, [c.finish_reason for c in completions], texts, scores, metrics,
                   sampler_logps=[torch.tensor(c.logprobs, dtype=torch.float32) for c in completions])


def correct_for_sampler(ctx: OnlineContext, ro: Rollout, indices: list[int], old_logps: torch.Tensor,
                        per_token: torch.Tensor, sums: dict, first_epoch: bool) -> torch.Tensor:
    """The policy-gradient loss per token, weighted by truncated importance sampling when `generation.tis_cap` is
    set (losses.truncated_importance_weights: the trainer's old log-probs over the sampler's); on the first
    epoch it also adds |trainer - sampler| log-prob differences to sums (the `sampler_logprob_diff` metric)."""
    if ro.sampler_logps is None:
        return per_token
    sampled = gather(ro.sampler_logps, indices).to(per_token.device)
    if first_epoch:
        sums["sampler_logprob_diff"] = sums.get("sampler_logprob_diff", 0.0) + float(
            logprob_mismatch(old_logps, sampled).sum())
        sums["sampler_tokens"] = sums.get("sampler_tokens", 0.0) + float(len(sampled))
    cap = ctx.config.generation.tis_cap
    return per_token if cap is None else per_token * truncated_importance_weights(old_logps, sampled, cap)


def sampler_metrics(sums: dict) -> dict:
    if not sums.get("sampler_tokens"):
        return {}
    return {"sampler_logprob_diff": sums["sampler_logprob_diff"] / sums["sampler_tokens"]}


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def batch_of(trainer, ctx: OnlineContext, rollout: Rollout, indices: list[int]) -> dict:
    batch = collate([rollout.sequences[i] for i in indices], ctx.engine.pad_token_id)
    return {k: v.to(trainer.accelerator.device) for k, v in batch.items()}


def gather(per_sequence: list[torch.Tensor], indices: list[int]) -> torch.Tensor:
    """The flat per-token tensor of these sequences, in the order the forward returns tokens."""
    return torch.cat([per_sequence[i] for i in indices])


def split_tokens(flat: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(flat.detach().float().cpu().split(lengths))


def minibatch_plan(n: int, mini_batches: int, seed: int) -> list[list[int]]:
    """Shuffled sequence indices cut into `mini_batches` parts (one optimizer update each), as even as can be:
    sizes differ by at most one (10 into 4: 3, 3, 2, 2), never a lone last sequence."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts = max(1, min(mini_batches, n))
    size, extra = divmod(n, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + size + (part < extra))
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def updates_per_rollout(n: int, epochs: int, mini_batches: int) -> int:
    """Optimizer updates one rollout of n sequences feeds: more than one makes the later ones off-policy."""
    return epochs * max(1, min(mini_batches, n))


def total_over_processes(trainer, value: float) -> float:
    acc = trainer.accelerator
    if acc.num_processes == 1:
        return value
    return float(acc.reduce(torch.tensor(float(value), device=acc.device), "sum"))


def mean_over_processes(trainer, metrics: dict) -> dict:
    acc = trainer.accelerator
    if acc.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    packed = torch.tensor([float(metrics[k]) for k in keys], device=acc.device, dtype=torch.float64)
    packed = acc.reduce(packed, "mean").tolist()
    return dict(zip(keys, packed))


def run_updates(trainer, n: int, epochs: int, mini_batches: int, micro: int, count, micro_step,
                critic_only: bool = False) -> tuple:
    """The update phase shared by ppo and grpo: `epochs` passes over the rollout's `n` sequences, each cut
    into shuffled mini-batches (one optimizer update each) and those into micro-batches of `micro`.
    `micro_step(epoch, indices, total)` does one micro-batch's forward and backward, with `total` =
    `count(mini_batch)` summed over processes, the loss's normaliser. `critic_only` (PPO's critic warm-up)
    steps the critic alone: the policy's gradients are dropped before each step. Returns the last update's
    gradient norms (the policy's, the critic's or None) and the number of updates."""
    norms, updates = (0.0, None), 0
    for epoch in range(epochs):
        for minibatch in minibatch_plan(n, mini_batches, seed=trainer.state.step * 1000 + epoch):
            total = max(total_over_processes(trainer, count(minibatch)), 1.0)
            parts = micro_batches(minibatch, micro)
            for i, indices in enumerate(parts):  # gradients synchronised on the last micro-batch only
                with trainer.micro_batch(last=i == len(parts) - 1):
                    micro_step(epoch, indices, total)
            norms = optimizer_update(trainer, critic_only)
            updates += 1
    return norms, updates


def optimizer_update(trainer, critic_only: bool = False) -> tuple[float, float | None]:
    """Clip, step, zero: returns the gradient norms before clipping (the policy's, the critic's or None)."""
    if critic_only:
        if trainer.strategy.startswith("DeepSpeed"):  # it has stepped inside the last backward already
            raise ConfigError("ppo.critic_warmup_steps does not combine with DeepSpeed (it steps every parameter "
                              "inside the backward); set it to 0 or train with DDP / FSDP2")
        for param in trainer.actor_params:
            param.grad = None
    norms = trainer.clip_gradients()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return norms


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_online(trainer, eval_units: list[dict], ctx: OnlineContext) -> dict[str, float]:
    """Greedy answers to the eval prompts, scored by the same reward sources (no missing-EOS penalty)."""
    if not eval_units:
        return {}
    result = rollout(trainer, ctx, eval_units, 1, None, greedy=True)
    metrics = {"eval_reward": float(result.scores.mean())}
    metrics.update({f"eval_{k}": v for k, v in result.metrics.items()})
    return mean_over_processes(trainer, metrics)
