import copy
import json
import math
import types

import pytest
import torch

import fastrl.eval as E
from fastrl.algo import supervision as S
from fastrl.algo.losses import get_policy_loss
from fastrl.config import ConfigError, load_config
from fastrl.envs.teacher import applicable
from fastrl.monitor import metrics as M
from fastrl.monitor.control_tokens import decision_positions
from fastrl.rollout.engines import ScriptedEngine
from fastrl.rollout.loop import Limits
from fastrl.rollout.types import Trajectory
from fastrl.train import batch as B
from fastrl.train import build, packing
from fastrl.train import optim as O
from fastrl.train import trainer as T


def test_collate_aligns_labels_with_trained_tokens():
    t = Trajectory("t", 0, [10, 11, 12], [20, 21, 30, 31, 22], [1, 1, 0, 0, 1], [-1, -2, 0, 0, -3])
    short = Trajectory("s", 1, [10, 11], [40], [1], [-0.5])
    b = B.collate([t, short], pad_id=0)
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31, 22], [10, 11, 40, 0, 0, 0, 0, 0]]
    # Position p predicts token p + 1: targets are exactly the sampled response tokens.
    assert b.labels[0][b.target_mask[0]].tolist() == [20, 21, 22]
    assert b.engine_logprobs[0][b.target_mask[0]].tolist() == [-1, -2, -3]
    assert b.labels[1][b.target_mask[1]].tolist() == [40]
    assert b.attention_mask.sum(1).tolist() == [8, 3]
    # Turn starts: the first trained position of each run (two turns in t, one in short).
    assert M.turn_start_rows(b).tolist() == [True, False, True, True]


def test_micro_batches_respect_the_token_budget():
    trajs = [Trajectory(str(i), i, [1] * (5 + 7 * i % 40), [2], [1], [0.0]) for i in range(30)]
    groups = B.micro_batches(trajs, token_budget=100)
    assert sorted(t.task_id for g in groups for t in g) == sorted(t.task_id for t in trajs)
    for g in groups:
        assert len(g) == 1 or len(g) * max(t.num_tokens for t in g) <= 100


def test_lr_schedules():
    assert [O.lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert O.lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert O.lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert O.lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)


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


def test_sampled_successes_counts_each_tasks_solved_samples(tiny_policy, world):
    _, tok, _ = tiny_policy
    tasks = world.tasks("test", 3)
    expert = {t.id: [m for turn in t.expert for m in turn] for t in tasks}
    # episode j of task i plays the expert when j < i: task i is solved by i of its 3 samples
    scripts = {
        f"{t.id}#{j}": expert[t.id] if j < i else ["I do not know."]
        for i, t in enumerate(tasks)
        for j in range(3)
    }
    rids = [f"{t.id}#{j}" for t in tasks for j in range(3)]
    solved = E.sampled_successes(
        ScriptedEngine(tok, scripts),
        tok,
        world,
        tasks,
        Limits(max_total_tokens=4096),
        samples=3,
        temperature=1.0,
        batch_size=4,  # batches cut across tasks
        request_ids=rids,
    )
    assert solved == [0, 1, 2]


def test_probe_experts_scores_each_expert_token_given_the_experts_prefix(tiny_policy, world):
    model, tok, _ = tiny_policy
    tasks = world.tasks("test", 3)
    limits = Limits(max_total_tokens=4096)
    rows = E.probe_experts(model, tok, world, tasks, limits, batch_size=2, chunk=7)
    experts = S.play_experts(tok, world, tasks, limits, solved_only=True)
    assert [e.task_id for e in experts] == [t.id for t in tasks]
    with torch.no_grad():  # independent: the full logits of one trajectory at a time
        for row, traj in zip(rows, experts):
            b = B.collate([traj], tok.pad_token_id)
            logp = model(input_ids=b.input_ids).logits[0].double().log_softmax(-1)
            m = b.target_mask[0]
            lp = logp[m].gather(-1, b.labels[0][m][:, None])[:, 0]  # [n]
            assert row["expert_tokens"] == int(m.sum()) == sum(traj.loss_mask)
            assert row["expert_logprob"] == pytest.approx(float(lp.sum()), rel=1e-4)
            assert row["expert_min_prob"] == pytest.approx(math.exp(lp.min()), rel=1e-3)
            hits = logp[m].argmax(-1) == b.labels[0][m]
            assert row["expert_greedy"] == bool(hits.all())
            miss = row["expert_first_miss"]
            first = int((~hits).nonzero()[0, 0])  # a random-init model misses early
            assert miss["index"] == first
            assert miss["prob"] == pytest.approx(math.exp(lp[first]), rel=1e-3)
            top = int(logp[m][first].argmax())
            assert miss["top"] == tok.decode([top]) and miss["top_prob"] > miss["prob"]
    # one task at a time and the whole head at once give the same rows
    again = E.probe_experts(model, tok, world, tasks[1:2], limits, batch_size=1, chunk=4096)
    assert again[0]["expert_logprob"] == pytest.approx(rows[1]["expert_logprob"], rel=1e-5)


