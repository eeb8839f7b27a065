"""Parity with TRL: on the same model and batch, our losses equal the values TRL's own trainers compute.

TRL 1.16 has no standalone DPO/KTO loss function (the loss is inlined in `_compute_loss`), so each test builds the
real TRL trainer on a tiny dataset, collates a batch with TRL's own data collator, and calls the trainer's
`compute_loss` on it. Our side runs a plain forward on the same tensors and applies `posttrain.losses`.
The reference model is a copy of the policy with perturbed weights, so the log-ratios are not zero.
GRPO: the same idea with GRPOTrainer's `compute_loss` on a hand-built batch of completions (and on a rollout TRL
generates and scores itself); the notes above the GRPO tests say how TRL's settings map to posttrain's.
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

from posttrain.losses import (DPO_LOSSES, LENGTH_NORMALISED_LOSSES, bradley_terry, kto_kl,  # noqa: E402
                              kto_loss, sequence_logps)

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


def our_sequence_logps(model, input_ids, attention_mask, completion_mask, grad: bool = False):
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return sequence_logps(logits, labels)


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

    inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    policy_logps, counts = our_sequence_logps(policy, *inputs, grad=True)
    reference_logps, _ = our_sequence_logps(reference, *inputs)
    if loss_type in LENGTH_NORMALISED_LOSSES:
        policy_logps, reference_logps = policy_logps / counts.clamp(min=1), reference_logps / counts.clamp(min=1)
    chosen, rejected = policy_logps.chunk(2)
    ref_chosen, ref_rejected = reference_logps.chunk(2)
    ours = DPO_LOSSES[loss_type](chosen, rejected, ref_chosen, ref_rejected, beta=BETA).mean()
    ours.backward()
    our_grads = gradients(policy)

    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    assert h.abs().min() > 1e-3  # the reference really differs, so the test is not checking ln 2 twice
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
    logps, _ = our_sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    chosen, rejected = logps.chunk(2)
    ours = DPO_LOSSES["sigmoid"](chosen, rejected, chosen, rejected, beta=BETA).mean().item()
    assert ours == pytest.approx(math.log(2), abs=1e-7)
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

    inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    mismatched = (batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    policy_logps, _ = our_sequence_logps(policy, *inputs)
    reference_logps, _ = our_sequence_logps(reference, *inputs)
    kl = kto_kl(our_sequence_logps(policy, *mismatched)[0], our_sequence_logps(reference, *mismatched)[0])
    ours = kto_loss(policy_logps, reference_logps, batch["label"], kl, beta=BETA,
                    desirable_weight=desirable_weight, undesirable_weight=undesirable_weight).mean().item()

    assert kl.item() > 0.1  # the reference point is active, not clamped away
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
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = rewards.chunk(2)
    ours = bradley_terry(chosen, rejected, margin=batch["margin"], center_coef=center).mean().item()

    assert (chosen + rejected).abs().max() > 0.1
    assert abs(ours - trl_loss) < TOLERANCE, (ours, trl_loss)


# ---------------------------------------------------------------------------------------------------------------
# GRPO: posttrain's per-token loss (losses.ppo_policy_loss + kl_coef * losses.kl_k3, aggregated by losses.aggregate,
# composed as rl/grpo.py `step` does it) against TRL's GRPOTrainer._compute_loss on the same hand-built batch.
#
# Mapping (TRL 1.16 -> posttrain): epsilon -> grpo.clip, epsilon_high -> grpo.clip_high, beta -> grpo.kl_coef,
# temperature -> generation.temperature, loss_type "dapo" -> loss "token_mean", loss_type "grpo" -> loss
# "sequence_mean". TRL's `old_per_token_logps` absent means "the current ones, detached": posttrain's epochs = 1.
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
#   means across micro-batches. It equals posttrain's token_mean only when the update is ONE micro-batch, which
#   is the only way it is tested here; "dapo" is the loss that stays a token mean over the whole update.
# Batch layout: all prompts have the same length, so TRL's [left-padded prompt | right-padded completion] and
# posttrain's right-padded [prompt + completion] are the same tensors (no positions shift between the two).
# ---------------------------------------------------------------------------------------------------------------
# posttrain.stages first: importing posttrain.rl.online (or rl.grpo / rl.ppo) on its own fails with a circular
# import (rl.online -> stages.lm -> stages/__init__ -> stages.online -> rl.ppo -> rl.online, half-initialised).
import posttrain.stages  # noqa: E402,F401
from posttrain.data.batching import collate  # noqa: E402
from posttrain.losses import aggregate, group_advantages, kl_k3, ppo_policy_loss  # noqa: E402
from posttrain.rl.grpo import _rows  # noqa: E402
from posttrain.rl.online import PolicyWithValue  # noqa: E402

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


def posttrain_grpo_loss(policy, sequences, pad_id, advantages, old, ref, *, how, temperature, clip, clip_high,
                        kl_coef, micro, backward=True):
    """One update of rl/grpo.py `step` over these sequences, in micro-batches of `micro` completions: each
    micro-batch's aggregated sum is divided by the update's total (tokens for token_mean, completions for
    sequence_mean) and back-propagated; returns the update's loss. `old` / `ref` are per-sequence log-prob
    tensors (old None: epochs = 1, the current log-probs detached)."""
    actor = PolicyWithValue(policy)
    lengths = [sum(label != -100 for label in s["labels"]) for s in sequences]
    total = sum(lengths) if how == "token_mean" else len(sequences)
    loss = 0.0
    for start in range(0, len(sequences), micro):
        indices = list(range(start, min(start + micro, len(sequences))))
        part = [lengths[i] for i in indices]
        batch = collate([sequences[i] for i in indices], pad_id)
        with torch.set_grad_enabled(backward):
            logps, _, _ = actor(batch, temperature, values=False)
            old_part = torch.cat([old[i] for i in indices]) if old is not None else logps.detach()
            adv = torch.repeat_interleave(advantages[indices], torch.tensor(part))
            per_token, _, _ = ppo_policy_loss(logps, old_part, adv, clip, clip_high)
            if ref is not None and kl_coef > 0:
                per_token = per_token + kl_coef * kl_k3(logps, torch.cat([ref[i] for i in indices]))
            padded, mask = _rows(per_token, part)
            summed, _ = aggregate(padded, mask, how)
        if backward:
            (summed / total).backward()
        loss += summed.item() / total
    return loss


GRPO_CASES = {
    # on-policy (ratio 1, TRL computes no old log-probs either): the plain policy gradient, two aggregations
    "dapo-on-policy": dict(loss_type="dapo", how="token_mean", beta=0.0, epsilon=0.2, epsilon_high=None,
                           temperature=1.0, off_policy=False, micro=3),
    "grpo-on-policy": dict(loss_type="grpo", how="sequence_mean", beta=0.0, epsilon=0.2, epsilon_high=None,
                           temperature=1.0, off_policy=False, micro=3),
    # off-policy old log-probs (clipping active on both sides, asymmetric clip), k3 KL to a reference, temperature
    "dapo-clip-kl": dict(loss_type="dapo", how="token_mean", beta=0.04, epsilon=0.2, epsilon_high=0.28,
                         temperature=0.7, off_policy=True, micro=3),
    "grpo-clip-kl": dict(loss_type="grpo", how="sequence_mean", beta=0.04, epsilon=0.2, epsilon_high=0.28,
                         temperature=0.7, off_policy=True, micro=3),
    # bnpo is a token mean per micro-batch: it matches token_mean when the update is one micro-batch
    "bnpo-clip-kl": dict(loss_type="bnpo", how="token_mean", beta=0.04, epsilon=0.2, epsilon_high=0.28,
                         temperature=0.7, off_policy=True, micro=len(GRPO_COMPLETION_LENGTHS)),
}


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_loss_matches_trl(case, make_model, tmp_path):
    c = GRPO_CASES[case]
    model_dir = make_model("qwen2")
    policy, reference = load_policy_and_reference(model_dir)
    trainer = grpo_trainer(model_dir, policy, tmp_path, loss_type=c["loss_type"], beta=c["beta"],
                           epsilon=c["epsilon"], epsilon_high=c["epsilon_high"], temperature=c["temperature"])
    pad_id = trainer.processing_class.pad_token_id
    prompts, completions = grpo_sequences(policy.config.vocab_size)
    lengths = GRPO_COMPLETION_LENGTHS
    sequences = [{"input_ids": p.tolist() + y.tolist(), "labels": [-100] * len(p) + y.tolist()}
                 for p, y in zip(prompts, completions)]
    advantages = group_advantages(GRPO_REWARDS, GRPO_GENERATIONS)

    # Per-token log-probs under logits / temperature, one tensor per completion (as grpo.step keeps them).
    full = collate(sequences, pad_id)
    with torch.no_grad():
        current = PolicyWithValue(policy)(full, c["temperature"], values=False)[0].split(lengths)
        ref = list(PolicyWithValue(reference)(full, c["temperature"], values=False)[0].split(lengths))
    old = None
    if c["off_policy"]:
        generator = torch.Generator().manual_seed(4)
        old = [x + 0.3 * torch.randn(x.shape, generator=generator) for x in current]

    # TRL: [prompt | completion] with per-row padded [B, C] tensors.
    completion_ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    for row, y in enumerate(completions):
        completion_ids[row, :len(y)] = y
    completion_mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages,
              "num_items_in_batch": completion_mask.sum()}
    if c["beta"] > 0:
        inputs["ref_per_token_logps"] = _rows(torch.cat(ref), lengths)[0]
    if old is not None:
        inputs["old_per_token_logps"] = _rows(torch.cat(old), lengths)[0]
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_grads = gradients(policy)

    settings = dict(temperature=c["temperature"], clip=c["epsilon"], clip_high=c["epsilon_high"],
                    kl_coef=c["beta"], micro=c["micro"])
    ours = posttrain_grpo_loss(policy, sequences, pad_id, advantages, old, ref, how=c["how"], **settings)
    our_grads = gradients(policy)
    other = "sequence_mean" if c["how"] == "token_mean" else "token_mean"
    other_loss = posttrain_grpo_loss(policy, sequences, pad_id, advantages, old, ref, how=other, backward=False,
                                     **settings)

    # The batch can tell the settings apart, so a match is not a coincidence.
    assert abs(other_loss - trl_loss.item()) > 1e-3, (other_loss, trl_loss.item())  # aggregation matters
    if c["off_policy"]:
        logps, olds = torch.cat(current), torch.cat(old)
        adv = torch.repeat_interleave(advantages, torch.tensor(lengths))
        _, clipped_asym, _ = ppo_policy_loss(logps, olds, adv, c["epsilon"], c["epsilon_high"])
        _, clipped_sym, _ = ppo_policy_loss(logps, olds, adv, c["epsilon"], c["epsilon"])
        ratio = torch.exp(logps - olds)
        assert ((ratio < 1 - c["epsilon"]) & (adv < 0)).any() and ((ratio > 1 + c["epsilon_high"]) & (adv > 0)).any()
        assert (clipped_asym != clipped_sym).any()  # epsilon_high changes which tokens are clipped
        assert kl_k3(logps, torch.cat(ref)).mean() > 1e-3  # the KL term is not ~0
    assert abs(ours - trl_loss.item()) < TOLERANCE, (case, ours, trl_loss.item())
    assert our_grads.keys() == trl_grads.keys()
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # TRL's generate
def test_grpo_on_trl_rollout_matches_trl(make_model, tmp_path):
    """TRL's own rollout (its generation, prompt padding, completion masks after EOS, reward-to-advantage code and
    reference log-probs): group_advantages on the rewards TRL saw equals TRL's advantages for each reward scaling,
    and posttrain's token_mean loss (k3 KL to the same reference model, temperature 0.8) equals TRL's dapo loss."""
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
                          **{**common_args(tmp_path), "per_device_train_batch_size": 2 * GRPO_GENERATIONS})
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

    trl_loss = trainer.compute_loss(trainer.model, rollout)
    trl_loss.backward()
    trl_grads = gradients(policy)

    # The same sequences, laid out as posttrain's rollout does: prompt + completion up to its end, right-padded.
    # TRL left-pads the prompts and passes no position_ids, so its positions start at the padding: a shift by a
    # constant, which rotary attention (relative positions only) does not see, up to rounding.
    sequences = []
    for p_ids, p_mask, c_ids, c_mask in zip(rollout["prompt_ids"], rollout["prompt_mask"],
                                            rollout["completion_ids"], rollout["completion_mask"]):
        prompt, completion = p_ids[p_mask.bool()].tolist(), c_ids[c_mask.bool()].tolist()
        sequences.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    lengths = [len(s["input_ids"]) - s["labels"].count(-100) for s in sequences]
    pad_id = trainer.processing_class.pad_token_id
    full = collate(sequences, pad_id)
    with torch.no_grad():
        current = PolicyWithValue(policy)(full, temperature, values=False)[0].split(lengths)
        ref = list(PolicyWithValue(trainer.ref_model)(full, temperature, values=False)[0].split(lengths))
    torch.testing.assert_close(torch.cat(ref), rollout["ref_per_token_logps"][rollout["completion_mask"].bool()],
                               rtol=0, atol=1e-5)

    ours = posttrain_grpo_loss(policy, sequences, pad_id, rollout["advantages"], None, ref, how="token_mean",
                               temperature=temperature, clip=0.2, clip_high=None, kl_coef=beta,
                               micro=GRPO_GENERATIONS)
    our_grads = gradients(policy)

    assert (rollout["prompt_mask"] == 0).any()  # TRL did left-pad some prompts
    assert kl_k3(torch.cat(current), torch.cat(ref)).mean() > 1e-3  # the KL term is not ~0
    assert abs(ours - trl_loss.item()) < TOLERANCE, (ours, trl_loss.item())
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
