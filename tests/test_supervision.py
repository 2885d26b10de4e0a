"""Supervision modes (OPS, HBG, ETS, PRS, mixed SFT), the phase plan and the collapse guard:
what each trains on (members, prompts, masks, phases), not only that it runs."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrl.algo import losses as L
from fastrl.algo import supervision as S
from fastrl.algo.advantages import group_advantages
from fastrl.algo.losses import get_policy_loss
from fastrl.algo.schedule import build_plan
from fastrl.cli import main
from fastrl.config import ConfigError, load_config
from fastrl.envs.base import Task
from fastrl.monitor.guard import Guard
from fastrl.rollout.engines import ScriptedEngine
from fastrl.rollout.loop import Limits
from fastrl.train import batch as B
from fastrl.train import optim as O
from fastrl.train import trainer as T
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
    kept, played, _ = T.sample_groups(
        cfg, engine, tok, world, T.task_stream(tasks, 0, 0), LIMITS, step=0
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


# --------------------------------------------------------------------------- ETS and PRS
def _failed(trajs):
    for t in trajs:
        t.success, t.source = False, "policy"
    return trajs


def test_failure_log_windows_and_state(tiny_policy, world):
    _, tok, _ = tiny_policy
    tasks = world.tasks("train", 4)
    trajs = S.play_experts(tok, world, tasks, LIMITS, solved_only=True)
    log = S.FailureLog()
    log.record(1, _failed(trajs[:2]))
    log.record(3, _failed(trajs[2:3]))
    trajs[3].source = "expert"
    trajs[3].success = False
    log.record(3, [trajs[3]])  # expert members never count as failures
    assert log.tasks_since(1) == [tasks[0].id, tasks[1].id, tasks[2].id]
    assert log.tasks_since(2) == [tasks[2].id]
    again = S.FailureLog()
    again.load_state_dict(json.loads(json.dumps(log.state_dict())))
    assert again.tasks_since(1) == log.tasks_since(1)
    again.forget_before(2)
    assert list(again.examples) == [tasks[2].id]


def test_corrective_data_is_experts_of_failed_tasks_plus_reflections(tiny_policy, world):
    _, tok, _ = tiny_policy
    tasks = world.tasks("train", 6)
    engine = Recording(tok)  # fails every task
    from fastrl.rollout.loop import run_episodes

    failed = run_episodes(engine, tok, tasks[:3], world.make_env, limits=LIMITS)
    log = S.FailureLog()
    log.record(5, failed)
    by_id = {t.id: t for t in tasks}
    data, n = S.corrective_data(tok, world, by_id, log, since_step=5, limits=LIMITS)
    assert n == 3 and sorted(t.task_id for t in data) == sorted(t.id for t in tasks[:3])
    assert all(t.source == "expert" and t.success for t in data)
    data, n = S.corrective_data(
        tok, world, by_id, log, since_step=5, limits=LIMITS, reflector=S.RuleReflector()
    )
    reflections = [t for t in data if t.source == "reflection"]
    assert n == 3 and len(reflections) == 3
    for r in reflections:
        task = by_id[r.task_id]
        prompt = tok.decode(r.prompt_ids)
        assert "I do not know." in prompt and task.expert[0][0] in prompt
        critique = tok.decode([i for i, m in zip(r.response_ids, r.loss_mask) if m])
        assert critique.startswith("Step 1: error: answered before calling")
        assert "First error: step 1" in critique and critique.endswith("<|im_end|>")
        assert all(r.loss_mask) and r.response_ids[-1] == tok.eos_token_id
    assert S.corrective_data(tok, world, by_id, log, since_step=6, limits=LIMITS)[1] == 0


def _task(world, n_calls: int) -> Task:
    return next(
        t for t in world.tasks("train", 200) if S.expert_calls(t) == n_calls and len(t.expert) == 1
    )


def test_rule_reflector_names_the_first_error_and_where_the_value_was(world):
    task = _task(world, 2)
    first, second, answer = task.expert[0]
    env = world.make_env()
    messages = env.reset(task)
    messages.append({"role": "assistant", "content": first})
    from fastrl.envs.formats import get_format

    obs, _ = env.step(first, get_format(task.fmt).parse(first))
    messages += obs
    call = get_format(task.fmt).parse(second).calls[0]
    key, value = next(iter(call.arguments.items()))
    wrong = second.replace(json.dumps(value), json.dumps("X" + str(value)))
    messages.append({"role": "assistant", "content": wrong})
    text = S.RuleReflector().reflect(task, messages, {"first_failing_turn": 0})
    lines = text.splitlines()
    assert lines[0].startswith("Step 1: correct")
    assert lines[1].startswith(f"Step 2: error: {call.name} argument {key} is")
    assert json.dumps(value) in lines[1]
    assert lines[2].startswith("First error: step 2")
    assert lines[-1].startswith("Lesson: When a call needs a value")
    if str(value) in obs[0]["content"]:
        assert "in an earlier tool result" in lines[1]
    malformed = [
        *messages[:2],
        {"role": "assistant", "content": "<tool_call>\n{oops\n</tool_call>"},
    ]
    assert "malformed" in S.RuleReflector().reflect(task, malformed, {}).splitlines()[0]


def test_model_reflector_runs_a_local_judge(tiny_policy, world):
    _, _, path = tiny_policy
    task = _task(world, 1)
    messages = world.make_env().reset(task) + [{"role": "assistant", "content": "No idea."}]
    text = S.get_reflector(str(path), max_new_tokens=8).reflect(task, messages, {})
    assert isinstance(text, str)
    with pytest.raises(OSError):
        S.get_reflector("/nonexistent/judge")


# --------------------------------------------------------------------------- plan and runs
def test_phase_plans():
    sync = build_plan(load_config(None, ["sft.steps=5", "rl.steps=7"]))
    assert [(p.kind, p.name, p.steps) for p in sync] == [("warmup", "warmup", 5), ("rl", "rl1", 7)]
    cfg = load_config(
        None,
        ["schedule.scheme=interleaved", "schedule.rl_phases=[2,3,4]",
         "supervision.prs.enabled=true", "supervision.ets.window=6"],
    )  # fmt: skip
    assert cfg.rl.steps == 9
    assert [(p.kind, p.name, p.steps) for p in build_plan(cfg)] == [
        ("warmup", "warmup", cfg.sft.steps), ("rl", "rl1", 2), ("corrective", "prs1", 6),
        ("rl", "rl2", 3), ("corrective", "prs2", 6), ("rl", "rl3", 4),
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="rl.steps"):
        load_config(
            None,
            ["schedule.scheme=interleaved", "schedule.rl_phases=[2]", "rl.steps=3",
             "supervision.ets.enabled=true"],
        )  # fmt: skip


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


# --------------------------------------------------------------------------- guard
def test_guard_confirms_snapshots_a_step_late_and_rolls_back():
    cfg = load_config(None, ["guard.enabled=true", "guard.snapshot_every=2", "guard.max_actions=1"])
    g = Guard(cfg.guard)
    g.candidate_step = 0  # the weights RL starts from
    healthy, alarm = {"ctrl/alarm": 0.0}, {"ctrl/alarm": 1.0}
    d = g.observe(1, dict(healthy))
    assert d.promote and g.snapshot_step == 0 and not d.save_candidate
    d = g.observe(2, dict(healthy))
    assert d.save_candidate and g.candidate_step == 2
    row = dict(alarm)
    d = g.observe(3, row)
    assert d.discard and d.rollback and d.action == "sft" and g.snapshot_step == 0
    assert row["guard/action"] == "rollback+sft" and row["guard/actions"] == 1
    d = g.observe(4, {"state/collapse": 0.9})
    assert not d.rollback  # no actions left
    polluted = Guard(load_config(None, ["guard.pollution_threshold=0.5"]).guard)
    assert polluted.unhealthy_reason({"state/pollution": 0.6}) == "state/pollution 0.60 > 0.5"
    assert not polluted.unhealthy_reason({"state/pollution": 0.4, "state/collapse": 0.2})
    lower = Guard(load_config(None, ["guard.action=lower_lr", "guard.lr_factor=0.25"]).guard)
    lower.snapshot_step = 0
    lower.observe(1, dict(alarm))
    assert lower.lr_scale == 0.25


@pytest.mark.parametrize("action", ["sft", "lower_lr"])
def test_guard_rolls_back_to_the_healthy_snapshot(tmp_path, monkeypatch, action):
    """A collapse cannot be provoked on cue in a smoke run, so the third RL step (step 6 after 3
    SFT steps) is declared unhealthy; everything the guard then does is real. The snapshot is the
    weights after step 4, the last ones a healthy step (5) confirmed; after the rollback the model
    holds them, and the corrective phase or the lower rate follows."""
    run = tmp_path / "run"
    seen = []
    real = T.act_on

    def checked(r, guard, decision):
        real(r, guard, decision)
        if decision.rollback and action == "lower_lr":
            snap = load_file(run / "checkpoints" / "healthy" / "model.safetensors")
            params = dict(r.model.named_parameters())
            seen.append(all(torch.equal(params[k], v) for k, v in snap.items() if k in params))
            seen.append(json.loads(
                (run / "checkpoints" / "healthy" / "trainer_state.json").read_text()
            )["step"])  # fmt: skip

    monkeypatch.setattr(T, "act_on", checked)
    monkeypatch.setattr(
        Guard, "unhealthy_reason", lambda self, row: "test" if row["step"] == 6 else ""
    )
    args = [
        *SMOKE, f"run_dir={run}", "rl.steps=4", "guard.enabled=true", f"guard.action={action}",
        "guard.snapshot_every=1", "supervision.ets.window=4", "supervision.ets.epochs=1",
    ]  # fmt: skip
    assert main(args) == 0
    rows = _rows(run)
    acted = [r for r in rows if "guard/action" in r]
    assert len(acted) == 1 and acted[0]["step"] == 6
    assert acted[0]["guard/action"] == f"rollback+{action}" and acted[0]["guard/snapshot_step"] == 4
    assert not (run / "checkpoints" / "healthy_candidate").exists() or rows[-1]["step"] > 6
    after = rows[rows.index(acted[0]) + 1 :]
    if action == "sft":
        guard_sft = [r for r in after if r["phase/name"] == "guard_sft"]
        assert guard_sft and after[: len(guard_sft)] == guard_sft
        assert all(r["phase"] == "sft" and r["sft/failed_tasks"] >= 1 for r in guard_sft)
    else:
        assert seen == [True, 4]
        rl_after = [r for r in after if r["phase"] == "rl"]
        assert rl_after and all(r["guard/lr_scale"] == 0.5 for r in rl_after)
        assert rl_after[0]["lr"] == pytest.approx(acted[0]["lr"] * 0.5)
    assert sum(r["phase"] == "rl" for r in rows) == 4


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
