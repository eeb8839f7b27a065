"""Parity with TRL: on the same model and batch, our losses equal the values TRL's own trainers compute.

TRL 1.16 has no standalone DPO/KTO loss function (the loss is inlined in `_compute_loss`), so each test builds the
real TRL trainer on a tiny dataset, collates a batch with TRL's own data collator, and calls the trainer's
`compute_loss` on it. Our side calls the stage's own loss (stages/dpo.py, kto.py, rm.py) on the same tensors.
The reference model is a copy of the policy with perturbed weights, so the log-ratios are not zero.
GRPO: the stage's own update (rl/grpo.py) against GRPOTrainer's `compute_loss` on a hand-built rollout (and on a
rollout TRL generates and scores itself); the notes above the GRPO tests say how TRL's settings map to posttrain's.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,  # noqa: E402
                          AutoTokenizer)

from posttrain.config import build_config  # noqa: E402
from posttrain.losses import DPO_LOSSES  # noqa: E402
from posttrain.reference import Reference  # noqa: E402
from posttrain.stages.dpo import dpo_loss  # noqa: E402
from posttrain.stages.kto import kto_stage_loss  # noqa: E402
from posttrain.stages.pairwise import StageContext  # noqa: E402
from posttrain.stages.rm import rm_loss  # noqa: E402

TOLERANCE = 1e-5
BETA = 0.1
PAIRS = [
    {"prompt": "The kitchen opens at", "chosen": " nine in the morning.",
     "rejected": " ten at night, and the soup is cold."},
    {"prompt": "Two plus three is", "chosen": " five.", "rejected": " twelve."},
    {"prompt": "Reverse the word cat to get", "chosen": " tac.", "rejected": " cat, I think."},
    {"prompt": "Our soup of the day is", "chosen": " tomato with basil.", "rejected": " the service was slow."},
]
UNPAIRED = [
    {"prompt": "The kitchen opens at", "completion": " nine in the morning.", "label": True},
    {"prompt": "Two plus three is", "completion": " twelve.", "label": False},
    {"prompt": "Reverse the word cat to get", "completion": " tac.", "label": True},
    {"prompt": "Our soup of the day is", "completion": " the service was slow and cold.", "label": False},
]


def common_args(tmp_path) -> dict:
    # bf16=False: TRL's configs default to bf16, and the trainer then wraps the *reference* model's forward in
    # autocast at construction while the policy only gets autocast inside training_step; calling compute_loss
    # directly would mix precisions (a policy == reference copy then gives 0.69313, not ln 2).
    return dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                per_device_train_batch_size=len(PAIRS),
                save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=0)


def load_policy_and_reference(model_dir):
    """A fresh policy (TRL patches the forward of the models it is given) and a perturbed frozen copy."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return policy.eval(), reference.eval()


def first_batch(trainer) -> dict:
    """The first training batch exactly as TRL builds it: its tokenized dataset and its data collator."""
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def stage_context(model_dir, stage: str, reference_model=None, **section) -> StageContext:
    """What posttrain's stage loss reads: the validated config (stage options) and the reference model."""
    config = build_config({"stage": stage, "model": str(model_dir), "output_dir": "unused",
                           "data": {"train": "unused"}, stage: section})
    return StageContext(config, Reference("copy", reference_model) if reference_model is not None else None)


