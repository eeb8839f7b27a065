"""Each preference loss against its formula, written again here with plain Python floats (math.log / math.exp)."""
from __future__ import annotations

import math

import pytest
import torch

from posttrain.forward import sequence_logps, token_logps
from posttrain.losses import (DPO_LOSSES, LENGTH_NORMALISED_LOSSES, REFERENCE_FREE_LOSSES, bradley_terry,
                              dpo_rewards, kto_kl, kto_loss)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_sigmoid(x: float) -> float:
    return math.log(sigmoid(x))


# Three hand-made pairs: summed log-probs of policy and reference for chosen (w) and rejected (l).
CHOSEN = [-12.0, -7.5, -20.25]
REJECTED = [-14.0, -6.0, -19.0]
REF_CHOSEN = [-13.0, -7.0, -21.0]
REF_REJECTED = [-13.5, -6.5, -18.0]
BETA = 0.1


def pairs():
    return [torch.tensor(v, dtype=torch.float64) for v in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)]


def h(i: int) -> float:
    return (CHOSEN[i] - REF_CHOSEN[i]) - (REJECTED[i] - REF_REJECTED[i])


def dpo(name: str, **kwargs) -> list[float]:
    return DPO_LOSSES[name](*pairs(), beta=kwargs.pop("beta", BETA), **kwargs).tolist()


def test_registry_names():
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"}
    assert REFERENCE_FREE_LOSSES == {"simpo", "orpo"}
    assert LENGTH_NORMALISED_LOSSES == {"ipo", "simpo", "orpo"}


def test_sigmoid_matches_formula():
    expected = [-log_sigmoid(BETA * h(i)) for i in range(3)]
    assert dpo("sigmoid") == pytest.approx(expected, abs=1e-12)


def test_sigmoid_label_smoothing_is_cdpo():
    eps = 0.1
    expected = [-(1 - eps) * log_sigmoid(BETA * h(i)) - eps * log_sigmoid(-BETA * h(i)) for i in range(3)]
    assert dpo("sigmoid", label_smoothing=eps) == pytest.approx(expected, abs=1e-12)


def test_sigmoid_at_reference_is_ln2():
    logps = torch.tensor([-5.0, -17.0, -3.25])
    rejected = torch.tensor([-9.0, -1.0, -40.0])
    loss = DPO_LOSSES["sigmoid"](logps, rejected, logps.clone(), rejected.clone(), beta=0.1)
    assert loss.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-7)


def test_ipo_matches_formula():
    expected = [(h(i) - 1 / (2 * BETA)) ** 2 for i in range(3)]
    assert dpo("ipo") == pytest.approx(expected, abs=1e-9)


def test_hinge_matches_formula():
    expected = [max(0.0, 1 - BETA * h(i)) for i in range(3)]
    assert dpo("hinge") == pytest.approx(expected, abs=1e-12)
    # large beta makes the margin reachable: the loss is exactly 0 where β h >= 1
    big = dpo("hinge", beta=10.0)
    assert [b == 0.0 for b in big] == [10.0 * h(i) >= 1 for i in range(3)]


def test_robust_matches_formula():
    eps = 0.2
    expected = [(-(1 - eps) * log_sigmoid(BETA * h(i)) + eps * log_sigmoid(-BETA * h(i))) / (1 - 2 * eps)
                for i in range(3)]
    assert dpo("robust", label_smoothing=eps) == pytest.approx(expected, abs=1e-12)
    assert dpo("robust") == pytest.approx(dpo("sigmoid"), abs=1e-12)
    with pytest.raises(ValueError):
        dpo("robust", label_smoothing=0.5)


# Length-normalised (per-token average) log-probs for the reference-free losses.
AVG_CHOSEN = [-0.8, -1.25, -0.05]
AVG_REJECTED = [-1.1, -0.9, -2.0]


def test_simpo_matches_formula_and_ignores_reference():
    beta, gamma = 2.0, 0.7
    expected = [-log_sigmoid(beta * (w - l) - gamma) for w, l in zip(AVG_CHOSEN, AVG_REJECTED)]
    w, l = torch.tensor(AVG_CHOSEN, dtype=torch.float64), torch.tensor(AVG_REJECTED, dtype=torch.float64)
    assert DPO_LOSSES["simpo"](w, l, None, None, beta=beta, gamma=gamma).tolist() == pytest.approx(expected)
    ref = torch.full_like(w, 123.0)
    assert DPO_LOSSES["simpo"](w, l, ref, ref, beta=beta, gamma=gamma).tolist() == pytest.approx(expected)


