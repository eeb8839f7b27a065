"""Reference-model strategies for DPO and KTO, and the shared evaluation of pairwise stages.

- adapter: with LoRA, the base model with the adapter disabled is the reference (no copy in memory);
- copy: a frozen copy of the starting model;
- precompute: the reference log-probs of every example are computed once before training, with the
  starting weights, and carried in the features (no reference model in memory while training).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .lm import response_logps


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class Reference:
    strategy: str
    model: torch.nn.Module | None = None   # only for "copy"

    @classmethod
    def build(cls, options, config, tokenizer, device) -> "Reference":
        strategy = options.strategy
        if strategy == "auto":
            strategy = "adapter" if config.method == "lora" else "precompute"
        if strategy == "adapter" and config.method != "lora":
            raise ConfigError("reference: adapter needs adapter.type: lora (use copy or precompute otherwise)")
        if strategy != "copy":
            return cls(strategy)
        from ..modeling import load_model

        copy = load_model(config.model, "causal", tokenizer=tokenizer, trust_remote_code=config.trust_remote_code,
                          attn_implementation=config.attn_implementation)
        return cls(strategy, copy.eval().requires_grad_(False).to(device))

    @torch.no_grad()
    def logps(self, policy, batch: dict) -> torch.Tensor:
        """Per-row summed reference log-probs of the trained tokens of `batch`."""
        if self.strategy == "copy":
            return response_logps(self.model, batch)[0]
        if self.strategy == "adapter":
            base = _unwrap(policy)
            with base.disable_adapter(), _eval_mode(base):
                return response_logps(base, batch)[0]
        if self.strategy == "precompute":  # prepare() runs before any update: the policy is the reference
            base = _unwrap(policy)
            with _eval_mode(base):
                return response_logps(base, batch)[0]
        raise ConfigError(f"unknown reference strategy {self.strategy}")


@dataclass
class StageContext:
    config: object
    reference: Reference | None = None
    extra: dict = field(default_factory=dict)


def precompute_reference(trainer, ctx: StageContext, row_keys: tuple[str, ...], collate) -> None:
    """Store the reference log-probs of every train and eval unit in the unit itself (keys `row_keys`).

    `collate(units)` builds a batch whose rows are the units' sequences for each key in turn (e.g. all
    chosen rows, then all rejected rows)."""
    if ctx.reference is None or ctx.reference.strategy != "precompute":
        return
    device = trainer.accelerator.device
    for units in (trainer.units, trainer.eval_units):
        size = trainer.train_cfg.batch_size
        for start in range(0, len(units), size):
            chunk = units[start:start + size]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            with trainer.accelerator.autocast():
                values = ctx.reference.logps(trainer.model, batch).float().cpu()
            parts = values.split(len(chunk))
            for key, part in zip(row_keys, parts):
                for unit, value in zip(chunk, part.tolist()):
                    unit[key] = value


def encode_pairs(examples, tokenizer, config):
    """Preference pairs for rm and dpo, under the data section's length limits."""
    from ..data.pairs import encode_preferences

    return encode_preferences(examples, tokenizer, max_length=config.data.max_length,
                              max_prompt_length=config.data.max_prompt_length, skip_invalid=config.data.skip_invalid)


def pair_tokens(feature: dict) -> int:
    """Tokens a feature stands for (the prompt counts once per sequence it is part of)."""
    return 2 * len(feature["prompt_ids"]) + len(feature["chosen_ids"]) + len(feature["rejected_ids"])


@torch.no_grad()
def evaluate_with_loss(loss_fn, model, batches, autocast, ctx) -> dict[str, float]:
    """Eval metrics of a pairwise stage: its loss and metrics averaged over all eval items."""
    totals: dict[str, float] = {}
    count = 0
    for batch in batches:
        with autocast():
            loss_sum, n, metrics = loss_fn(model, batch, ctx)
        count += n
        totals["loss"] = totals.get("loss", 0.0) + float(loss_sum)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return {f"eval_{k}": v / max(count, 1) for k, v in totals.items()}
