"""Every loss in one place, each with its formula.

Conventions: `labels` are aligned with `input_ids` (Hugging Face style) and -100 marks positions that
are not trained; the shift (token t is predicted from positions < t) happens here. Losses return a
*sum* and a count so the training loop can normalise over all micro-batches of an optimizer step
(a token-level mean across gradient accumulation, not a mean of means).
Preference losses (Bradley–Terry, the DPO family, KTO) return one value per pair or example; the stage
sums or averages them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE = -100
Tensor = torch.Tensor


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """targets[t] = labels[t + 1]; the last position has no target."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Negative log-likelihood summed over trained positions.

    L = -sum_t [target_t != -100] * log softmax(logits_t)[target_t]

    `logits` (..., V) and `targets` (...) are already aligned (targets shifted). Computed in fp32.
    """
    logits = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    return total, int((targets != IGNORE).sum())


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over examples: L = -sum_i log softmax(logits_i)[label_i]."""
    return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())


def macro_f1(predictions: list[int], labels: list[int], num_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2PR / (P + R); a class absent from both counts as F1 = 0 only
    if it appears in labels or predictions (classes never seen are left out)."""
    scores = []
    for c in range(num_classes):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Preference learning: Bradley–Terry, the DPO family and KTO. The sequence log-probs they take come from
# forward.sequence_logps: logp(y|x) = sum over the response tokens of log softmax(logits)[token], in fp32.
#
# Parity notes: TRL 1.16 (trl/trainer/dpo_trainer.py, kto_trainer.py, reward_trainer.py) is the reference
# implementation; tests/test_trl_parity.py checks sigmoid / ipo / hinge DPO, KTO and the reward-model loss against
# TRL's own `compute_loss` to 1e-5. Where TRL and the papers differ, we follow TRL and say so below.
# ---------------------------------------------------------------------------------------------------------------


def bradley_terry(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None,
                  center_coef: float = 0.0) -> Tensor:
    """Per-pair Bradley–Terry reward-model loss, with optional margin and reward centering.

    L_i = -log σ(r_w - r_l - m_i) + c · (r_w + r_l)²

    The mean over pairs equals TRL's RewardTrainer loss exactly: -mean log σ(r_w - r_l - m) +
    c · mean((r_w + r_l)²) (`center_rewards_coefficient`, Eisenstein et al. 2023 suggest c = 0.01).
    """
    difference = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference)
    if center_coef:
        loss = loss + center_coef * (chosen_rewards.float() + rejected_rewards.float()) ** 2
    return loss


def _logratio_difference(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> Tensor:
    """h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))."""
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


def dpo_sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
                label_smoothing=0.0, gamma=0.5) -> Tensor:
    """DPO (Rafailov et al. 2023), with conservative label smoothing ε (cDPO):

    L = -(1 - ε) log σ(β h) - ε log σ(-β h)        (ε = 0: plain DPO; at π = π_ref, L = ln 2)

    TRL 1.16's "sigmoid" has no ε (its label smoothing lives in "robust"/"exo_pair"); at ε = 0 they agree.
    """
    logits = beta * _logratio_difference(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_ipo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
            label_smoothing=0.0, gamma=0.5) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17, with τ = β):  L = (h - 1/(2β))²

    The caller passes LENGTH-NORMALISED log-probs (logps / tokens, for policy and reference), so h is the
    difference of per-token average log-ratios. The paper writes h on summed log-probs; TRL 1.16 averages per
    token (confirmed with the IPO authors, per TRL's comment), and we follow TRL for parity.
    """
    h = _logratio_difference(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1 / (2 * beta)) ** 2


def dpo_hinge(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
              label_smoothing=0.0, gamma=0.5) -> Tensor:
    """Hinge / SLiC (Zhao et al. 2023):  L = max(0, 1 - β h)."""
    h = _logratio_difference(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1 - beta * h)


