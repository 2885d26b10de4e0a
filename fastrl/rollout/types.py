"""Trajectory and engine types shared by the agent loop, the engines and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Sampling:
    """How an engine samples one assistant turn."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop_token_id: int | None = None  # generation ends after this token (kept in the output)


@dataclass
class GenOutput:
    """What an engine returns for one prompt: the exact sampled ids and their logprobs."""

    token_ids: list[int]
    logprobs: list[float]  # log p(token) under the sampling distribution at temperature 1/T scale
    finished: bool  # True when the stop token ended the turn, False when max_tokens cut it
    error: str | None = None  # set when the engine could not serve the prompt (e.g. too long)


class Engine(Protocol):
    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        request_ids: list[str] | None = None,
    ) -> list[GenOutput]: ...

    def sync_weights(self, named_tensors: Any) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


@dataclass
class Trajectory:
    """One episode. `response_ids` holds every token after the prompt, observations included;
    `loss_mask` is 1 only on tokens the policy sampled (or expert tokens supervision trains on)."""

    task_id: str
    group_id: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    engine_logprobs: list[float] = field(default_factory=list)  # 0.0 where loss_mask is 0
    turn_spans: list[tuple[int, int]] = field(
        default_factory=list
    )  # [start, end) of assistant turns
    messages: list[dict] = field(default_factory=list)  # the conversation as text, for logs
    reward: float = 0.0
    success: bool = False
    truncated: bool = False  # cut by a token or turn limit
    source: str = "policy"  # policy | expert | hinted
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)