def as_labels(batch: dict, prefix: str = "") -> dict:
    """TRL's rows as posttrain's batch: the same tensors, the completion mask turned into labels (-100 outside)."""
    ids = batch[f"{prefix}input_ids"]
    return {"input_ids": ids, "attention_mask": batch[f"{prefix}attention_mask"],
            "labels": ids.masked_fill(batch[f"{prefix}completion_mask"] == 0, -100)}


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_matches_trl(loss_type, make_model, tmp_path):
    model_dir = make_model("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy, reference = load_policy_and_reference(model_dir)
    args = trl.DPOConfig(beta=BETA, loss_type=[loss_type], max_length=None, **common_args(tmp_path))
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(PAIRS),
                             processing_class=tokenizer)
    batch = first_batch(trainer)
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_loss.backward()
    trl_grads = gradients(policy)

    # posttrain's own stage loss (stages/dpo.py: forward.sequence_logps, the reference model, losses.DPO_LOSSES)
    ctx = stage_context(model_dir, "dpo", reference, beta=BETA, loss=loss_type, reference="copy")
    summed, pairs, metrics = dpo_loss(policy, as_labels(batch), ctx)
    ours = summed / pairs
    ours.backward()
    our_grads = gradients(policy)

    assert metrics["margin"].abs() > 1e-3  # the reference really differs, so the test is not checking ln 2 twice
    assert abs(ours.item() - trl_loss.item()) < TOLERANCE, (loss_type, ours.item(), trl_loss.item())
    assert our_grads.keys() == trl_grads.keys()
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dpo_at_reference_is_ln2_in_trl_and_ours(make_model, tmp_path):
    model_dir = make_model("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference = copy.deepcopy(policy)
    args = trl.DPOConfig(beta=BETA, max_length=None, **common_args(tmp_path))
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(PAIRS),
                             processing_class=tokenizer)
    batch = first_batch(trainer)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    ctx = stage_context(model_dir, "dpo", reference, beta=BETA, reference="copy")
    with torch.no_grad():
        summed, pairs, _ = dpo_loss(policy, as_labels(batch), ctx)
    assert (summed / pairs).item() == pytest.approx(math.log(2), abs=1e-7)
    assert trl_loss == pytest.approx(math.log(2), abs=TOLERANCE)


def test_kto_loss_matches_trl(make_model, tmp_path):
    model_dir = make_model("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy, reference = load_policy_and_reference(model_dir)
    desirable_weight, undesirable_weight = 1.0, 1.25
    args = trl.KTOConfig(beta=BETA, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                         max_length=None, **common_args(tmp_path))
    trainer = trl.KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(UNPAIRED),
                             processing_class=tokenizer)
    batch = first_batch(trainer)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()

    ctx = stage_context(model_dir, "kto", reference, beta=BETA, desirable_weight=desirable_weight,
                        undesirable_weight=undesirable_weight, reference="copy")
    ours_batch = {**as_labels(batch), **{f"kl_{k}": v for k, v in as_labels(batch, "KL_").items()},
                  "desirable": batch["label"]}
    with torch.no_grad():
        summed, count, metrics = kto_stage_loss(policy, ours_batch, ctx)
    ours = (summed / count).item()

    assert metrics["kl"] / count > 0.1  # the reference point is active, not clamped away
    assert abs(ours - trl_loss) < TOLERANCE, (ours, trl_loss)


def test_reward_model_loss_matches_trl(make_model, tmp_path):
    model_dir = make_model("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32).eval()
    with torch.no_grad():  # a visible head, so the rewards (and the centering term) are not all near 0
        model.score.weight.normal_(0.0, 0.5)
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], "margin": m}
            for p, m in zip(PAIRS, [0.0, 0.5, 1.0, -0.25])]
    center = 0.01
    args = trl.RewardConfig(center_rewards_coefficient=center, max_length=None, **common_args(tmp_path))
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer)
    batch = first_batch(trainer)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        summed, pairs, metrics = rm_loss(model, dict(batch), stage_context(model_dir, "rm", center_coef=center))
    ours = (summed / pairs).item()

    assert (metrics["rewards_chosen"] + metrics["rewards_rejected"]).abs() > 0.1
    assert abs(ours - trl_loss) < TOLERANCE, (ours, trl_loss)


