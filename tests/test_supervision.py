"""Supervision modes (OPS, HBG, mixed SFT, interleaved ETS/PRS runs) and group sampling:
what each trains on (members, prompts, masks, phases), not only that it runs."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from fastrl.algo import losses as L
from fastrl.algo import supervision as S
from fastrl.algo.advantages import group_advantages
from fastrl.algo.losses import get_policy_loss
from fastrl.cli import main
from fastrl.config import load_config
from fastrl.rollout.engines import ScriptedEngine
from fastrl.rollout.loop import Limits
from fastrl.train import batch as B
from fastrl.train import optim as O
from fastrl.train import update as U

LIMITS = Limits(max_total_tokens=4096)


class Recording(ScriptedEngine):
    """Answers every turn with "I do not know." and records the prompt of each request's first
    turn."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, {})
        self.first_prompts: dict[str, list[int]] = {}

    def generate(self, prompts, sampling, request_ids=None):
        for rid, prompt in zip(request_ids, prompts):
            self.first_prompts.setdefault(rid, list(prompt))
            self.scripts.setdefault(rid, ["I do not know."])
        return super().generate(prompts, sampling, request_ids)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- OPS and HBG
def test_group_members_hinted_while_sampling_and_experts_played(tiny_policy, world):
    _, tok, _ = tiny_policy
    cfg = load_config(
        None,
        ["rl.prompts_per_step=2", "rl.group_size=5", "supervision.ops.k=1", "supervision.hbg.k=2"],
    )
    tasks = world.tasks("train", 10)
    engine = Recording(tok)
    kept, played, _ = S.sample_groups(
        cfg, engine, tok, world, S.task_stream(tasks, 0, 0), LIMITS, step=0
    )
    assert len(played) == 10 and kept == played
    by_group: dict[int, list] = {}
    for t in played:
        by_group.setdefault(t.group_id, []).append(t)
    assert len(by_group) == 2
    for members in by_group.values():
        assert [t.source for t in members].count("policy") == 2
        assert [t.source for t in members].count("hinted") == 2
        assert [t.source for t in members].count("expert") == 1
        assert len({t.task_id for t in members}) == 1
        task = next(x for x in tasks if x.id == members[0].task_id)
        plain = [t for t in members if t.source == "policy"]
        hinted = [t for t in members if t.source == "hinted"]
        (expert,) = [t for t in members if t.source == "expert"]
        # The trained sequence of a hinted member starts with the plain prompt ...
        assert all(t.prompt_ids == plain[0].prompt_ids for t in hinted)
        assert "Hint:" not in tok.decode(hinted[0].prompt_ids)
        # ... while the engine saw the hint in the system prompt.
        hinted_prompts = [
            tok.decode(p) for rid, p in engine.first_prompts.items() if rid.startswith(task.id)
        ]
        assert sum(f"Hint: {task.hint}" in p for p in hinted_prompts) == 2
        # The expert member is the task's expert solution, played and scored in the env.
        assert expert.success and expert.reward == 1.0
        assert expert.messages[-1]["content"] == task.expert[-1][-1]
        trained = [i for s, e in expert.turn_spans for i in range(s, e)]
        assert [i for i, m in enumerate(expert.loss_mask) if m] == trained
        assert not any(expert.engine_logprobs)
    advantages = group_advantages(
        torch.tensor([t.reward for t in played]), torch.tensor([t.group_id for t in played])
    )
    assert all(a > 0 for t, a in zip(played, advantages.tolist()) if t.source == "expert")


