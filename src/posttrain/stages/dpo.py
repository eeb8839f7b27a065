"""`dpo`: direct preference optimisation and its family (ipo, hinge, robust, simpo, orpo) on pairs.

Chosen and rejected go through one concatenated forward (rows 0..B-1 chosen, B..2B-1 rejected); a
sequence log-prob is the sum over the response tokens only. The formulas are in losses.py.
"""
from __future__ import annotations

import torch

from ..data.pairs import collate_pairs
from ..data.vision import own_positions
from ..losses import DPO_LOSSES, LENGTH_NORMALISED_LOSSES, REFERENCE_FREE_LOSSES, dpo_rewards
from ..forward import prefix_sharing_on, sequence_logps
from ..reference import Reference
from .base import Stage
from .pairwise import StageContext, encode_pairs, evaluate_with_loss, pair_tokens, precompute_reference
from .prefix import collate_shared_prefix


def setup(config, model, tokenizer, accelerator) -> StageContext:
    shared = prefix_sharing_on(config.dpo.prefix_sharing, model, "dpo.prefix_sharing")
    reference = None
    if config.dpo.loss not in REFERENCE_FREE_LOSSES:
        reference = Reference.build(config.dpo.strategy, config, tokenizer, accelerator.device)
    return StageContext(config, reference, {"pad_id": tokenizer.pad_token_id, "prefix_sharing": shared})


def collate(features, pad_id, ctx):
    # images whose positions the model works out itself (Qwen2-VL) cannot take the shared layout's position_ids
    if ctx is not None and ctx.extra.get("prefix_sharing") and not own_positions(features):
        return collate_shared_prefix(features, pad_id)
    return collate_pairs(features, pad_id)


def pair_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs and token counts, from the plain or the shared-prefix batch (both
    put the chosen sequences first)."""
    logps, counts = sequence_logps(model, batch)
    n = logps.shape[0] // 2
    return logps[:n], logps[n:], counts[:n], counts[n:]


def reference_logps(model, batch, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    if "ref_chosen_logps" in batch:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    logps = ctx.reference.sequence_logps(model, batch)
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def dpo_loss(model, batch, ctx) -> tuple[torch.Tensor, int, dict]:
    options = ctx.config.dpo
    chosen, rejected, chosen_len, rejected_len = pair_logps(model, batch)
    n = chosen.shape[0]
    if options.loss in REFERENCE_FREE_LOSSES:
        ref_chosen = ref_rejected = torch.zeros_like(chosen)
    else:
        ref_chosen, ref_rejected = reference_logps(model, batch, ctx)
    chosen_in, rejected_in = chosen, rejected
    if options.loss in LENGTH_NORMALISED_LOSSES:  # mean token log-probs (ipo as in TRL; simpo; orpo)
        chosen_len, rejected_len = chosen_len.clamp(min=1), rejected_len.clamp(min=1)
        chosen_in, rejected_in = chosen / chosen_len, rejected / rejected_len
        ref_chosen, ref_rejected = ref_chosen / chosen_len, ref_rejected / rejected_len
    losses = DPO_LOSSES[options.loss](chosen_in, rejected_in, ref_chosen, ref_rejected, beta=options.beta,
                                      label_smoothing=options.label_smoothing, gamma=options.simpo_gamma)
    sft_weight = options.sft_weight if options.sft_weight is not None else float(options.loss == "orpo")
    if sft_weight:
        losses = losses + sft_weight * -(chosen / chosen_len.clamp(min=1))
    reward_chosen, reward_rejected = dpo_rewards(chosen_in.detach(), rejected_in.detach(), ref_chosen, ref_rejected,
                                                 options.beta)
    metrics = {"rewards_chosen": reward_chosen.sum(), "rewards_rejected": reward_rejected.sum(),
               "margin": (reward_chosen - reward_rejected).sum(),
               "accuracy": (reward_chosen > reward_rejected).float().sum(),
               "logps_chosen": chosen.detach().sum(), "logps_rejected": rejected.detach().sum()}
    return losses.sum(), n, metrics


def count_pairs(batch: dict) -> int:
    return int(batch["pair_count"]) if "pair_count" in batch else batch["input_ids"].shape[0] // 2


def prepare(trainer, ctx) -> None:
    # in the layout training uses (shared prefixes when on): both give chosen rows first, then rejected
    precompute_reference(trainer, ctx, ("ref_chosen_logps", "ref_rejected_logps"),
                         lambda units: collate(units, ctx.extra["pad_id"], ctx))


def evaluate(model, batches, autocast, ctx):
    return evaluate_with_loss(dpo_loss, model, batches, autocast, ctx)


STAGE = Stage("dpo", "preference", "causal", dpo_loss, evaluate, count=count_pairs, encode=encode_pairs,
              collate=collate, length=pair_tokens, setup=setup, prepare=prepare)
