import math

import pytest
import torch

import fastrl.eval as E
from fastrl.algo import supervision as S
from fastrl.envs.teacher import applicable
from fastrl.monitor.control_tokens import decision_positions
from fastrl.rollout.engines import ScriptedEngine
from fastrl.rollout.loop import Limits
from fastrl.train import batch as B


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
    row = E.decision_probe(model, probe, tool_call, tok.pad_token_id, 4096, packing=True)
    for kind, values in by_kind.items():
        assert row[f"ctrl/{kind}_p_tool_call"] == pytest.approx(sum(values) / len(values), abs=1e-5)


def test_health_probe_is_the_experts_control_token_nll_read_off_the_full_logits(tiny_policy, world):
    """Each `ctrl/health_nll_<kind>` is the mean -log p(expert's token) over that kind's positions,
    recomputed here from the model's full logits by scanning the token ids; the packed and
    padded paths agree."""
    from fastrl.monitor.metrics import probe_ids

    model, tok, _ = tiny_policy
    tasks = world.tasks("test", 12)
    probe = E.health_probe_set(tok, world, tasks, Limits(max_total_tokens=4096))
    ids = probe_ids(tok)
    tool_call, end_call, im_end = tok.convert_tokens_to_ids(["<tool_call>", "</tool_call>",
                                                             "<|im_end|>"])  # fmt: skip
    newline = ids.newline
    want = {k: [] for k in ("turn_start", "open", "after_call", "end", "control", "all")}
    for traj in probe:
        seq = traj.prompt_ids + traj.response_ids
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([seq])).logits[0].double().log_softmax(-1)
        p = len(traj.prompt_ids)
        for j, trained in enumerate(traj.loss_mask):
            if not trained:
                continue
            pos = p + j - 1  # predicts seq[p + j]
            nll = -logp[pos, seq[p + j]].item()
            kinds = {
                "turn_start": j == 0 or not traj.loss_mask[j - 1],
                "open": seq[pos] == tool_call
                or (seq[pos] == newline and seq[pos - 1] == tool_call),
                "after_call": seq[pos] == end_call,
                "end": seq[p + j] == im_end,
            }
            for kind, hit in kinds.items():
                if hit:
                    want[kind].append(nll)
            if any(kinds.values()):
                want["control"].append(nll)
            want["all"].append(nll)
    assert all(want.values())
    for packing in (True, False):
        row = E.health_probe(model, probe, ids, tok.pad_token_id, 4096, packing=packing)
        for kind, values in want.items():
            key = "ctrl/health_nll" if kind == "control" else f"ctrl/health_nll_{kind}"
            assert row[key] == pytest.approx(sum(values) / len(values), rel=1e-4), key


def test_health_probe_rises_when_the_turn_end_is_broken_and_falls_when_the_expert_is_learned(
    tiny_policy, world
):
    """The look-ahead alarm's direction: an update that makes the expert's turn ends (<|im_end|>)
    less likely (the collapse of docs/EXPERIMENTS.md: turns that do not end) drifts the probe up
    past the threshold and alarms; an SFT step on the expert's trajectories drifts it down and
    does not."""
    import copy

    from fastrl.monitor.control_tokens import SpikeAlarm
    from fastrl.monitor.metrics import probe_ids

    model, tok, _ = tiny_policy
    probe = E.health_probe_set(tok, world, world.tasks("test", 8), Limits(max_total_tokens=4096))
    ids = probe_ids(tok)
    score = lambda m: E.health_probe(m, probe, ids, tok.pad_token_id, 4096, packing=True)  # noqa: E731
    alarm = SpikeAlarm(health_threshold=0.15, spikes=False)
    alarm.health_start = score(model)
    batch = B.collate(probe, tok.pad_token_id)

    def updated(sign: float, only_end: bool, lr: float):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        for _ in range(3):
            opt.zero_grad()
            logp, _, _ = B.token_stats(m, batch)
            where = batch.target_mask & (batch.labels == ids.control[1] if only_end else True)
            (sign * (logp * where).sum() / where.sum()).backward()
            opt.step()
        return m

    out = alarm.update(score(updated(+1.0, only_end=True, lr=0.5)))  # ascent on -log p(<|im_end|>)
    assert out["ctrl/health_drift_end"] > 0.15 and out["ctrl/alarm"] == 1.0
    out = alarm.update(score(updated(-1.0, only_end=False, lr=0.02)))  # SFT on the expert
    assert out["ctrl/health_drift_all"] < 0 and out["ctrl/health_drift"] < 0
    assert out["ctrl/alarm"] == 0.0