def test_hinted_and_expert_rows_are_left_out_of_the_logprob_gap(tiny_policy, world):
    model, tok, _ = tiny_policy
    cfg = load_config(None, ["optim.grad_clip=0"])
    trajs = S.play_experts(tok, world, world.tasks("train", 3), LIMITS, solved_only=True)
    sources = ["policy", "hinted", "expert"]
    for t, source in zip(trajs, sources):
        t.source, t.group_id, t.info["advantage"] = source, 0, 1.0
        batch = B.collate([t], tok.pad_token_id)
        with torch.no_grad():
            lp, _, _ = B.token_stats(model, batch, packed=True)
        # The policy row matches the engine exactly; the others are 5 nats off.
        offset = 0.0 if source == "policy" else 5.0
        t.engine_logprobs = (lp[batch.target_mask] + offset).tolist()
        t.engine_logprobs = [
            t.engine_logprobs.pop(0) if m else 0.0 for m in t.loss_mask
        ]  # back to response positions
    m = copy.deepcopy(model).train()
    opt = O.make_optimizer(m, cfg, 1e-4)
    stats = U.policy_update(m, opt, trajs, trajs, 1e-4, U.step_spec(cfg, tok))
    assert stats["rollout/logprob_diff_mean"] < 1e-4


def _update(cfg_overrides, model, trajs, tok, **kw):
    cfg = load_config(None, ["optim.grad_clip=0", "rl.lr=1", "rl.warmup_steps=0", *cfg_overrides])
    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    before = [p.detach().clone() for p in m.parameters()]
    U.policy_update(m, opt, trajs, trajs, 1.0, U.step_spec(cfg, tok), **kw)  # SGD at lr 1
    return [b - p.detach() for b, p in zip(before, m.parameters())]  # the gradient


def test_ops_luffy_shapes_only_expert_rows(tiny_policy, world):
    """Under LUFFY the expert row's gradient is -A g/(p+g)^2 dp; the sampled row's stays the plain
    policy loss's. Checked by comparing against hand-built losses on the same model."""
    model, tok, _ = tiny_policy
    trajs = S.play_experts(tok, world, world.tasks("train", 2), LIMITS, solved_only=True)
    trajs[0].source, trajs[1].source = "policy", "expert"
    for t, a in zip(trajs, (0.7, 1.3)):
        t.group_id, t.info["advantage"] = 0, a
    agg = "seq-mean-token-mean"
    got = _update(["supervision.ops.k=1", "supervision.ops.shaping=luffy", f"rl.loss_agg={agg}"],
                  model, trajs, tok)  # fmt: skip
    m = copy.deepcopy(model).train()
    batch = B.collate(trajs, tok.pad_token_id)
    logp, _, _ = B.token_stats(m, batch, packed=False)
    mask = batch.target_mask
    adv = torch.tensor([0.7, 1.3])
    plain = get_policy_loss("ppo")(
        logp, logp.detach(), adv, mask & torch.tensor([[True], [False]]), loss_agg=agg,
        clip_low=0.2, clip_high=0.2, dual_clip=3.0,
    )[0]  # fmt: skip
    shaped = L.luffy_loss(logp, adv, mask & torch.tensor([[False], [True]]), loss_agg=agg)
    ((plain + shaped) / 2).backward()
    for g, p in zip(got, m.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=2e-6)
    clip = _update(["supervision.ops.k=1", f"rl.loss_agg={agg}"], model, trajs, tok)
    assert any(not torch.allclose(a, b, atol=1e-7) for a, b in zip(got, clip))


# --------------------------------------------------------------------------- mixed SFT


@pytest.mark.parametrize("chord", [False, True])
def test_mixed_sft_adds_mu_times_the_sft_gradient(tiny_policy, world, chord):
    model, tok, _ = tiny_policy
    samples = S.play_experts(tok, world, world.tasks("train", 2), LIMITS, solved_only=True)
    for t, a in zip(samples, (1.0, -1.0)):
        t.source, t.group_id, t.info["advantage"] = "policy", 0, a
    experts = S.play_experts(tok, world, world.tasks("train", 5)[2:], LIMITS, solved_only=True)
    chord_key = f"supervision.mixed_sft.chord_phi={str(chord).lower()}"
    rl_only = _update([chord_key], model, samples, tok)
    mixed = _update([chord_key], model, samples, tok, experts=experts, mixed_weight=0.3)
    m = copy.deepcopy(model).train()
    batch = B.collate(experts, tok.pad_token_id)
    logp, _, _ = B.token_stats(m, batch, packed=False)
    (0.3 * L.mixed_sft_loss(logp, batch.target_mask, chord_phi=chord)).backward()
    for a, b, p in zip(mixed, rl_only, m.parameters()):
        torch.testing.assert_close(a - b, p.grad, rtol=1e-3, atol=1e-6)