def test_probe_row_first_miss_skips_ties_and_reports_both_tokens(tiny_policy):
    _, tok, _ = tiny_policy
    lp = torch.log(torch.tensor([0.9, 0.5, 0.2, 0.6]))
    top = torch.log(torch.tensor([0.9, 0.5, 0.7, 0.6]))  # a tie at 1, the first miss at 2
    labels, top_id = torch.tensor([11, 12, 13, 14]), torch.tensor([11, 12, 15, 14])
    row = E.probe_row(tok, lp, top, top_id, labels)
    assert row["expert_tokens"] == 4 and not row["expert_greedy"]
    assert row["expert_logprob"] == pytest.approx(math.log(0.9 * 0.5 * 0.2 * 0.6))
    assert row["expert_min_prob"] == pytest.approx(0.2)
    assert row["expert_first_miss"] == {
        "index": 2,
        "token": tok.decode([13]),
        "prob": pytest.approx(0.2),
        "top": tok.decode([15]),
        "top_prob": pytest.approx(0.7),
    }
    hit = E.probe_row(tok, top[:2], top[:2], labels[:2], labels[:2])
    assert hit["expert_greedy"] and hit["expert_first_miss"] is None


def test_rollout_metrics_count_groups_without_signal_and_solved_groups():
    def traj(group, success, source="policy"):
        return Trajectory("t", group, [1], reward=float(success), success=success, source=source)

    played = [
        *(traj(0, False) for _ in range(3)),  # all fail: no signal
        traj(1, False),
        traj(1, True),  # mixed and solved
        *(traj(2, False) for _ in range(2)),
        traj(2, True, source="expert"),  # only the expert solves it: signal, not solved
        *(traj(3, True) for _ in range(2)),  # all solved: no signal
    ]
    row = M.rollout_metrics(played)
    assert row["rollout/frac_reward_zero_std"] == 0.5
    assert row["rollout/solved_groups"] == 0.5
    assert row["supervision/expert_success"] == 1.0


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
    stream = T.task_stream(tasks, seed=0, start=0)
    state = {"step": 0, "rl_position": 0}
    kept, sampled = T.sample_groups(
        cfg, HalfRight(tok, tasks), tok, world, stream, Limits(max_total_tokens=4096), state
    )
    groups = {t.group_id for t in kept}
    assert len(groups) >= expected_groups and len(kept) == 4 * len(groups)
    if mode != "off":
        for g in groups:  # every kept group has reward variance
            assert len({t.reward for t in kept if t.group_id == g}) == 2
    assert state["rl_position"] == len(sampled) // 4


