"""The sampler / trainer log-prob mismatch and its truncated importance sampling (TIS) correction, on CPU: the
formula, grpo.update's gradients with the correction (a sampler whose log-probs are off by a known amount), the
engine's own log-probs against the trainer's in a real run, and `generation.backend: vllm` where vLLM is absent.

The vLLM backend itself needs vLLM and a CUDA GPU and is not exercised here."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from conftest import run_cli, write_jsonl
from posttrain.config import build_config
from posttrain.losses import logprob_mismatch, truncated_importance_weights
from posttrain.rl import grpo, online
from posttrain.train import build_trainer, run_training


def test_truncated_importance_weights_formula():
    trainer = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    sampler = torch.tensor([-1.0, -2.0 - math.log(4), -0.5 + math.log(2), -3.0 - math.log(1.5)])
    weights = truncated_importance_weights(trainer, sampler, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([1.0, 2.0, 0.5, 1.5]))  # 4 is capped at 2
    assert not weights.requires_grad
    torch.testing.assert_close(logprob_mismatch(trainer, sampler),
                               torch.tensor([0.0, math.log(4), math.log(2), math.log(1.5)]))


PROMPTS = [{"prompt": "Two plus three is"}, {"prompt": "The kitchen opens at"}]
LENGTHS = [5, 3, 4, 2]  # two prompts x two completions


def test_grpo_update_weights_each_tokens_loss_by_the_capped_ratio(make_model, tmp_path):
    """The same rollout and weights, a sampler whose log-probs are log 2 below the trainer's on every token:
    with tis_cap 10 each token's loss is weighted by 2, with cap 1.5 by 1.5, so the gradients are exactly 2x and
    1.5x those without the correction (token_mean loss, one update, no clipping of the gradient)."""
    model_dir = make_model("qwen2")
    config = build_config({
        "stage": "grpo", "model": str(model_dir), "output_dir": str(tmp_path / "out"),
        "data": {"train": str(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS))},
        "rewards": [{"builtin": "length", "target": 5}], "generation": {"max_new_tokens": max(LENGTHS)},
        "train": {"batch_size": 2, "lr": 0.01, "max_grad_norm": None, "seed": 0, "scheduler": "constant"},
        "grpo": {"num_generations": 2, "kl_coef": 0.0, "track_kl": False}})
    trainer, _ = build_trainer(config, tmp_path / "out")
    policy = trainer.raw_model.policy
    start = {name: p.detach().clone() for name, p in policy.state_dict().items()}
    grads = []
    trainer.optimizer.optimizer.register_step_pre_hook(lambda *_: grads.append(
        {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))

    generator = torch.Generator().manual_seed(0)
    vocab = policy.config.vocab_size
    prompts = [torch.randint(5, vocab, (6,), generator=generator).tolist() for _ in PROMPTS for _ in range(2)]
    completions = [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in LENGTHS]
    with torch.no_grad():  # the trainer's own log-probs of the completions, one plain forward each
        trainer_logps = [torch.log_softmax(policy(torch.tensor([p + c])).logits[0, len(p) - 1:-1], -1)
                         .gather(-1, torch.tensor(c)[:, None]).squeeze(-1) for p, c in zip(prompts, completions)]

    def update(cap):
        policy.load_state_dict(start)
        trainer.ctx.config.generation.tis_cap = cap
        rollout = online.Rollout([{"input_ids": p, "prompt": "", "columns": {}, "location": "test"} for p in prompts],
                                 [{"input_ids": p + c, "labels": [-100] * len(p) + c} for p, c in zip(prompts, completions)],
                                 LENGTHS, ["stop"] * 4, [""] * 4, torch.tensor([1.0, 0.0, 0.3, 0.9]), {},
                                 sampler_logps=[lp - math.log(2) for lp in trainer_logps])
        return grpo.update(trainer, trainer.ctx, rollout)["metrics"]

    metrics = [update(cap) for cap in (None, 10.0, 1.5)]
    assert all(m["sampler_logprob_diff"] == pytest.approx(math.log(2), abs=1e-4) for m in metrics)
    plain, doubled, capped = grads
    assert any(g.abs().max() > 1e-6 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(doubled[name], 2 * grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(capped[name], 1.5 * grad, rtol=1e-4, atol=1e-7)


def test_engine_log_probs_are_the_trainers_in_a_real_run(tiny_model, tmp_path):
    """grpo and ppo runs (posttrain train's own entry, in this process) with the correction on: the engine's
    sampler log-probs match the trainer's recomputed ones (fp32, same model), so the mismatch is ~0, the
    weights ~1."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} plus {i}?"} for i in range(8)])
    for stage, section in (("grpo", {"num_generations": 2}), ("ppo", {"epochs": 2})):
        out = tmp_path / stage
        config = {"stage": stage, "model": str(tiny_model), "output_dir": str(out),
                  "data": {"train": str(prompts), "max_length": 64}, "rewards": [{"builtin": "length", "target": 5}],
                  "generation": {"max_new_tokens": 8, "tis_cap": 2.0, "batch_size": 2},
                  "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "seed": 0}, stage: section}
        run_training(build_config(config))
        rows = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        diffs = [r["sampler_logprob_diff"] for r in rows if "sampler_logprob_diff" in r]
        assert len(diffs) == 1 and diffs[0] < 1e-4, (stage, diffs)


def test_vllm_backend_without_vllm_is_one_line(tiny_model, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    config = {"stage": "grpo", "model": str(tiny_model), "output_dir": str(tmp_path / "out"),
              "data": {"train": str(prompts)}, "rewards": [{"builtin": "length", "target": 5}],
              "generation": {"backend": "vllm"}, "train": {"max_steps": 1}}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("train", tmp_path / "grpo.yaml", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "generation.backend: vllm needs vLLM" in result.stderr, result.stderr
