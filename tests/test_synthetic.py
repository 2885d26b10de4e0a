"""The synthetic world and its environment: expert replay, scoring, the registry."""

from __future__ import annotations

import json
import re

import pytest

from fastrl.envs import ENVS, get_format, get_world
from fastrl.envs.base import Parsed, Task, ToolCall
from fastrl.envs.synthetic import SPLITS, SyntheticEnv, SyntheticWorld

N = 200


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld()


@pytest.fixture(scope="module")
def tasks(world) -> dict[str, list[Task]]:
    return {split: world.tasks(split, N) for split in SPLITS}


def _send(env: SyntheticEnv, task: Task, text: str) -> tuple[list[dict], bool]:
    return env.step(text, get_format(task.fmt).parse(text))


def _replay(world: SyntheticWorld, task: Task, expert: list[list[str]] | None = None):
    """Feed assistant messages turn by turn; returns the transcript, the env and the last done."""
    env = world.make_env()
    transcript = env.reset(task)
    done = False
    for turn in task.expert if expert is None else expert:
        for text in turn:
            transcript.append({"role": "assistant", "content": text})
            observations, done = _send(env, task, text)
            transcript.extend(observations)
    return transcript, env, done


def _n_calls(task: Task) -> int:
    return sum(len(turn) - 1 for turn in task.expert)


def _is_stateful_call(text: str, fmt: str) -> bool:
    return any(
        c.name in {"transfer", "add_todo", "order", "book_flight"}
        for c in get_format(fmt).parse(text).calls
    )


# --- expert replay and scoring ------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_expert_replay_scores_one(world, tasks, split):
    for task in tasks[split]:
        transcript, env, done = _replay(world, task)
        reward, info = env.score()
        assert done
        assert reward == 1.0, (task.id, info)
        assert info["success"] and info["first_failing_turn"] is None
        assert info["n_calls"] == _n_calls(task)
        assert info["n_errors"] == 0
        users = [m["content"] for m in transcript if m["role"] == "user"]
        assert users == [turn["question"] for turn in task.meta["turns"]]


def test_reset_returns_copies(world, tasks):
    task = tasks["train"][0]
    env = world.make_env()
    messages = env.reset(task)
    messages[0]["content"] = "changed"
    assert task.messages[0]["content"] != "changed"


@pytest.mark.parametrize("split", SPLITS)
def test_wrong_answer_fails_at_that_turn(world, tasks, split):
    for task in tasks[split][:80]:
        for bad in range(len(task.expert)):
            expert = [list(turn) for turn in task.expert]
            expert[bad][-1] = "I do not know."
            _, env, _ = _replay(world, task, expert)
            reward, info = env.score()
            assert reward == 0.0
            assert info["first_failing_turn"] == bad
            assert info["answers_correct"][bad] is False


def test_wrong_number_fails(world, tasks):
    for task in tasks["test"][:80]:
        expected = task.meta["turns"][0]["expected"]
        if not expected[0].lstrip("-").isdigit():
            continue
        expert = [list(turn) for turn in task.expert]
        wrong = str(int(expected[0]) + 1)
        expert[0][-1] = re.sub(rf"(?<![\w-]){re.escape(expected[0])}\b", wrong, expert[0][-1])
        _, env, _ = _replay(world, task, expert)
        assert env.score()[1]["first_failing_turn"] == 0


def test_skipped_stateful_call_fails_at_that_turn(world, tasks):
    checked = 0
    for split in ("train", "content_ood"):
        for task in tasks[split]:
            for turn_index, turn in enumerate(task.expert):
                stateful = [i for i, m in enumerate(turn[:-1]) if _is_stateful_call(m, task.fmt)]
                if not stateful:
                    continue
                expert = [list(t) for t in task.expert]
                del expert[turn_index][stateful[-1]]
                _, env, _ = _replay(world, task, expert)
                reward, info = env.score()
                assert reward == 0.0 and not info["state_match"]
                assert info["first_failing_turn"] == turn_index
                checked += 1
    assert checked > 50


