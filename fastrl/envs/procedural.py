"""Procedural tool worlds: random tools and tasks over them, the data of the tool-use pretraining.

Every task invents its own small tool set: tool names (`scan_orchard`), argument and result field
names, types and one-line descriptions are drawn from word lists, entity names are pronounceable
pseudo-words (`Kavori`) and codes (`Q47`), and every result value is random. A task has 1-3
user turns, each a question whose answer needs 1-3 calls on tools of its own, either a chain (each
call takes a value the previous call returned, sometimes under another argument name, so the
schema must be read) or one tool for two entities, and each answer repeats values taken from the
results (at most 7 assistant messages in all, within the default `rollout.max_turns`). The
system prompt lists the offered tools (the needed ones plus up to two distractors) and names the
call syntax, hermes JSON or the pythonic list, and a task is rendered in either: what generalises
is "read the schema, call in the asked syntax, use the result", not any tool.

Nothing here is drawn from the synthetic tool world: its tool and argument names, entity pools
and question templates are excluded from every word list at import, and
`tests/test_procedural.py` checks the generated text against that world programmatically.

Splits: `train` and `test` (the held-out tasks, one content hash bucket in five), a syntax drawn
per task, and the held-out tasks in each syntax, `test_hermes` and `test_pythonic`, task for task
the same.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
from collections.abc import Mapping
from typing import Any

from fastrl.envs.base import QuestionTurnsEnv, Task, ToolCall
from fastrl.envs.formats import FORMATS, get_format
from fastrl.envs.synthetic import tools as world_tools
from fastrl.envs.synthetic.tools import answer_ok, dumps

SPLITS = ("train", "test", "test_hermes", "test_pythonic")
_HELD_OUT_EVERY = 5
_CALL_COUNT_WEIGHTS = {1: 35, 2: 40, 3: 25}  # per user turn
_TURN_COUNT_WEIGHTS = {1: 6, 2: 3, 3: 1}
# Assistant messages (calls and answers) of a task at most: within rollout.max_turns (8).
_MAX_MESSAGES = 7
_PAIR_PROB = 0.25  # of the 2-call tasks, the share of two independent lookups
_RENAME_PROB = 0.3  # a chained argument named differently from the result field that feeds it
_SYNTAX_NAMES = {"hermes": "hermes JSON", "pythonic": "pythonic list"}


# ---------------------------------------------------------------------------------------------
# Word lists, minus every word of the synthetic tool world.


def _world_words() -> set[str]:
    """Lower-cased words of the synthetic world's tools (names, arguments, descriptions, result
    fields) and entity pools: the pretraining vocabulary must not contain any of them."""
    words: set[str] = set()
    for schema in world_tools.TOOLS.values():
        words |= set(re.findall(r"[a-z]+", schema["name"].lower()))
        words.add(schema["name"].lower())
        words |= {p.lower() for p in schema["parameters"]}
    pools = (
        world_tools.PEOPLE,
        world_tools.CITIES,
        world_tools.SKIES,
        world_tools.CURRENCIES,
        world_tools.TODO_ITEMS,
        world_tools.OOD_PEOPLE,
        world_tools.OOD_CITIES,
        world_tools.OOD_ITEMS,
    )
    for pool in pools:
        for entry in pool:
            words |= set(re.findall(r"[a-z]+", entry.lower()))
    # Result fields and table names the tools return or read.
    words |= {"temp", "sky", "home", "stock", "price", "total", "seats", "booked", "count"}
    words |= {"balance", "account", "user", "users", "city", "member", "flight", "item"}
    return words


_WORLD_WORDS = _world_words()


def _keep(words: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(w for w in words if w.lower() not in _WORLD_WORDS)


VERBS = _keep(
    ("fetch", "scan", "query", "probe", "inspect", "locate", "measure", "resolve", "trace",
     "survey", "read", "check", "list", "show", "report", "pull")
)  # fmt: skip
NOUNS = _keep(
    ("orchard", "beacon", "glacier", "harbor", "quarry", "lantern", "meadow", "vessel", "canyon",
     "archive", "turbine", "reactor", "garden", "tower", "engine", "parcel", "crate", "island",
     "planet", "robot", "sensor", "library", "castle", "river", "valley", "studio", "market",
     "pipeline", "satellite", "warehouse", "station", "mine", "forest", "bridge", "tunnel")
)  # fmt: skip
FIELDS = _keep(
    ("depth", "color", "code", "owner", "level", "region", "grade", "speed", "weight", "score",
     "label", "size", "shelf", "zone", "port", "sector", "tier", "mass", "width", "rank", "batch",
     "node", "slot", "band", "lane", "gate", "dock", "serial", "keeper", "pilot", "voltage",
     "height", "volume", "age", "capacity", "channel", "district", "signal", "ward", "badge")
)  # fmt: skip
DESCRIPTIONS = (
    "The {fields} of a {noun}.",
    "Returns the {fields} for one {noun}.",
    "Looks up a {noun} and gives its {fields}.",
    "{Fields} of the given {noun}.",
)
QUESTIONS = (
    "Tell me the {field} linked to {noun} {entity}.",
    "I need the {field} for {noun} {entity}.",
    "Which {field} belongs to {noun} {entity}?",
    "Report the {field} of {noun} {entity}.",
    "Can you find the {field} that goes with {noun} {entity}?",
)
PAIR_QUESTIONS = (
    "Report the {field} of {noun} {first} and of {noun} {second}.",
    "Compare the {field} of {noun} {first} with {noun} {second}.",
)
ANSWERS = ("The {field} is {value}.", "It is {value}.", "Found it: {field} {value}.")
PAIR_ANSWERS = ("{first} has {field} {v1} and {second} has {field} {v2}.",)
INSTRUCTIONS = (
    "Answer the user with the tools below. Call them in the {syntax} syntax.",
    "You can use these tools. Write every call in the {syntax} syntax, then answer briefly.",
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh")
_VOWELS = ("a", "e", "i", "o", "u")


def _pseudo_words(n: int, seed: str) -> tuple[str, ...]:
    """`n` distinct capitalised consonant-vowel words of 2-3 syllables, none a world word."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3))
        ).capitalize()
        if word.lower() not in _WORLD_WORDS:
            out[word] = None
    return tuple(out)


