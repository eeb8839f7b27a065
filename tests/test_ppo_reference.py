"""PPO against an independent implementation: rl/ppo.py `update` (the stage's own code, through a trainer built as
`posttrain train` builds it) on a fixed rollout, against a PPO step written out here from Huang et al. 2024 ("The
N+ Implementation Details of RLHF with PPO") in plain torch, one unpadded sequence at a time, without anything
from posttrain.losses or posttrain.forward:

    score      s_i standardised by the mean and unbiased std of the batch (the first batch: ppo.normalize_scores)
    reward     r_t = -beta * (log pi_old(a_t) - log pi_ref(a_t)),  plus s_i on the last token
    GAE        delta_t = r_t + gamma V_{t+1} - V_t (V after the last token = 0),  A_t = delta_t + gamma lam A_{t+1}
    returns    R_t = A_t + V_t;  advantages whitened over every token of the rollout
    loss       sum_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
               + vf_coef * sum_t 0.5 max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2),
               over the mini-batch's tokens, divided by its token count;  rho_t = exp(log pi(a_t) - log pi_old(a_t))

At every optimizer update (2 epochs x 2 mini-batches) the gradients posttrain steps with (recorded by a hook on
its optimizer, with the weights the policy and its value head had then) equal the hand-written loss's.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import write_jsonl
from posttrain.config import build_config
from posttrain.reference import Reference
from posttrain.rl import online, ppo
from posttrain.train import build_trainer

PROMPT_TOKENS = 5
COMPLETION_LENGTHS = [6, 2, 4, 5]
SCORES = torch.tensor([0.9, 0.1, 0.4, 0.7])
BETA, GAMMA, LAM, CLIP, VALUE_CLIP, VF_COEF, TEMPERATURE = 0.05, 1.0, 0.95, 0.2, 0.2, 1.0, 0.8


def sequences(vocab_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, vocab_size, (PROMPT_TOKENS,), generator=generator) for _ in COMPLETION_LENGTHS]
    completions = [torch.randint(5, vocab_size, (n,), generator=generator) for n in COMPLETION_LENGTHS]
    return prompts, completions


def ppo_stage(model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Two plus three is"}] * 4)
    config = build_config({
        "stage": "ppo", "model": str(model_dir), "output_dir": str(tmp_path / "posttrain"),
        "data": {"train": str(prompts)}, "rewards": [{"builtin": "length", "target": 5}],
        "generation": {"temperature": TEMPERATURE, "max_new_tokens": 8},
        "train": {"batch_size": 1, "lr": 0.02, "max_grad_norm": None, "seed": 0, "scheduler": "constant"},
        "ppo": {"epochs": 2, "mini_batches": 2, "kl_coef": BETA, "gamma": GAMMA, "lam": LAM, "clip": CLIP,
                "value_clip": VALUE_CLIP, "vf_coef": VF_COEF, "value_model": "head", "reference": "copy"}})
    trainer, _ = build_trainer(config, tmp_path / "posttrain")
    return trainer


class HandActor(nn.Module):
    """The policy and a linear value head on its last hidden state, as plain transformers modules."""

    def __init__(self, model_dir):
        super().__init__()
        self.policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.value_head = nn.Linear(self.policy.config.hidden_size, 1)

    def forward(self, prompt: torch.Tensor, completion: torch.Tensor):
        """Per completion token: log pi(a_t | prefix) under logits / T, and V of the prefix before it."""
        ids = torch.cat([prompt, completion])[None]
        out = self.policy(input_ids=ids, output_hidden_states=True)
        positions = slice(len(prompt) - 1, len(ids[0]) - 1)
        logps = torch.log_softmax(out.logits[0, positions].float() / TEMPERATURE, -1)
        logps = logps.gather(-1, completion[:, None]).squeeze(-1)
        values = self.value_head(out.hidden_states[-1][0, positions]).squeeze(-1)
        return logps, values


def hand_advantages(old_logps, ref_logps, values, scores):
    standardised = (scores - scores.mean()) / (scores.std() + 1e-8)
    advantages, returns = [], []
    for old, ref, value, score in zip(old_logps, ref_logps, values, standardised):
        rewards = -BETA * (old - ref)
        rewards[-1] += score
        running, row = 0.0, [0.0] * len(rewards)
        for t in reversed(range(len(rewards))):
            next_value = value[t + 1] if t + 1 < len(rewards) else 0.0
            delta = rewards[t] + GAMMA * next_value - value[t]
            running = delta + GAMMA * LAM * running
            row[t] = running
        advantages.append(torch.stack([torch.as_tensor(a) for a in row]))
        returns.append(advantages[-1] + value)
    flat = torch.cat(advantages)
    mean, std = flat.mean(), flat.var(unbiased=True).add(1e-8).sqrt()
    return [(a - mean) / std for a in advantages], returns


def hand_loss(actor, prompts, completions, rows, old_logps, old_values, advantages, returns):
    total, tokens = 0.0, 0
    for i in rows:
        logps, values = actor(prompts[i], completions[i])
        ratio = torch.exp(logps - old_logps[i])
        policy = torch.maximum(-advantages[i] * ratio, -advantages[i] * ratio.clamp(1 - CLIP, 1 + CLIP))
        clipped_values = old_values[i] + (values - old_values[i]).clamp(-VALUE_CLIP, VALUE_CLIP)
        value = 0.5 * torch.maximum((values - returns[i]) ** 2, (clipped_values - returns[i]) ** 2)
        total = total + policy.sum() + VF_COEF * value.sum()
        tokens += len(logps)
    return total / tokens


def test_ppo_update_matches_a_hand_written_ppo_step(make_model, tmp_path):
    model_dir = make_model("qwen2")
    trainer = ppo_stage(model_dir, tmp_path)
    actor_module = trainer.raw_model
    with torch.no_grad():  # a value head that already says something, so the value loss and its clip matter
        actor_module.value_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
        actor_module.value_head.bias.fill_(0.1)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reference away from the policy, so the KL reward is not 0
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    trainer.ctx.reference = Reference("copy", reference)

    records = []

    def hook(optimizer, args, kwargs):
        records.append({"weights": copy.deepcopy(actor_module.state_dict()),
                        "grads": {n: p.grad.clone() for n, p in actor_module.named_parameters() if p.grad is not None}})
    trainer.optimizer.optimizer.register_step_pre_hook(hook)

    hand = HandActor(model_dir)
    hand.load_state_dict(actor_module.state_dict())
    prompts, completions = sequences(hand.policy.config.vocab_size)
    with torch.no_grad():
        old = [hand(p, y) for p, y in zip(prompts, completions)]
        old_logps, old_values = [o[0] for o in old], [o[1] for o in old]
        ref_logps = []
        for p, y in zip(prompts, completions):
            logits = reference(input_ids=torch.cat([p, y])[None]).logits[0, len(p) - 1:-1].float() / TEMPERATURE
            ref_logps.append(torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1))
    advantages, returns = hand_advantages(old_logps, ref_logps, old_values, SCORES)

    features = [{"input_ids": p.tolist(), "prompt": "", "columns": {}, "location": "test"} for p in prompts]
    rollout = online.Rollout(features, [{"input_ids": p.tolist() + y.tolist(), "labels": [-100] * len(p) + y.tolist()}
                                        for p, y in zip(prompts, completions)],
                             list(COMPLETION_LENGTHS), ["stop"] * 4, [""] * 4, SCORES.clone(), {})
    result = ppo.update(trainer, trainer.ctx, rollout)

    plan = [mb for epoch in range(2) for mb in online.minibatch_plan(4, 2, seed=epoch)]
    assert len(records) == len(plan) == 4
    for update, (rows, record) in enumerate(zip(plan, records)):
        hand.load_state_dict(record["weights"])
        hand.zero_grad(set_to_none=True)
        hand_loss(hand, prompts, completions, rows, old_logps, old_values, advantages, returns).backward()
        expected = dict(hand.named_parameters())
        assert record["grads"].keys() == {n for n, p in expected.items() if p.grad is not None}
        for name, grad in record["grads"].items():
            # float32 sums in another order (batched and padded vs one sequence at a time; AVX2 vs AVX-512
            # kernels) differ by ~1e-7 of the tensor's largest entry, so near-zero entries get that much slack
            scale = float(expected[name].grad.abs().max())
            torch.testing.assert_close(grad, expected[name].grad, rtol=1e-4, atol=1e-5 * scale + 1e-7,
                                       msg=f"update {update}: {name}")

    metrics = result["metrics"]
    assert metrics["kl"] > 1e-3 and metrics["clip_fraction"] > 0.01 and metrics["value_clip_fraction"] > 0.01
    kl = sum(float((o - r).sum()) for o, r in zip(old_logps, ref_logps)) / 4
    assert abs(metrics["kl"] - kl) < 1e-4
