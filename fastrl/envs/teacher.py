"""An imperfect teacher for the synthetic world: the expert's solution, written with habits.

SFT data in practice comes from a teacher model, not from the truth, and carries the teacher's
habits; RL with a verifiable reward is what corrects them. The teacher here writes each task's
demonstration from `Task.expert` (the correct solution, which stays the truth for the oracle, OPS,
ETS/PRS, hints and the expert probe) and, turn by turn, may fall into one of three habits. Each is
a *decision* a sampled policy can get right and the reward tells apart, not a copying error:

- `stop_early`: in a turn of two or more calls, answer with the value the turn has so far ("The
  answer is Paris.") instead of making the turn's last call. The wrong decision is a
  control-token one: after a tool result, answer text where `<tool_call>` belongs.
- `guess`: answer a turn from memory, without any call, with a made-up value in the expert's
  sentence ("It is 23 degrees in Lima." for 17). Also a control-token decision: after the user's
  question, answer text where `<tool_call>` belongs.
- `skip_lookup`: in a turn that starts with `lookup_user`, skip the lookup and pass the person's
  name where the looked-up value belongs (`get_weather(city="Ana")`); the tool answers with an
  error and the teacher gives up ("I could not find Ana."). The wrong decision is the first
  call's tool.

The habits touch only a task's last turn or turns whose calls read the world and never change it,
so the world after every earlier turn is the expert's and the later turns are the expert's own.
The decisions are drawn per task, turn and seed, so a teacher is deterministic; rates of 0 give
the expert's demonstrations. Where several habits fire in one turn, the one that decides first
wins (guess, then skip_lookup, then stop_early). The messages are played through the environment
like the expert's (real observations, a real score), and kept whether or not they solve the task.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from fastrl.envs.base import Task, ToolCall
from fastrl.envs.formats import get_format
from fastrl.envs.synthetic import CITIES, OOD_CITIES, answer_ok

# The tools that change the world (the others only read it).
WRITES = frozenset(("transfer", "add_todo", "book_flight", "order"))


@dataclass(frozen=True)
class Habits:
    """How often the teacher falls into each habit, per turn it applies to (0 never, 1 always)."""

    stop_early: float = 0.0
    skip_lookup: float = 0.0
    guess: float = 0.0

    @property
    def perfect(self) -> bool:
        return self.stop_early == 0 and self.skip_lookup == 0 and self.guess == 0


def _fed(result: dict, arguments: dict) -> tuple[str, Any] | None:
    """The (argument, value) of `arguments` whose value comes from `result`, or None."""
    values = [v for v in result.values() if not isinstance(v, bool)]
    for arg, value in arguments.items():
        if not isinstance(value, bool) and value in values:
            return arg, value
    return None


def stop_early_turn(calls: list[dict], last_turn: bool = False) -> str | None:
    """The early answer for a turn the `stop_early` habit applies to, else None.

    Applies to turns of two or more calls whose last call takes a value from the call before it
    and only reads, or may write when the turn is the task's last (`last_turn`); the answer names
    that value.
    """
    if len(calls) < 2 or not (last_turn or calls[-1]["name"] not in WRITES):
        return None
    fed = _fed(calls[-2]["result"], calls[-1]["arguments"])
    if fed is None:
        return None
    return f"The answer is {fed[1]}."


def skip_lookup_turn(calls: list[dict], last_turn: bool = False) -> tuple[dict, str] | None:
    """The (guessed call, give-up answer) for a turn `skip_lookup` applies to, else None.

    Applies to turns that start with `lookup_user` and pass a value of its result to the next
    call, and whose calls only read unless the turn is the task's last (`last_turn`); the guessed
    call passes the person's name instead.
    """
    if len(calls) < 2 or calls[0]["name"] != "lookup_user":
        return None
    if not last_turn and any(c["name"] in WRITES for c in calls):
        return None
    fed = _fed(calls[0]["result"], calls[1]["arguments"])
    if fed is None:
        return None
    name = calls[0]["arguments"]["name"]
    guess = {"name": calls[1]["name"], "arguments": {**calls[1]["arguments"], fed[0]: name}}
    return guess, f"I could not find {name}."


def guess_turn(turn: dict, last_turn: bool, rng: random.Random) -> str | None:
    """The made-up answer for a turn the `guess` habit applies to, else None.

    Applies to turns of one or more calls that only read, or may write when the turn is the
    task's last (`last_turn`), whose expected values are numbers or cities; the expert's answer
    with each replaced by another value of its kind (a number moved by 1 to about half its size,
    another city), kept only where it fails the turn's check.
    """
    calls = turn["calls"]
    if not calls or not (last_turn or all(c["name"] not in WRITES for c in calls)):
        return None
    answer = turn["answer"]
    for value in dict.fromkeys(turn["expected"]):
        if re.fullmatch(r"-?\d+", value):
            n = int(value)
            step = rng.randint(1, max(3, abs(n) // 2))
            made_up = str(n + step if n < 0 or rng.random() < 0.5 or n - step < 0 else n - step)
        elif value in CITIES or value in OOD_CITIES:
            pool = CITIES if value in CITIES else OOD_CITIES
            made_up = rng.choice([c for c in pool if c != value])
        else:
            return None
        answer = re.sub(rf"(?<![\w.-]){re.escape(value)}(?![\w])", made_up, answer)
    return None if answer_ok(answer, turn["expected"]) else answer


def applicable(task: Task) -> list[tuple[str, ...]]:
    """Per user turn of a synthetic-world task, the habits that apply to it."""
    turns = task.meta.get("turns", [])
    out = []
    for i, turn in enumerate(turns):
        last = i == len(turns) - 1
        rng = random.Random(f"teacher/guess/{task.id}/{i}")  # the values do not decide eligibility
        habits = (
            ("guess",) * (guess_turn(turn, last, rng) is not None)
            + ("skip_lookup",) * (skip_lookup_turn(turn["calls"], last) is not None)
            + ("stop_early",) * (stop_early_turn(turn["calls"], last) is not None)
        )
        out.append(habits)
    return out


def demonstration(task: Task, habits: Habits, seed: int) -> tuple[list[list[str]], list[str]]:
    """The teacher's assistant messages for `task`, per user turn (the shape of `Task.expert`),
    and the habit that fired in each turn ("" where none did).

    Deterministic in (task.id, seed, turn); with `habits.perfect`, the expert's messages.
    """
    if habits.perfect:
        return [list(turn) for turn in task.expert], [""] * len(task.expert)
    turns = task.meta.get("turns")
    if turns is None:
        raise ValueError(f"task {task.id}: the teacher's habits need a synthetic-world task")
    form = get_format(task.fmt)
    messages, fired = [], []
    for i, (turn, expert) in enumerate(zip(turns, task.expert, strict=True)):
        rng = random.Random(f"teacher/{seed}/{task.id}/{i}")
        # every draw is made, so each habit's decisions do not depend on the other rates
        draw_guess, draw_skip, draw_stop = rng.random(), rng.random(), rng.random()
        last = i == len(turns) - 1
        guess = guess_turn(turn, last, rng)
        skip = skip_lookup_turn(turn["calls"], last)
        early = stop_early_turn(turn["calls"], last)
        if guess is not None and draw_guess < habits.guess:
            messages.append([guess])
            fired.append("guess")
        elif skip is not None and draw_skip < habits.skip_lookup:
            made_up, answer = skip
            call = form.render_calls([ToolCall(made_up["name"], made_up["arguments"])])
            messages.append([call, answer])
            fired.append("skip_lookup")
        elif early is not None and draw_stop < habits.stop_early:
            messages.append([*expert[: len(turn["calls"]) - 1], early])
            fired.append("stop_early")
        else:
            messages.append(list(expert))
            fired.append("")
    return messages, fired