def test_orpo_matches_formula():
    lam = 0.25

    def log_odds(avg: float) -> float:
        p = math.exp(avg)
        return math.log(p / (1 - p))

    expected = [-lam * log_sigmoid(log_odds(w) - log_odds(l)) for w, l in zip(AVG_CHOSEN, AVG_REJECTED)]
    w, l = torch.tensor(AVG_CHOSEN, dtype=torch.float64), torch.tensor(AVG_REJECTED, dtype=torch.float64)
    assert DPO_LOSSES["orpo"](w, l, None, None, beta=lam).tolist() == pytest.approx(expected, abs=1e-12)


def test_dpo_rewards():
    chosen, rejected = dpo_rewards(*pairs(), beta=BETA)
    assert chosen.tolist() == pytest.approx([BETA * (c - r) for c, r in zip(CHOSEN, REF_CHOSEN)])
    assert rejected.tolist() == pytest.approx([BETA * (c - r) for c, r in zip(REJECTED, REF_REJECTED)])
    w, l = torch.tensor(CHOSEN), torch.tensor(REJECTED)
    free_w, free_l = dpo_rewards(w, l, None, None, beta=BETA)
    assert free_w.tolist() == pytest.approx([BETA * c for c in CHOSEN])
    assert free_l.tolist() == pytest.approx([BETA * c for c in REJECTED])


def test_bradley_terry_matches_formula():
    r_w, r_l, m = [1.5, -0.25, 0.0], [0.5, 0.75, -2.0], [0.3, 0.0, 1.0]
    tw, tl = torch.tensor(r_w, dtype=torch.float64), torch.tensor(r_l, dtype=torch.float64)
    plain = bradley_terry(tw, tl).tolist()
    assert plain == pytest.approx([-log_sigmoid(w - l) for w, l in zip(r_w, r_l)], abs=1e-7)
    with_margin = bradley_terry(tw, tl, margin=torch.tensor(m, dtype=torch.float64)).tolist()
    assert with_margin == pytest.approx([-log_sigmoid(w - l - mm) for w, l, mm in zip(r_w, r_l, m)], abs=1e-7)


def test_reward_centering_term():
    c = 0.01
    r_w, r_l = [3.0, 2.0, -1.0], [1.0, 2.5, -4.0]
    tw, tl = torch.tensor(r_w), torch.tensor(r_l)
    loss = bradley_terry(tw, tl, center_coef=c)
    expected = [-log_sigmoid(w - l) + c * (w + l) ** 2 for w, l in zip(r_w, r_l)]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    # TRL's batch form: -mean log σ(Δ) + c · mean((r_w + r_l)²)
    trl_form = (sum(-log_sigmoid(w - l) for w, l in zip(r_w, r_l)) / 3
                + c * sum((w + l) ** 2 for w, l in zip(r_w, r_l)) / 3)
    assert loss.mean().item() == pytest.approx(trl_form, abs=1e-6)
    # centering pulls the sum of the rewards towards 0: its gradient is 2c(r_w + r_l) on each reward
    tw.requires_grad_(True)
    tl.requires_grad_(True)
    (bradley_terry(tw, tl, center_coef=c) - bradley_terry(tw, tl)).sum().backward()
    assert tw.grad.tolist() == pytest.approx([2 * c * (w + l) for w, l in zip(r_w, r_l)], abs=1e-6)


