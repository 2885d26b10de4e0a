"""BFCL v4 multi-turn: the `bfcl-eval` package's tasks and API classes, executed safely.

Data: categories `base`, `miss_param`, `miss_func` and `long_context` of the installed
`bfcl-eval` package (questions, initial state of the involved API classes, ground truth per turn,
function docs). Nothing is downloaded.

Prompt (PAPER.md §3): the tool schemas of the involved classes in the system prompt (Hermes style,
or the Python-list syntax for `format_ood`), one user question per turn; an assistant message
without a call ends the turn and brings the next question; functions held out in `miss_func`
are revealed (as a user message listing their schemas) at the turn where they come back.

Safe execution: BFCL's own executor builds call strings and runs them through `eval`. Here no
text reaches `eval`. A parsed call runs through `fastrl.envs.executor.MethodExecutor` (shared
with the custom world): only if its name is a public method of an involved class that the task
offers at this point, with JSON-literal arguments bound as keyword arguments
(`inspect.signature(...).bind`); anything else, and any exception inside the API class, and any
output longer than `max_output_chars`, becomes an error observation. Ground-truth call strings
(trusted package data) are parsed with `ast` into the same form and run through the same
executor; positional ground-truth arguments are bound by the method's signature.

Reward: BFCL's multi-turn checks on the model's and the ground truth's API instances, turn by
turn: the state of every instance (`state_checker`) and the ground truth's execution results
contained in the model's (`response_checker`); a turn whose ground truth is empty must contain no
executed call. Binary, with the first failing turn and the checker's message in info.

Splits: `train`/`test` are the paper's 300/300 split of base+miss_param+miss_func: one permutation
(seed 0) of the 200 task indices, so the variants of one task stay on the same side;
`long_context` holds its 200 tasks out; `format_ood` is `test` in the Python-list syntax;
`content_ood` is the test tasks whose API classes are all in `CONTENT_OOD_CLASSES` (a model meant
for that split trains on `train_in_domain`, the train tasks that touch none of them).
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fastrl.envs.base import Parsed, Task, ToolCall
from fastrl.envs.executor import MethodExecutor
from fastrl.envs.formats import get_format

CATEGORIES = ("base", "miss_param", "miss_func", "long_context")
SPLITS = ("train", "test", "long_context", "format_ood", "content_ood", "train_in_domain")
# API classes held out for the content-OOD split: test tasks using only these, never trained on.
CONTENT_OOD_CLASSES = frozenset({"TravelAPI", "VehicleControlAPI"})
SPLIT_SEED = 0
CLARIFY = (
    "I cannot do that with the tools and information I have. Could you provide what is missing?"
)
DONE = "Done."


def _package() -> Any:
    try:
        import bfcl_eval  # noqa: F401
        from bfcl_eval.constants import executable_backend_config as backend
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the BFCL environment needs the bfcl-eval package: `pip install -e .[bfcl]` "
            "(installed without its declared dependencies: `make test` does it)"
        ) from e
    return backend


@cache
def _root() -> Path:
    import bfcl_eval

    return Path(bfcl_eval.__file__).parent / "data"


@cache
def load_category(category: str) -> list[dict]:
    """The category's entries, each with its `ground_truth` (list of call strings per turn)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; known: {', '.join(CATEGORIES)}")
    name = f"BFCL_v4_multi_turn_{category}.json"
    answers = {}
    for line in (_root() / "possible_answer" / name).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            answers[row["id"]] = row["ground_truth"]
    entries = []
    for line in (_root() / name).read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            entry["ground_truth"] = answers[entry["id"]]
            entry["category"] = category
            entries.append(entry)
    return entries


@cache
def _class_docs(class_name: str) -> tuple[dict, ...]:
    backend = _package()
    path = _root() / "multi_turn_func_doc" / backend.MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]
    return tuple(json.loads(line) for line in path.read_text().splitlines() if line.strip())


def _schema(doc: dict) -> dict:
    """A BFCL function doc as a JSON-schema tool (`dict` -> `object`, `float` -> `number`)."""

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: fix(v) for k, v in node.items()}
            if out.get("type") == "dict":
                out["type"] = "object"
            elif out.get("type") in ("float", "tuple"):
                out["type"] = "number" if out["type"] == "float" else "array"
            return out
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    return {
        "name": doc["name"],
        "description": doc["description"],
        "parameters": fix(doc["parameters"]),
    }


