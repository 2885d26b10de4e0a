"""The imperfect teacher: its habits, their rates, determinism, and its demonstrations played."""

import re

import pytest

import fastrl
from fastrl.algo import supervision as S
from fastrl.config import ConfigError, load_config
from fastrl.envs.synthetic import answer_ok
from fastrl.envs.teacher import Habits, applicable, demonstration
from fastrl.rollout.loop import Limits


@pytest.fixture(scope="module")
def train_tasks(world):
    return world.tasks("train", 1500)


def _eligible(task):
    """Per turn: the set of habits that apply."""
    return [set(a) for a in applicable(task)]


def test_no_habit_gives_the_experts_demonstrations(train_tasks):
    for task in train_tasks[:300]:
        messages, fired = demonstration(task, Habits(), seed=3)
        assert messages == task.expert
        assert fired == [""] * len(task.expert)


@pytest.mark.parametrize(
    ("habits", "name", "rate"),
    [
        (Habits(stop_early=0.35), "stop_early", 0.35),
        (Habits(skip_lookup=0.6), "skip_lookup", 0.6),
        (Habits(guess=0.2), "guess", 0.2),
    ],
)
def test_each_habit_fires_at_its_rate_on_the_turns_it_applies_to(train_tasks, habits, name, rate):
    eligible = fired = 0
    for task in train_tasks:
        _, turns = demonstration(task, habits, seed=0)
        for applies, habit in zip(_eligible(task), turns, strict=True):
            assert habit in ("", name)
            assert name in applies or habit == "", "a habit fired on a turn it does not apply to"
            eligible += name in applies
            fired += habit == name
    assert eligible > 400
    assert abs(fired / eligible - rate) < 0.05


def test_rate_one_fires_on_every_turn_it_applies_to(train_tasks):
    for task in train_tasks[:300]:
        _, turns = demonstration(task, Habits(stop_early=1.0, skip_lookup=1.0), seed=0)
        for applies, habit in zip(_eligible(task), turns, strict=True):
            # skip_lookup decides before stop_early, so it takes the turn where both apply
            expected = "skip_lookup" if "skip_lookup" in applies else ""
            assert habit == (expected or ("stop_early" if "stop_early" in applies else ""))
        _, turns = demonstration(task, Habits(stop_early=1.0, guess=1.0), seed=0)
        assert turns == [  # guess decides first
            "guess" if "guess" in a else "stop_early" if "stop_early" in a else ""
            for a in _eligible(task)
        ]


def test_decisions_are_deterministic_per_task_and_seed(train_tasks):
    habits = Habits(stop_early=0.5, skip_lookup=0.5)
    tasks = train_tasks[:400]
    first = [demonstration(t, habits, seed=1) for t in tasks]
    assert first == [demonstration(t, habits, seed=1) for t in tasks]
    assert [demonstration(t, habits, seed=1) for t in reversed(tasks)] == first[::-1]
    other = [demonstration(t, habits, seed=2) for t in tasks]
    assert other != first


def test_habits_write_the_documented_messages(world):
    tasks = world.tasks("train", 200)
    seen = set()
    for task in tasks:
        messages, fired = demonstration(task, Habits(1.0, 1.0), seed=0)
        for turn, expert, msgs, habit in zip(
            task.meta["turns"], task.expert, messages, fired, strict=True
        ):
            calls = turn["calls"]
            if habit == "stop_early":  # the turn's last call dropped, the value in hand answered
                assert msgs[:-1] == expert[: len(calls) - 1]
                assert msgs[-1].startswith("The answer is ")
                assert msgs[-1] != expert[-1]
            elif habit == "skip_lookup":  # the name passed where the looked-up value belongs
                name = calls[0]["arguments"]["name"]
                assert '"name": "lookup_user"' not in msgs[0]
                assert f'"{name}"' in msgs[0] and calls[1]["name"] in msgs[0]
                assert msgs[1] == f"I could not find {name}."
            seen.add(habit)
    assert seen == {"", "stop_early", "skip_lookup"}
    guessed = 0
    for task in tasks:  # guess: no call, the expert's sentence with made-up values, a failure
        messages, fired = demonstration(task, Habits(guess=1.0), seed=0)
        for turn, expert, msgs, habit in zip(
            task.meta["turns"], task.expert, messages, fired, strict=True
        ):
            if habit != "guess":
                continue
            guessed += 1
            (answer,) = msgs
            assert "<tool_call>" not in answer and answer != expert[-1]
            assert re.sub(r"-?\d+|[A-Z][a-z]+", "#", answer) == re.sub(
                r"-?\d+|[A-Z][a-z]+", "#", expert[-1]
            )  # the same sentence, other numbers or names
            assert not answer_ok(answer, turn["expected"])
    assert guessed > 100


def test_teacher_demonstrations_are_played_and_kept_when_they_fail(tiny_policy, world):
    _, tok, _ = tiny_policy
    tasks = world.tasks("train", 40)
    habits = Habits(stop_early=1.0, skip_lookup=1.0, guess=0.3)
    trajs = S.play_teacher(tok, world, tasks, Limits(max_total_tokens=4096),
                                   habits, seed=0)  # fmt: skip
    assert [t.task_id for t in trajs] == [t.id for t in tasks]  # one per task, in order, all kept
    assert all(t.source == "teacher" for t in trajs)
    touched = [t for t in trajs if any(t.info["habits"])]
    assert touched and len(touched) < len(trajs)
    assert {h for t in trajs for h in t.info["habits"]} == {
        "",
        "stop_early",
        "skip_lookup",
        "guess",
    }
    for t in trajs:  # every habit is a decision the reward tells apart
        assert t.success == (not any(t.info["habits"]))
    skipped = next(t for t in trajs if "skip_lookup" in t.info["habits"])
    # the environment's real answer to the guessed call
    assert any(m["role"] == "tool" and "unknown" in m["content"] for m in skipped.messages)
    perfect = S.play_teacher(tok, world, tasks, Limits(max_total_tokens=4096),
                                     Habits(), seed=0)  # fmt: skip
    experts = S.play_experts(tok, world, tasks, Limits(max_total_tokens=4096), solved_only=True)
    assert [t.response_ids for t in perfect] == [t.response_ids for t in experts]


def test_teacher_config_keys():
    cfg = load_config(None)
    assert 0 < cfg.env.teacher.stop_early_rate <= 1  # the demo's teacher has habits
    with pytest.raises(ConfigError, match="env.teacher.stop_early_rate"):
        load_config(None, ["env.teacher.stop_early_rate=1.5"])
    with pytest.raises(ConfigError, match="env.teacher.skip_lookup_rate"):
        load_config(None, ["env.teacher.skip_lookup_rate=-0.1"])
    # BFCL's demonstrations are its ground truth: its defaults turn the habits off, and a habit
    # set for it is refused before any work (fastrl.load_config completes and checks a config)
    bfcl = fastrl.load_config(None, ["env.name=bfcl"])
    teacher = bfcl.env.teacher
    assert teacher.stop_early_rate == teacher.skip_lookup_rate == teacher.guess_rate == 0
    with pytest.raises(ConfigError, match="synthetic world only"):
        fastrl.load_config(None, ["env.name=bfcl", "env.teacher.stop_early_rate=0.5"])