def test_policy_update_with_kl_and_several_updates(tiny_policy, world):
    model, tok, _ = tiny_policy
    model = copy.deepcopy(model).train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    cfg = load_config(None, ["rl.kl_coef=0.05", "rl.updates_per_step=2", "rl.entropy_coef=0.01"])
    tasks = world.tasks("train", 4)
    trajs = S.play_experts(tok, world, tasks, Limits(max_total_tokens=4096), solved_only=True)
    for i, t in enumerate(trajs):
        t.group_id = 0
        t.info["advantage"] = 1.0 if i % 2 else -1.0
        t.source = "policy"  # stand-ins for samples: the logprob gap is measured on them
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = O.make_optimizer(model, cfg, 1e-3)
    im_end, tool_call = tok.convert_tokens_to_ids(["<|im_end|>", "<tool_call>"])
    control_ids = [tok.convert_tokens_to_ids('{"'), im_end, tool_call]
    newline = tok.encode("\n", add_special_tokens=False)[0]
    stats = T.policy_update(
        cfg,
        model,
        ref,
        optimizer,
        get_policy_loss("ppo"),
        trajs,
        trajs,
        tok.pad_token_id,
        1.0,
        control_ids,
        newline,
        0,
        end_call_id=tok.convert_tokens_to_ids("</tool_call>"),
    )
    for key in (
        "loss",
        "kl",
        "entropy",
        "clip_frac",
        "grad_norm",
        "rollout/logprob_diff_mean",
        "ctrl/p_open_json",
        "ctrl/p_im_end",
        "ctrl/p_tool_call",
        "ctrl/mean_p_im_end",
        "ctrl/turn_p_im_end",
        "ctrl/turn_p_tool_call",
        "ctrl/after_call_p_im_end",
        "ctrl/grad_self_im_end",
        "ctrl/grad_other_tool_call",
    ):
        assert key in stats and stats[key] == stats[key], key
    assert stats["kl"] > 0  # the second update moved away from the reference
    assert 0 < stats["ctrl/mean_p_im_end"] < 1
    assert stats["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(not p.requires_grad for p in ref.parameters())


def test_policy_update_triton_backend_matches_torch(tiny_policy, world, monkeypatch):
    """One RL update through the Triton kernels (interpreter on CPU) equals the torch backend's."""
    pytest.importorskip("triton")
    from fastrl.ops import select_backend

    model0, tok, _ = tiny_policy
    cfg = load_config(None, ["rl.kl_coef=0.05", "rl.entropy_coef=0.01"])
    trajs = S.play_experts(
        tok, world, world.tasks("train", 3), Limits(max_total_tokens=4096), solved_only=True
    )
    for i, t in enumerate(trajs):
        t.group_id = 0
        t.info["advantage"] = 1.0 if i % 2 else -1.0
    im_end, tool_call = tok.convert_tokens_to_ids(["<|im_end|>", "<tool_call>"])
    control_ids = [tok.convert_tokens_to_ids('{"'), im_end, tool_call]
    newline = tok.encode("\n", add_special_tokens=False)[0]
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTRL_BACKEND", backend)
        assert select_backend("fused_linear_token_logprobs", "cpu") == backend
        assert select_backend("policy_loss", "cpu") == backend
        torch.manual_seed(0)
        model = copy.deepcopy(model0).train()
        ref = copy.deepcopy(model0).eval().requires_grad_(False)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        stats = T.policy_update(
            cfg, model, ref, optimizer, get_policy_loss("ppo"), trajs, trajs,
            tok.pad_token_id, 1.0, control_ids, newline, 0,
        )  # fmt: skip
        deltas = [(p - q).detach() for p, q in zip(model.parameters(), model0.parameters())]
        results[backend] = (stats, deltas)
    (s_torch, p_torch), (s_triton, p_triton) = results["torch"], results["triton"]
    for key in ("loss", "entropy", "grad_norm", "ctrl/p_im_end", "ctrl/p_open_json"):
        assert s_triton[key] == pytest.approx(s_torch[key], rel=1e-4, abs=1e-5), key
    assert sum(d.abs().sum() for d in p_torch) > 0
    for a, b in zip(p_torch, p_triton):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("attention", ["fastrl_packed", "sdpa", "eager"])
def test_packed_logprobs_equal_one_by_one(tiny_policy, world, attention):
    """A packed micro-batch gives each sequence the logprobs it gets when run alone.

    Every attention path available here: the varlen implementation (per-sequence SDPA on CPU),
    and transformers' sdpa and eager with a block-diagonal mask.
    """
    model0, tok, _ = tiny_policy
    model = copy.deepcopy(model0).eval()
    if attention == packing.ATTN_IMPLEMENTATION:
        packing.register()
    model.config._attn_implementation = attention
    trajs = S.play_experts(
        tok, world, world.tasks("test", 5), Limits(max_total_tokens=4096), solved_only=True
    )
    assert len({t.num_tokens for t in trajs}) > 1  # different lengths: real padding in the batch
    with torch.no_grad():
        batch = B.collate(trajs, tok.pad_token_id)
        together, _, _ = B.token_stats(model, batch, packed=True)
        for row, t in enumerate(trajs):
            one = B.collate([t], tok.pad_token_id)
            alone, _, _ = B.token_stats(model, one, packed=True)
            n = one.target_mask.shape[1]
            torch.testing.assert_close(together[row, :n], alone[0], rtol=1e-5, atol=1e-5)
            # and against the plain padded HF forward of the full model
            logits = model(input_ids=one.input_ids).logits.float().log_softmax(-1)
            ref = logits[0].gather(-1, one.labels[0].clamp(min=0)[:, None])[:, 0]
            torch.testing.assert_close(
                alone[0][one.target_mask[0]], ref[one.target_mask[0]], rtol=1e-5, atol=1e-5
            )


def test_negative_weight_scales_only_negative_advantages():
    trajs = [Trajectory(str(i), i // 4, [1], [2], [1], [0.0]) for i in range(8)]
    for t, r in zip(trajs, [1, 0, 0, 0, 1, 1, 0, 1]):
        t.reward = float(r)
    T.assign_advantages(trajs, "grpo", 1.0)
    full = [t.info["advantage"] for t in trajs]
    assert sum(full[:4]) == pytest.approx(0, abs=1e-5) and full[0] > 0 > full[1]
    T.assign_advantages(trajs, "grpo", 0.25)
    scaled = [t.info["advantage"] for t in trajs]
    for a, b in zip(full, scaled):
        assert b == pytest.approx(a if a > 0 else 0.25 * a)


def test_negative_weight_zero_trains_on_better_than_average_samples_only(tiny_policy, world):
    """With rl.negative_weight=0 the update on a mixed group equals the update on its positive
    members alone, so failed samples cannot push down the tokens they share with successes."""
    model, tok, _ = tiny_policy
    cfg = load_config(None, ["rl.negative_weight=0"])
    trajs = S.play_experts(
        tok, world, world.tasks("train", 4), Limits(max_total_tokens=4096), solved_only=True
    )
    for i, t in enumerate(trajs):
        t.group_id, t.reward = 0, float(i % 2)
    T.assign_advantages(trajs, "grpo", cfg.rl.negative_weight)
    assert [t.info["advantage"] > 0 for t in trajs] == [False, True, False, True]

    def update(batch):
        m = copy.deepcopy(model).train()
        opt = O.make_optimizer(m, cfg, 1e-3)
        args = (get_policy_loss("ppo"), batch, batch, tok.pad_token_id, 1.0, None, None, 0)
        T.policy_update(cfg, m, None, opt, *args)
        return [p.detach() for p in m.parameters()]

    both, positives = update(trajs), update([t for t in trajs if t.info["advantage"] > 0])
    for a, b in zip(both, positives):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, p) for a, p in zip(both, model.parameters()))


def test_truncated_importance_sampling_weights_tokens_by_the_capped_ratio(tiny_policy, world):
    """rl.tis_cap: each sampled token's loss is weighted by min(p_trainer / p_engine, cap). With the
    engine `gap` nats below the trainer on every token of a trajectory, the update equals a plain
    one whose advantages are scaled by min(e^gap, cap) (different per trajectory, so Adam's scale
    invariance cannot hide a wrong weight)."""
    model, tok, _ = tiny_policy
    trajs = S.play_experts(
        tok, world, world.tasks("train", 4), Limits(max_total_tokens=4096), solved_only=True
    )
    gaps = [1.0, 0.25, -0.5, 1.0]
    for i, (t, gap) in enumerate(zip(trajs, gaps)):
        t.group_id, t.info["advantage"] = 0, (1.0 if i % 2 else -0.5)
        t.source = "policy"  # stand-ins for samples (expert rows get weight 1)
        batch = B.collate([t], tok.pad_token_id)
        with torch.no_grad():
            lp, _, _ = B.token_stats(model, batch, packed=True)
        p, n = len(t.prompt_ids), t.num_tokens
        t.engine_logprobs = [
            (v - gap) * m for v, m in zip(lp[0, p - 1 : n - 1].tolist(), t.loss_mask)
        ]

    def update(overrides, scales):
        cfg = load_config(None, overrides)
        m = copy.deepcopy(model).train()
        opt = O.make_optimizer(m, cfg, 1e-3)
        batch = [copy.deepcopy(t) for t in trajs]
        for t, scale in zip(batch, scales):
            t.info["advantage"] *= scale
        stats = T.policy_update(cfg, m, None, opt, get_policy_loss("ppo"), batch, batch,
                                tok.pad_token_id, 1.0, None, None, 0)  # fmt: skip
        return [p.detach() for p in m.parameters()], stats

    weighted, stats = update(["rl.tis_cap=2"], [1.0] * 4)
    plain, _ = update([], [min(math.exp(g), 2.0) for g in gaps])
    tokens = [sum(t.loss_mask) for t in trajs]
    expected = sum(min(math.exp(g), 2.0) * k for g, k in zip(gaps, tokens)) / sum(tokens)
    assert stats["rollout/tis_weight_mean"] == pytest.approx(expected, rel=1e-4)
    for a, b in zip(weighted, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    uncapped, _ = update(["rl.tis_cap=10"], [1.0] * 4)  # weights e, not 2, on two trajectories
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(uncapped, plain))


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
        stream = T.task_stream(tasks, seed=0, start=0)
        _, sampled = T.sample_groups(
            cfg, HalfRight(tok, tasks), tok, world, stream, Limits(max_total_tokens=4096),
            {"step": 0, "rl_position": 0},
        )  # fmt: skip
        rewards[w] = [(t.reward, t.success, t.info["states"]) for t in sampled]
    for (r0, s0, states), (r1, s1, _) in zip(rewards[0.0], rewards[0.5]):
        healthy = sum(s in ("healthy_call", "healthy_text") for s in states) / len(states)
        assert s0 == s1 and r1 == pytest.approx(r0 + 0.5 * healthy)


def test_sft_demonstrates_only_short_tasks_when_asked(world):
    tasks = world.tasks("train", 200)
    counts = [T.expert_calls(t) for t in tasks]
    assert min(counts) == 1 and max(counts) >= 3
    assert T.demonstrated(load_config(None, []), tasks) == tasks
    short = T.demonstrated(load_config(None, ["sft.max_expert_calls=2"]), tasks)
    assert short and all(T.expert_calls(t) <= 2 for t in short)
    assert len(short) == sum(c <= 2 for c in counts)


def test_nonfinite_loss_skips_the_update_and_stops_after_a_streak(tiny_policy, world):
    model, tok, _ = tiny_policy
    cfg = load_config(None, ["optim.max_nonfinite_steps=2"])
    m = copy.deepcopy(model).train()
    opt = O.make_optimizer(m, cfg, 1e-3)
    trajs = S.play_experts(
        tok, world, world.tasks("train", 2), Limits(max_total_tokens=4096), solved_only=True
    )
    for t in trajs:
        t.group_id, t.info["advantage"] = 0, float("nan")  # a NaN loss
    before = [p.detach().clone() for p in m.parameters()]
    stats = T.policy_update(cfg, m, None, opt, get_policy_loss("ppo"), trajs, trajs,
                            tok.pad_token_id, 1.0, None, None, 0)  # fmt: skip
    assert stats["skipped_updates"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # nothing applied
    assert not opt.state  # and the optimizer never stepped
    state: dict = {}
    O.note_nonfinite(state, 1, 2, {})
    O.note_nonfinite(state, 0, 2, {})  # a healthy step resets the streak
    O.note_nonfinite(state, 1, 2, {})
    with pytest.raises(RuntimeError, match="max_nonfinite_steps=2"):
        O.note_nonfinite(state, 1, 2, {})
    # A finite update still goes through afterwards.
    for t in trajs:
        t.info["advantage"] = 1.0
    stats = T.policy_update(cfg, m, None, opt, get_policy_loss("ppo"), trajs, trajs,
                            tok.pad_token_id, 1.0, None, None, 0)  # fmt: skip
    assert stats["skipped_updates"] == 0 and opt.state


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

    monkeypatch.setattr(T, "token_stats", second_oom)
    m = copy.deepcopy(model).train()
    opt = O.make_optimizer(m, cfg, 1e-4)
    groups = B.micro_batches(trajs, 400, packed=True)
    assert len(groups) >= 2
    with pytest.raises(RuntimeError, match="out of memory in micro-batch 2 of") as err:
        T.policy_update(cfg, m, None, opt, get_policy_loss("ppo"), trajs, trajs,
                        tok.pad_token_id, 1.0, None, None, 0)  # fmt: skip
    tokens = sum(t.num_tokens for t in groups[1])
    assert f"{len(groups[1])} sequences, {tokens} tokens" in str(err.value)


def test_mask_truncated_keeps_cut_episodes_out_of_the_loss_only_when_asked():
    cut = Trajectory("a", 0, [1], truncated=True)
    whole = Trajectory("b", 0, [1])
    assert T.loss_members([cut, whole], mask_truncated=True) == [whole]
    assert T.loss_members([cut, whole], mask_truncated=False) == [cut, whole]
    assert load_config(None, []).rl.mask_truncated is False  # loops are failures the loss sees


def test_training_device_and_batches_on_it():
    assert build.training_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert build.training_device("auto").type == "cuda"
    else:
        assert build.training_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="model.device"):
            build.training_device("cuda")
    traj = Trajectory("a", 0, [5, 6, 7], response_ids=[8, 9], loss_mask=[1, 1],
                      engine_logprobs=[-0.5, -0.25])  # fmt: skip
    short = Trajectory("b", 0, [5], response_ids=[8], loss_mask=[1], engine_logprobs=[-1.0])
    batch = B.collate([traj, short], pad_id=0, device="cpu")
    assert (batch.n_real, batch.longest) == (7, 5)  # host counts: packing never syncs
    assert int(batch.attention_mask.sum()) == batch.n_real


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_run_trains_on_the_gpu(tmp_path, caplog):
    """The single-process smoke run with the policy on CUDA (HF engine): finite losses, weights
    on the device, a loadable final model."""
    from fastrl.api import train

    with caplog.at_level("INFO", logger="fastrl.train"):
        summary = train("configs/smoke.yaml", [f"run_dir={tmp_path}", "rollout.engine=hf"])
    assert "training device: cuda" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert summary["rl_success"] is not None and (tmp_path / "final" / "config.json").exists()


def test_decision_probe_scores_the_turns_after_a_tool_result(tiny_policy, world):
    """The probe's positions follow each turn's expert calls (`first` after the question,
    `habit` before the last call of a turn a teacher that stops early cuts short), and its means
    equal p(<tool_call>) read off the model's full logits at those positions."""
    model, tok, _ = tiny_policy
    tasks = {t.id: t for t in world.tasks("test", 16)}
    experts = S.play_experts(
        tok, world, list(tasks.values()), Limits(max_total_tokens=4096), solved_only=True
    )
    tool_call = tok.convert_tokens_to_ids("<tool_call>")
    probe, by_kind = [], {"habit": [], "first": [], "continue": [], "answer": []}
    for traj in experts:
        task = tasks[traj.task_id]
        habit_turns = ["stop_early" in a for a in applicable(task)]
        masked = decision_positions(traj, habit_turns)
        expected = []
        for turn, habit in zip(task.meta["turns"], habit_turns, strict=True):
            n = len(turn["calls"])  # >= 1 in this world
            expected += ["first"] + ["continue"] * max(0, n - 2)
            expected += ["habit" if habit else "continue"] * (n >= 2) + ["answer"]
        assert masked.info["kinds"] == expected
        ids = torch.tensor([traj.prompt_ids + traj.response_ids])
        with torch.no_grad():
            probs = model(input_ids=ids).logits[0].float().softmax(-1)[:, tool_call]
        at = [i for i, m in enumerate(masked.loss_mask) if m]
        for pos, kind in zip(at, expected, strict=True):
            # the token written there opens a call exactly where the expert calls
            assert (traj.response_ids[pos] == tool_call) == (kind != "answer")
            by_kind[kind].append(probs[len(traj.prompt_ids) + pos - 1].item())
        probe.append(masked)
    assert all(by_kind.values())  # the 16 tasks hold every kind
    run = types.SimpleNamespace(cfg=load_config(None), pad_id=tok.pad_token_id, model=model)
    row = T.decision_probe(run, probe, tool_call)
    for kind, values in by_kind.items():
        assert row[f"ctrl/{kind}_p_tool_call"] == pytest.approx(sum(values) / len(values), abs=1e-5)