def test_mixed_sft_alone_when_no_group_carries_a_signal(tiny_policy, world):
    model, tok, _ = tiny_policy
    samples = S.play_experts(tok, world, world.tasks("train", 2), LIMITS, solved_only=True)
    for t in samples:
        t.source, t.group_id, t.info["advantage"] = "policy", 0, 0.0  # the group agreed
    experts = S.play_experts(tok, world, world.tasks("train", 4)[2:], LIMITS, solved_only=True)
    got = _update([], model, samples, tok, experts=experts, mixed_weight=0.5)
    m = copy.deepcopy(model).train()
    batch = B.collate(experts, tok.pad_token_id)
    logp, _, _ = B.token_stats(m, batch, packed=False)
    (0.5 * L.mixed_sft_loss(logp, batch.target_mask)).backward()
    for g, p in zip(got, m.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=2e-6)


# --------------------------------------------------------------------------- plan and runs


SMOKE = ["train", "--config", "configs/smoke.yaml", "eval.splits=[test]"]


def test_interleaved_prs_run_trains_on_failed_tasks_between_rl_phases(tmp_path):
    run = tmp_path / "run"
    args = [
        *SMOKE, f"run_dir={run}", "schedule.scheme=interleaved", "schedule.rl_phases=[2,1]",
        "rl.steps=3",
        "supervision.prs.enabled=true", "supervision.ets.batch_size=4", "supervision.ets.epochs=1",
        "supervision.ets.lr=1e-4", "supervision.ets.window=1",
    ]  # fmt: skip
    assert main(args) == 0
    rows = _rows(run)
    names = [r["phase/name"] for r in rows]
    n_sft = names.count("prs1")
    assert n_sft >= 1
    assert names == ["warmup"] * 3 + ["rl1"] * 2 + ["prs1"] * n_sft + ["rl2"]
    prs = [r for r in rows if r["phase/name"] == "prs1"]
    assert all(r["phase"] == "sft" and r["sft/failed_tasks"] >= 1 for r in prs)
    assert prs[0]["sft/reflections"] >= 1
    # Window 1: the failed tasks of the last RL step only (a group of 4 per task, 2 tasks).
    assert prs[0]["sft/failed_tasks"] <= 2
    # The phase's length: one epoch over the failed tasks' experts and reflections, 4 a step.
    assert n_sft == math.ceil((prs[0]["sft/failed_tasks"] + prs[0]["sft/reflections"]) / 4)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))


def test_synchronous_run_with_ops_hbg_and_mixed_sft(tmp_path):
    run = tmp_path / "run"
    args = [
        *SMOKE, f"run_dir={run}", "supervision.ops.k=1", "supervision.hbg.k=1",
        "supervision.ops.shaping=luffy", "supervision.mixed_sft.weight=0.5",
        "supervision.mixed_sft.schedule=linear", "supervision.mixed_sft.batch_size=2",
    ]  # fmt: skip
    assert main(args) == 0
    rl = [r for r in _rows(run) if r["phase"] == "rl"]
    assert len(rl) == 2 and all(r["phase/name"] == "rl1" for r in rl)
    assert [r["sft/mixed_weight"] for r in rl] == [0.5, 0.0]
    assert all(r["supervision/expert_success"] == 1.0 for r in rl)
    assert all("supervision/hinted_success" in r for r in rl)
    assert rl[0]["sft/mixed_loss"] > 0 and "sft/mixed_loss" not in rl[1]  # mu 0: no SFT term


