"""The synthetic tool world: task generation, expert replay, scoring, and hostile calls."""

from __future__ import annotations

import json
import re

import pytest

from fastrl.envs import ENVS, get_format, get_world
from fastrl.envs.base import Parsed, Task, ToolCall
from fastrl.envs.synthetic import (
    FAMILIES,
    OOD_CITIES,
    OOD_FAMILIES,
    OOD_ITEMS,
    OOD_PEOPLE,
    SPLITS,
    SyntheticEnv,
    SyntheticWorld,
)

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


# --- generation ---------------------------------------------------------------------------------


def test_deterministic_and_prefix(world):
    for split in SPLITS:
        long = world.tasks(split, 60)
        assert world.tasks(split, 60) == long
        assert world.tasks(split, 10) == long[:10]
        assert world.tasks(split, 10, seed=1) != long[:10]


def test_unknown_split_names_valid_ones(world):
    with pytest.raises(ValueError, match="content_ood"):
        world.tasks("validation", 3)


def test_ids_unique_and_fields(tasks):
    for split, ts in tasks.items():
        assert len({t.id for t in ts}) == len(ts)
        for t in ts:
            assert t.split == split
            assert t.fmt == ("pythonic" if split == "format_ood" else "hermes")
            assert [m["role"] for m in t.messages] == ["system", "user"]
            assert t.hint
            for tool in t.tools:
                assert set(tool) == {"name", "description", "parameters"}
                assert all(kind in ("string", "integer") for kind in tool["parameters"].values())


def test_train_and_test_disjoint(world, tasks):
    # What the model sees apart from the system prompt: questions, calls, results, answers.
    def key(task: Task) -> str:
        transcript, _, _ = _replay(world, task)
        return json.dumps([m["content"] for m in transcript[1:]])

    train = {key(t) for t in world.tasks("train", 3000)}
    test = {key(t) for t in world.tasks("test", 1000)}
    assert len(test) > 900
    assert not train & test


def test_format_ood_is_test_in_python_syntax(tasks):
    hermes, pythonic = get_format("hermes"), get_format("pythonic")
    for a, b in zip(tasks["test"], tasks["format_ood"], strict=True):
        assert a.messages[1] == b.messages[1]
        assert "<tool_call>" in a.messages[0]["content"]
        assert "Python list" in b.messages[0]["content"]
        for turn_a, turn_b in zip(a.expert, b.expert, strict=True):
            assert [hermes.parse(m).calls for m in turn_a] == [
                pythonic.parse(m).calls for m in turn_b
            ]


def test_call_and_turn_counts(tasks):
    for ts in tasks.values():
        calls = [_n_calls(t) for t in ts]
        turns = [len(t.expert) for t in ts]
        assert set(calls) == {1, 2, 3, 4}
        assert set(turns) == {1, 2, 3}
        assert all(1 <= n_turns <= n for n, n_turns in zip(calls, turns, strict=True))
        for t in ts:
            assert all(len(turn) >= 2 for turn in t.expert)  # at least one call, then an answer
        assert 0.2 < calls.count(1) / len(ts) < 0.45
        assert calls.count(4) / len(ts) < 0.2
        assert turns.count(3) / len(ts) < 0.2


def test_prompt_lists_used_families_and_at_most_one_distractor(tasks):
    family_of = {
        tool: f for fams in (FAMILIES, OOD_FAMILIES) for f, ts in fams.items() for tool in ts
    }
    for ts in tasks.values():
        n_with_distractor = 0
        for t in ts:
            offered = [tool["name"] for tool in t.tools]
            fmt = get_format(t.fmt)
            used = {c.name for turn in t.expert for m in turn[:-1] for c in fmt.parse(m).calls}
            assert used <= set(offered)
            for tool in t.tools:
                assert json.dumps(tool) in t.messages[0]["content"]
            offered_families = {family_of[name] for name in offered}
            used_families = {family_of[name] for name in used}
            # whole families are offered
            assert sorted(offered) == sorted(
                tool for f in offered_families for tool in {**FAMILIES, **OOD_FAMILIES}[f]
            )
            extra = len(offered_families - used_families)
            assert extra <= 1
            n_with_distractor += extra
        assert 0.2 < n_with_distractor / len(ts) < 0.8


def test_length_budget(world, tasks):
    for split, ts in tasks.items():
        lengths = [sum(len(m["content"]) for m in _replay(world, t)[0]) for t in ts]
        assert sum(n > 2000 for n in lengths) / len(ts) < 0.05, split
        assert sum(lengths) / len(lengths) < 1400, split


