"""The online stages ppo and grpo: prompts in, rollouts and updates inside the one loop (see rl/)."""
from __future__ import annotations

from functools import partial

from ..rl import grpo, online, ppo
from .base import Stage


def _prompt_units(features, pad_id, ctx):
    return features


def _common(name: str, module) -> Stage:
    return Stage(name, "prompt", "causal", loss=None, evaluate=online.evaluate_online,
                 encode=online.encode_prompts, collate=_prompt_units, setup=module.setup,
                 load=online.load_prompts, step=module.step, wrap=module.wrap,
                 unwrap=lambda model: model.policy)


PPO = _common("ppo", ppo)
GRPO = _common("grpo", grpo)
