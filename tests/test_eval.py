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
