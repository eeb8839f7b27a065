"""Parity with TRL: on the same model and batch, our losses equal the values TRL's own trainers compute.

TRL 1.16 has no standalone DPO/KTO loss function (the loss is inlined in `_compute_loss`), so each test builds the
real TRL trainer on a tiny dataset, collates a batch with TRL's own data collator, and calls the trainer's
`compute_loss` on it. Our side runs a plain forward on the same tensors and applies `posttrain.losses`.
The reference model is a copy of the policy with perturbed weights, so the log-ratios are not zero.
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