# ------------------------------------------------------------------------------------------------
# Safe execution
# ------------------------------------------------------------------------------------------------


class Executor:
    """The involved API class instances of one task and a guarded way to call their methods
    (`fastrl.envs.executor.MethodExecutor`)."""

    def __init__(self, entry: dict, *, max_output_chars: int = 4000):
        backend = _package()
        long_context = entry["category"] == "long_context"
        self.instances: dict[str, Any] = {}
        self.methods: dict[str, Any] = {}
        for class_name in entry["involved_classes"]:
            module = importlib.import_module(backend.CLASS_FILE_PATH_MAPPING[class_name])
            instance = getattr(module, class_name)()
            if class_name not in backend.STATELESS_CLASSES:
                scenario = copy.deepcopy(entry["initial_config"].get(class_name, {}))
                instance._load_scenario(scenario, long_context=long_context)
            self.instances[class_name] = instance
            for name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
                if not name.startswith("_"):
                    self.methods[name] = method
        self._executor = MethodExecutor(self.methods, max_output_chars=max_output_chars)
        self.results: list[str] = []  # every executed call's result, in order

    def call(
        self, name: Any, arguments: Any, allowed: set[str], positional: tuple = ()
    ) -> tuple[str, str | None]:
        """Run one call; returns (observation for the model, result text or None if it did not
        run). An output over `max_output_chars` ran (the state may have changed, and the
        checker sees the result) but the model is shown an error instead."""
        shown, result = self._executor.call(name, arguments, allowed, positional)
        if result is not None:
            self.results.append(result)
        return shown, result


def parse_ground_truth(call: str) -> tuple[str, tuple, dict]:
    """A ground-truth call string `f(a, b=1)` as (name, positional literals, keyword literals)."""
    node = ast.parse(call.strip(), mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a plain call: {call!r}")
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    return node.func.id, args, kwargs


@cache
def _signatures(classes: tuple[str, ...]) -> dict[str, inspect.Signature]:
    """Public method name -> signature (without `self`) for the API classes, from the classes
    themselves: naming ground-truth arguments needs no instance and no scenario."""
    backend = _package()
    out = {}
    for class_name in classes:
        cls = getattr(
            importlib.import_module(backend.CLASS_FILE_PATH_MAPPING[class_name]), class_name
        )
        for name, fn in inspect.getmembers(cls, predicate=inspect.isfunction):
            if not name.startswith("_"):
                params = list(inspect.signature(fn).parameters.values())[1:]  # drop self
                out[name] = inspect.Signature(params)
    return out


def _as_keywords(classes: tuple[str, ...], name: str, args: tuple, kwargs: dict) -> dict:
    """Ground-truth arguments as keyword arguments (positional ones named by the signature)."""
    if not args:
        return dict(kwargs)
    return dict(_signatures(classes)[name].bind_partial(*args, **kwargs).arguments)


# ------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------


def _offered(entry: dict) -> tuple[list[str], dict[int, list[str]]]:
    """(functions offered from the start, {turn: functions revealed at that turn})."""
    excluded = set(entry.get("excluded_function", []))
    missed = {int(k): list(v) for k, v in entry.get("missed_function", {}).items()}
    held = {f for fs in missed.values() for f in fs}
    names = []
    for class_name in entry["involved_classes"]:
        for doc in _class_docs(class_name):
            if doc["name"] not in excluded and doc["name"] not in held:
                names.append(doc["name"])
    return names, missed


def _docs_by_name(entry: dict) -> dict[str, dict]:
    return {d["name"]: d for c in entry["involved_classes"] for d in _class_docs(c)}


def _turn_text(turn: list[dict]) -> str:
    return "\n".join(m["content"] for m in turn if m.get("role") == "user")


def make_task(entry: dict, split: str, fmt: str) -> Task:
    f = get_format(fmt)
    docs = _docs_by_name(entry)
    offered, missed = _offered(entry)
    tools = [_schema(docs[n]) for n in offered]
    system = (
        "You are an assistant that completes the user's requests by calling tools. Call tools "
        "when needed; when the request is done, or cannot be done with the tools or the "
        "information given, reply in plain text.\n" + f.render_tools(tools)
    )
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": _turn_text(entry["question"][0])},
    ]
    # Expert: each turn's ground-truth calls in one message, then a short reply.
    classes = tuple(entry["involved_classes"])
    expert: list[list[str]] = []
    for calls in entry["ground_truth"]:
        if not calls:
            expert.append([CLARIFY])
            continue
        parsed = []
        for call in calls:
            name, args, kwargs = parse_ground_truth(call)
            parsed.append(ToolCall(name, _as_keywords(classes, name, args, kwargs)))
        expert.append([f.render_calls(parsed), DONE])
    return Task(
        id=f"bfcl/{split}/{entry['id']}",
        split=split,
        messages=messages,
        tools=tools,
        fmt=fmt,
        expert=expert,
        hint=hint_from_ground_truth(entry["ground_truth"]),
        meta={"entry_id": entry["id"], "category": entry["category"], "missed": missed},
    )


