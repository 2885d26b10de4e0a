"""Learning, not only running: an update moves probability in the direction of the advantage, and
GRPO on the tiny preset solves a two-armed bandit over completions on CPU."""

import copy

import torch

from fastrl.algo import supervision as S
from fastrl.config import load_config
from fastrl.envs.teacher import Habits, demonstration
from fastrl.rollout.loop import Limits
from fastrl.rollout.types import Trajectory
from fastrl.train import batch as B
from fastrl.train import optim as O
from fastrl.train import update as U


def _completion_logprobs(model, tok, trajs):
    batch = B.collate(trajs, tok.pad_token_id)
    with torch.no_grad():
        logp, _, _ = B.token_stats(model, batch)
    return (logp * batch.target_mask).sum(dim=1)  # [B] summed log-probability of each completion


def test_one_grpo_step_raises_the_rewarded_completion_and_lowers_the_other(tiny_policy, world):
    """A group of two completions of one task, the expert's (solves it) and the teacher's that
    stops early (fails): one GRPO step moves probability from the failed to the solved one."""
    model, tok, _ = tiny_policy
    model = copy.deepcopy(model).train()
    limits = Limits(max_total_tokens=4096)
    task = next(
        t for t in world.tasks("train", 200)
        if "stop_early" in demonstration(t, Habits(stop_early=1.0), seed=0)[1]
    )  # fmt: skip
    good = S.play_experts(tok, world, [task], limits, solved_only=True)[0]
    bad = S.play_teacher(tok, world, [task], limits, Habits(stop_early=1.0), seed=0)[0]
    assert good.success and not bad.success
    group = [good, bad]
    for t in group:
        t.group_id, t.source = 0, "policy"
        t.engine_logprobs = [0.0] * len(t.response_ids)
    U.assign_advantages(group, "grpo", 1.0)
    assert good.info["advantage"] > 0 > bad.info["advantage"]
    cfg = load_config(None, ["rl.lr=1e-4"])
    before = _completion_logprobs(model, tok, group)
    optimizer = O.make_optimizer(model, cfg, cfg.rl.lr)
    lr = cfg.rl.lr * O.lr_factor(0, cfg.rl.steps, cfg.rl.warmup_steps, cfg.rl.schedule)
    U.policy_update(model, optimizer, group, group, lr, U.step_spec(cfg, tok))
    after = _completion_logprobs(model, tok, group)
    assert after[0] > before[0] + 0.01  # the rewarded completion is more likely
    assert after[1] < before[1] - 0.01  # the unrewarded one less


def test_grpo_learns_a_two_armed_bandit_over_completions(tiny_policy):
    """One prompt, two completions that differ in one word; only `blue` is rewarded. Each step
    draws a group of 8 from the policy's own odds between the two, and GRPO moves those odds from
    about even to above 0.9 within 40 steps at lr 1e-5 (an arm never drawn would never be learned
    from, so the odds start near even: the arms differ in one token of a random-weight model)."""
    model, tok, _ = tiny_policy
    model = copy.deepcopy(model).train()
    prompt = tok.encode("Which colour?", add_special_tokens=False)
    arms = []
    for word in ("blue", "green"):
        response = tok.encode(f"The colour is {word}.<|im_end|>", add_special_tokens=False)
        n = len(response)
        arms.append(Trajectory("bandit", 0, prompt, response, [1] * n, [0.0] * n))
    assert arms[0].response_ids != arms[1].response_ids
    cfg = load_config(None, ["rl.lr=1e-5"])  # about 10 steps from even odds to 0.9
    spec = U.step_spec(cfg, tok)
    optimizer = O.make_optimizer(model, cfg, cfg.rl.lr)
    gen = torch.Generator().manual_seed(0)

    def p_blue() -> float:
        lp = _completion_logprobs(model, tok, arms)
        return torch.sigmoid(lp[0] - lp[1]).item()  # the odds between the two arms

    start = p_blue()
    assert 0.1 < start < 0.9
    for _ in range(40):
        picks = torch.rand(8, generator=gen) < p_blue()
        group = [copy.deepcopy(arms[0] if blue else arms[1]) for blue in picks.tolist()]
        for t, blue in zip(group, picks.tolist()):
            t.source, t.reward = "policy", float(blue)
        U.assign_advantages(group, "grpo", 1.0)
        U.policy_update(model, optimizer, group, group, cfg.rl.lr, spec)
        if p_blue() > 0.9:
            break
    assert p_blue() > 0.9
