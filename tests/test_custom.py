"""The custom world: tools from a Python class, tasks from JSONL, the default and a custom reward,
the executor's guards against hostile calls, and a short run on examples/custom_tools."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import fastrl
from fastrl.config import ConfigError
from fastrl.envs import get_format, get_world
from fastrl.envs.base import Parsed, ToolCall, set_tool_timeout
from fastrl.envs.custom import (
    CustomWorld,
    CustomWorldError,
    contains_word,
    public_methods,
    tool_schemas,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_tools"
EXECUTED: list[str] = []


class Counter:
    """A counter whose methods are tools."""

    def __init__(self, start: int = 0, label: str = "c") -> None:
        self.value = start
        self.label = label
        self._secret = "s"

    def add(self, amount: int, note: str | None = None) -> int:
        """Add to the counter.

        Args:
            amount: How much to add.
            note: An optional note.
        """
        EXECUTED.append("add")
        self.value += amount
        return self.value

    def scale(self, factor: float, tags: list[str] = None) -> dict:  # noqa: RUF013
        """Multiply the counter.

        Args:
            factor: The factor.
            tags: Labels to keep.
        """
        self.value = self.value * factor
        return {"value": self.value, "tags": tags or []}

    def boom(self) -> str:
        """Always fails."""
        raise RuntimeError("it broke")

    def hang(self) -> str:
        """Never returns in time."""
        time.sleep(5)
        EXECUTED.append("hang")
        return "late"

    def echo(self, text: str) -> str:
        """Say it back.

        Args:
            text: What to say.
        """
        return text

    def odd(self) -> object:
        """A result JSON cannot hold."""
        return {1, 2}

    def _private(self) -> str:
        EXECUTED.append("_private")
        return "private"


def _task(**fields) -> dict:
    row = {"id": "t1", "split": "train", "question": "Add 2.", "expected": [["2"]]}
    if "turns" in fields:
        del row["question"]
    return {**row, **fields}


def _rows(*extra: dict) -> list[dict]:
    return [_task(), _task(id="t2", split="test"), *extra]


# ---------------------------------------------------------------------------------------------
# Schemas


def test_schemas_from_hints_and_docstrings():
    schemas = tool_schemas(Counter)
    assert set(schemas) == {"add", "scale", "boom", "hang", "echo", "odd"}
    add = schemas["add"]
    assert add["description"] == "Add to the counter."
    props = add["parameters"]["properties"]
    assert props["amount"] == {"type": "integer", "description": "How much to add."}
    assert props["note"]["description"] == "An optional note."
    assert add["parameters"]["required"] == ["amount"]  # note has a default
    scale = schemas["scale"]["parameters"]
    assert scale["properties"]["factor"]["type"] == "number"
    assert scale["properties"]["tags"]["type"] == "array"
    assert "self" not in scale["properties"]


def test_public_methods_include_bases_not_object_or_private():
    class More(Counter):
        def extra(self) -> str:
            """More."""
            return "x"

    assert "extra" in public_methods(More) and "add" in public_methods(More)
    assert not [n for n in public_methods(More) if n.startswith("_")]


def test_a_method_that_cannot_be_described_is_named():
    class Bad(Counter):
        def vague(self, x):
            return x

    with pytest.raises(CustomWorldError, match=r"Bad\.vague"):
        tool_schemas(Bad)


# ---------------------------------------------------------------------------------------------
# Task file errors


def test_every_task_error_is_reported_with_its_line(tmp_path):
    lines = [
        json.dumps(_task()),
        "{not json",
        json.dumps(_task(id="t1", split="test")),  # repeats t1
        json.dumps({"id": "x", "split": "test"}),  # neither question nor turns
        json.dumps(_task(id="y", split="test", tools=["nope"])),
        json.dumps(_task(id="z", split="test", initial_state={"missing": 1})),
        json.dumps(_task(id="w", split="test", expected=[["a"], ["b"]])),
        json.dumps(_task(id="v", split="test", color="red")),
        json.dumps(_task(id="u", split="test", solution=[[{"name": "_private", "arguments": {}}]])),
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CustomWorldError) as e:
        CustomWorld(Counter, path)
    text = str(e.value)
    for lineno, what in [(2, "not JSON"), (3, "repeats line 1"), (4, "'question'"),
                         (5, "unknown tools"), (6, "initial_state"), (7, "one per turn"),
                         (8, "unknown field 'color'"), (9, "not offered")]:  # fmt: skip
        assert f"{path}:{lineno}: " in text and what in text, (lineno, what)
    assert f"{path}:1:" not in text


def test_task_errors_stop_load_config_before_any_work(tmp_path):
    (tmp_path / "tools.py").write_text(
        "class T:\n    def f(self, x: int) -> int:\n"
        '        """F.\n\n        Args:\n            x: X.\n        """\n        return x\n'
    )
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"id": "a", "split": "train"}) + "\n")
    (tmp_path / "c.yaml").write_text(
        "env:\n  name: custom\n  tools: tools.py:T\n  tasks: tasks.jsonl\n"
    )
    with pytest.raises(ConfigError, match=r"tasks.jsonl:1: give exactly one of"):
        fastrl.load_config(str(tmp_path / "c.yaml"))


# ---------------------------------------------------------------------------------------------
# The example: oracle, config, paths


def test_example_loads_with_paths_relative_to_the_config():
    cfg = fastrl.load_config(str(EXAMPLE / "config.yaml"))
    assert cfg.env.tools == f"{EXAMPLE}/library.py:LoanDesk"
    assert cfg.env.tasks == str(EXAMPLE / "tasks.jsonl")
    assert cfg.eval.splits == ["test"]  # the file's splits other than train
    world = get_world("custom", cfg.env)
    assert world.splits == ("train", "test")
    assert len(world.tasks("train", 10**6)) >= 150 and len(world.tasks("test", 10**6)) >= 50
    assert any(len(t.expert) > 1 for t in world.tasks("train", 10**6))  # multi-turn tasks


def test_example_task_file_is_what_the_generator_writes(tmp_path):
    import shutil
    import subprocess
    import sys

    for name in ("library.py", "generate_tasks.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    subprocess.run([sys.executable, "generate_tasks.py"], cwd=tmp_path, check=True,
                   capture_output=True)  # fmt: skip
    assert (tmp_path / "tasks.jsonl").read_text() == (EXAMPLE / "tasks.jsonl").read_text()


def test_oracle_scores_one_on_the_example():
    for split in ("train", "test"):
        summary = fastrl.evaluate(split, policy="oracle", config=str(EXAMPLE / "config.yaml"),
                                  overrides=["progress=false"])  # fmt: skip
        assert summary["success"] == 1.0 and summary["n"] > 0


# ---------------------------------------------------------------------------------------------
# Episodes, rewards and hostile calls


def _play(world, task, *messages):
    """Run the messages (str: text, list of (name, args): calls) on a fresh env; the env and
    every observation."""
    env = world.make_env()
    env.reset(task)
    fmt = get_format(task.fmt)
    seen = []
    for m in messages:
        text = m if isinstance(m, str) else fmt.render_calls([ToolCall(n, a) for n, a in m])
        obs, done = env.step(text, fmt.parse(text))
        seen += [o["content"] for o in obs]
    return env, seen


def test_default_reward_checks_words_and_state():
    world = CustomWorld(Counter, _rows(_task(id="s", split="test", turns=["Add 2.", "Add 3."],
                                             expected=[["2"], ["5"]],
                                             expected_state={"value": 5})))  # fmt: skip
    task = next(t for t in world.tasks("test", 9) if t.id == "s")
    env, _ = _play(world, task, [("add", {"amount": 2})], "It is 2.", [("add", {"amount": 3})],
                   "Now 5.")  # fmt: skip
    assert env.score()[0] == 1.0
    env, _ = _play(world, task, "It is 12.")
    reward, info = env.score()
    assert reward == 0.0 and info["first_failing_turn"] == 0 and "lacks ['2']" in info["error"]
    env, _ = _play(world, task, "2", [("add", {"amount": 1})], "5")
    reward, info = env.score()
    assert reward == 0.0 and info["first_failing_turn"] == 1 and "state value is 1" in info["error"]
    assert contains_word("Total: 5.", "5") and not contains_word("15", "5")


def test_a_custom_reward_replaces_the_default():
    seen = {}

    def reward(task, tools, answers):
        seen.update(task=task["id"], value=tools.value, answers=answers)
        return 0.5, {"why": "half"}

    world = CustomWorld(Counter, _rows(), reward=reward)
    env, _ = _play(world, world.tasks("train", 1)[0], [("add", {"amount": 4})], "four")
    score, info = env.score()
    assert (score, info["why"], info["success"]) == (0.5, "half", False)
    assert seen == {"task": "t1", "value": 4, "answers": ["four"]}


def test_initial_state_and_offered_subset():
    world = CustomWorld(Counter, _rows(_task(id="k", split="test", tools=["add"],
                                             initial_state={"start": 10})))  # fmt: skip
    task = next(t for t in world.tasks("test", 9) if t.id == "k")
    assert [t["name"] for t in task.tools] == ["add"]
    _, seen = _play(world, task, [("add", {"amount": 1}), ("echo", {"text": "hi"})])
    assert seen[0] == "11" and "unknown function 'echo'" in json.loads(seen[1])["error"]


HOSTILE = [
    ("_private", {}),
    ("__init__", {}),
    ("__class__", {}),
    ("__dict__", {}),
    ("__getattribute__", {"name": "_secret"}),
    ("nope", {}),
    ("add", {"amount": "2"}),  # wrong type
    ("add", {"amount": True}),  # a bool is not an integer
    ("add", {"amount": 1.5}),
    ("add", {}),  # missing
    ("add", {"amount": 1, "extra": 2}),  # unknown
    ("scale", {"factor": 2, "tags": [1]}),  # wrong item type
    ("echo", {"text": "x" * 200_000}),  # huge: runs, shown as an error
    ("boom", {}),
    ("hang", {}),
    ("odd", {}),
]


def test_hostile_calls_are_error_observations_and_execute_nothing():
    world = CustomWorld(Counter, _rows())
    task = world.tasks("train", 1)[0]
    EXECUTED.clear()
    set_tool_timeout(0.2)
    try:
        env, seen = _play(world, task, *[[call] for call in HOSTILE])
    finally:
        set_tool_timeout(10.0)
    errors = [json.loads(s)["error"] if s.startswith('{"error"') else None for s in seen]
    assert len(errors) == len(HOSTILE) and all(e is not None for e in errors[:-1]), errors
    assert "expected integer, got str" in errors[6]
    assert "expected integer, got bool" in errors[7]
    assert "missing a required argument" in errors[9]
    assert "unexpected keyword argument 'extra'" in errors[10]
    assert "exceeds the limit" in errors[12]
    assert errors[13] == "RuntimeError: it broke"
    assert "timed out" in errors[14]
    assert seen[-1] == str({1, 2})  # not JSON: its str
    assert EXECUTED == [] and env.instance.value == 0 and env.instance._secret == "s"
    assert env.score()[1]["n_errors"] == len(HOSTILE) - 1
    time.sleep(0.1)


def test_parse_errors_and_a_closed_episode():
    world = CustomWorld(Counter, _rows())
    env = world.make_env()
    env.reset(world.tasks("train", 1)[0])
    obs, done = env.step("<tool_call>{", Parsed([], error="bad"))
    assert obs[0]["content"] == "Error: bad" and not done
    assert env.step("2", Parsed([])) == ([], True)
    assert env.step("again", Parsed([])) == ([], True)


# ---------------------------------------------------------------------------------------------
# Python API and a short run


def test_python_api_takes_the_objects(tmp_path):
    tasks = _rows()
    summary = fastrl.evaluate("test", policy="oracle", tools=Counter, tasks=tasks,
                              overrides=["progress=false"])  # fmt: skip
    assert summary["n"] == 1 and summary["env"] == "custom"
    with pytest.raises(ConfigError, match="no task in the 'train' split"):
        fastrl.evaluate("test", policy="oracle", tools=Counter, tasks=tasks[1:])


def test_a_short_train_run_on_the_example(tmp_path):
    import fastrl.train.build  # noqa: F401 - binds the subpackage as fastrl.train: still callable

    summary = fastrl.train(
        str(EXAMPLE / "config.yaml"),
        [f"run_dir={tmp_path}/run", f"model.cache_dir={tmp_path}/models", "progress=false",
         "sft.steps=2", "rl.steps=1", "rl.prompts_per_step=2", "rl.group_size=2",
         "env.train_tasks=8", "env.eval_tasks=2", "rollout.engine=hf", "rollout.max_turns=2",
         "rollout.max_turn_tokens=16", "model.vocab_size=512"],
    )  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["sft", "sft", "rl"]
    assert summary["sft_success"] is not None and summary["rl_success"] is not None
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"{EXAMPLE}/library.py:LoanDesk" in saved


def test_reward_from_a_file_named_by_the_config(tmp_path):
    (tmp_path / "reward.py").write_text(
        "def half(task, tools, answers):\n    return 0.5 if answers else 0.0\n"
    )
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (tmp_path / "c.yaml").write_text(
        "env:\n  name: custom\n  tools: test_custom:Counter\n  tasks: tasks.jsonl\n"
        "  reward: reward.py:half\n"
    )
    cfg = fastrl.load_config(str(tmp_path / "c.yaml"))
    assert cfg.env.reward == f"{tmp_path}/reward.py:half"
    assert cfg.env.tools == "test_custom:Counter"  # a module path stays as it is
    world = get_world("custom", cfg.env)
    env, _ = _play(world, world.tasks("test", 1)[0], "2")
    assert env.score()[0] == 0.5


def test_the_tokenizer_corpus_is_the_worlds_own_text():
    cfg = fastrl.load_config(str(EXAMPLE / "config.yaml"))
    corpus = get_world("custom", cfg.env).tokenizer_corpus()
    text = "\n".join(corpus)
    assert "find_book" in text and '"copies":' in text and "Then lend it to" in text
    assert "lent B" in text  # the solutions' tool results
