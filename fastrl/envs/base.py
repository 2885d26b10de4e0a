"""Core environment types: tool calls, parse results, tasks, and the Env and Format protocols.

An environment turns a task into a conversation. The agent loop calls `reset(task)` for the
initial messages, then for every assistant turn parses the text with the task's `Format` and calls
`step(text, parsed)`, appending the returned observation messages, until `done`. `score()` then
gives the reward. Tool execution never evaluates model text: malformed or invalid calls come back
to the model as error observations.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# Seconds a single tool call may run before it is cut off (`env.tool_timeout_s`; 0: no limit).
_TOOL_TIMEOUT_S = 10.0


class ToolTimeout(Exception):
    """A tool call ran past the per-call time limit."""


def set_tool_timeout(seconds: float) -> None:
    """Set the per-call limit of `call_with_timeout` for this process."""
    global _TOOL_TIMEOUT_S
    _TOOL_TIMEOUT_S = float(seconds)


def call_with_timeout(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, raising `ToolTimeout` once it runs past the per-call limit.

    On the main thread a SIGALRM timer interrupts the call itself; elsewhere the call runs in a
    worker thread that is abandoned (it cannot be stopped) when the limit passes.
    """
    limit = _TOOL_TIMEOUT_S
    if limit <= 0:
        return fn(*args, **kwargs)
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):

        def expired(signum, frame):
            raise ToolTimeout(f"timed out after {limit:g} s")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    future: concurrent.futures.Future = concurrent.futures.Future()

    def work() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            future.set_exception(e)

    # A daemon thread: an abandoned call never holds the process open at exit.
    threading.Thread(target=work, daemon=True, name="fastrl-tool-call").start()
    try:
        return future.result(timeout=limit)
    except concurrent.futures.TimeoutError:
        raise ToolTimeout(f"timed out after {limit:g} s") from None


@dataclass
class ToolCall:
    """One call of a named tool with keyword arguments."""

    name: str
    arguments: dict[str, Any]


@dataclass
class Parsed:
    """The tool calls found in an assistant message.

    `calls` is empty when the message is a plain text answer; `error` holds the parse error when
    the message tried to call a tool but was malformed.
    """

    calls: list[ToolCall]
    error: str | None = None


@dataclass
class Task:
    """One episode: the opening chat, the offered tools, and the expert's solution."""

    id: str  # unique and stable, e.g. "synthetic/test/00042"
    split: str  # train | test | format_ood | content_ood
    messages: list[dict]  # opening chat: system prompt then the first user message
    tools: list[dict]  # {"name", "description", "parameters"} schemas of the offered tools
    fmt: str  # the call syntax the system prompt asks for: "hermes" | "pythonic"
    expert: list[list[str]]  # per user turn: expert assistant contents (calls, then the answer)
    hint: str | None = None  # short natural-language summary of the solution
    meta: dict = field(default_factory=dict)  # env-specific data (world, later turns, answers)


class Env(Protocol):
    """A multi-turn tool environment; one instance runs one episode at a time."""

    def reset(self, task: Task) -> list[dict]:
        """Start an episode and return copies of the task's opening messages."""
        ...

    def step(self, assistant_text: str, parsed: Parsed) -> tuple[list[dict], bool]:
        """Consume one assistant message; return the observation messages and whether it is done.

        Calls give one `{"role": "tool"}` message each; a parse error gives one tool message
        starting with "Error:"; a plain text message answers the current user turn and yields the
        next user message, or ends the episode after the last turn.
        """
        ...

    def score(self) -> tuple[float, dict]:
        """Reward and info with at least success, first_failing_turn, n_calls, n_errors."""
        ...


class QuestionTurnsEnv:
    """The `Env.step` of worlds whose tasks are user questions answered in turn, shared: a parse
    error is an error observation, each call becomes the observation `_call` gives, a plain-text
    message answers the current question and brings the next (`_question`), and the last answer
    ends the episode. A subclass's `reset` calls `_start` first; `_answered` runs after each
    answer."""

    _task: Task | None = None

    def _start(self, task: Task, n_questions: int) -> None:
        self._task = task
        self._n_questions = n_questions
        self._answers: list[str] = []
        self._n_calls = self._n_errors = 0
        self._done = False

    def _call(self, call: ToolCall) -> tuple[str, bool]:
        """Execute `call`: the tool message's text and whether it reports an error."""
        raise NotImplementedError

    def _question(self, index: int) -> str:
        """The text of user question `index` (0-based)."""
        raise NotImplementedError

    def _answered(self) -> None:
        """Called after each answer is recorded."""

    def step(self, assistant_text: str, parsed: Parsed) -> tuple[list[dict], bool]:
        if self._task is None:
            raise RuntimeError("call reset(task) before step()")
        if self._done:
            return [], True
        if parsed.error is not None:
            self._n_errors += 1
            return [{"role": "tool", "content": f"Error: {parsed.error}"}], False
        if parsed.calls:
            observations = []
            for call in parsed.calls:
                shown, error = self._call(call)
                self._n_calls += 1
                self._n_errors += error
                observations.append({"role": "tool", "content": shown})
            return observations, False
        self._answers.append(assistant_text)
        self._answered()
        if len(self._answers) < self._n_questions:
            return [{"role": "user", "content": self._question(len(self._answers))}], False
        self._done = True
        return [], True


class Format(Protocol):
    """A tool-call syntax: how tools are described to the model and how calls are written."""

    name: str

    def render_tools(self, tools: list[dict]) -> str:
        """System-prompt text listing the tools and showing how to call them."""
        ...

    def render_calls(self, calls: list[ToolCall]) -> str:
        """The assistant message content that makes these calls."""
        ...

    def parse(self, text: str) -> Parsed:
        """Find the calls in an assistant message; never raises."""
        ...


class World(Protocol):
    """A source of tasks and of environments that run them (one per benchmark or generator).

    `name`, `splits` and `config_defaults` are class attributes: a configuration is completed and
    checked against the registered class (`fastrl.envs.ENVS`) before any world is built.
    """

    # The registry name (`env.name`).
    name: str
    # The split names `tasks` accepts; `eval.splits` must be among them.
    splits: tuple[str, ...]
    # Dotted config keys this world sets unless the configuration gives them (BFCL's longer
    # episode limits, for one); empty where the config's defaults suit the world.
    config_defaults: Mapping[str, Any]

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """The first `n` tasks of `split`, deterministic in (split, n, seed)."""
        ...

    def make_env(self) -> Env:
        """A fresh environment for this world's tasks."""
        ...

    def tokenizer_corpus(self, n_tasks: int = ..., seed: int = 0) -> list[str]:
        """Plain texts of `n_tasks` train tasks (no chat tokens) to fit a preset's tokenizer on."""
        ...