def hint_from_ground_truth(ground_truth: list[list[str]]) -> str:
    """A short solution summary written by a template from the ground truth (for HBG): the tools
    each turn needs, in order, or that the turn cannot be done as asked."""
    parts = []
    for t, calls in enumerate(ground_truth, 1):
        if calls:
            names = [parse_ground_truth(c)[0] for c in calls]
            parts.append(f"turn {t}: call {', '.join(names)}")
        else:
            parts.append(f"turn {t}: no tool fits or information is missing; ask the user")
    return "Hint: " + "; ".join(parts) + "."


@cache
def _entry(entry_id: str) -> dict:
    category = entry_id.removeprefix("multi_turn_").rsplit("_", 1)[0]
    for entry in load_category(category):
        if entry["id"] == entry_id:
            return entry
    raise KeyError(entry_id)


@cache
def split_ids(split: str) -> tuple[str, ...]:
    """Entry ids of a split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown BFCL split {split!r}; known: {', '.join(SPLITS)}")
    if split == "long_context":
        return tuple(e["id"] for e in load_category("long_context"))
    indices = list(range(len(load_category("base"))))
    random.Random(SPLIT_SEED).shuffle(indices)
    half = len(indices) // 2
    side = set(indices[:half] if split in ("train", "train_in_domain") else indices[half:])
    ids = []
    for category in ("base", "miss_param", "miss_func"):
        for i, entry in enumerate(load_category(category)):
            if i not in side:
                continue
            classes = set(entry["involved_classes"])
            if split == "content_ood" and not classes <= CONTENT_OOD_CLASSES:
                continue
            if split == "train_in_domain" and classes & CONTENT_OOD_CLASSES:
                continue
            ids.append(entry["id"])
    return tuple(ids)


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------


@dataclass
class _Turn:
    calls: list[str]  # results of the calls executed without error in this turn
    state: dict[str, Any]  # deep copies of the instances at the end of the turn
    attempted: int  # calls the model made in this turn, executed or not (BFCL's decoded calls)


class BFCLEnv:
    """Runs one BFCL multi-turn task (implements the Env protocol)."""

    def __init__(self, max_output_chars: int = 4000, max_steps_per_turn: int = 20):
        self.max_output_chars = max_output_chars
        self.max_steps_per_turn = max_steps_per_turn
        self._task: Task | None = None

    def reset(self, task: Task) -> list[dict]:
        self._task = task
        self._entry = _entry(task.meta["entry_id"])
        self._exec = Executor(self._entry, max_output_chars=self.max_output_chars)
        offered, self._missed = _offered(self._entry)
        self._allowed = set(offered)
        self._docs = _docs_by_name(self._entry)
        self._turn = 0
        self._turn_results: list[str] = []
        self._turn_attempts = 0
        self._turns: list[_Turn] = []
        self._steps = 0
        self._n_calls = self._n_errors = 0
        self._done = False
        return [dict(m) for m in task.messages]

    def _end_turn(self) -> list[dict]:
        state = copy.deepcopy(self._exec.instances)
        self._turns.append(_Turn(self._turn_results, state, self._turn_attempts))
        self._turn_results, self._turn_attempts, self._steps = [], 0, 0
        self._turn += 1
        questions = self._entry["question"]
        if self._turn >= len(questions):
            self._done = True
            return []
        text = _turn_text(questions[self._turn])
        revealed = self._missed.get(self._turn, [])
        if revealed:
            self._allowed |= set(revealed)
            fmt = get_format(self._task.fmt)
            schemas = [_schema(self._docs[n]) for n in revealed if n in self._docs]
            text = (f"{text}\n" if text else "") + "More tools are available now.\n"
            text += fmt.render_tools(schemas)
        return [{"role": "user", "content": text or "Please continue."}]

    def step(self, assistant_text: str, parsed: Parsed) -> tuple[list[dict], bool]:
        if self._task is None:
            raise RuntimeError("call reset(task) before step()")
        if self._done:
            return [], True
        self._steps += 1
        if parsed.error is not None:
            self._n_errors += 1
            observations = [{"role": "tool", "content": f"Error: {parsed.error}"}]
        elif parsed.calls:
            observations = []
            for call in parsed.calls:
                shown, result = self._exec.call(call.name, call.arguments, self._allowed)
                self._n_calls += 1
                self._turn_attempts += 1
                self._n_errors += result is None or shown != result
                if result is not None:
                    self._turn_results.append(result)
                observations.append({"role": "tool", "content": shown})
        else:
            return self._end_turn(), self._done
        if self._steps >= self.max_steps_per_turn:  # BFCL's MAXIMUM_STEP_LIMIT per turn (20)
            observations += self._end_turn()
        return observations, self._done

    def score(self) -> tuple[float, dict]:
        from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import (
            response_checker,
            state_checker,
        )

        info: dict[str, Any] = {
            "success": False,
            "first_failing_turn": None,
            "n_calls": self._n_calls,
            "n_errors": self._n_errors,
            "category": self._entry["category"],
        }
        truth = Executor(self._entry, max_output_chars=10**9)
        everything: list[str] = []
        for t, calls in enumerate(self._entry["ground_truth"]):
            results = []
            for call in calls:
                name, args, kwargs = parse_ground_truth(call)
                shown, result = truth.call(name, kwargs, set(truth.methods), positional=args)
                results.append(result if result is not None else shown)
            if t >= len(self._turns):
                info.update(first_failing_turn=t, error="the episode ended before this turn")
                return 0.0, info
            turn = self._turns[t]
            everything += turn.calls
            if not calls:
                if turn.attempted:
                    info.update(first_failing_turn=t, error="calls in a turn that needs none")
                    return 0.0, info
                continue
            if not turn.attempted:
                info.update(first_failing_turn=t, error="no call in this turn")
                return 0.0, info
            for check in (
                state_checker(turn.state, truth.instances),
                response_checker(everything, results, t),
            ):
                if not check["valid"]:
                    info.update(first_failing_turn=t, error=check["error_message"][:300])
                    return 0.0, info
        info["success"] = True
        return 1.0, info


class BFCLWorld:
    """BFCL v4 multi-turn tasks (implements the World protocol)."""

    name = "bfcl"
    splits = SPLITS
    # The paper's limits (30 turns, 2048 tokens per assistant turn, 1024 per observation, 8192
    # prompt + 8192 response) and its 300-task splits, unless a config sets them.
    config_defaults = {
        # The teacher's habits are the synthetic world's; BFCL's SFT data is its ground truth.
        "env.teacher.stop_early_rate": 0.0,
        "env.teacher.skip_lookup_rate": 0.0,
        "env.teacher.guess_rate": 0.0,
        # The decision probe's forward runs every RL step; BFCL episodes are long.
        "monitor.decision_probe_tasks": 8,
        "rollout.max_turns": 30,
        "rollout.max_turn_tokens": 2048,
        "rollout.max_obs_tokens": 1024,
        "rollout.max_total_tokens": 16384,
        "env.train_tasks": 300,
        "env.eval_tasks": 300,
    }

    def __init__(self) -> None:
        _package()

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """The first `n` tasks of `split` in the split's fixed order (`seed` is not used)."""
        fmt = "pythonic" if split == "format_ood" else "hermes"
        source = "test" if split == "format_ood" else split
        return [make_task(_entry(i), split, fmt) for i in split_ids(source)[:n]]

    def make_env(self) -> BFCLEnv:
        return BFCLEnv()

    def tokenizer_corpus(self, n_tasks: int = 200, seed: int = 0) -> list[str]:
        """Texts to build a preset tokenizer from: prompts and expert messages."""
        texts = []
        for task in self.tasks("train", n_tasks):
            texts += [m["content"] for m in task.messages]
            texts += [m for turn in task.expert for m in turn]
        return texts
