"""Your own tools and tasks: a Python class whose public methods are the tools, tasks as JSONL.

Configured by `env.name: custom`, `env.tools` (`FILE.py:ClassName` or `pkg.mod:ClassName`),
`env.tasks` (`FILE.jsonl`) and optionally `env.reward` (`FILE.py:function`); relative paths
resolve against the config file's folder. From Python, `fastrl.train(config, tools=MyClass,
tasks=[...], reward=fn)` passes the objects themselves (`provide`).

Tools: one instance of the class per episode, built with the task's `initial_state` as keyword
arguments. Its public methods (not starting with `_`, defined by the class or its bases other than
`object`) are the tools; their JSON schemas come from the type hints and docstrings
(`transformers.utils.get_json_schema`, what HF chat templates use). A method that cannot be
described is an error at start naming it. Calls run through the executor shared with BFCL
(`fastrl.envs.executor.MethodExecutor`): offered public methods only, JSON arguments bound to the
signature and checked against the schema's types, the tool timeout, exceptions as
`{"error": "Type: message"}`, results JSON-serialised (anything else as `str`).

Tasks, one JSON object per line (`TASK_FIELDS`): `id` (unique), `split` (any name; `train` is
trained on, `test` evaluated after SFT and RL; the file needs both), `question` (one user turn)
or `turns` (several), and optional `initial_state`, `tools` (the offered subset), `expected` (per
turn, strings the turn's answer must contain as whole words, case-insensitive), `expected_state`
(public attributes of the instance after the episode and the values they must equal), `solution`
(per turn, the expert's calls `{"name", "arguments"}`: SFT, the oracle, OPS, ETS/PRS, hints),
`answers` (per turn, the expert's final reply; by default the expected strings, or "Done."),
`hint`. Every error in the file is reported with its line number, all at once, before any work.

Reward: 1.0 when every turn is answered with its expected strings and `expected_state` holds;
`info` names the first failing turn and why (`error`). `env.reward` replaces it:
`fn(task: dict, tools: object, answers: list[str]) -> float | (float, dict)`; `success` is the
dict's `success` when it gives one, else reward >= 1.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fastrl.envs.base import QuestionTurnsEnv, Task, ToolCall
from fastrl.envs.executor import MethodExecutor, dumps_result
from fastrl.envs.formats import get_format

TASK_FIELDS = (
    "id", "split", "question", "turns", "initial_state", "tools", "expected", "expected_state",
    "solution", "answers", "hint",
)  # fmt: skip
INSTRUCTION = (
    "Use the tools to complete the user's request. When it is done, reply in one sentence."
)
DONE = "Done."
# Objects handed over from Python (`provide`), by the name the config gives them.
_PROVIDED: dict[str, Any] = {}


class CustomWorldError(ValueError):
    """A tools class, task file or reward that cannot be used; the message says where."""


# ---------------------------------------------------------------------------------------------
# Loading the class, the reward and the tasks.


def provide(kind: str, obj: Any) -> str:
    """Register a Python object (`kind`: tools | tasks | reward) for a config to name; returns
    the value for `env.<kind>`."""
    label = getattr(obj, "__qualname__", None) or f"{len(obj)} tasks"
    key = f"python:{kind}:{label}:{id(obj):x}"
    _PROVIDED[key] = obj
    return key


def load_object(spec: str, key: str) -> Any:
    """The object `FILE.py:Name` or `pkg.mod:Name` (or one given by `provide`) names."""
    if spec in _PROVIDED:
        return _PROVIDED[spec]
    if spec.startswith("python:"):
        raise CustomWorldError(f"{key}: {spec!r} was given from Python in another process")
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise CustomWorldError(f"{key}: expected FILE.py:Name or package.module:Name, got {spec!r}")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise CustomWorldError(f"{key}: file not found: {path}")
        module_name = "fastrl_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[module_name]
                raise CustomWorldError(f"{key}: importing {path}: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise CustomWorldError(f"{key}: cannot import {where!r}: {e}") from e
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise CustomWorldError(f"{key}: {where} has no {name!r}")
        obj = getattr(obj, part)
    return obj


def public_methods(cls: type) -> list[str]:
    """Names of the public methods `cls` or its bases other than `object` define, sorted."""
    names = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and inspect.isfunction(value):
                names.add(name)
    return sorted(names)


def tool_schemas(cls: type) -> dict[str, dict]:
    """{name: {"name", "description", "parameters"}} of the public methods of `cls`, from their
    type hints and docstrings; CustomWorldError names every method that cannot be described."""
    from transformers.utils import get_json_schema

    schemas, problems = {}, []
    for name in public_methods(cls):
        try:
            schema = get_json_schema(getattr(cls, name))["function"]
        except Exception as e:  # transformers' own errors: no docstring, a missing hint, ...
            problems.append(f"{cls.__name__}.{name}: {e}")
            continue
        params = schema.get("parameters", {"type": "object", "properties": {}})
        params["properties"].pop("self", None)
        if "required" in params:
            params["required"] = [p for p in params["required"] if p != "self"]
        schemas[name] = {
            "name": name,
            "description": schema.get("description", ""),
            "parameters": params,
        }
    if problems:
        raise CustomWorldError(
            "env.tools: these methods cannot be described as tools (give each type hints and a "
            "docstring with an Args section, or start its name with _): " + "; ".join(problems)
        )
    if not schemas:
        raise CustomWorldError(f"env.tools: {cls.__name__} has no public methods")
    return schemas


def _task_problems(row: Any, cls: type, tools: Mapping[str, dict]) -> list[str]:
    """Everything wrong with one task row (empty when it is usable)."""
    if not isinstance(row, dict):
        return ["expected a JSON object"]
    problems = [f"unknown field {k!r}" for k in row if k not in TASK_FIELDS]
    for key in ("id", "split"):
        if not isinstance(row.get(key), str) or not row.get(key):
            problems.append(f"{key!r} must be a non-empty string")
    if ("question" in row) == ("turns" in row):
        problems.append("give exactly one of 'question' (a string) or 'turns' (strings)")
        return problems
    turns = [row["question"]] if "question" in row else row["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        problems.append("'question' must be a string and 'turns' a non-empty list of strings")
        return problems
    n = len(turns)

    def per_turn(key: str, ok: Callable[[Any], bool], what: str) -> None:
        if key in row and (
            not isinstance(row[key], list) or len(row[key]) != n or not all(map(ok, row[key]))
        ):
            problems.append(f"{key!r} must be a list of {n} (one per turn) {what}")

    per_turn("expected", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
             "lists of strings")  # fmt: skip
    per_turn("answers", lambda v: isinstance(v, str), "strings")
    per_turn("solution", lambda v: isinstance(v, list), "lists of calls")
    offered = row.get("tools", list(tools))
    if not isinstance(offered, list) or not all(isinstance(t, str) for t in offered):
        problems.append("'tools' must be a list of tool names")
        offered = list(tools)
    unknown = [t for t in offered if t not in tools]
    if unknown:
        problems.append(f"'tools' names unknown tools {unknown} (known: {sorted(tools)})")
    state = row.get("initial_state", {})
    if not isinstance(state, dict):
        problems.append("'initial_state' must be an object")
    else:
        try:
            inspect.signature(cls).bind(**state)
        except TypeError as e:
            problems.append(f"'initial_state' does not fit {cls.__name__}(...): {e}")
    expected_state = row.get("expected_state", {})
    if not isinstance(expected_state, dict) or any(k.startswith("_") for k in expected_state):
        problems.append("'expected_state' must be an object of public attribute names")
    if "hint" in row and not isinstance(row["hint"], str):
        problems.append("'hint' must be a string")
    if isinstance(row.get("solution"), list):
        for t, calls in enumerate(row["solution"]):
            for call in calls if isinstance(calls, list) else []:
                if (
                    not isinstance(call, dict)
                    or set(call) != {"name", "arguments"}
                    or not isinstance(call["arguments"], dict)
                ):
                    problems.append(
                        f'solution turn {t + 1}: a call is {{"name": str, "arguments": {{}}}}'
                    )
                elif call["name"] not in offered or call["name"] not in tools:
                    problems.append(f"solution turn {t + 1}: {call['name']!r} is not offered")
    return problems


def read_tasks(
    lines: Iterable[tuple[int, Any]], cls: type, tools: Mapping[str, dict], source: str
) -> list[dict]:
    """Checked task rows from (line number, parsed object or JSONDecodeError) pairs;
    CustomWorldError lists every problem as `source:LINE: ...`."""
    rows, problems, seen = [], [], {}
    for lineno, row in lines:
        if isinstance(row, json.JSONDecodeError):
            problems.append(f"{source}:{lineno}: not JSON ({row.msg})")
            continue
        found = _task_problems(row, cls, tools)
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            if row["id"] in seen:
                found.append(f"id {row['id']!r} repeats line {seen[row['id']]}")
            seen.setdefault(row["id"], lineno)
        problems += [f"{source}:{lineno}: {p}" for p in found]
        if not found:
            rows.append(row)
    splits = {r["split"] for r in rows}
    if not problems:
        for needed in ("train", "test"):
            if needed not in splits:
                problems.append(f"{source}: no task in the {needed!r} split")
    if problems:
        raise CustomWorldError(f"env.tasks: {len(problems)} problem(s):\n" + "\n".join(problems))
    return rows


def _task_lines(spec: Any) -> tuple[list[tuple[int, Any]], str]:
    """(line number, parsed row) pairs of a JSONL file path or a list of dicts, and its name."""
    if isinstance(spec, list):
        return list(enumerate(spec, 1)), "tasks"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CustomWorldError(f"env.tasks: file not found: {path}")
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((lineno, e))
    return out, str(path)


# ---------------------------------------------------------------------------------------------
# Scoring.


def contains_word(text: str, word: str) -> bool:
    """`word` in `text` as a whole word (no letter, digit or _ on either side), any case."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def _plain(value: Any) -> Any:
    """A value as JSON would carry it (tuples as lists, unknown objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def default_reward(task: dict, tools: object, answers: list[str]) -> tuple[float, dict]:
    """1.0 iff every turn is answered with its expected strings and `expected_state` holds."""
    turns = task.get("turns") or [task["question"]]
    expected = task.get("expected") or [[] for _ in turns]
    for t in range(len(turns)):
        if t >= len(answers):
            return 0.0, {"first_failing_turn": t, "error": "the episode ended before this turn"}
        missing = [w for w in expected[t] if not contains_word(answers[t], w)]
        if missing:
            return 0.0, {"first_failing_turn": t, "error": f"the answer lacks {missing}"}
    for name, want in task.get("expected_state", {}).items():
        have = _plain(getattr(tools, name, None))
        if have != want:
            return 0.0, {
                "first_failing_turn": len(turns) - 1,
                "error": f"state {name} is {str(have)[:200]}, expected {str(want)[:200]}",
            }
    return 1.0, {"first_failing_turn": None}


# ---------------------------------------------------------------------------------------------
# The world and its environment.


class CustomEnv(QuestionTurnsEnv):
    """Runs one task of a custom world (implements the Env protocol)."""

    def __init__(self, world: CustomWorld) -> None:
        self.world = world
        self._task: Task | None = None

    def reset(self, task: Task) -> list[dict]:
        self._row = task.meta["row"]
        self._turns = self._row.get("turns") or [self._row["question"]]
        self._start(task, len(self._turns))
        self.instance = self.world.tools_class(**copy.deepcopy(self._row.get("initial_state", {})))
        self._allowed = {t["name"] for t in task.tools}
        methods = {name: getattr(self.instance, name) for name in self._allowed}
        self._executor = MethodExecutor(methods, schemas=self.world.parameters, json_errors=True)
        return [dict(m) for m in task.messages]

    def _call(self, call: ToolCall) -> tuple[str, bool]:
        shown, result = self._executor.call(call.name, call.arguments, self._allowed)
        return shown, result is None or shown != result

    def _question(self, index: int) -> str:
        return self._turns[index]

    def score(self) -> tuple[float, dict]:
        if self._task is None:
            raise RuntimeError("call reset(task) before score()")
        out = (self.world.reward or default_reward)(self._row, self.instance, list(self._answers))
        reward, extra = out if isinstance(out, tuple) else (out, {})
        reward = float(reward)
        info = {
            "first_failing_turn": None,
            "n_calls": self._n_calls,
            "n_errors": self._n_errors,
            "n_turns": len(self._turns),
            "turns_answered": len(self._answers),
            **dict(extra),
        }
        info["success"] = bool(info.get("success", reward >= 1.0))
        return reward, info


class CustomWorld:
    """Tasks of a JSONL file on the tools of a Python class (implements the World protocol)."""

    name = "custom"
    # The splits every task file holds; an instance's `splits` are its file's.
    splits: tuple[str, ...] = ("train", "test")
    # The teacher's habits are the synthetic world's; here SFT imitates the tasks' solutions.
    config_defaults: Mapping[str, Any] = {
        "env.teacher.stop_early_rate": 0.0,
        "env.teacher.skip_lookup_rate": 0.0,
        "env.teacher.guess_rate": 0.0,
    }

    def __init__(
        self,
        tools_class: type,
        tasks: list[dict] | str | Path,
        reward: Callable[..., Any] | None = None,
    ) -> None:
        if not inspect.isclass(tools_class):
            raise CustomWorldError(f"env.tools: {tools_class!r} is not a class")
        if reward is not None and not callable(reward):
            raise CustomWorldError(f"env.reward: {reward!r} is not callable")
        self.tools_class = tools_class
        self.reward = reward
        self.schemas = tool_schemas(tools_class)
        self.parameters = {n: s["parameters"] for n, s in self.schemas.items()}
        lines, source = _task_lines(tasks)
        self.rows = read_tasks(lines, tools_class, self.schemas, source)
        self.splits = tuple(dict.fromkeys(r["split"] for r in self.rows))

    @classmethod
    def from_config(cls, env: Any) -> CustomWorld:
        """The world `env.tools`, `env.tasks` and `env.reward` name (an EnvConfig)."""
        for key in ("tools", "tasks"):
            if not getattr(env, key):
                raise CustomWorldError(f"env.{key}: required by env.name=custom")
        tools = load_object(env.tools, "env.tools")
        tasks = _PROVIDED.get(env.tasks, env.tasks)
        reward = load_object(env.reward, "env.reward") if env.reward else None
        return cls(tools, tasks, reward)

    def _task(self, row: dict) -> Task:
        fmt = get_format("hermes")
        turns = row.get("turns") or [row["question"]]
        offered = row.get("tools", list(self.schemas))
        tools = [self.schemas[n] for n in offered]
        expected = row.get("expected") or [[] for _ in turns]
        answers = row.get("answers") or [(", ".join(e) + ".") if e else DONE for e in expected]
        solution = row.get("solution") or [[] for _ in turns]
        expert = [
            [fmt.render_calls([ToolCall(c["name"], c["arguments"])]) for c in calls] + [answer]
            for calls, answer in zip(solution, answers, strict=True)
        ]
        steps = [
            f"turn {t}: call {', '.join(c['name'] for c in calls)}" if calls else f"turn {t}: reply"
            for t, calls in enumerate(solution, 1)
        ]
        hint = row.get("hint") or "Hint: " + "; ".join(steps) + "."
        return Task(
            id=row["id"],
            split=row["split"],
            messages=[
                {"role": "system", "content": f"{INSTRUCTION}\n{fmt.render_tools(tools)}"},
                {"role": "user", "content": turns[0]},
            ],
            tools=tools,
            fmt="hermes",
            expert=expert,
            hint=hint,
            meta={"row": row},
        )

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """The first `n` tasks of `split` in file order (`seed` is not used)."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; the task file has {', '.join(self.splits)}")
        return [self._task(r) for r in self.rows if r["split"] == split][:n]

    def make_env(self) -> CustomEnv:
        return CustomEnv(self)

    def tokenizer_corpus(self, n_tasks: int = 2000, seed: int = 0) -> list[str]:
        """Prompts, expert messages and the solutions' tool results of the train tasks, then the
        questions of the other splits (the words a policy must read there)."""
        texts = []
        for task in self.tasks("train", n_tasks, seed):
            texts += [m["content"] for m in task.messages]
            texts += [m for turn in task.expert for m in turn]
            texts += self.solution_results(task)
        for row in self.rows:
            if row["split"] != "train":
                texts += row.get("turns") or [row["question"]]
        return texts

    def solution_results(self, task: Task) -> list[str]:
        """The observation texts the solution's calls produce (the tools run on a fresh
        instance; a failing call gives its error)."""
        env = self.make_env()
        env.reset(task)
        out = []
        for calls in task.meta["row"].get("solution") or []:
            for c in calls:
                out.append(env._executor.call(c["name"], c["arguments"], env._allowed)[0])
        return out


def world_of(env: Any) -> CustomWorld:
    """The custom world of EnvConfig `env`, loaded once per (tools, tasks, reward) and task-file
    modification time."""
    path = Path(env.tasks).expanduser()
    stamp = path.stat().st_mtime_ns if env.tasks and path.is_file() else None
    key = (env.tools, env.tasks, env.reward, stamp)
    if key not in _WORLDS:
        _WORLDS[key] = CustomWorld.from_config(env)
    return _WORLDS[key]


_WORLDS: dict[tuple, CustomWorld] = {}

__all__ = [
    "TASK_FIELDS",
    "CustomEnv",
    "CustomWorld",
    "CustomWorldError",
    "contains_word",
    "default_reward",
    "dumps_result",
    "load_object",
    "provide",
    "public_methods",
    "read_tasks",
    "tool_schemas",
    "world_of",
]
