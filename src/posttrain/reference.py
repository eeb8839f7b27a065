"""The reference model, one way for every stage that needs one (dpo, kto, ppo, grpo).

Strategies:
- adapter: with LoRA, the base model with the adapter disabled is the reference (no copy in memory);
- copy: a frozen copy of the starting model, in eval mode with dropout off, on the device in the compute dtype
  (modeling.frozen_dtype);
- precompute (offline stages only): the reference log-probs of every example are computed once before
  training, with the starting weights, and carried in the features (no reference model in memory while
  training); the policy itself scores them, in eval mode, before its first update.
`auto` is adapter with LoRA; otherwise precompute for the offline stages (their examples are known up front)
and copy for the online ones (their samples are new every step).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .config import resolve_reference
from .errors import ConfigError
from .forward import sequence_logps, token_logps, unwrap


def resolve_strategy(setting: str, method: str, online: bool) -> str:
    try:
        return resolve_reference(setting, method, online)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class Reference:
    strategy: str
    model: nn.Module | None = None   # only for "copy"

    @classmethod
    def build(cls, setting: str, config, tokenizer, device, online: bool = False) -> "Reference":
        strategy = resolve_strategy(setting, config.method, online)
        if strategy != "copy":
            return cls(strategy)
        from .modeling import disable_dropout, frozen_dtype, load_model

        # on the device, in the compute dtype (bf16 under train.bf16): a 7B copy is 14 GB, not 28
        copy = load_model(config.model, "causal", tokenizer=tokenizer, trust_remote_code=config.trust_remote_code,
                          attn_implementation=config.attn_implementation, dtype=frozen_dtype(config), device=device)
        disable_dropout(copy)
        return cls(strategy, copy.eval().requires_grad_(False).to(device))

    @contextmanager
    def scorer(self, policy: nn.Module):
        """The module that scores as the reference (the copy, or the policy without its adapter)."""
        if self.strategy == "copy":
            yield self.model
            return
        base = unwrap(policy)
        if self.strategy == "adapter":
            with base.disable_adapter(), eval_mode(base):
                yield base
        else:  # precompute: called only before the first update, when the policy is the reference
            with eval_mode(base):
                yield base

    @torch.no_grad()
    def token_logps(self, policy: nn.Module, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """Per trained token of `batch`, log pi_ref under logits / temperature (forward.token_logps order)."""
        with self.scorer(policy) as model:
            return token_logps(model, batch, temperature)["logps"]

    @torch.no_grad()
    def sequence_logps(self, policy: nn.Module, batch: dict) -> torch.Tensor:
        """Per row (or shared-prefix slot), the summed reference log-probs of the trained tokens."""
        with self.scorer(policy) as model:
            return sequence_logps(model, batch)[0]
