"""The built-in synthetic tool world: short, procedurally generated multi-step tool-use tasks.

Every task draws a small random world (people with a city, a bank account and a todo list; the
weather in each city; exchange rates; for `content_ood`, club members, flights and a shop) and asks
1-3 user questions whose answers need 1-4 dependent tool calls in total, e.g. look up a person's
city, then the weather in that city. Attribute values are random per task, so a policy must read
tool results rather than memorise them. Some tools change the world (bank transfers, todo items,
orders, bookings); a task succeeds only if every answer holds its expected value and the final
state of those tools equals the one the expert's calls produce.

Splits:
- `train` and `test` share the tool families and entity pools; a hash of each task's content puts
  it in exactly one of them, so no task instance appears in both.
- `format_ood` holds the `test` tasks, one for one, written in the Python-list call syntax.
- `content_ood` uses tool families and entity names (people, cities, items) never seen in training.

This module holds the world (`SyntheticWorld`: splits, tasks, tokenizer corpus) and the
environment that runs a task (`SyntheticEnv`); `tools.py` the entity pools, tool schemas and
implementations, `execute` and `answer_ok`; `tasks.py` the task builder, its templates and the
held-out hash.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from fastrl.envs.base import QuestionTurnsEnv, Task, ToolCall
from fastrl.envs.formats import get_format
from fastrl.envs.synthetic.tasks import OOD_TEMPLATES, TEMPLATES, content_key, draw
from fastrl.envs.synthetic.tools import (
    CITIES,
    CURRENCIES,
    FAMILIES,
    MAX_ANSWER_CHARS,
    OOD_CITIES,
    OOD_FAMILIES,
    OOD_ITEMS,
    OOD_PEOPLE,
    PEOPLE,
    SKIES,
    STATEFUL,
    TODO_ITEMS,
    TOOLS,
    answer_ok,
    dumps,
    execute,
    snapshot,
)

SPLITS = ("train", "test", "format_ood", "content_ood")
INSTRUCTION = "Use the tools to answer the user. When you know the answer, reply in one sentence."

__all__ = [
    "CITIES",
    "CURRENCIES",
    "FAMILIES",
    "INSTRUCTION",
    "MAX_ANSWER_CHARS",
    "OOD_CITIES",
    "OOD_FAMILIES",
    "OOD_ITEMS",
    "OOD_PEOPLE",
    "OOD_TEMPLATES",
    "PEOPLE",
    "SKIES",
    "SPLITS",
    "STATEFUL",
    "TEMPLATES",
    "TODO_ITEMS",
    "TOOLS",
    "SyntheticEnv",
    "SyntheticWorld",
    "answer_ok",
    "content_key",
    "dumps",
    "execute",
    "system_prompt",
]


# ---------------------------------------------------------------------------------------------
# The environment.


class SyntheticEnv(QuestionTurnsEnv):
    """Runs one synthetic task at a time (implements the Env protocol)."""

    def __init__(self) -> None:
        self._task: Task | None = None

    def reset(self, task: Task) -> list[dict]:
        """Start `task` from its initial world and return copies of its opening messages."""
        self._start(task, len(task.meta["turns"]))
        self._turns = task.meta["turns"]
        self._state = copy.deepcopy(task.meta["world"])
        self._allowed = {t["name"] for t in task.tools}
        self._snapshots: list[dict] = []
        return [dict(m) for m in task.messages]

    def _call(self, call: ToolCall) -> tuple[str, bool]:
        result = execute(self._state, self._allowed, call.name, call.arguments)
        return dumps(result), "error" in result

    def _question(self, index: int) -> str:
        return self._turns[index]["question"]

    def _answered(self) -> None:
        self._snapshots.append(snapshot(self._state))

    def score(self) -> tuple[float, dict]:
        """1.0 iff every answer holds its expected values and the final state matches the expert.

        `first_failing_turn` (0-based) is the first turn whose answer is missing or wrong or after
        which the world differs from the expert's; None on success.
        """
        if self._task is None:
            raise RuntimeError("call reset(task) before score()")
        turns, answers = self._turns, self._answers
        correct = [
            i < len(answers) and answer_ok(answers[i], t["expected"]) for i, t in enumerate(turns)
        ]
        state_match = snapshot(self._state) == turns[-1]["state"]
        success = all(correct) and state_match
        first_failing = None
        if not success:
            first_failing = next(
                i for i, t in enumerate(turns) if not correct[i] or self._snapshots[i] != t["state"]
            )
        info = {
            "success": success,
            "first_failing_turn": first_failing,
            "n_calls": self._n_calls,
            "n_errors": self._n_errors,
            "n_turns": len(turns),
            "turns_answered": len(answers),
            "answers_correct": correct,
            "state_match": state_match,
        }
        return float(success), info


def system_prompt(fmt: str, tools: list[dict]) -> str:
    """The fixed instruction line followed by the format's tool list and call example."""
    return f"{INSTRUCTION}\n{get_format(fmt).render_tools(tools)}"


class SyntheticWorld:
    """Task source for the synthetic tool world (implements the World protocol)."""

    name = "synthetic"
    splits = SPLITS
    config_defaults: Mapping[str, Any] = {}  # the config's own defaults are this world's

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """The first `n` tasks of `split`; deterministic, and a prefix of any longer request."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        # test and format_ood draw from one stream, so format_ood task i is test task i re-written.
        stream = {"train": "train", "test": "held_out", "format_ood": "held_out"}.get(split, split)
        fmt = "pythonic" if split == "format_ood" else "hermes"
        return [self._task(split, stream, fmt, seed, i) for i in range(n)]

    def _task(self, split: str, stream: str, fmt: str, seed: int, index: int) -> Task:
        content = draw(stream, seed, index)
        turns, form = content["turns"], get_format(fmt)
        expert = [
            [form.render_calls([ToolCall(c["name"], c["arguments"])]) for c in t["calls"]]
            + [t["answer"]]
            for t in turns
        ]
        hint = " Next question: ".join(t["hint"] for t in turns)
        task_id = (
            f"synthetic/{split}/{index:05d}"
            if seed == 0
            else f"synthetic/{split}/s{seed}/{index:05d}"
        )
        return Task(
            id=task_id,
            split=split,
            messages=[
                {"role": "system", "content": system_prompt(fmt, content["tools"])},
                {"role": "user", "content": turns[0]["question"]},
            ],
            tools=content["tools"],
            fmt=fmt,
            expert=expert,
            hint=hint,
            meta={
                "seed": seed,
                "world": content["world"],
                "turns": turns,
                "families": content["families"],
            },
        )

    def make_env(self) -> SyntheticEnv:
        """A fresh environment; `reset(task)` loads a task's world."""
        return SyntheticEnv()

    def tokenizer_corpus(self, n_tasks: int = 2000, seed: int = 0) -> list[str]:
        """Plain text pieces of `n_tasks` train tasks for fitting a tokenizer (no chat tokens).

        Holds system prompts in both formats, user questions, expert messages with the calls in
        both syntaxes, and tool results.
        """
        pythonic = get_format("pythonic")
        corpus = []
        for task in self.tasks("train", n_tasks, seed):
            corpus.append(task.messages[0]["content"])
            corpus.append(system_prompt("pythonic", task.tools))
            for turn, messages in zip(task.meta["turns"], task.expert, strict=True):
                corpus.append(turn["question"])
                corpus.extend(messages)
                for c in turn["calls"]:
                    corpus.append(pythonic.render_calls([ToolCall(c["name"], c["arguments"])]))
                    corpus.append(dumps(c["result"]))
        return corpus
