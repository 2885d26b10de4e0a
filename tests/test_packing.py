"""Token-budget micro-batches (first-fit decreasing, rank balance) and grouping invariance."""

import copy
import random

import pytest
import torch

from fastrl.algo import supervision as S
from fastrl.config import load_config
from fastrl.rollout.loop import Limits
from fastrl.train import batch as B
from fastrl.train import packing
from fastrl.train import update as U


def _random_lengths(seed: int, n: int, hi: int = 900) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, hi) for _ in range(n)]


@pytest.mark.parametrize("seed", range(20))
def test_first_fit_decreasing_respects_budget_and_keeps_every_sequence(seed):
    lengths = _random_lengths(seed, 37) + [1500]  # one sequence longer than the budget
    bins = packing.first_fit_decreasing(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 1024 or len(b) == 1
    # First fit: no bin could have taken the first item of a later bin.
    for j, b in enumerate(bins):
        first = lengths[b[0]]
        for earlier in bins[:j]:
            assert sum(lengths[i] for i in earlier) + first > 1024
    # Within 11/9 OPT + 1 bins (a known bound); OPT >= total / budget.
    assert len(bins) <= 11 / 9 * -(-sum(min(n, 1024) for n in lengths) // 1024) + 2


def test_first_fit_decreasing_examples():
    assert packing.first_fit_decreasing([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert packing.first_fit_decreasing([], 7) == []
    with pytest.raises(ValueError, match="max_tokens"):
        packing.first_fit_decreasing([1], 0)


def test_kernel_choice_is_available_and_named():
    assert packing.available_kernels("cpu") == ["sdpa_segments"]
    assert packing.choose_kernel("cpu") == "sdpa_segments"
    with pytest.raises(ValueError, match="not available on cpu"):
        packing.choose_kernel("cpu", "torch_varlen")


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_update_is_the_same_for_two_groupings(tiny_policy, world, loss_agg):
    """Loss and gradients do not depend on how sequences are grouped into micro-batches."""
    model0, tok, _ = tiny_policy
    trajs = S.play_experts(
        tok, world, world.tasks("train", 6), Limits(max_total_tokens=4096), solved_only=True
    )
    lengths = [t.num_tokens for t in trajs]
    assert len(set(lengths)) > 1
    for i, t in enumerate(trajs):
        t.group_id = 0
        t.info["advantage"] = [1.0, -0.5, 0.25, -1.0, 0.75, -0.3][i % 6]
    results = []
    for budget in (sum(lengths), max(lengths)):  # one micro-batch, then (nearly) one per sequence
        cfg = load_config(
            None, [f"optim.max_tokens_per_microbatch={budget}", f"rl.loss_agg={loss_agg}"]
        )
        groups = B.micro_batches(trajs, budget, packed=True)
        model = copy.deepcopy(model0).train()
        model.config._attn_implementation = packing.register()  # the varlen path
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        stats = U.policy_update(model, optimizer, trajs, trajs, cfg.rl.lr, U.step_spec(cfg, tok))
        deltas = [(p - q).detach() for p, q in zip(model.parameters(), model0.parameters())]
        results.append((len(groups), stats, deltas))
    (n_one, s_one, d_one), (n_many, s_many, d_many) = results
    assert n_one == 1 and n_many >= 4
    assert s_many["loss"] == pytest.approx(s_one["loss"], rel=1e-4, abs=1e-6)
    assert sum(d.abs().sum() for d in d_one) > 0
    for a, b in zip(d_one, d_many):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