def test_content_ood_unseen_in_train(world, tasks):
    train_text = "\n".join(
        m["content"] for t in world.tasks("train", 1000) for m in _replay(world, t)[0]
    )
    unseen = [*OOD_PEOPLE, *OOD_CITIES, *OOD_ITEMS]
    unseen += [tool for tools in OOD_FAMILIES.values() for tool in tools]
    for word in unseen:
        assert not re.search(rf"\b{re.escape(word)}\b", train_text, re.IGNORECASE), word
    ood_tools = {tool["name"] for t in tasks["content_ood"] for tool in t.tools}
    assert ood_tools == {tool for tools in OOD_FAMILIES.values() for tool in tools}


def test_entity_attributes_vary_between_tasks(tasks):
    temps = {
        (city, w["temp"]) for t in tasks["train"] for city, w in t.meta["world"]["weather"].items()
    }
    cities = {city for city, _ in temps}
    assert len(temps) > 3 * len(cities)


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


# --- hostile calls ------------------------------------------------------------------------------


def _hostile_calls(task: Task) -> list[ToolCall]:
    tool = task.tools[0]
    name = tool["name"]
    params = tool["parameters"]  # argument name -> JSON type
    good = {p: ("x" if kind == "string" else 1) for p, kind in params.items()}
    wrong_type = {p: (1 if kind == "string" else "1") for p, kind in params.items()}
    return [
        ToolCall("rm_rf", {}),
        ToolCall("__import__", {"name": "os"}),
        ToolCall("lookup_user" if task.split == "content_ood" else "get_stock", {"item": "lamp"}),
        ToolCall(name, {}),
        ToolCall(name, {**good, "extra": 1}),
        ToolCall(name, wrong_type),
        ToolCall(name, {p: True for p in params}),
        ToolCall(name, {p: None for p in params}),
        ToolCall(name, {p: [1, 2] for p in params}),
        ToolCall(name, {p: {"a": 1} for p in params}),
        ToolCall(name, {p: "x" * 1_000_000 for p in params}),
        ToolCall(
            name,
            {p: -(10**30) if kind == "integer" else "Nobody" for p, kind in params.items()},
        ),
        ToolCall(name, good),
    ]


@pytest.mark.parametrize("split", ["train", "content_ood"])
def test_hostile_calls_return_errors_and_change_nothing(world, tasks, split):
    for task in tasks[split][:40]:
        env = world.make_env()
        env.reset(task)
        calls = _hostile_calls(task)
        observations, done = env.step("...", Parsed(calls))
        assert not done
        assert len(observations) == len(calls)
        for obs in observations:
            assert obs["role"] == "tool"
            assert len(obs["content"]) < 300
            assert "error" in json.loads(obs["content"])
        for turn in task.expert:
            for text in turn:
                _send(env, task, text)
        reward, info = env.score()
        assert reward == 1.0  # the failed calls left the world untouched
        assert info["n_errors"] == len(calls)


def test_non_dict_arguments_and_non_string_names(world, tasks):
    env = world.make_env()
    task = tasks["train"][0]
    env.reset(task)
    observations, _ = env.step("", Parsed([ToolCall(3, {}), ToolCall(task.tools[0]["name"], [1])]))
    assert all("error" in json.loads(o["content"]) for o in observations)


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


# --- registry -----------------------------------------------------------------------------------


def test_registry():
    assert ENVS["synthetic"] is SyntheticWorld
    assert isinstance(get_world("synthetic"), SyntheticWorld)
    with pytest.raises(ValueError, match="synthetic"):
        get_world("nope")


def test_a_hanging_tool_is_cut_off_with_an_error_observation(monkeypatch):
    import time

    from fastrl.envs import base, synthetic

    def hang(world, city):
        time.sleep(3)

    monkeypatch.setitem(synthetic._IMPLS, "get_weather", hang)
    base.set_tool_timeout(0.2)
    try:
        t0 = time.time()
        result = synthetic.execute(synthetic._empty_world(), {"get_weather"}, "get_weather",
                                   {"city": "Oslo"})  # fmt: skip
        assert time.time() - t0 < 5
        assert result == {"error": "get_weather timed out after 0.2 s"}
        # Off the main thread the call is abandoned in a worker thread instead.
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            result = pool.submit(synthetic.execute, synthetic._empty_world(), {"get_weather"},
                                 "get_weather", {"city": "Oslo"}).result()  # fmt: skip
        assert result == {"error": "get_weather timed out after 0.2 s"}
    finally:
        base.set_tool_timeout(10.0)