# ---------------------------------------------------------------------------------------------------------------
# GRPO: posttrain's stage code (rl/grpo.py `update`, run on a rollout the test hands it through a trainer built
# by train.build_trainer as `posttrain train` builds it) against TRL's GRPOTrainer.compute_loss on the same
# completions, optimizer update by optimizer update: the gradients posttrain steps with are recorded by a hook on
# its optimizer, with the weights the policy had at that update, and TRL computes the loss at those weights.
#
# Mapping (TRL 1.16 -> posttrain): epsilon -> grpo.clip, epsilon_high -> grpo.clip_high, beta -> grpo.kl_coef,
# temperature -> generation.temperature, loss_type "dapo" -> loss "token_mean", loss_type "grpo" -> loss
# "sequence_mean". TRL's `old_per_token_logps` absent means "the current ones, detached": posttrain's rollout
# that feeds one optimizer update. When a rollout feeds several (epochs or mini_batches > 1), TRL is given the
# log-probs of the policy that sampled (before any update) as `old_per_token_logps`.
#
# The KL: TRL 1.16 defaults to `use_bias_correction_kl=True` (DeepSeek-V3.2): its per-token KL is
# ratio * k3 with ratio = exp(logp - old_logp) differentiable, so the KL gradient gets an extra k3 * grad(logp)
# term (an unbiased reverse-KL gradient) even on-policy, where the value is unchanged. posttrain adds plain k3
# (original GRPO, DeepSeekMath), which is TRL with use_bias_correction_kl=False; that is the setting tested. With
# TRL's default, the values differ off-policy and the gradients differ whenever beta > 0.
# Not mapped, on purpose:
# - "dr_grpo" divides the summed token losses by (rows x max_completion_length), a constant that does not depend
#   on the completions; posttrain has no such aggregation, so it is not tested.
# - "bnpo" divides each micro-batch by its own token count (and then by the accumulation steps): a mean of token
#   means across micro-batches. It equals posttrain's token_mean only when an update is ONE micro-batch, which
#   is the only way it is tested here; "dapo" is the loss that stays a token mean over the whole update.
# Batch layout: all prompts have the same length, so TRL's [left-padded prompt | right-padded completion] and
# posttrain's right-padded [prompt + completion] are the same tensors (no positions shift between the two).
# ---------------------------------------------------------------------------------------------------------------
from conftest import write_jsonl  # noqa: E402
from posttrain.losses import group_advantages, kl_k3  # noqa: E402
from posttrain.rl import grpo, online  # noqa: E402
from posttrain.train import build_trainer  # noqa: E402

GRPO_GENERATIONS = 3
GRPO_PROMPT_TOKENS = 6
GRPO_COMPLETION_LENGTHS = [7, 2, 5, 4, 1, 6]   # two prompts x three completions, very different lengths
GRPO_REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.1])
GRPO_PROMPTS = [{"prompt": "Two plus three is"}, {"prompt": "The kitchen opens at"}]


def length_reward(completions, **kwargs):
    """TRL needs a reward function to build the trainer; the batch below carries its advantages already."""
    return [float(len(c)) for c in completions]


def grpo_trainer(model_dir, policy, tmp_path, *, loss_type, beta, epsilon, epsilon_high, temperature):
    args = trl.GRPOConfig(
        loss_type=loss_type, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high, temperature=temperature,
        num_generations=GRPO_GENERATIONS, max_completion_length=max(GRPO_COMPLETION_LENGTHS),
        use_bias_correction_kl=False,  # see the note above: TRL 1.16's default weights the KL by the ratio
        activation_checkpointing=False,  # GRPOConfig turns (gradient) checkpointing on by default
        **{**common_args(tmp_path), "per_device_train_batch_size": len(GRPO_COMPLETION_LENGTHS)})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return trl.GRPOTrainer(model=policy, reward_funcs=length_reward, args=args,
                           train_dataset=Dataset.from_list(GRPO_PROMPTS), processing_class=tokenizer)


