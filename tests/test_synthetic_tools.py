"""The synthetic world's tools (fastrl/envs/synthetic/tools.py): calls, errors, answer checks."""

from __future__ import annotations

import json

import pytest

from fastrl.envs import get_format
from fastrl.envs.base import Parsed, Task, ToolCall
from fastrl.envs.synthetic import SPLITS, SyntheticWorld, tools
from fastrl.envs.synthetic.tools import (
    FAMILIES,
    FAMILY_OF,
    OOD_FAMILIES,
    TOOLS,
    answer_ok,
    empty_world,
    execute,
)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld()


@pytest.fixture(scope="module")
def tasks(world) -> dict[str, list[Task]]:
    return {split: world.tasks(split, 40) for split in SPLITS}


def _send(env, task: Task, text: str) -> tuple[list[dict], bool]:
    return env.step(text, get_format(task.fmt).parse(text))


def _bank(**balances: int) -> dict:
    world = empty_world()
    world["bank"].update(balances)
    return world


def test_every_tool_has_a_family_and_an_implementation():
    assert set(FAMILY_OF) == set(TOOLS) == set(tools._IMPLS)
    assert not set(FAMILIES) & set(OOD_FAMILIES)


def test_transfer_changes_the_world_and_checks_funds():
    world = _bank(A10=50, A11=20)
    allowed = {"transfer", "get_balance"}
    result = execute(world, allowed, "transfer", {"src": "A10", "dst": "A11", "amount": 30})
    assert result == {"src_balance": 20, "dst_balance": 50}
    assert execute(world, allowed, "transfer", {"src": "A10", "dst": "A11", "amount": 21}) == {
        "error": "insufficient funds in A10"
    }
    assert "error" in execute(world, allowed, "transfer", {"src": "A10", "dst": "A10", "amount": 1})
    assert "error" in execute(world, allowed, "transfer", {"src": "A10", "dst": "A11", "amount": 0})
    assert world["bank"] == {"A10": 20, "A11": 50}  # failed calls change nothing


def test_calls_are_checked_against_the_offered_tools_and_the_schema():
    world = _bank(A10=50)
    assert execute(world, {"get_balance"}, "get_balance", {"account": "A10"}) == {"balance": 50}
    assert execute(world, {"get_balance"}, "transfer", {})["error"].startswith("unknown tool")
    assert "missing argument" in execute(world, {"get_balance"}, "get_balance", {})["error"]
    assert (
        "has no argument"
        in execute(world, {"get_balance"}, "get_balance", {"account": "A10", "x": 1})["error"]
    )
    assert (
        "must be a string"
        in execute(world, {"get_balance"}, "get_balance", {"account": 10})["error"]
    )
    assert (
        "unknown account"
        in execute(world, {"get_balance"}, "get_balance", {"account": "A99"})["error"]
    )


def test_answer_ok_matches_whole_values():
    assert answer_ok("It is 42 degrees in Oslo.", ["42", "Oslo"])
    assert answer_ok("Account A10 has 1,250 dollars.", ["1250"])
    assert not answer_ok("It is 425 degrees.", ["42"])
    assert not answer_ok("It is 42.5 degrees.", ["42"])
    assert not answer_ok("It is -42 degrees.", ["42"])
    assert not answer_ok("42 " * 100, ["42"])  # longer than MAX_ANSWER_CHARS


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


def test_a_hanging_tool_is_cut_off_with_an_error_observation(monkeypatch):
    import time

    from fastrl.envs import base

    def hang(world, city):
        time.sleep(3)

    monkeypatch.setitem(tools._IMPLS, "get_weather", hang)
    base.set_tool_timeout(0.2)
    try:
        t0 = time.time()
        result = tools.execute(tools.empty_world(), {"get_weather"}, "get_weather",
                                   {"city": "Oslo"})  # fmt: skip
        assert time.time() - t0 < 5
        assert result == {"error": "get_weather timed out after 0.2 s"}
        # Off the main thread the call is abandoned in a worker thread instead.
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            result = pool.submit(tools.execute, tools.empty_world(), {"get_weather"},
                                 "get_weather", {"city": "Oslo"}).result()  # fmt: skip
        assert result == {"error": "get_weather timed out after 0.2 s"}
    finally:
        base.set_tool_timeout(10.0)