def dpo_robust(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
               label_smoothing=0.0, gamma=0.5) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate ε ∈ [0, 0.5):

    L = (-(1 - ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε)      (TRL's "robust", same form)
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    logits = beta * _logratio_difference(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def dpo_simpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta,
              label_smoothing=0.0, gamma=0.5) -> Tensor:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, target margin γ:

    L = -(1 - ε) log σ(β (avg_w - avg_l) - γ) - ε log σ(-(β (avg_w - avg_l) - γ))

    avg = log π(y|x) / |y|: the caller passes LENGTH-NORMALISED log-probs; the reference arguments are ignored.
    γ is the paper's margin itself (TRL's CPOTrainer takes γ/β as `simpo_gamma`; same loss with γ = β · ratio).
    """
    logits = beta * (chosen_logps - rejected_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_orpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta,
             label_smoothing=0.0, gamma=0.5) -> Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024), reference-free; β plays ORPO's λ:

    L = -β log σ(log odds(y_w) - log odds(y_l)),   log odds(y) = avg - log(1 - exp(avg))

    avg = log π(y|x) / |y|: the caller passes LENGTH-NORMALISED log-probs; the reference arguments are ignored.
    The NLL of the chosen response, the other half of ORPO, is added by the stage (`dpo.sft_weight`, 1 for orpo):
    each pair's mean token NLL over its chosen RESPONSE, averaged over pairs, so every pair weighs the same
    whatever its length. TRL 1.16's ORPOTrainer (trl.experimental.orpo) instead takes one token mean over the
    prompt AND response tokens of all chosen rows of a batch; the odds-ratio term is the same in both.
    log(1 - exp(avg)) is computed as log(-expm1(avg)), accurate near avg = 0 (TRL writes log1p(-exp(avg)); equal
    in exact arithmetic).
    """
    def log_odds(avg):
        return avg - torch.log(-torch.expm1(avg))

    return -beta * F.logsigmoid(log_odds(chosen_logps) - log_odds(rejected_logps))


DPO_LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": dpo_sigmoid,
    "ipo": dpo_ipo,
    "hinge": dpo_hinge,
    "robust": dpo_robust,
    "simpo": dpo_simpo,
    "orpo": dpo_orpo,
}
# Losses whose log-prob arguments are per-token averages (logps / counts), not sums.
LENGTH_NORMALISED_LOSSES = frozenset({"ipo", "simpo", "orpo"})
# Losses that need no reference model (their reference arguments are ignored).
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})


def dpo_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta) -> tuple[Tensor, Tensor]:
    """Implicit rewards r = β (log π(y|x) - log π_ref(y|x)), detached; for metrics (rewards, margin, accuracy).

    For reference-free losses pass None (or 0) as the reference: r = β log π(y|x).
    """
    def reward(logps, ref_logps):
        return beta * (logps - (0 if ref_logps is None else ref_logps)).detach()

    return reward(chosen_logps, ref_chosen_logps), reward(rejected_logps, ref_rejected_logps)


def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point: z_ref = mean_i (log π(y'_i|x_i) - log π_ref(y'_i|x_i)), detached.

    y'_i are completions of OTHER prompts (mismatched pairs). TRL builds them by rotating the completions by one
    within each batch, (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}), and computes the policy side under no_grad.
    Not clamped here; kto_loss clamps at 0 (TRL clamps after averaging across processes).
    """
    return (policy_kl_logps.float() - ref_kl_logps.float()).mean().detach()


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Tensor:
    """KTO (Ethayarajh et al. 2024, Eq. 7), per example:

    r = log π(y|x) - log π_ref(y|x),  z0 = max(0, kl) (no gradient)
    desirable:   L = w_D (1 - σ(β (r - z0)))
    undesirable: L = w_U (1 - σ(β (z0 - r)))

    The batch loss is the plain mean over examples, as in TRL (which concatenates desirable then undesirable
    losses and takes the mean; order does not matter).
    """
    r = policy_logps - ref_logps
    z0 = kl.clamp(min=0).detach()
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable.bool(), desirable_loss, undesirable_loss)


# ---------------------------------------------------------------------------------------------------------------
# Online RL (ppo, grpo): KL estimators, GAE, advantages, clipped policy and value losses.
#
# Per-token tensors are padded [B, T] with a `mask` of the response tokens (1) and padding (0); a row's
# response starts at column 0. Log-probs are log pi(token) under logits / sampling temperature.

def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log pi(a) - log pi_ref(a): unbiased for KL(pi || pi_ref) under samples from pi, can be negative."""
    return logps - ref_logps


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = exp(r) - r - 1 with r = log pi_ref(a) - log pi(a): unbiased, never negative (Schulman's k3)."""
    r = ref_logps - logps
    return torch.exp(r) - r - 1


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); shift_mean=False keeps the mean."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = (((x - mean) ** 2) * mask).sum() / (n - 1).clamp(min=1)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation per row, over the response tokens (masked entries are 0).

    delta_t = r_t + gamma * V_{t+1} - V_t  (V after the last response token is 0)
    A_t = delta_t + gamma * lam * A_{t+1};   returns R_t = A_t + V_t
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, clip_low: float = 0.2,
                    clip_high: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate per token: max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high)),
    ratio = exp(logp - old_logp). Also returns whether the clipped term was the larger one (clip
    fraction) and the approximate KL to the sampling policy, 0.5 * (logp - old_logp)^2, per token."""
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    return loss, (clipped > unclipped).float().detach(), (0.5 * log_ratio.detach() ** 2)


def truncated_importance_weights(trainer_logps: Tensor, sampler_logps: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (TIS) for rollouts sampled by another implementation of the policy than the
    one the update differentiates (vLLM's kernels, another dtype). Per sampled token a_t,

        w_t = min(pi_trainer(a_t) / pi_sampler(a_t), C) = min(exp(log pi_trainer(a_t) - log pi_sampler(a_t)), C)

    with pi_trainer the trainer's log-probs before the update (the "old" policy of the clipped surrogate) and C
    the cap; no gradient flows through w. Each token's policy-gradient loss is multiplied by w_t: the tokens
    were drawn from pi_sampler, the ratio re-weights them towards pi_trainer's distribution, and the cap bounds
    the variance a rare large ratio would bring (biased, low variance). Equal implementations give w_t = 1."""
    return torch.exp(trainer_logps.detach().float() - sampler_logps.float()).clamp(max=cap)