def grpo_sequences(vocab_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random prompts (one per group, repeated G times) and completions of GRPO_COMPLETION_LENGTHS."""
    generator = torch.Generator().manual_seed(3)
    prompts = torch.randint(5, vocab_size, (len(GRPO_COMPLETION_LENGTHS) // GRPO_GENERATIONS, GRPO_PROMPT_TOKENS),
                            generator=generator).repeat_interleave(GRPO_GENERATIONS, dim=0)
    completions = [torch.randint(5, vocab_size, (n,), generator=generator) for n in GRPO_COMPLETION_LENGTHS]
    return prompts, completions


def padded_rows(per_sequence: list[torch.Tensor]) -> torch.Tensor:
    """Per-completion tensors in TRL's [B, C] layout (0 beyond each completion)."""
    out = torch.zeros(len(per_sequence), max(len(t) for t in per_sequence), dtype=per_sequence[0].dtype)
    for row, t in enumerate(per_sequence):
        out[row, :len(t)] = t
    return out


def hf_completion_logps(model, prompts, completions, temperature: float) -> list[torch.Tensor]:
    """log softmax(logits / T) of each completion token, one unpadded sequence at a time through the plain
    transformers forward: independent of posttrain's forward.py."""
    out = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            ids = torch.cat([torch.as_tensor(prompt), torch.as_tensor(completion)])[None]
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(completion)[:, None]).squeeze(-1))
    return out


def grpo_stage(model_dir, tmp_path, *, loss="token_mean", clip=0.2, clip_high=None, kl_coef=0.0, temperature=1.0,
               epochs=1, mini_batches=1, lr=0.02):
    """posttrain's grpo stage, built by train.build_trainer from a config exactly as `posttrain train` builds it,
    ready for grpo.update on a rollout the test hands it. Gradient clipping is off, so the gradients recorded are
    the loss's own; one prompt's completions per micro-batch, so an update over both prompts accumulates two."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", GRPO_PROMPTS)
    config = build_config({
        "stage": "grpo", "model": str(model_dir), "output_dir": str(tmp_path / "posttrain"),
        "data": {"train": str(prompts)}, "rewards": [{"builtin": "length", "target": 5}],
        "generation": {"temperature": temperature, "max_new_tokens": max(GRPO_COMPLETION_LENGTHS)},
        "train": {"batch_size": 1, "lr": lr, "max_grad_norm": None, "seed": 0, "scheduler": "constant"},
        "grpo": {"num_generations": GRPO_GENERATIONS, "loss": loss, "clip": clip, "clip_high": clip_high,
                 "kl_coef": kl_coef, "epochs": epochs, "mini_batches": mini_batches, "reference": "copy"}})
    trainer, _ = build_trainer(config, tmp_path / "posttrain")
    return trainer


def record_updates(trainer) -> list[dict]:
    """Before every optimizer step: the policy's weights (those the update's loss was computed with) and its
    gradients."""
    records = []
    policy = trainer.raw_model.policy

    def hook(optimizer, args, kwargs):
        records.append({"weights": {n: p.detach().clone() for n, p in policy.state_dict().items()},
                        "grads": {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}})
    trainer.optimizer.optimizer.register_step_pre_hook(hook)  # the torch optimizer inside accelerate's wrapper
    return records


def rollout_of(prompts, completions, rewards: torch.Tensor) -> online.Rollout:
    prompts = [torch.as_tensor(p).tolist() for p in prompts]
    completions = [torch.as_tensor(y).tolist() for y in completions]
    sequences = [{"input_ids": p + y, "labels": [-100] * len(p) + y} for p, y in zip(prompts, completions)]
    features = [{"input_ids": p, "prompt": "", "columns": {}, "location": "test"} for p in prompts]
    return online.Rollout(features, sequences, [len(y) for y in completions], ["stop"] * len(completions),
                          [""] * len(completions), rewards.float(), {})


def trl_gradients(trl_trainer, policy, weights: dict, inputs: dict, rows: list[int]) -> dict:
    """TRL's gradients for the completions `rows` of `inputs`, with the policy at `weights`."""
    policy.load_state_dict(weights)
    part = {k: v[rows] for k, v in inputs.items()}
    part["num_items_in_batch"] = part["completion_mask"].sum()
    trl_trainer.compute_loss(trl_trainer.model, part).backward()
    return gradients(policy)


