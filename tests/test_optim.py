import copy

import pytest
import torch

from fastrl.algo import supervision as S
from fastrl.config import load_config
from fastrl.rollout.loop import Limits
from fastrl.train import batch as B
from fastrl.train import optim as O
from fastrl.train import update as U


def test_lr_schedules():
    assert [O.lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert O.lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert O.lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert O.lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)


def test_out_of_memory_names_the_micro_batch_and_its_tokens(tiny_policy, world, monkeypatch):
    model, tok, _ = tiny_policy
    cfg = load_config(None, ["optim.max_tokens_per_microbatch=400"])
    trajs = S.play_experts(
        tok, world, world.tasks("train", 4), Limits(max_total_tokens=4096), solved_only=True
    )
    for i, t in enumerate(trajs):
        t.source, t.group_id, t.info["advantage"] = "policy", 0, (1.0, -1.0)[i % 2]
    calls = {"n": 0}
    real = B.token_stats

    def second_oom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(U, "token_stats", second_oom)
    m = copy.deepcopy(model).train()
    opt = O.make_optimizer(m, cfg, 1e-4)
    groups = B.micro_batches(trajs, 400, packed=True)
    assert len(groups) >= 2
    with pytest.raises(RuntimeError, match="out of memory in micro-batch 2 of") as err:
        U.policy_update(m, opt, trajs, trajs, 1e-4, U.step_spec(cfg, tok))
    tokens = sum(t.num_tokens for t in groups[1])
    assert f"{len(groups[1])} sequences, {tokens} tokens" in str(err.value)
