"""`stage: ppo`: RLHF with PPO (InstructGPT; the implementation details of Huang et al. 2024).

Per step (one rollout of the step's prompts, one response each):
  score    s = weighted reward sources, plus ppo.missing_eos_penalty when the response has no end-of-turn;
  reward   r_t = -beta * (log pi_old(a_t) - log pi_ref(a_t))   (k1 KL, per token), plus s on the last token;
  GAE      advantages and returns with gamma, lambda over the response tokens; advantages whitened;
  update   ppo.epochs passes of ppo.mini_batches updates: clipped surrogate + vf_coef * clipped value loss;
  beta     fixed, or Ziegler et al.'s adaptive controller towards ppo.target_kl (kept in checkpoints).
Log-probs are taken under logits / generation.temperature, for the policy and the reference alike; dropout
is off. The critic is a value head on the policy, or a separate value model (from the reward model, or any
directory) trained with the same optimizer; only the policy is written to output_dir.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import ConfigError
from ..losses import (adaptive_kl_coef, gae, kl_k1, masked_mean, masked_whiten, ppo_policy_loss,
                      ppo_value_loss, running_standardize)
from . import online
from .online import PolicyWithValue


def value_model_source(config) -> str | None:
    """None: a value head on the policy; else the directory the separate value model starts from."""
    choice = config.ppo.value_model
    reward_models = [spec["model"] for spec in config.rewards if isinstance(spec, dict) and "model" in spec]
    if choice == "auto":
        return reward_models[0] if reward_models else None
    if choice == "head":
        return None
    if choice == "reward":
        if not reward_models:
            raise ConfigError("ppo.value_model: reward needs a `{model: DIR}` entry in rewards")
        return reward_models[0]
    return choice


def wrap(config, model, tokenizer):
    """The policy and its critic, both trained, in the trained dtype (modeling.trained_dtype); a separate critic
    is a second whole model, so train.gradient_checkpointing applies to it too."""
    from ..modeling import apply_lora, load_model, trained_dtype

    source, dtype = value_model_source(config), trained_dtype(config)
    if source is None:
        hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") \
            else model.config.hidden_size
        head = nn.Linear(hidden, 1, dtype=dtype)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return PolicyWithValue(model, value_head=head)
    critic = load_model(source, "reward", tokenizer=tokenizer, trust_remote_code=config.trust_remote_code,
                        attn_implementation=config.attn_implementation, dtype=dtype)
    if critic.config.vocab_size != getattr(model.config, "vocab_size", critic.config.vocab_size):
        raise ConfigError(f"ppo.value_model {source}: its vocabulary ({critic.config.vocab_size}) differs from "
                          f"the policy's; the critic reads the policy's tokens")
    if config.method == "lora":
        critic = apply_lora(critic, config.adapter, "reward")
    if config.train.gradient_checkpointing:
        critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.method == "lora":
            critic.enable_input_require_grads()
    return PolicyWithValue(model, critic=critic.train())


def setup(config, model, tokenizer, accelerator):
    # ppo always needs the reference: its KL penalty is part of the reward
    return online.setup_online(config, model, tokenizer, accelerator, config.ppo, need_reference=True)


def _padded(per_sequence: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in per_sequence)
    out = torch.zeros(len(per_sequence), width)
    mask = torch.zeros(len(per_sequence), width)
    for i, t in enumerate(per_sequence):
        out[i, :len(t)], mask[i, :len(t)] = t, 1
    return out, mask


def normalized_scores(trainer, scores: torch.Tensor) -> torch.Tensor:
    """The scores standardised by the running mean and std of every score so far (over all processes), so the
    KL penalty weighs against a unit-variance score whatever the reward's scale; the moments live in the
    loop's stage_state, so a resumed run continues them."""
    moments = trainer.state.stage_state.setdefault("score_moments", {"count": 0, "sum": 0.0, "sum_sq": 0.0})
    batch = [float(len(scores)), float(scores.sum()), float((scores.double() ** 2).sum())]
    count, total, total_sq = (online.total_over_processes(trainer, value) for value in batch)
    moments.update(count=moments["count"] + int(count), sum=moments["sum"] + total, sum_sq=moments["sum_sq"] + total_sq)
    return running_standardize(scores, moments).float()


def step(trainer, prompts: list[dict], ctx) -> dict:
    """One rollout of the step's prompts (one response each), scored, then the updates on it."""
    return update(trainer, ctx, online.rollout(trainer, ctx, prompts, 1, ctx.config.ppo.missing_eos_penalty))


