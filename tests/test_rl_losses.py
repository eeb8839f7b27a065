"""The online-RL formulas against hand computation (plain Python loops, written again here)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain.losses import (adaptive_kl_coef, aggregate, gae, group_advantages, kl_k1, kl_k3, masked_whiten,
                              ppo_policy_loss, ppo_value_loss)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    assert kl_k1(logp, ref).tolist() == pytest.approx([0.5, -1.0, 0.0])
    expected = [math.exp(r - l) - (r - l) - 1 for l, r in zip(logp.tolist(), ref.tolist())]
    assert kl_k3(logp, ref).tolist() == pytest.approx(expected)
    assert (kl_k3(logp, ref) >= 0).all()


def test_gae_matches_a_backwards_loop():
    rng = random.Random(0)
    lengths = [5, 3, 1]
    rewards = [[rng.uniform(-1, 1) for _ in range(n)] for n in lengths]
    values = [[rng.uniform(-1, 1) for _ in range(n)] for n in lengths]
    gamma, lam = 0.9, 0.8
    width = max(lengths)
    r = torch.zeros(3, width)
    v = torch.zeros(3, width)
    mask = torch.zeros(3, width)
    for i, n in enumerate(lengths):
        r[i, :n], v[i, :n], mask[i, :n] = torch.tensor(rewards[i]), torch.tensor(values[i]), 1
    v[0, :] += 0  # padding values must not leak in: put junk there
    v[2, 1:] = 7.0
    adv, ret = gae(r, v, mask, gamma, lam)
    for i, n in enumerate(lengths):
        running, expected = 0.0, [0.0] * n
        for t in reversed(range(n)):
            next_v = values[i][t + 1] if t + 1 < n else 0.0
            delta = rewards[i][t] + gamma * next_v - values[i][t]
            running = delta + gamma * lam * running
            expected[t] = running
        assert adv[i, :n].tolist() == pytest.approx(expected, abs=1e-6)
        assert ret[i, :n].tolist() == pytest.approx([a + b for a, b in zip(expected, values[i])], abs=1e-6)
        assert adv[i, n:].abs().sum() == 0


def test_gae_gamma_one_lambda_one_is_return_minus_value():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.2, 0.4, 0.6]])
    adv, ret = gae(r, v, torch.ones(1, 3), 1.0, 1.0)
    assert ret.tolist()[0] == pytest.approx([1.0, 1.0, 1.0])
    assert adv.tolist()[0] == pytest.approx([0.8, 0.6, 0.4])


def test_clipped_surrogate_and_value_loss():
    logp = torch.tensor([0.0, math.log(1.5), math.log(0.5), math.log(1.1)])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, clipped, approx = ppo_policy_loss(logp, old, adv, 0.2)
    # ratio 1: -A; ratio 1.5 > 1.2 with A > 0: clipped to -1.2; ratio 0.5 with A < 0: clipped to 0.8;
    # ratio 1.1 inside the range: -A * 1.1
    assert loss.tolist() == pytest.approx([-1.0, -1.2, 0.8, 2.2])
    assert clipped.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert approx.tolist() == pytest.approx([0.5 * x * x for x in logp.tolist()])
    loss_high, _, _ = ppo_policy_loss(logp, old, adv, 0.2, clip_high=0.6)
    assert loss_high[1].item() == pytest.approx(-1.5)  # 1.5 < 1 + 0.6: not clipped any more

    v, v_old, ret = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.5, 0.5, 0.5]), torch.tensor([2.0, 0.0, 0.0])
    # row 0: unclipped (1-2)^2 = 1, clipped (0.7-2)^2 = 1.69 -> 0.845; row 1: 0, (0.3)^2 -> 0.045; row 2: 0.125
    assert ppo_value_loss(v, v_old, ret, 0.2).tolist() == pytest.approx([0.845, 0.045, 0.125])
    assert ppo_value_loss(v, v_old, ret, None).tolist() == pytest.approx([0.5, 0.0, 0.125])


def test_whiten_uses_the_masked_entries_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = masked_whiten(x, mask)
    assert white.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)


def test_adaptive_kl_controller():
    # e = clip(KL/target - 1, -0.2, 0.2); beta * (1 + e * n / horizon)
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert adaptive_kl_coef(0.1, 6.6, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000))
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    grpo = group_advantages(rewards, 4, "grpo", "group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    assert grpo[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 +
                                              [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)], rel=1e-5)
    assert grpo[4:].tolist() == [0.0] * 4  # a group with equal rewards teaches nothing
    none = group_advantages(rewards, 4, "grpo", "none")
    assert none.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    batch = group_advantages(rewards, 4, "grpo", "batch")
    assert batch.tolist() == pytest.approx((none / (rewards.std() + 1e-4)).tolist())
    rloo = group_advantages(rewards, 4, "rloo")
    # r_i minus the mean of the other three
    assert rloo[0].item() == pytest.approx(1.0 - 1 / 3)
    assert rloo[1].item() == pytest.approx(0.0 - 2 / 3)
    # reinforce++: centred within the group first, then whitened over the batch. The groups have different means
    # (0.5 and 2.0), so this is not plain whitening of the rewards: the second group's advantages are all 0.
    pp = group_advantages(rewards, 4, "reinforce++")
    centred = [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    centred_std = torch.tensor(centred).std().item()
    assert pp.tolist() == pytest.approx([c / (centred_std + 1e-4) for c in centred], rel=1e-5, abs=1e-6)
    plain = (rewards - rewards.mean()) / rewards.std()
    assert (pp - plain).abs().max() > 0.5


def test_aggregation_token_and_sequence_mean():
    per_token = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token_mean") == (pytest.approx(6.0), 3.0)
    summed, count = aggregate(per_token, mask, "sequence_mean")
    assert (float(summed), count) == (pytest.approx(2.0 + 2.0), 2.0)


def test_minibatch_plan_spreads_the_rollout_evenly():
    from posttrain.rl.online import minibatch_plan

    for n, parts, sizes in [(10, 4, [3, 3, 2, 2]), (7, 3, [3, 2, 2]), (9, 4, [3, 2, 2, 2]), (3, 5, [1, 1, 1]),
                            (8, 1, [8])]:
        plan = minibatch_plan(n, parts, seed=0)
        assert [len(p) for p in plan] == sizes, (n, parts)
        assert sorted(i for p in plan for i in p) == list(range(n))
    assert minibatch_plan(10, 4, seed=3) == minibatch_plan(10, 4, seed=3) != minibatch_plan(10, 4, seed=4)


def test_running_standardize_uses_every_value_seen_so_far():
    from posttrain.losses import running_standardize

    first, second = torch.tensor([0.2, 0.4, 0.9]), torch.tensor([1.5, -0.5])
    moments = {"count": 3, "sum": float(first.sum()), "sum_sq": float((first ** 2).sum())}
    seen = first
    assert running_standardize(first, moments).tolist() == pytest.approx(((first - seen.mean()) / seen.std()).tolist())
    moments = {"count": 5, "sum": moments["sum"] + float(second.sum()),
               "sum_sq": moments["sum_sq"] + float((second ** 2).sum())}
    seen = torch.cat([first, second])
    assert running_standardize(second, moments).tolist() == pytest.approx(((second - seen.mean()) / seen.std()).tolist(),
                                                                        rel=1e-5)
    assert running_standardize(torch.tensor([3.0]), {"count": 1, "sum": 3.0, "sum_sq": 9.0}).tolist() == [0.0]