def test_unanswered_turns_fail(world, tasks):
    task = next(t for t in tasks["train"] if len(t.expert) >= 2)
    _, env, done = _replay(world, task, task.expert[:1])
    assert not done
    reward, info = env.score()
    assert reward == 0.0 and info["first_failing_turn"] == 1 and info["turns_answered"] == 1


def test_overlong_answer_fails(world, tasks):
    task = tasks["train"][0]
    expert = [list(turn) for turn in task.expert]
    expert[-1][-1] = expert[-1][-1] + " " + "1 2 3 4 5 6 7 8 9 " * 20
    _, env, _ = _replay(world, task, expert)
    assert env.score()[0] == 0.0


def test_answer_matching_is_by_whole_value(world, tasks):
    task = next(
        t
        for t in tasks["train"]
        if len(t.expert) == 1 and t.meta["turns"][0]["expected"][0].isdigit()
    )
    value = task.meta["turns"][0]["expected"][0]
    for answer, ok in [
        (f"It is {value}.", True),
        (f"The answer: {value}", True),
        (f"It is {value}5.", False),
        (f"It is 1{value}.", False),
        (f"It is {value}.5 now.", False),
    ]:
        expert = [[*task.expert[0][:-1], answer]]
        _, env, _ = _replay(world, task, expert)
        assert env.score()[1]["success"] is ok, answer


def test_extra_transfer_breaks_state(world, tasks):
    task = next(t for t in tasks["train"] if "transfer" in json.dumps(t.expert))
    src, dst = sorted(task.meta["world"]["bank"])[:2]
    env = world.make_env()
    env.reset(task)
    extra = ToolCall("transfer", {"src": src, "dst": dst, "amount": 1})
    observations, _ = _send(env, task, get_format("hermes").render_calls([extra]))
    assert "src_balance" in observations[0]["content"]
    for turn in task.expert:
        for text in turn:
            _send(env, task, text)
    reward, info = env.score()
    assert reward == 0.0 and not info["state_match"]


def test_parse_error_is_reported_and_retry_allowed(world, tasks):
    task = tasks["train"][0]
    env = world.make_env()
    env.reset(task)
    observations, done = _send(env, task, "<tool_call>\n{oops\n</tool_call>")
    assert not done and observations[0]["content"].startswith("Error: ")
    for turn in task.expert:
        for text in turn:
            _send(env, task, text)
    reward, info = env.score()
    assert reward == 1.0 and info["n_errors"] == 1


def test_step_after_done_is_inert(world, tasks):
    task = tasks["train"][0]
    _, env, done = _replay(world, task)
    assert done
    assert env.step("more", Parsed([])) == ([], True)
    assert env.score()[0] == 1.0


def test_unknown_split_names_valid_ones(world):
    with pytest.raises(ValueError, match="content_ood"):
        world.tasks("validation", 3)


def test_tokenizer_corpus(world):
    corpus = world.tokenizer_corpus(n_tasks=50)
    text = "\n".join(corpus)
    assert all(isinstance(piece, str) and piece for piece in corpus)
    assert "<tool_call>" in text and "Python list" in text
    assert re.search(r"\[\w+\(\w+=", text)  # calls in Python syntax
    assert '"balance": ' in text or '"city": ' in text  # tool results
    assert "<|im_start|>" not in text and "<|endoftext|>" not in text
    train_questions = {t.meta["turns"][0]["question"] for t in world.tasks("train", 50)}
    assert train_questions <= set(corpus)


# --- registry -----------------------------------------------------------------------------------


def test_registry():
    assert ENVS["synthetic"] is SyntheticWorld
    assert isinstance(get_world("synthetic"), SyntheticWorld)
    with pytest.raises(ValueError, match="synthetic"):
        get_world("nope")
