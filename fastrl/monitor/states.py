"""Structural states of assistant messages (PAPER.md §2).

Every assistant message is one of:

- `healthy_call`: only well-formed tool calls in the task's syntax (whitespace around them allowed);
- `healthy_text`: a non-empty plain-text reply with no call syntax or control tags in it;
- `pollution`: call syntax mixed with stray text, malformed calls, or control tags (`<tool_call>`,
  `<tool_response>`, `<|im_start|>`...) inside a text reply;
- `collapse`: an empty turn, or a call opened and closed at once (`<tool_call>` followed by nothing
  but whitespace or the end of the turn), the collapse the paper reports.

`state_fractions` turns a list of states into the `state/*` metrics.
"""

from __future__ import annotations

import re

from fastrl.envs.formats import get_format

STATES = ("healthy_call", "healthy_text", "pollution", "collapse")
_TAGS = re.compile(r"<\|im_start\|>|<\|im_end\|>|</?tool_call>|</?tool_response>|</?tools>")
_BLOCK = re.compile(r"<tool_call>.*?</tool_call>", re.DOTALL)
_PY_CALL = re.compile(r"^\s*\[\s*[A-Za-z_][A-Za-z0-9_.]*\s*\(")


def classify(text: str, fmt: str = "hermes") -> str:
    """The structural state of one assistant message written for a task in syntax `fmt`."""
    body = text.strip()
    if not body or re.fullmatch(r"(<tool_call>\s*)+(</tool_call>\s*)*", body):
        return "collapse"
    parsed = get_format(fmt).parse(text)
    if parsed.error is None and parsed.calls:
        if fmt == "hermes":
            rest = _BLOCK.sub("", body).strip()
            return "healthy_call" if not rest else "pollution"
        return "healthy_call"  # the Python-list parser accepts nothing but the list
    if (
        parsed.error is not None
        or _TAGS.search(body)
        or (fmt == "pythonic" and _PY_CALL.match(body))
    ):
        return "pollution"
    return "healthy_text"


def state_fractions(states: list[str]) -> dict[str, float]:
    """`state/<name>` fractions over `states` (all four keys, zeros when empty)."""
    n = max(1, len(states))
    return {f"state/{s}": sum(1 for x in states if x == s) / n for s in STATES}


def healthy_fraction(states: list[str]) -> float:
    """Fraction of `states` that are healthy (a call or a text reply); 0 for no messages."""
    return sum(1 for s in states if s in ("healthy_call", "healthy_text")) / max(1, len(states))
