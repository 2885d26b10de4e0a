"""A policy that sends given assistant messages in order (expert, oracle and replay policies).

Each request id names a script: the list of assistant message texts to send. Message text is
tokenised once, as the tokenizer would split it, and ended with the stop token, so a scripted
episode is token-for-token what the trainer sees for an expert trajectory. A script that runs out
sends an empty turn.
"""

from __future__ import annotations

from typing import Any

from fastrl.rollout.types import GenOutput, Sampling


class ScriptedEngine:
    def __init__(self, tokenizer: Any, scripts: dict[str, list[str]]):
        self.tokenizer = tokenizer
        self.scripts = scripts
        self._cursor: dict[str, int] = {}

    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        request_ids: list[str] | None = None,
    ) -> list[GenOutput]:
        if request_ids is None:
            raise ValueError("ScriptedEngine needs request_ids naming each prompt's script")
        outs = []
        for rid in request_ids:
            script = self.scripts.get(rid, [])
            turn = self._cursor.get(rid, 0)
            self._cursor[rid] = turn + 1
            text = script[turn] if turn < len(script) else ""
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            finished = len(ids) < sampling.max_tokens
            ids = ids[: sampling.max_tokens - 1] if finished else ids[: sampling.max_tokens]
            if finished and sampling.stop_token_id is not None:
                ids = ids + [sampling.stop_token_id]
            outs.append(GenOutput(ids, [0.0] * len(ids), finished))
        return outs

    def sync_weights(self, named_tensors: Any = None) -> None:
        """Scripts have no weights."""

    def sleep(self) -> None:
        """Nothing to release."""

    def wake(self) -> None:
        """Nothing to restore."""