GRPO_CASES = {
    # one update per rollout (on-policy: ratio 1, and TRL computes no old log-probs either), both aggregations,
    # the update accumulated over two micro-batches
    "dapo-on-policy": dict(loss_type="dapo", how="token_mean", beta=0.0, epsilon=0.2, epsilon_high=None,
                           temperature=1.0, epochs=1, mini_batches=1),
    "grpo-on-policy": dict(loss_type="grpo", how="sequence_mean", beta=0.0, epsilon=0.2, epsilon_high=None,
                           temperature=1.0, epochs=1, mini_batches=1),
    # a rollout that feeds several updates: the later ones are off-policy, importance-weighted and clipped
    # (asymmetric clip) against the policy that sampled; k3 KL to a reference; temperature
    "dapo-minibatches-clip-kl": dict(loss_type="dapo", how="token_mean", beta=0.04, epsilon=0.2, epsilon_high=0.28,
                                     temperature=0.7, epochs=1, mini_batches=2),
    "grpo-epochs-clip-kl": dict(loss_type="grpo", how="sequence_mean", beta=0.04, epsilon=0.2, epsilon_high=0.28,
                                temperature=0.7, epochs=2, mini_batches=1),
    # bnpo is a token mean per micro-batch: it matches token_mean when an update is one micro-batch
    "bnpo-minibatches-clip-kl": dict(loss_type="bnpo", how="token_mean", beta=0.04, epsilon=0.2, epsilon_high=0.28,
                                     temperature=0.7, epochs=1, mini_batches=2),
}


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_update_matches_trl(case, make_model, tmp_path):
    """grpo.update on a fixed rollout: at every optimizer update, the gradients posttrain steps with equal TRL's
    for the same mini-batch, TRL being given the weights the policy had at that update and, when the rollout
    feeds several updates, the log-probs of the policy that sampled as its old log-probs."""
    c = GRPO_CASES[case]
    model_dir = make_model("qwen2")
    policy, reference = load_policy_and_reference(model_dir)
    trl_trainer = grpo_trainer(model_dir, policy, tmp_path / "trl", loss_type=c["loss_type"], beta=c["beta"],
                               epsilon=c["epsilon"], epsilon_high=c["epsilon_high"], temperature=c["temperature"])
    trainer = grpo_stage(model_dir, tmp_path, loss=c["how"], clip=c["epsilon"], clip_high=c["epsilon_high"],
                         kl_coef=c["beta"], temperature=c["temperature"], epochs=c["epochs"],
                         mini_batches=c["mini_batches"])
    trainer.ctx.reference = Reference("copy", reference)  # the same perturbed reference TRL has
    records = record_updates(trainer)
    prompts, completions = grpo_sequences(policy.config.vocab_size)
    sampler = hf_completion_logps(policy, prompts, completions, c["temperature"])
    ref = hf_completion_logps(reference, prompts, completions, c["temperature"])
    n = len(completions)

    metrics = grpo.update(trainer, trainer.ctx, rollout_of(prompts, completions, GRPO_REWARDS))["metrics"]

    plan = [mb for epoch in range(c["epochs"]) for mb in online.minibatch_plan(n, c["mini_batches"], seed=epoch)]
    assert len(records) == len(plan) == c["epochs"] * c["mini_batches"]
    lengths = torch.tensor(GRPO_COMPLETION_LENGTHS)
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts),
              "completion_ids": padded_rows(completions),
              "completion_mask": (torch.arange(max(lengths))[None, :] < lengths[:, None]).long(),
              "advantages": group_advantages(GRPO_REWARDS, GRPO_GENERATIONS)}
    if c["beta"] > 0:
        inputs["ref_per_token_logps"] = padded_rows(ref)
    if len(plan) > 1:
        inputs["old_per_token_logps"] = padded_rows(sampler)
    for update, (rows, record) in enumerate(zip(plan, records)):
        trl_grads = trl_gradients(trl_trainer, policy, record["weights"], inputs, rows)
        assert record["grads"].keys() == trl_grads.keys()
        for name, grad in trl_grads.items():
            torch.testing.assert_close(record["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"update {update}: {name}")

    if len(plan) > 1:  # the later updates were off-policy and clipped: the match is not a ratio-1 coincidence
        policy.load_state_dict(records[-1]["weights"])
        moved = hf_completion_logps(policy, prompts, completions, c["temperature"])
        assert max(float((a - b).abs().max()) for a, b in zip(moved, sampler)) > 0.3
        assert metrics["clip_fraction"] > 0.01, metrics["clip_fraction"]
    else:
        assert metrics["clip_fraction"] == 0.0
    if c["beta"] > 0:
        assert kl_k3(torch.cat(sampler), torch.cat(ref)).mean() > 1e-3  # the KL term is not ~0


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # TRL's generate
def test_grpo_on_trl_rollout_matches_trl(make_model, tmp_path):
    """TRL's own rollout (its generation, prompt padding, completion masks after EOS, reward-to-advantage code and
    reference log-probs): group_advantages on the rewards TRL saw equals TRL's advantages for each reward scaling,
    and grpo.update's gradients on those completions (token_mean, k3 KL to the same reference model, temperature
    0.8) equal TRL's dapo loss's."""
    model_dir = make_model("qwen2")
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen = []

    def char_reward(completions, **kwargs):
        scores = [float(sum(map(ord, c)) % 7) for c in completions]
        seen.append(torch.tensor(scores))
        return scores

    beta, temperature = 0.05, 0.8
    args = trl.GRPOConfig(loss_type="dapo", beta=beta, temperature=temperature, num_generations=GRPO_GENERATIONS,
                          max_completion_length=6, use_bias_correction_kl=False, activation_checkpointing=False,
                          **{**common_args(tmp_path / "trl"), "per_device_train_batch_size": 2 * GRPO_GENERATIONS})
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=char_reward, args=args,
                              train_dataset=Dataset.from_list(GRPO_PROMPTS),
                              processing_class=AutoTokenizer.from_pretrained(model_dir))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # TRL loaded its reference as a copy of the policy: move it away, so the KL is not 0
        for parameter in trainer.ref_model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    rows = [{"prompt": p["prompt"]} for p in GRPO_PROMPTS for _ in range(GRPO_GENERATIONS)]

    for scale in ["none", "batch", "group"]:  # one rollout each; the loss check below uses the last one
        trainer.scale_rewards = scale
        rollout = trainer._generate_and_score_completions(rows)
        ours = group_advantages(seen[-1], GRPO_GENERATIONS, "grpo", scale)
        assert rollout["advantages"].abs().max() > 0.1, scale
        torch.testing.assert_close(ours, rollout["advantages"], rtol=0, atol=1e-6, msg=scale)

    trainer.compute_loss(trainer.model, rollout).backward()
    trl_grads = gradients(policy)

    # The same completions, laid out as posttrain's rollout does: prompt + completion up to its end, right-padded.
    # TRL left-pads the prompts and passes no position_ids, so its positions start at the padding: a shift by a
    # constant, which rotary attention (relative positions only) does not see, up to rounding.
    prompts, completions = [], []
    for p_ids, p_mask, c_ids, c_mask in zip(rollout["prompt_ids"], rollout["prompt_mask"],
                                            rollout["completion_ids"], rollout["completion_mask"]):
        prompts.append(p_ids[p_mask.bool()])
        completions.append(c_ids[c_mask.bool()])
    ref = hf_completion_logps(trainer.ref_model, prompts, completions, temperature)
    torch.testing.assert_close(torch.cat(ref), rollout["ref_per_token_logps"][rollout["completion_mask"].bool()],
                               rtol=0, atol=1e-5)
    stage = grpo_stage(model_dir, tmp_path, kl_coef=beta, temperature=temperature)
    stage.ctx.reference = Reference("copy", trainer.ref_model)
    records = record_updates(stage)
    # group_advantages(scores) with scale "group" is what TRL used for this rollout (checked above)
    grpo.update(stage, stage.ctx, rollout_of(prompts, completions, seen[-1]))

    assert (rollout["prompt_mask"] == 0).any()  # TRL did left-pad some prompts
    assert len(records) == 1
    assert kl_k3(torch.cat(hf_completion_logps(policy, prompts, completions, temperature)), torch.cat(ref)).mean() > 1e-3
    for name, grad in trl_grads.items():
        torch.testing.assert_close(records[0]["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
