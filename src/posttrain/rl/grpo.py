"""`stage: grpo`: reinforcement fine-tuning with programmatic rewards (GRPO, RLOO, REINFORCE++).

Per step: G = grpo.num_generations completions per prompt; their rewards give one advantage per completion
(losses.group_advantages), shared by its tokens; the loss per token is the clipped surrogate
(losses.ppo_policy_loss, optional asymmetric clip) plus kl_coef * k3 KL to the reference, aggregated as a
token mean over the update (DAPO) or a mean of per-completion means (original GRPO).

With one optimizer update per rollout (epochs = 1, mini_batches = 1) the old log-probs are the current ones
detached (ratio 1: the plain policy gradient), so no extra forward is needed; when a rollout feeds several
updates they are computed once per rollout, before the first update and without gradients, so the later
updates are importance-weighted and clipped against the policy that sampled.
Metrics: reward (mean), reward_std, reward/<source>, kl (mean over completions of the summed k1 KL to the
reference, when a reference is tracked), entropy, response_length, no_eos_fraction, clip_fraction.
"""
from __future__ import annotations

import time

import torch

from ..losses import aggregate, group_advantages, kl_k1, kl_k3, ppo_policy_loss
from . import online
from .online import PolicyWithValue


def setup(config, model, tokenizer, accelerator):
    return online.setup_online(config, model, tokenizer, accelerator, config.grpo,
                               need_reference=config.grpo.kl_coef > 0 or config.grpo.track_kl)


def wrap(config, model, tokenizer):
    return PolicyWithValue(model)


def step(trainer, prompts: list[dict], ctx) -> dict:
    """One rollout of the step's prompts (G completions each), scored, then the updates on it."""
    ro = online.rollout(trainer, ctx, prompts, ctx.config.grpo.num_generations, ctx.config.grpo.missing_eos_penalty)
    return update(trainer, ctx, ro)


def update(trainer, ctx, ro: online.Rollout) -> dict:
    """epochs x mini_batches optimizer updates on one scored rollout; returns the step's metrics."""
    cfg, acc, temperature = ctx.config.grpo, trainer.accelerator, ctx.config.generation.temperature
    rolled_out = time.perf_counter()
    advantages = group_advantages(ro.scores, cfg.num_generations, cfg.baseline, cfg.scale)
    n = len(ro.sequences)
    micro = trainer.train_cfg.batch_size * cfg.num_generations
    model = trainer.model

    # With one optimizer update per rollout the policy that sampled is the one being updated: the old log-probs
    # are the current ones detached (ratio 1), no extra forward. With more (epochs > 1 or mini_batches > 1)
    # they are computed once, before the first update, so that later updates see the ratio to the sampler.
    off_policy = online.updates_per_rollout(n, cfg.epochs, cfg.mini_batches) > 1
    old_logps = ref_logps = None
    if off_policy or ctx.reference is not None:
        old, ref = [], []
        actor = online.unwrap(model)
        for indices in online.micro_batches(list(range(n)), micro):
            batch = online.batch_of(trainer, ctx, ro, indices)
            with acc.autocast():
                if off_policy:
                    with torch.no_grad():
                        old.append(actor(batch, temperature, values=False)[0])
                if ctx.reference is not None:
                    ref.append(online.reference_logps(ctx, actor, batch, temperature))
        old_logps = online.split_tokens(torch.cat(old), ro.response_tokens) if old else None
        ref_logps = online.split_tokens(torch.cat(ref), ro.response_tokens) if ref else None

    prepared = time.perf_counter()
    sums = {"loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "kl_k3": 0.0, "tokens": 0.0}
    first_pass_logps: list[torch.Tensor | None] = [None] * n

    def micro_step(epoch: int, indices: list[int], total: float) -> None:
        batch = online.batch_of(trainer, ctx, ro, indices)
        lengths = [ro.response_tokens[i] for i in indices]
        with acc.autocast():
            logps, entropy, _ = model(batch, temperature, values=False)
        old = online.gather(old_logps, indices).to(logps.device) if old_logps else logps.detach()
        adv = torch.repeat_interleave(advantages[indices].to(logps.device), torch.tensor(lengths, device=logps.device))
        per_token, clipped, _ = ppo_policy_loss(logps, old, adv, cfg.clip, cfg.clip_high)
        per_token = online.correct_for_sampler(ctx, ro, indices, old, per_token, sums, epoch == 0)
        if ref_logps is not None:
            ref = online.gather(ref_logps, indices).to(logps.device)
            k3 = kl_k3(logps, ref)
            if cfg.kl_coef > 0:
                per_token = per_token + cfg.kl_coef * k3
            sums["kl_k3"] += float(k3.detach().sum())
        padded, mask = _rows(per_token, lengths)
        summed, _ = aggregate(padded, mask, cfg.loss)
        acc.backward(summed * acc.num_processes / total)
        sums["loss"] += float(summed.detach()) / total
        sums["clip_fraction"] += float(clipped.sum())
        sums["entropy"] += float(entropy.sum())
        sums["tokens"] += float(sum(lengths))
        if epoch == 0:
            for i, part in zip(indices, logps.detach().float().cpu().split(lengths)):
                first_pass_logps[i] = part

    def count(minibatch: list[int]) -> float:  # what the loss is averaged over: tokens or completions
        return sum(ro.response_tokens[i] for i in minibatch) if cfg.loss == "token_mean" else len(minibatch)

    (grad_norm, _), updates = online.run_updates(trainer, n, cfg.epochs, cfg.mini_batches, micro, count, micro_step)
    timing = {"time/logprobs": prepared - rolled_out, "time/update": time.perf_counter() - prepared}

    tokens = max(sums["tokens"], 1.0)
    metrics = {"reward": float(ro.scores.mean()), "reward_std": float(ro.scores.std()) if n > 1 else 0.0,
               **ro.metrics, "clip_fraction": sums["clip_fraction"] / tokens, "entropy": sums["entropy"] / tokens,
               "advantage_abs": float(advantages.abs().mean()), **online.sampler_metrics(sums)}
    if ref_logps is not None:
        sampled = old_logps or first_pass_logps
        metrics["kl"] = sum(float(kl_k1(sampled[i], ref_logps[i]).sum()) for i in range(n)) / n
        metrics["kl_k3"] = sums["kl_k3"] / tokens
    metrics = online.mean_over_processes(trainer, {**metrics, **timing})
    loss = sums["loss"] / max(updates, 1)
    return {"loss": loss, "grad_norm": grad_norm, "tokens": int(total_tokens(trainer, ro)), "metrics": metrics}


def total_tokens(trainer, ro) -> float:
    return online.total_over_processes(trainer, float(sum(ro.response_tokens)))


def _rows(flat: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values -> [rows, longest] with a mask (for per-completion means)."""
    width = max(lengths)
    mask = torch.arange(width, device=flat.device)[None, :] < torch.tensor(lengths, device=flat.device)[:, None]
    padded = flat.new_zeros(len(lengths), width)
    padded[mask] = flat
    return padded, mask.to(flat.dtype)
