import copy
import math

import pytest
import torch

from fastrl.algo import supervision as S
from fastrl.config import load_config
from fastrl.rollout.loop import Limits
from fastrl.rollout.types import Trajectory
from fastrl.train import batch as B
from fastrl.train import optim as O
from fastrl.train import update as U


def update(cfg, model, optimizer, trajs, tok, *, ref=None, **kw):
    """One `policy_update` of `trajs` at `rl.lr`, with the config's step spec."""
    spec = U.step_spec(cfg, tok)
    return U.policy_update(model, optimizer, trajs, trajs, cfg.rl.lr, spec, ref_model=ref, **kw)


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
    stats = update(cfg, model, optimizer, trajs, tok, ref=ref)
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
    assert stats["train/tokens"] == sum(t.num_tokens for t in trajs)  # both mini-batches
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
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTRL_BACKEND", backend)
        assert select_backend("fused_linear_token_logprobs", "cpu") == backend
        assert select_backend("policy_loss", "cpu") == backend
        torch.manual_seed(0)
        model = copy.deepcopy(model0).train()
        ref = copy.deepcopy(model0).eval().requires_grad_(False)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        stats = update(cfg, model, optimizer, trajs, tok, ref=ref)
        deltas = [(p - q).detach() for p, q in zip(model.parameters(), model0.parameters())]
        results[backend] = (stats, deltas)
    (s_torch, p_torch), (s_triton, p_triton) = results["torch"], results["triton"]
    for key in ("loss", "entropy", "grad_norm", "ctrl/p_im_end", "ctrl/p_open_json"):
        assert s_triton[key] == pytest.approx(s_torch[key], rel=1e-4, abs=1e-5), key
    assert sum(d.abs().sum() for d in p_torch) > 0
    for a, b in zip(p_torch, p_triton):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


def test_negative_weight_scales_only_negative_advantages():
    trajs = [Trajectory(str(i), i // 4, [1], [2], [1], [0.0]) for i in range(8)]
    for t, r in zip(trajs, [1, 0, 0, 0, 1, 1, 0, 1]):
        t.reward = float(r)
    U.assign_advantages(trajs, "grpo", 1.0)
    full = [t.info["advantage"] for t in trajs]
    assert sum(full[:4]) == pytest.approx(0, abs=1e-5) and full[0] > 0 > full[1]
    U.assign_advantages(trajs, "grpo", 0.25)
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
    U.assign_advantages(trajs, "grpo", cfg.rl.negative_weight)
    assert [t.info["advantage"] > 0 for t in trajs] == [False, True, False, True]

    def train_on(batch):
        m = copy.deepcopy(model).train()
        opt = O.make_optimizer(m, cfg, 1e-3)
        stats = update(cfg, m, opt, batch, tok)
        # zero-advantage rows are skipped in the forward pass: only the positives are trained
        assert stats["train/tokens"] == sum(t.num_tokens for t in batch if t.info["advantage"])
        return [p.detach() for p in m.parameters()]

    both, positives = train_on(trajs), train_on([t for t in trajs if t.info["advantage"] > 0])
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

    def train_with(overrides, scales):
        cfg = load_config(None, overrides)
        m = copy.deepcopy(model).train()
        opt = O.make_optimizer(m, cfg, 1e-3)
        batch = [copy.deepcopy(t) for t in trajs]
        for t, scale in zip(batch, scales):
            t.info["advantage"] *= scale
        stats = update(cfg, m, opt, batch, tok)
        return [p.detach() for p in m.parameters()], stats

    weighted, stats = train_with(["rl.tis_cap=2"], [1.0] * 4)
    plain, _ = train_with([], [min(math.exp(g), 2.0) for g in gaps])
    tokens = [sum(t.loss_mask) for t in trajs]
    expected = sum(min(math.exp(g), 2.0) * k for g, k in zip(gaps, tokens)) / sum(tokens)
    assert stats["rollout/tis_weight_mean"] == pytest.approx(expected, rel=1e-4)
    for a, b in zip(weighted, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    uncapped, _ = train_with(["rl.tis_cap=10"], [1.0] * 4)  # weights e, not 2, on two trajectories
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(uncapped, plain))


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
    stats = update(cfg, m, opt, trajs, tok)
    assert stats["skipped_updates"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # nothing applied
    assert not opt.state  # and the optimizer never stepped
    streak = O.note_nonfinite(0, 1, 2, {})
    streak = O.note_nonfinite(streak, 0, 2, {})  # a healthy step resets the streak
    streak = O.note_nonfinite(streak, 1, 2, {})
    with pytest.raises(RuntimeError, match="max_nonfinite_steps=2"):
        O.note_nonfinite(streak, 1, 2, {})
    # A finite update still goes through afterwards.
    for t in trajs:
        t.info["advantage"] = 1.0
    stats = update(cfg, m, opt, trajs, tok)
    assert stats["skipped_updates"] == 0 and opt.state


def test_mask_truncated_keeps_cut_episodes_out_of_the_loss_only_when_asked():
    cut = Trajectory("a", 0, [1], truncated=True)
    whole = Trajectory("b", 0, [1])
    assert U.loss_members([cut, whole], mask_truncated=True) == [whole]
    assert U.loss_members([cut, whole], mask_truncated=False) == [cut, whole]
    assert load_config(None, []).rl.mask_truncated is False  # loops are failures the loss sees


def test_a_step_without_signal_leaves_weights_and_measures_a_spread_sample(tiny_policy, world):
    """Every group agreed (all advantages 0): no optimizer step (`train/updates` 0, weights as they
    were), the token metrics measured on rows spread over the groups within
    `monitor.idle_metric_tokens`; 0 measures nothing."""
    model, tok, _ = tiny_policy
    model = copy.deepcopy(model).train()
    tasks = world.tasks("train", 6)
    trajs = S.play_experts(tok, world, tasks, Limits(max_total_tokens=4096), solved_only=True)
    for i, t in enumerate(trajs):
        t.group_id = i // 2
        t.info["advantage"] = 0.0
        t.source = "policy"
    assert len(trajs) == 6
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = O.make_optimizer(model, load_config(None, []), 1e-3)
    mean_len = sum(t.num_tokens for t in trajs) / len(trajs)
    budget = math.ceil(3 * mean_len)  # three rows of six: one per group
    sample = U.spread_sample(trajs, budget)
    assert [trajs.index(t) for t in sample] == [0, 2, 4]
    assert U.spread_sample(trajs, 1) == trajs[:1] and U.spread_sample(trajs, 10**9) == trajs

    def run(tokens):
        cfg = load_config(None, [f"monitor.idle_metric_tokens={tokens}"])
        return update(cfg, model, optimizer, trajs, tok)

    full, some, none = run(10**9), run(budget), run(0)
    for stats in (full, some, none):
        assert stats["train/updates"] == 0 and stats["loss"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "entropy" not in none and "ctrl/p_im_end" not in none
    # The sample's metrics are those of a forward over its rows alone.
    cfg = load_config(None, [])
    alone = U.policy_update(model, optimizer, sample, sample, cfg.rl.lr,
                            U.step_spec(cfg, tok))  # fmt: skip
    assert some["entropy"] == pytest.approx(alone["entropy"], rel=1e-6)
    assert some["entropy"] != pytest.approx(full["entropy"], rel=1e-6)