ENTITIES = _pseudo_words(300, "procedural/entities")
_CODE_LETTERS = "BCDGHJKMNPQRSVWXZ"


# ---------------------------------------------------------------------------------------------
# Task generation.


class _Maker:
    """Draws one task's tools, values and lookup tables from a seeded `rng`."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.tools: list[dict] = []
        self.table: dict[str, dict[str, dict]] = {}  # tool -> canonical arguments -> result
        self._names: set[str] = set()
        self.fields: set[str] = set()  # result fields of the task's tools, each named once
        self._values: set[Any] = set()

    def value(self, kind: str) -> Any:
        """A fresh value of `kind` (name | code | integer), unique within the task."""
        while True:
            if kind == "name":
                v: Any = self.rng.choice(ENTITIES)
            elif kind == "code":
                v = f"{self.rng.choice(_CODE_LETTERS)}{self.rng.randint(10, 99)}"
            else:
                v = self.rng.randint(10, 99)
            if v not in self._values:
                self._values.add(v)
                return v

    def tool(self, arg: str | None, arg_kind: str, n_fields: int) -> dict:
        """A new tool taking `arg` (None: the tool's own noun) and returning `n_fields` fields
        no other tool of the task returns."""
        rng = self.rng
        while True:
            noun = rng.choice(NOUNS)
            name = f"{rng.choice(VERBS)}_{noun}"
            if name not in self._names:
                break
        self._names.add(name)
        arg = arg or noun
        fields = rng.sample([f for f in FIELDS if f not in self.fields and f != arg], n_fields)
        self.fields |= set(fields)
        kinds = {f: rng.choice(("name", "code", "integer")) for f in fields}
        text = " and ".join(fields)
        description = rng.choice(DESCRIPTIONS).format(
            fields=text, Fields=text.capitalize(), noun=noun
        )
        schema = {
            "name": name,
            "description": description,
            "parameters": {arg: "integer" if arg_kind == "integer" else "string"},
        }
        self.tools.append(schema)
        self.table[name] = {}
        return {"schema": schema, "noun": noun, "arg": arg, "fields": fields, "kinds": kinds}

    def run(self, tool: dict, arg_value: Any) -> dict:
        """Draw and record the tool's result for `arg_value`."""
        result = {f: self.value(tool["kinds"][f]) for f in tool["fields"]}
        self.table[tool["schema"]["name"]][_key(arg_value)] = result
        return result


def _key(value: Any) -> str:
    return json.dumps(value)


def _chain(m: _Maker, n_calls: int) -> dict:
    """n_calls tools where each takes a value the previous one returned; the last answers."""
    rng = m.rng
    entity_kind = rng.choice(("name", "name", "code"))
    entity = m.value(entity_kind)
    arg: str | None = None  # the first tool takes its own noun: "market Bofa"
    arg_kind = entity_kind
    calls, first = [], None
    value = entity
    for i in range(n_calls):
        last = i == n_calls - 1
        tool = m.tool(arg, arg_kind, rng.randint(1, 2))
        first = first or tool
        result = m.run(tool, value)
        arguments = {tool["arg"]: value}
        calls.append({"name": tool["schema"]["name"], "arguments": arguments, "result": result})
        link = rng.choice(tool["fields"])
        if last:
            break
        value, arg_kind = result[link], tool["kinds"][link]
        arg = link if rng.random() >= _RENAME_PROB else f"{link}_{rng.choice(('id', 'key'))}"
    field = link
    answer_value = calls[-1]["result"][field]
    question = rng.choice(QUESTIONS).format(field=field, noun=first["noun"], entity=entity)
    answer = rng.choice(ANSWERS).format(field=field, value=answer_value)
    return {"question": question, "calls": calls, "answer": answer, "expected": [str(answer_value)]}


def _pair(m: _Maker) -> dict:
    """One tool called for two entities; the answer names both results."""
    rng = m.rng
    kind = rng.choice(("name", "code"))
    first, second = m.value(kind), m.value(kind)
    tool = m.tool(None, kind, rng.randint(1, 2))
    arg = tool["arg"]
    field = rng.choice(tool["fields"])
    calls = []
    for entity in (first, second):
        result = m.run(tool, entity)
        calls.append({"name": tool["schema"]["name"], "arguments": {arg: entity}, "result": result})
    v1, v2 = (c["result"][field] for c in calls)
    question = rng.choice(PAIR_QUESTIONS).format(
        field=field, noun=tool["noun"], first=first, second=second
    )
    answer = rng.choice(PAIR_ANSWERS).format(field=field, first=first, second=second, v1=v1, v2=v2)
    return {"question": question, "calls": calls, "answer": answer, "expected": [str(v1), str(v2)]}


def _weighted(rng: random.Random, weights: dict[int, int]) -> int:
    return rng.choices(list(weights), list(weights.values()))[0]


def draw(stream: str, seed: int, index: int) -> dict:
    """Content of task `index` of `stream` (train | held_out) for `seed`: tools, lookup table, and
    1-3 user turns (question, expert calls with their results, answer, expected values), each on
    tools of its own; an instruction and a syntax.
    Deterministic in its arguments; a content hash decides train vs held out."""
    rng = random.Random(f"procedural/{stream}/{seed}/{index}")
    while True:
        m = _Maker(rng)
        turns = []
        for _ in range(_weighted(rng, _TURN_COUNT_WEIGHTS)):
            n_calls = _weighted(rng, _CALL_COUNT_WEIGHTS)
            pair = n_calls == 2 and rng.random() < _PAIR_PROB
            turns.append(_pair(m) if pair else _chain(m, n_calls))
        if sum(len(t["calls"]) + 1 for t in turns) > _MAX_MESSAGES:
            continue
        for _ in range(rng.randint(0, 2)):  # distractors: offered, never needed
            m.tool(None, rng.choice(("name", "code", "integer")), 1)
        rng.shuffle(m.tools)
        fmt = rng.choice(sorted(FORMATS))
        instruction = rng.choice(INSTRUCTIONS)
        content = {"turns": turns, "tools": m.tools, "table": m.table, "fmt": fmt}
        content["instruction"] = instruction
        digest = hashlib.sha256(json.dumps(turns, sort_keys=True).encode()).digest()
        held_out = int.from_bytes(digest[:8], "big") % _HELD_OUT_EVERY == 0
        if held_out == (stream == "held_out"):
            return content


def system_prompt(instruction: str, fmt: str, tools: list[dict]) -> str:
    """The instruction (naming the syntax) followed by the format's tool list and call example."""
    syntax = instruction.format(syntax=_SYNTAX_NAMES[fmt])
    return f"{syntax}\n{get_format(fmt).render_tools(tools)}"


# ---------------------------------------------------------------------------------------------
# The environment and the world.


class ProceduralEnv(QuestionTurnsEnv):
    """Runs one procedural task: calls are checked against the offered schemas and answered from
    the task's lookup table; a plain-text message answers the current user turn and brings the
    next question (implements Env)."""

    def __init__(self) -> None:
        self._task: Task | None = None

    def reset(self, task: Task) -> list[dict]:
        self._start(task, len(task.meta["turns"]))
        self._tools = {t["name"]: t for t in task.tools}
        self._table = task.meta["table"]
        self._turns = task.meta["turns"]
        return [dict(m) for m in task.messages]

    def _execute(self, call: ToolCall) -> dict:
        if call.name not in self._tools:
            return {"error": f"unknown tool {call.name!r}; available: {', '.join(self._tools)}"}
        params = self._tools[call.name]["parameters"]
        if set(call.arguments) != set(params):
            return {"error": f"{call.name} takes exactly: {', '.join(params)}"}
        for arg, kind in params.items():
            value = call.arguments[arg]
            ok = isinstance(value, str) if kind == "string" else type(value) is int
            if not ok:
                return {"error": f"argument {arg!r} of {call.name} must be a {kind}"}
        (value,) = call.arguments.values()
        result = self._table.get(call.name, {}).get(_key(value))
        return copy.deepcopy(result) if result else {"error": f"nothing found for {value!r}"}

    def _call(self, call: ToolCall) -> tuple[str, bool]:
        result = self._execute(call)
        return dumps(result), "error" in result

    def _question(self, index: int) -> str:
        return self._turns[index]["question"]

    def score(self) -> tuple[float, dict]:
        """1.0 iff every answer holds its turn's expected values (which only the results give)."""
        if self._task is None:
            raise RuntimeError("call reset(task) before score()")
        correct = [
            i < len(self._answers) and answer_ok(self._answers[i], t["expected"])
            for i, t in enumerate(self._turns)
        ]
        success = all(correct)
        info = {
            "success": success,
            "first_failing_turn": None if success else correct.index(False),
            "n_calls": self._n_calls,
            "n_errors": self._n_errors,
            "n_turns": len(self._turns),
            "answers_correct": correct,
        }
        return float(success), info


class ProceduralWorld:
    """Task source of procedurally generated tools and tasks (implements World)."""

    name = "procedural"
    splits = SPLITS
    config_defaults: Mapping[str, Any] = {
        # The teacher's habits are the synthetic world's; here the expert is the teacher.
        "env.teacher.stop_early_rate": 0.0,
        "env.teacher.skip_lookup_rate": 0.0,
        "env.teacher.guess_rate": 0.0,
        "eval.splits": ["test_hermes", "test_pythonic"],
    }

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """The first `n` tasks of `split`; deterministic, and a prefix of any longer request."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        stream = "train" if split == "train" else "held_out"
        return [self._task(split, stream, seed, i) for i in range(n)]

    def _task(self, split: str, stream: str, seed: int, index: int) -> Task:
        content = draw(stream, seed, index)
        fmt = content["fmt"] if split in ("train", "test") else split.removeprefix("test_")
        turns, form = content["turns"], get_format(fmt)
        expert = [
            [form.render_calls([ToolCall(c["name"], c["arguments"])]) for c in t["calls"]]
            + [t["answer"]]
            for t in turns
        ]
        return Task(
            id=f"procedural/{split}/s{seed}/{index:05d}",
            split=split,
            messages=[
                {
                    "role": "system",
                    "content": system_prompt(content["instruction"], fmt, content["tools"]),
                },
                {"role": "user", "content": turns[0]["question"]},
            ],
            tools=content["tools"],
            fmt=fmt,
            expert=expert,
            meta={"table": content["table"], "turns": turns},
        )

    def make_env(self) -> ProceduralEnv:
        return ProceduralEnv()

    def tokenizer_corpus(self, n_tasks: int = 2000, seed: int = 0) -> list[str]:
        """Plain texts of `n_tasks` train tasks: system prompts and calls in both syntaxes,
        questions, results and answers."""
        corpus = []
        for index in range(n_tasks):
            content = draw("train", seed, index)
            for fmt in sorted(FORMATS):
                corpus.append(system_prompt(content["instruction"], fmt, content["tools"]))
            for turn in content["turns"]:
                corpus.append(turn["question"])
                for fmt in sorted(FORMATS):
                    form = get_format(fmt)
                    corpus.extend(
                        form.render_calls([ToolCall(c["name"], c["arguments"])])
                        for c in turn["calls"]
                    )
                corpus.extend(dumps(c["result"]) for c in turn["calls"])
                corpus.append(turn["answer"])
        return corpus


__all__ = [
    "ENTITIES",
    "FIELDS",
    "NOUNS",
    "PAIR_QUESTIONS",
    "QUESTIONS",
    "SPLITS",
    "VERBS",
    "ProceduralEnv",
    "ProceduralWorld",
    "draw",
    "system_prompt",
]