def logprob_mismatch(trainer_logps: Tensor, sampler_logps: Tensor) -> Tensor:
    """Per token |log pi_trainer(a_t) - log pi_sampler(a_t)|: how far the sampler's log-probs are from the
    trainer's for the same tokens (its mean is logged as `sampler_logprob_diff`)."""
    return (trainer_logps.detach().float() - sampler_logps.float()).abs()


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None = 0.2) -> Tensor:
    """Clipped value loss per token: 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum(unclipped, (clipped_values - returns) ** 2)


def running_standardize(values: Tensor, moments: dict, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std with the mean and (unbiased) std of every value seen so far, this batch included.

    `moments` = {"count", "sum", "sum_sq"} accumulates over calls (kept in checkpoints by the caller); the batch's
    own sums may already be totals over processes. With a single value seen, std is taken as 1.
    """
    count = moments["count"]
    mean = moments["sum"] / max(count, 1)
    variance = (moments["sum_sq"] - count * mean ** 2) / (count - 1) if count > 1 else 1.0
    return (values - mean) / (max(variance, 0.0) ** 0.5 + eps)


def adaptive_kl_coef(beta: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Ziegler et al.'s controller: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


def group_advantages(rewards: Tensor, group_size: int, baseline: str = "grpo", scale: str = "group",
                     eps: float = 1e-4) -> Tensor:
    """One advantage per completion; `rewards` holds groups of `group_size` completions of one prompt each.

    grpo:        A = r - mean(group), divided by std(group) (scale 'group'), by std(batch) ('batch'), or
                 not at all ('none'); std is the unbiased one, plus eps.
    rloo:        A = r - mean(other completions of the group) = G / (G - 1) * (r - mean(group)).
    reinforce++: A = r - mean(group), then whitened over the whole batch (REINFORCE++ with a baseline).
    """
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if baseline == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 completions per prompt")
        return (centred * group_size / (group_size - 1)).reshape(-1)
    if baseline == "reinforce++":
        flat = centred.reshape(-1)
        return (flat - flat.mean()) / (flat.std() + eps) if flat.numel() > 1 else flat
    if baseline != "grpo":
        raise ValueError(f"unknown baseline {baseline!r}")
    if scale == "group":
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups)
        centred = centred / (std + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps if rewards.numel() > 1 else 1.0)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}")
    return centred.reshape(-1)


def aggregate(per_token: Tensor, mask: Tensor, how: str = "token_mean") -> tuple[Tensor, float]:
    """A summed loss and what it is to be divided by across the whole update: token_mean sums over every
    response token (divide by the tokens of the update: DAPO), sequence_mean sums each row's token mean
    (divide by the rows: GRPO's original form)."""
    if how == "token_mean":
        return (per_token * mask).sum(), float(mask.sum())
    if how == "sequence_mean":
        return masked_mean(per_token, mask, dim=1).sum(), float(mask.shape[0])
    raise ValueError(f"unknown loss aggregation {how!r}")


# ---------------------------------------------------------------------------------------------------------------
# Embedders (stage embed, for RAG retrieval): contrastive InfoNCE with in-batch negatives.
# ---------------------------------------------------------------------------------------------------------------


def info_nce(queries: Tensor, candidates: Tensor, temperature: float = 0.05) -> tuple[Tensor, Tensor]:
    """InfoNCE with in-batch negatives (van den Oord et al. 2018; DPR, Karpukhin et al. 2020).

    queries [B, D]; candidates [C, D], C >= B: candidate i is query i's positive, every other candidate (the other
    queries' positives, then any hard negatives appended after the B positives) is a negative for it.

        s_ij = cos(q_i, c_j) / tau
        L_i  = -log( exp(s_ii) / sum_j exp(s_ij) ) = logsumexp_j(s_ij) - s_ii

    Returns (L [B], the logits s [B, C]), in fp32.
    """
    q = F.normalize(queries.float(), dim=-1)
    c = F.normalize(candidates.float(), dim=-1)
    logits = q @ c.T / temperature
    targets = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, targets, reduction="none"), logits
