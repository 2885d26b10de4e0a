"""Group advantage estimators and zero-variance group detection."""

from __future__ import annotations

import pytest
import torch

from fastrl.algo import group_advantages, zero_variance_groups

# groups interleaved on purpose: 7 has rewards 1, 0, 0, 1; 3 has 2, 2; 9 is a singleton
REWARDS = torch.tensor([1.0, 2.0, 0.0, 5.0, 0.0, 2.0, 1.0])
GROUPS = torch.tensor([7, 3, 7, 9, 7, 3, 7])


def test_grpo_hand_example():
    adv = group_advantages(REWARDS, GROUPS, estimator="grpo", eps=1e-6)
    # group 7: mean 0.5, population std 0.5
    s = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([s, 0.0, -s, 0.0, -s, 0.0, s]))


def test_drgrpo_hand_example():
    adv = group_advantages(REWARDS, GROUPS, estimator="drgrpo")
    torch.testing.assert_close(adv, torch.tensor([0.5, 0.0, -0.5, 0.0, -0.5, 0.0, 0.5]))


def test_rloo_hand_example():
    adv = group_advantages(REWARDS, GROUPS, estimator="rloo")
    # reward 1 against the mean of (0, 0, 1) = 1/3; reward 0 against (1, 0, 1) = 2/3
    third = 2.0 / 3.0
    torch.testing.assert_close(adv, torch.tensor([third, 0.0, -third, 0.0, -third, 0.0, third]))


def test_grpo_matches_float64_loop():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(40, generator=gen) * 3 - 1  # [N]
    groups = torch.randint(0, 6, (40,), generator=gen) * 11  # [N]
    adv = group_advantages(rewards, groups, estimator="grpo", eps=1e-4)
    expected = torch.empty(40, dtype=torch.float64)
    for g in groups.unique():
        members = groups == g
        r = rewards[members].double()
        expected[members] = (r - r.mean()) / (r.std(unbiased=False) + 1e-4)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_singleton_and_constant_groups_give_zero(estimator):
    rewards = torch.tensor([3.0, 0.5, 0.5, 0.5, -2.0])
    groups = torch.tensor([0, 1, 1, 1, 2])
    assert torch.all(group_advantages(rewards, groups, estimator=estimator) == 0)


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="grpo, drgrpo, rloo"):
        group_advantages(REWARDS, GROUPS, estimator="ppo")


def test_zero_variance_groups():
    flags = zero_variance_groups(REWARDS, GROUPS)
    assert flags.tolist() == [False, True, False, True, False, True, False]
    binary = torch.tensor([1, 1, 0, 0, 1])  # integer rewards work too
    assert zero_variance_groups(binary, torch.tensor([4, 4, 5, 5, 5])).tolist() == [
        True,
        True,
        False,
        False,
        False,
    ]
