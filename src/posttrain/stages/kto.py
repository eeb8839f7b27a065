"""`kto`: Kahneman-Tversky optimisation on unpaired desirable / undesirable completions.

The KL term z0 is estimated as in TRL: the policy-vs-reference log-ratio of mismatched pairs, averaged
over the batch and detached. TRL pairs each prompt with the next completion of its batch; here the pairing
is fixed once per dataset (each example with the next example's completion), so the mismatched rows'
reference log-probs can be precomputed like the others.
"""
from __future__ import annotations

import torch

from ..data.pairs import collate_feedback, encode_feedbacks, pair_mismatched
from ..losses import kto_kl, kto_loss
from ..forward import sequence_logps
from ..reference import Reference
from .base import Stage
from .pairwise import StageContext, evaluate_with_loss, precompute_reference

KL_KEYS = {"kl_input_ids": "input_ids", "kl_attention_mask": "attention_mask", "kl_labels": "labels"}


def setup(config, model, tokenizer, accelerator) -> StageContext:
    reference = Reference.build(config.kto.strategy, config, tokenizer, accelerator.device)
    return StageContext(config, reference, {"pad_id": tokenizer.pad_token_id})


def encode(examples, tokenizer, config):
    features, stats = encode_feedbacks(examples, tokenizer, max_length=config.data.max_length,
                                       max_prompt_length=config.data.max_prompt_length,
                                       skip_invalid=config.data.skip_invalid)
    return pair_mismatched(features), stats


def collate(features, pad_id, ctx):
    return collate_feedback(features, pad_id, ctx.config.data.max_length)


def _main_rows(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def _kl_rows(batch: dict) -> dict:
    return {plain: batch[key] for key, plain in KL_KEYS.items()}


def kto_stage_loss(model, batch, ctx) -> tuple[torch.Tensor, int, dict]:
    options = ctx.config.kto
    policy, _ = sequence_logps(model, _main_rows(batch))
    with torch.no_grad():
        policy_kl, _ = sequence_logps(model, _kl_rows(batch))
    if "ref_logps" in batch:
        reference, reference_kl = batch["ref_logps"], batch["ref_kl_logps"]
    else:
        reference = ctx.reference.sequence_logps(model, _main_rows(batch))
        reference_kl = ctx.reference.sequence_logps(model, _kl_rows(batch))
    kl = kto_kl(policy_kl, reference_kl)
    desirable = batch["desirable"].bool()
    losses = kto_loss(policy, reference, desirable, kl, beta=options.beta,
                      desirable_weight=options.desirable_weight, undesirable_weight=options.undesirable_weight)
    rewards = options.beta * (policy.detach() - reference)
    metrics = {"kl": kl.detach() * len(policy), "rewards_desirable": rewards[desirable].sum(),
               "rewards_undesirable": rewards[~desirable].sum(), "desirable_fraction": desirable.float().sum()}
    return losses.sum(), len(policy), metrics


def pair_tokens(feature: dict) -> int:
    """Tokens a feature stands for (the prompt counts once per sequence it is part of)."""
    return len(feature["prompt_ids"]) + len(feature["completion_ids"])


def count_examples(batch: dict) -> int:
    return batch["input_ids"].shape[0]


def prepare(trainer, ctx) -> None:
    def rows(units):  # main rows first, then the mismatched (KL) rows
        batch = collate_feedback(units, ctx.extra["pad_id"], ctx.config.data.max_length)
        main, kl = _main_rows(batch), _kl_rows(batch)
        width = max(main["input_ids"].shape[1], kl["input_ids"].shape[1])
        return {k: torch.cat([_pad(main[k], width, k, ctx), _pad(kl[k], width, k, ctx)]) for k in main}

    precompute_reference(trainer, ctx, ("ref_logps", "ref_kl_logps"), rows)


def _pad(tensor: torch.Tensor, width: int, key: str, ctx) -> torch.Tensor:
    value = {"input_ids": ctx.extra["pad_id"], "attention_mask": 0, "labels": -100}[key]
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def evaluate(model, batches, autocast, ctx):
    return evaluate_with_loss(kto_stage_loss, model, batches, autocast, ctx)


STAGE = Stage("kto", "feedback", "causal", kto_stage_loss, evaluate, count=count_examples, encode=encode,
              collate=collate, length=pair_tokens, setup=setup, prepare=prepare)
