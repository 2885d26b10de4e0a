"""Tool-call syntaxes: Hermes JSON blocks and Python-list calls.

Both formats list the tools as JSON schemas, one per line, inside `<tools>` ... `</tools>`, and
differ in how calls are written:

- hermes:   `<tool_call>\\n{"name": "f", "arguments": {"a": 1}}\\n</tool_call>`, one block per call;
- pythonic: `[f(a=1), g(b='x')]`, keyword arguments with literal values only.

Parsers never raise and never evaluate model text: the pythonic parser builds an AST and accepts
only plain names, keyword arguments and JSON-like literals.
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from typing import Any

from fastrl.envs.base import Format, Parsed, ToolCall

# Parsing untrusted text can fail deep inside the stdlib in several ways: syntax errors, digit
# limits (ValueError), nesting (RecursionError), or the C parser's stack limit (MemoryError).
_PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError, TypeError)

_SNIPPET_CHARS = 60


def _snippet(text: str) -> str:
    """A short quotation of model text for error messages, so huge inputs stay out of the chat."""
    text = text.strip()
    return repr(text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "...")


def _tools_block(tools: list[dict]) -> str:
    lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return f"<tools>\n{lines}\n</tools>"


class HermesFormat:
    """Calls as JSON objects inside `<tool_call>` tags (the Hermes / Qwen convention)."""

    name = "hermes"
    _OPEN = "<tool_call>"
    _CLOSE = "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def render_tools(self, tools: list[dict]) -> str:
        """Tool list plus a one-example call instruction."""
        return (
            f"Tools:\n{_tools_block(tools)}\n"
            "To call a tool, reply with:\n"
            '<tool_call>\n{"name": "tool_name", "arguments": {"arg": "value"}}\n</tool_call>'
        )

    def render_calls(self, calls: list[ToolCall]) -> str:
        """One `<tool_call>` block per call, separated by newlines."""
        return "\n".join(
            f"{self._OPEN}\n"
            + json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False)
            + f"\n{self._CLOSE}"
            for c in calls
        )

    def parse(self, text: str) -> Parsed:
        """Every `<tool_call>` must be closed and hold {"name": str, "arguments": object}."""
        if not isinstance(text, str) or self._OPEN not in text:
            return Parsed([])
        blocks = self._BLOCK.findall(text)
        if len(blocks) != text.count(self._OPEN):
            return Parsed([], error=f"every {self._OPEN} needs a matching {self._CLOSE}")
        calls = []
        for block in blocks:
            try:
                obj = json.loads(block)
            except _PARSE_ERRORS:
                return Parsed([], error=f"invalid JSON in tool call: {_snippet(block)}")
            if not isinstance(obj, dict):
                return Parsed([], error='a tool call must be a JSON object {"name", "arguments"}')
            name, arguments = obj.get("name"), obj.get("arguments")
            if not isinstance(name, str) or not name:
                return Parsed([], error='a tool call needs a string "name"')
            if not isinstance(arguments, dict):
                return Parsed([], error=f'"arguments" of {_snippet(name)} must be a JSON object')
            calls.append(ToolCall(name, arguments))
        return Parsed(calls)


def _py_literal(value: Any) -> str:
    """Python source for a JSON-like value (str keys, finite numbers)."""
    if isinstance(value, dict):
        items = ", ".join(f"{_py_literal(k)}: {_py_literal(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    return repr(value)


def _json_like(value: Any) -> bool:
    """True for values a JSON tool argument can hold: sets, bytes, complex and the like are not."""
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_json_like(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_like(v) for k, v in value.items())
    return False


def _tuples_to_lists(value: Any) -> Any:
    """`literal_eval` yields tuples for `(1, 2)`; tool arguments are JSON, which has only lists."""
    if isinstance(value, tuple | list):
        return [_tuples_to_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _tuples_to_lists(v) for k, v in value.items()}
    return value


class PythonicFormat:
    """Calls as a Python list of keyword-argument calls, e.g. `[f(a=1), g(b=[1, 2])]`."""

    name = "pythonic"

    def render_tools(self, tools: list[dict]) -> str:
        """Tool list plus a one-example call instruction."""
        return (
            f"Tools:\n{_tools_block(tools)}\n"
            "To call tools, reply with a Python list of calls:\n"
            "[tool_name(arg='value')]"
        )

    def render_calls(self, calls: list[ToolCall]) -> str:
        """`[f(a=1, b='x'), g(c=[1, 2])]`."""
        rendered = (
            f"{c.name}(" + ", ".join(f"{k}={_py_literal(v)}" for k, v in c.arguments.items()) + ")"
            for c in calls
        )
        return "[" + ", ".join(rendered) + "]"

    def parse(self, text: str) -> Parsed:
        """The whole stripped message must be a list of `name(key=literal, ...)` calls."""
        if not isinstance(text, str):
            return Parsed([])
        source = text.strip()
        if not (source.startswith("[") and "(" in source):
            return Parsed([])
        try:
            # Odd escapes in model strings raise SyntaxWarnings that would flood training logs.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(source, mode="eval")
        except _PARSE_ERRORS:
            return Parsed([], error=f"not a valid Python list of calls: {_snippet(source)}")
        if not isinstance(tree.body, ast.List):
            return Parsed([], error="the message must be a single Python list of calls")
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                return Parsed([], error="each list item must be a call like tool_name(arg=value)")
            name = node.func.id
            if node.args:
                return Parsed([], error=f"{name}: use keyword arguments only")
            arguments = {}
            for kw in node.keywords:
                if kw.arg is None:
                    return Parsed([], error=f"{name}: ** arguments are not allowed")
                if kw.arg in arguments:
                    return Parsed([], error=f"{name}: argument {kw.arg} given twice")
                try:
                    value = _tuples_to_lists(ast.literal_eval(kw.value))
                except _PARSE_ERRORS:
                    return Parsed([], error=f"{name}: argument {kw.arg} must be a literal value")
                if not _json_like(value):
                    return Parsed(
                        [],
                        error=f"{name}: argument {kw.arg} must be a string, number, "
                        "boolean, None, list or dict",
                    )
                arguments[kw.arg] = value
            calls.append(ToolCall(name, arguments))
        if not calls:
            return Parsed([], error="the list of calls is empty")
        return Parsed(calls)


FORMATS: dict[str, type] = {"hermes": HermesFormat, "pythonic": PythonicFormat}


def get_format(name: str) -> Format:
    """The format called `name`; ValueError lists the known ones."""
    if name not in FORMATS:
        raise ValueError(f"unknown tool-call format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]()