def test_sft_demonstrates_only_short_tasks_when_asked(world):
    tasks = world.tasks("train", 200)
    counts = [S.expert_calls(t) for t in tasks]
    assert min(counts) == 1 and max(counts) >= 3
    assert S.demonstrated(tasks, load_config(None, []).sft.max_expert_calls) == tasks
    short = S.demonstrated(
        tasks, load_config(None, ["sft.max_expert_calls=2"]).sft.max_expert_calls
    )
    assert short and all(S.expert_calls(t) <= 2 for t in short)
    assert len(short) == sum(c <= 2 for c in counts)


# --------------------------------------------------------------------------- group sampling
class HalfRight(ScriptedEngine):
    """Sends the expert's messages for episodes of odd-numbered tasks every other episode, and
    nothing useful otherwise: even tasks' groups all fail (no variance), odd tasks' groups mix."""

    def __init__(self, tokenizer, tasks):
        super().__init__(tokenizer, {})
        self.expert = {t.id: [m for turn in t.expert for m in turn] for t in tasks}
        self.seen = 0

    def generate(self, prompts, sampling, request_ids=None):
        for rid in request_ids:
            if rid not in self.scripts:
                task_id = rid.split("#")[0]
                odd = int(task_id.rsplit("/", 1)[1]) % 2 == 1
                self.seen += 1
                good = odd and self.seen % 2 == 0
                self.scripts[rid] = self.expert[task_id] if good else ["I do not know."]
        return super().generate(prompts, sampling, request_ids)


@pytest.mark.parametrize("mode, expected_groups", [("off", 4), ("drop", 2), ("refill", 4)])
def test_dynamic_sampling(tiny_policy, world, mode, expected_groups):
    _, tok, _ = tiny_policy
    cfg = load_config(
        None,
        [
            f"rl.dynamic_sampling={mode}",
            "rl.prompts_per_step=4",
            "rl.group_size=4",
            "rl.max_refill_rounds=3",
        ],
    )
    tasks = world.tasks("train", 40)
    stream = S.task_stream(tasks, seed=0, start=0)
    kept, sampled, position = S.sample_groups(
        cfg, HalfRight(tok, tasks), tok, world, stream, Limits(max_total_tokens=4096), step=0
    )
    groups = {t.group_id for t in kept}
    assert len(groups) >= expected_groups and len(kept) == 4 * len(groups)
    if mode != "off":
        for g in groups:  # every kept group has reward variance
            assert len({t.reward for t in kept if t.group_id == g}) == 2
    assert position == len(sampled) // 4


def test_format_reward_adds_the_healthy_fraction(tiny_policy, world):
    """rl.format_reward: the task reward plus w x the share of healthy assistant messages; success
    is untouched. HalfRight's good episodes are the expert's (all healthy), the others one text."""
    _, tok, _ = tiny_policy
    tasks = world.tasks("train", 40)
    rewards = {}
    for w in (0.0, 0.5):
        cfg = load_config(
            None, [f"rl.format_reward={w}", "rl.prompts_per_step=4", "rl.group_size=4"]
        )
        stream = S.task_stream(tasks, seed=0, start=0)
        _, sampled, _ = S.sample_groups(
            cfg, HalfRight(tok, tasks), tok, world, stream, Limits(max_total_tokens=4096), step=0
        )
        rewards[w] = [(t.reward, t.success, t.info["states"]) for t in sampled]
    for (r0, s0, states), (r1, s1, _) in zip(rewards[0.0], rewards[0.5]):
        healthy = sum(s in ("healthy_call", "healthy_text") for s in states) / len(states)
        assert s0 == s1 and r1 == pytest.approx(r0 + 0.5 * healthy)
