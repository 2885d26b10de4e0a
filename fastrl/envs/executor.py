"""Safe execution of tool calls on live Python objects, shared by the BFCL and custom worlds.

A call runs only if its name is one of the offered public methods; its arguments must be JSON
values (finite numbers, string keys, bounded nesting) that bind to the method's signature
(`inspect.signature(...).bind`) and, where a JSON schema is known, have the schema's types.
Everything else, an exception inside the method and a call past the tool timeout
(`call_with_timeout`) come back as an error observation: no model text is ever evaluated and no
failure escapes. Results are JSON-serialised (anything JSON cannot hold as `str`); a result over
`max_output_chars` ran (the state may have changed) but the model is shown an error instead.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from fastrl.envs.base import ToolTimeout, call_with_timeout

# JSON-schema type name -> the Python types of a JSON value that have it.
_SCHEMA_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def json_literal(value: Any, depth: int = 0) -> bool:
    """True for a JSON value: None, bool, str, finite numbers, lists, string-keyed objects."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, (int, float)):
        return not (isinstance(value, float) and not math.isfinite(value))
    if isinstance(value, list):
        return all(json_literal(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and json_literal(v, depth + 1) for k, v in value.items())
    return False


def type_problem(value: Any, schema: Mapping[str, Any]) -> str | None:
    """Why JSON `value` does not have the type `schema` declares (None when it does or when the
    schema declares none); `bool` is not an integer."""
    wanted = schema.get("type")
    if wanted is None:
        return None
    names = wanted if isinstance(wanted, list) else [wanted]
    for name in names:
        types = _SCHEMA_TYPES.get(name)
        if types is None:
            return None  # a type this check does not know: left to the method
        if isinstance(value, bool) and name not in ("boolean",):
            continue
        if isinstance(value, types):
            if name == "array" and isinstance(schema.get("items"), Mapping):
                for i, item in enumerate(value):
                    problem = type_problem(item, schema["items"])
                    if problem:
                        return f"item {i}: {problem}"
            return None
    return f"expected {' or '.join(names)}, got {type(value).__name__}"


def dumps_result(result: Any) -> str:
    """A method's result as observation text: strings as they are, else JSON, else `str`."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result)
    except (TypeError, ValueError):
        return str(result)


class MethodExecutor:
    """Guarded calls of named methods (`methods`: name -> bound method, read at each call).

    `schemas` (name -> JSON schema of the parameters) adds a type check of each argument.
    Errors read `Error: ...` (BFCL's observations), or with `json_errors` `{"error": "..."}`,
    an exception inside a method `{"error": "Type: message"}`.
    """

    def __init__(
        self,
        methods: dict[str, Callable[..., Any]],
        *,
        max_output_chars: int = 4000,
        schemas: Mapping[str, Mapping[str, Any]] | None = None,
        json_errors: bool = False,
    ) -> None:
        self.methods = methods
        self.max_output_chars = max_output_chars
        self.schemas = schemas or {}
        self.json_errors = json_errors

    def _error(self, message: str) -> tuple[str, None]:
        if self.json_errors:
            return json.dumps({"error": message}), None
        return f"Error: {message}", None

    def call(
        self, name: Any, arguments: Any, allowed: set[str], positional: tuple = ()
    ) -> tuple[str, str | None]:
        """Run one call; returns (observation for the model, result text or None if it did not
        run)."""
        if not isinstance(name, str) or name not in allowed or name.startswith("_"):
            return self._error(f"unknown function {str(name)[:60]!r}")
        method = self.methods.get(name)
        if method is None:
            return self._error(f"unknown function {name!r}")
        if not isinstance(arguments, dict) or not all(isinstance(k, str) for k in arguments):
            return self._error(f"{name}: arguments must be an object of named values")
        if not json_literal(arguments) or not json_literal(list(positional)):
            return self._error(f"{name}: arguments must be JSON literals")
        try:
            bound = inspect.signature(method).bind(*positional, **arguments)
        except TypeError as e:
            return self._error(f"{name}: {e}")
        properties = self.schemas.get(name, {}).get("properties", {})
        for arg, value in bound.arguments.items():
            problem = type_problem(value, properties.get(arg, {}))
            if problem:
                return self._error(f"{name}: argument {arg!r}: {problem}")
        try:
            result = call_with_timeout(method, *bound.args, **bound.kwargs)
        except ToolTimeout as e:
            return self._error(f"{name} {e}")
        except Exception as e:  # the method's own failure: an observation, not a crash
            if self.json_errors:
                return self._error(f"{type(e).__name__}: {str(e)[:300]}")
            return f"Error during execution: {type(e).__name__}: {str(e)[:300]}", None
        text = dumps_result(result)
        if len(text) > self.max_output_chars:
            shown, _ = self._error(f"{name}: output of {len(text)} characters exceeds the limit")
            return shown, text
        return text, text