def test_kto_matches_formula():
    policy, ref = [-10.0, -4.0, -7.0, -3.0], [-11.0, -3.5, -6.0, -3.25]
    desirable = [True, True, False, False]
    beta, w_d, w_u = 0.1, 1.0, 1.5
    for kl in (0.4, -0.3):  # a negative estimate is clamped to 0
        z0 = max(kl, 0.0)
        expected = []
        for p, r, d in zip(policy, ref, desirable):
            logratio = p - r
            expected.append(w_d * (1 - sigmoid(beta * (logratio - z0))) if d
                            else w_u * (1 - sigmoid(beta * (z0 - logratio))))
        loss = kto_loss(torch.tensor(policy, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                        torch.tensor(desirable), torch.tensor(kl, dtype=torch.float64), beta=beta,
                        desirable_weight=w_d, undesirable_weight=w_u)
        assert loss.tolist() == pytest.approx(expected, abs=1e-12)


def test_kto_kl_is_detached_mean():
    policy = torch.tensor([-5.0, -6.0, -2.0], requires_grad=True)
    ref = torch.tensor([-5.5, -5.0, -1.0])
    kl = kto_kl(policy, ref)
    assert kl.item() == pytest.approx(((0.5) + (-1.0) + (-1.0)) / 3)
    assert not kl.requires_grad


def manual_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """log softmax written out per position with math.exp on python floats."""
    out = []
    for n in range(logits.size(0)):
        row = []
        for t in range(logits.size(1) - 1):
            target = int(labels[n, t + 1])
            if target == -100:
                row.append(0.0)
                continue
            values = logits[n, t].tolist()
            top = max(values)
            log_z = top + math.log(sum(math.exp(v - top) for v in values))
            row.append(values[target] - log_z)
        out.append(row)
    return out


def masked_batch(vocab_size: int):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab_size, (3, 6), generator=generator)
    labels = input_ids.clone()
    labels[0, :2] = -100  # prompt
    labels[1, :4] = -100
    labels[1, 5] = -100  # padding at the end
    labels[2, :] = -100  # nothing trained
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def small_lm(make_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(make_model("qwen2"), dtype=torch.float32).eval()


def test_token_and_sequence_logps_match_manual_loop(small_lm):
    """forward.py (the LM head on trained positions only) against log softmax written out in Python floats
    over the model's full logits."""
    batch = masked_batch(small_lm.config.vocab_size)
    with torch.no_grad():
        logits = small_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        manual = manual_token_logps(logits, batch["labels"])
        sums, counts = sequence_logps(small_lm, batch)
        per_token = token_logps(small_lm, batch)
    trained = [v for row, labels in zip(manual, batch["labels"].tolist()) for v, label in zip(row, labels[1:])
               if label != -100]
    assert per_token["logps"].tolist() == pytest.approx(trained, abs=1e-5)
    assert per_token["slots"].tolist() == [0, 0, 0, 0, 1]
    assert sums.tolist() == pytest.approx([sum(row) for row in manual], abs=1e-5)
    assert counts.tolist() == [4, 1, 0]
    assert sums[2].item() == 0.0


def test_sequence_logps_bf16_model_is_scored_in_fp32(small_lm):
    import copy

    model = copy.deepcopy(small_lm).to(torch.bfloat16)
    batch = masked_batch(model.config.vocab_size)
    with torch.no_grad():
        sums, _ = sequence_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert sums.dtype == torch.float32
    manual = manual_token_logps(logits.float(), batch["labels"])
    assert sums.tolist() == pytest.approx([sum(row) for row in manual], abs=1e-4)


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_gradients_flow_through_logps(name, small_lm):
    import copy

    model = copy.deepcopy(small_lm).train()
    batch = masked_batch(model.config.vocab_size)
    two = {k: v[:2] for k, v in batch.items()}  # two sequences: chosen, rejected
    sums, counts = sequence_logps(model, two)
    if name in LENGTH_NORMALISED_LOSSES:
        sums = sums / counts.clamp(min=1)
    chosen, rejected = sums[:1], sums[1:]
    ref_chosen, ref_rejected = chosen.detach() + 0.3, rejected.detach() - 0.2
    loss = DPO_LOSSES[name](chosen, rejected, ref_chosen, ref_rejected, beta=0.5, label_smoothing=0.1).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_gradients_flow_kto_and_bradley_terry():
    policy = torch.tensor([-3.0, -4.0], requires_grad=True)
    kto_loss(policy, torch.tensor([-3.5, -3.0]), torch.tensor([True, False]), torch.tensor(0.1),
             beta=0.1).sum().backward()
    assert (policy.grad != 0).all()
    rewards = torch.tensor([0.5, -0.5], requires_grad=True)
    bradley_terry(rewards[:1], rewards[1:], center_coef=0.01).sum().backward()
    assert rewards.grad[0] < 0 < rewards.grad[1]