def update(trainer, ctx, ro: online.Rollout) -> dict:
    """KL-penalised rewards, GAE, then epochs x mini_batches optimizer updates on one scored rollout."""
    cfg, acc = ctx.config.ppo, trainer.accelerator
    temperature = ctx.config.generation.temperature
    beta = trainer.state.stage_state.get("kl_coef", cfg.kl_coef)
    rolled_out = time.perf_counter()
    n, micro, model = len(ro.sequences), trainer.train_cfg.batch_size, trainer.model
    actor = online.unwrap(model)

    # once per rollout, without gradients: old log-probs, values, reference log-probs, entropy
    old, values, ref, ent = [], [], [], []
    for indices in online.micro_batches(list(range(n)), micro):
        batch = online.batch_of(trainer, ctx, ro, indices)
        with acc.autocast(), torch.no_grad():
            logps, entropy, value = actor(batch, temperature)
            ref.append(online.reference_logps(ctx, actor, batch, temperature))
        old.append(logps)
        values.append(value)
        ent.append(entropy)
    split = lambda parts: online.split_tokens(torch.cat(parts), ro.response_tokens)  # noqa: E731
    old_logps, old_values, ref_logps, entropies = split(old), split(values), split(ref), split(ent)

    old_lp, mask = _padded(old_logps)
    ref_lp, _ = _padded(ref_logps)
    old_v, _ = _padded(old_values)
    kl = kl_k1(old_lp, ref_lp) * mask
    rewards = -beta * kl
    last = torch.tensor(ro.response_tokens) - 1
    scores = normalized_scores(trainer, ro.scores) if cfg.normalize_scores else ro.scores
    rewards[torch.arange(n), last] += scores
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, old_v, mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask)
    adv_rows = [advantages[i, :L] for i, L in enumerate(ro.response_tokens)]
    ret_rows = [returns[i, :L] for i, L in enumerate(ro.response_tokens)]

    prepared = time.perf_counter()
    sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "value_clip_fraction": 0.0,
            "approx_kl": 0.0, "tokens": 0.0}

    def micro_step(epoch: int, indices: list[int], total: float) -> None:
        batch = online.batch_of(trainer, ctx, ro, indices)
        with acc.autocast():
            logps, _, value = model(batch, temperature)
        dev = logps.device
        pick = lambda rows: online.gather(rows, indices).to(dev)  # noqa: E731
        pg, clipped, approx = ppo_policy_loss(logps, pick(old_logps), pick(adv_rows), cfg.clip, cfg.clip_high)
        pg = online.correct_for_sampler(ctx, ro, indices, pick(old_logps), pg, sums, epoch == 0)
        vf = ppo_value_loss(value, pick(old_values), pick(ret_rows), cfg.value_clip)
        summed = pg.sum() + cfg.vf_coef * vf.sum()
        acc.backward(summed * acc.num_processes / total)
        sums["policy_loss"] += float(pg.detach().sum())
        sums["value_loss"] += float(vf.detach().sum())
        sums["clip_fraction"] += float(clipped.sum())
        sums["approx_kl"] += float(approx.sum())
        if cfg.value_clip is not None:
            moved = (value.detach() - pick(old_values)).abs() > cfg.value_clip
            sums["value_clip_fraction"] += float(moved.sum())
        sums["tokens"] += float(len(logps))

    warming_up = trainer.state.step < cfg.critic_warmup_steps
    (grad_norm, value_grad_norm), _ = online.run_updates(
        trainer, n, cfg.epochs, cfg.mini_batches, micro, lambda mb: sum(ro.response_tokens[i] for i in mb), micro_step,
        critic_only=warming_up)
    timing = {"time/logprobs": prepared - rolled_out, "time/update": time.perf_counter() - prepared}

    tokens = max(sums["tokens"], 1.0)
    kl_per_response = kl.sum(1)
    non_score = (-beta * kl).sum(1)
    flat_returns, flat_values = returns[mask.bool()], old_v[mask.bool()]
    variance = flat_returns.var() if flat_returns.numel() > 1 else torch.tensor(0.0)
    explained = 1 - (flat_returns - flat_values).var() / variance if variance > 0 else torch.tensor(0.0)
    metrics = {"reward": float((scores + non_score).mean()), "score": float(ro.scores.mean()),
               "score_normalized": float(scores.mean()),
               "reward_std": float(ro.scores.std()) if n > 1 else 0.0, **ro.metrics,
               "kl": float(kl_per_response.mean()), "beta": beta,
               "entropy": float(masked_mean(_padded(entropies)[0], mask)),
               "policy_loss": sums["policy_loss"] / tokens, "value_loss": sums["value_loss"] / tokens,
               "clip_fraction": sums["clip_fraction"] / tokens, "approx_kl": sums["approx_kl"] / tokens,
               "value_clip_fraction": sums["value_clip_fraction"] / tokens,
               "explained_variance": float(explained), "value_mean": float(masked_mean(old_v, mask)),
               "critic_warmup": float(warming_up), **online.sampler_metrics(sums),
               **({"value_grad_norm": value_grad_norm} if value_grad_norm is not None else {})}
    metrics = online.mean_over_processes(trainer, {**metrics, **timing})
    if cfg.adaptive_kl:
        n_total = int(online.total_over_processes(trainer, n))
        trainer.state.stage_state["kl_coef"] = adaptive_kl_coef(beta, metrics["kl"], cfg.target_kl, n_total,
                                                                cfg.kl_horizon)
    loss = (sums["policy_loss"] + cfg.vf_coef * sums["value_loss"]) / tokens
    return {"loss": loss, "grad_norm": grad_norm,
            "tokens": int(online.total_over_processes(trainer, float(sum(ro.response_tokens)))), "metrics": metrics}
