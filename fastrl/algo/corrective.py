"""Corrective supervision from failures (ETS and PRS).

- ETS, erroneous trajectory supervision: `FailureLog` remembers which tasks had a failed rollout
  at which RL step; between RL phases (interleaved scheme) and for the guard's corrective phase,
  `corrective_data` returns those tasks' expert trajectories for an SFT phase.
- PRS, process reflection supervision: as ETS, plus reflection pairs: an analysis prompt holding a
  failed conversation and the reference solution, answered by a turn-by-turn critique naming the
  first error, its cause and the lesson. Critiques come from a `Reflector`: `RuleReflector` (a
  deterministic comparison with the expert trajectory) or `ModelReflector` (a local judge model).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from fastrl.algo.supervision import play_experts
from fastrl.envs.base import Task, ToolCall
from fastrl.envs.formats import get_format
from fastrl.rollout.loop import Limits
from fastrl.rollout.types import Trajectory

log = logging.getLogger(__name__)

REVIEW_INSTRUCTION = (
    "Review the assistant's tool use against the reference solution. Go step by step, name the "
    "first error and its cause, and state the lesson for similar tasks."
)


# --------------------------------------------------------------------------- ETS
class FailureLog:
    """Which tasks had a failed (sampled or hinted) rollout at which RL step, and one failed
    conversation per task (the latest) for reflections. Checkpointed with the trainer state."""

    def __init__(self) -> None:
        self.last_failed: dict[str, int] = {}  # task id -> latest RL step with a failure
        self.examples: dict[str, dict] = {}  # task id -> {"messages", "info"} of that failure

    def record(self, step: int, trajs: Iterable[Trajectory]) -> None:
        for t in trajs:
            if t.source == "expert" or t.success:
                continue
            self.last_failed[t.task_id] = step
            info = {k: t.info.get(k) for k in ("first_failing_turn", "status") if k in t.info}
            self.examples[t.task_id] = {"messages": t.messages, "info": info}

    def merge(self, step: int, failed: list[dict[str, dict]]) -> None:
        """Take in other ranks' failures at `step`: one {task id: example} per rank (`mine`)."""
        for other in failed:
            for tid, example in other.items():
                self.last_failed[tid] = step
                self.examples[tid] = example

    def mine(self, step: int, trajs: Iterable[Trajectory]) -> dict[str, dict]:
        """{task id: example} of the tasks among `trajs` that failed at `step` (what `merge`
        takes from each rank)."""
        tids = {t.task_id for t in trajs if self.last_failed.get(t.task_id) == step}
        return {tid: self.examples[tid] for tid in tids}

    def tasks_since(self, step: int) -> list[str]:
        """Task ids with a failure at RL step >= `step`, oldest failure first."""
        hits = [(s, tid) for tid, s in self.last_failed.items() if s >= step]
        return [tid for _, tid in sorted(hits)]

    def forget_before(self, step: int) -> None:
        """Drop tasks whose latest failure is older than `step` (bounds memory and checkpoints)."""
        for tid in [tid for tid, s in self.last_failed.items() if s < step]:
            del self.last_failed[tid]
            self.examples.pop(tid, None)

    def state_dict(self) -> dict:
        return {"last_failed": dict(self.last_failed), "examples": dict(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.last_failed = dict(state.get("last_failed", {}))
        self.examples = dict(state.get("examples", {}))


# --------------------------------------------------------------------------- PRS
class Reflector(Protocol):
    def reflect(self, task: Task, messages: list[dict], info: dict) -> str:
        """A critique of the failed conversation `messages` of `task` (`info`: the env's score
        info, e.g. first_failing_turn)."""
        ...


def _render_call(call: ToolCall) -> str:
    args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in call.arguments.items())
    return f"{call.name}({args})"


def _render(calls: list[ToolCall]) -> str:
    return "; ".join(_render_call(c) for c in calls)


def _turns(messages: list[dict]) -> list[list[tuple[str, list[str]]]]:
    """Assistant messages per user turn, each with the tool / observation texts that followed."""
    turns: list[list[tuple[str, list[str]]]] = []
    for m in messages:
        if m["role"] == "user":
            turns.append([])
        elif m["role"] == "assistant" and turns:
            turns[-1].append((m["content"], []))
        elif m["role"] == "tool" and turns and turns[-1]:
            turns[-1][-1][1].append(m["content"])
    return turns


def _source_of(value: Any, context: list[tuple[str, str]]) -> str:
    """Where an expected argument value was visible before the step, as a phrase."""
    needle = value if isinstance(value, str) else json.dumps(value)
    for kind, text in reversed(context):
        if needle and needle in text:
            return f" ({needle} is in {kind}; copy it exactly)"
    return ""


class RuleReflector:
    """A deterministic critic: compares the failed conversation with the task's expert messages
    step by step and writes the first divergence, its cause and a lesson for similar tasks."""

    LESSONS = {
        "argument": "When a call needs a value from the request or an earlier result, copy that "
        "value exactly.",
        "premature": "Answer only after every call the question needs has returned.",
        "malformed": "Write each call in the required syntax with the tool's name and arguments.",
        "tool": "Pick the tool whose description matches what is still unknown.",
        "extra": "Once the results answer the question, reply in one sentence.",
        "answer": "State the values the tool results gave, exactly as they were returned.",
        "limit": "Finish within the turn and token limits: do not repeat a failing call.",
    }

    def reflect(self, task: Task, messages: list[dict], info: dict) -> str:
        fmt = get_format(task.fmt)
        got_turns = _turns(messages)
        lines: list[str] = []
        context: list[tuple[str, str]] = []
        first: tuple[int, str, str] | None = None  # (step, kind, cause)
        step = 0
        for t, expert_msgs in enumerate(task.expert):
            user = [m["content"] for m in messages if m["role"] == "user"]
            if t < len(user):
                context.append(("the user's request", user[t]))
            got = got_turns[t] if t < len(got_turns) else []
            for i, expected in enumerate(expert_msgs):
                step += 1
                exp = fmt.parse(expected)
                if i >= len(got):
                    cause = "the episode ended before this step (a turn or token limit)"
                    first = first or (step, "limit", cause)
                    lines.append(
                        f"Step {step}: missing; the reference does: {self._say(exp, expected)}."
                    )
                    break
                text, observations = got[i]
                kind, cause = self._compare(fmt.parse(text), exp, expected, context)
                if kind is None and not exp.calls and t == info.get("first_failing_turn"):
                    kind = "answer"
                    cause = f'the answer "{text}" misses what the reference states: "{expected}"'
                if kind is None:
                    lines.append(f"Step {step}: correct: {self._say(exp, expected)}.")
                else:
                    lines.append(f"Step {step}: error: {cause}.")
                    first = first or (step, kind, cause)
                for obs in observations:
                    context.append(("an earlier tool result", obs))
                if first:
                    break
            if first:
                break
        if first is None:
            step_count = sum(len(turn) for turn in got_turns)
            cause = "every step matches the reference, yet the task failed"
            if info.get("status") or step_count > step:
                cause = "the steps match the reference, then extra turns followed"
                first = (step, "limit", cause)
            else:
                first = (step, "answer", cause)
        n, kind, cause = first
        lines.append(f"First error: step {n}: {cause}.")
        lines.append(f"Lesson: {self.LESSONS[kind]}")
        return "\n".join(lines)

    @staticmethod
    def _say(parsed, text: str) -> str:
        return _render(parsed.calls) if parsed.calls else f'answer "{text}"'

    def _compare(self, got, exp, expected_text: str, context) -> tuple[str | None, str]:
        if got.error:
            return (
                "malformed",
                f"the call is malformed ({got.error}); the reference calls {_render(exp.calls)}",
            )
        if exp.calls and not got.calls:
            return "premature", f"answered before calling {_render(exp.calls)}"
        if not exp.calls and got.calls:
            return "extra", (
                f"called {_render(got.calls)} although the results already answer the request; "
                f'the reference answers "{expected_text}"'
            )
        if not exp.calls:
            return None, ""  # both answers; whether the text holds the values is the env's call
        if [c.name for c in got.calls] != [c.name for c in exp.calls]:
            return "tool", f"called {_render(got.calls)} where {_render(exp.calls)} was needed"
        for g, e in zip(got.calls, exp.calls):
            if g.arguments != e.arguments:
                wrong = [k for k in e.arguments if g.arguments.get(k, object()) != e.arguments[k]]
                extra = [k for k in g.arguments if k not in e.arguments]
                parts = [
                    f"{e.name} argument {k} is {json.dumps(g.arguments.get(k))} but should be "
                    f"{json.dumps(e.arguments[k])}{_source_of(e.arguments[k], context)}"
                    for k in wrong
                ] + [f"{e.name} has no argument {k}" for k in extra]
                return "argument", "; ".join(parts)
        return None, ""


class ModelReflector:
    """A local Hugging Face causal LM as judge: greedy critique of the reflection prompt."""

    def __init__(self, model_dir: str, max_new_tokens: int = 256):
        from transformers import AutoModelForCausalLM

        from fastrl.models import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def reflect(self, task: Task, messages: list[dict], info: dict) -> str:
        chat = reflection_messages(task, messages)
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        out = self.model.generate(
            ids,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def get_reflector(spec: str, max_new_tokens: int = 256) -> Reflector:
    """`builtin` -> RuleReflector; otherwise a local model directory -> ModelReflector."""
    if spec == "builtin":
        return RuleReflector()
    return ModelReflector(spec, max_new_tokens)


def reflection_messages(task: Task, messages: list[dict], max_chars: int = 300) -> list[dict]:
    """The analysis prompt: the failed conversation (without the tool list) and the reference."""
    convo = []
    for m in messages[1:]:  # the system prompt (tool schemas) is left out
        content = (
            m["content"] if len(m["content"]) <= max_chars else m["content"][:max_chars] + "..."
        )
        convo.append(f"{m['role']}: {content}")
    reference = [m for turn in task.expert for m in turn]
    user = (
        "Conversation:\n"
        + "\n".join(convo)
        + "\nReference solution:\n"
        + "\n".join(f"assistant: {m}" for m in reference)
    )
    return [{"role": "system", "content": REVIEW_INSTRUCTION}, {"role": "user", "content": user}]


def reflection_trajectory(
    tokenizer: Any, task: Task, messages: list[dict], critique: str, max_tokens: int
) -> Trajectory | None:
    """An SFT sample: the analysis prompt, then the critique (loss mask 1) ended by <|im_end|>.

    None when it would exceed `max_tokens`."""
    chat = reflection_messages(task, messages)
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    response = tokenizer.encode(critique, add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(response) > max_tokens:
        return None
    return Trajectory(
        task_id=task.id,
        group_id=0,
        prompt_ids=prompt_ids,
        response_ids=response,
        loss_mask=[1] * len(response),
        engine_logprobs=[0.0] * len(response),
        turn_spans=[(0, len(response))],
        messages=[*chat, {"role": "assistant", "content": critique}],
        source="reflection",
    )


def corrective_data(
    tokenizer: Any,
    world: Any,
    tasks_by_id: dict[str, Task],
    failures: FailureLog,
    since_step: int,
    limits: Limits,
    reflector: Reflector | None = None,
) -> tuple[list[Trajectory], int]:
    """SFT data of a corrective phase: the expert trajectories of tasks that failed at RL step
    >= `since_step` (ETS) and, with a `reflector`, one reflection per such task (PRS).

    Returns (trajectories, number of failed tasks)."""
    ids = [tid for tid in failures.tasks_since(since_step) if tid in tasks_by_id]
    tasks = [tasks_by_id[tid] for tid in ids]
    data = [
        t for t in play_experts(tokenizer, world, tasks, limits) if t.success and not t.truncated
    ]
    if reflector is not None:
        made = 0
        for task in tasks:
            example = failures.examples.get(task.id)
            if example is None:
                continue
            critique = reflector.reflect(task, example["messages"], example["info"])
            traj = reflection_trajectory(
                tokenizer, task, example["messages"], critique, limits.max_total_tokens
            )
            if traj is not None:
                data.append(traj)
                made += 1
        log.info("PRS: %d reflections from %d failed tasks", made, len(tasks))
    return data, len(tasks)
