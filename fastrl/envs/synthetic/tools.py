"""The synthetic world's tools: entity pools, schemas, implementations, `execute`, `answer_ok`.

A world is a plain dict of tables (`empty_world`); a tool reads or changes it in place. Calls are
checked against the offered tools and the schema before they run, and every problem (an unknown
tool or entity, a missing or mistyped argument, insufficient funds, a call past the time limit)
comes back as `{"error": ...}` for the model to read: model text is never evaluated.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

from fastrl.envs.base import ToolTimeout, call_with_timeout

MAX_ANSWER_CHARS = 200  # longer answers fail: listing many numbers must not pass the value check

# ---------------------------------------------------------------------------------------------
# Entity pools. The content_ood pools share no name with the training pools.

PEOPLE = (
    "Ana", "Ben", "Carla", "Dev", "Eva", "Finn", "Gia", "Hugo", "Ines", "Jon",
    "Kira", "Leo", "Mia", "Nico", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma",
    "Vera", "Wes", "Yara", "Zoe", "Ivan", "Lena", "Marco", "Nora", "Otto", "Rosa",
)  # fmt: skip
CITIES = (
    "Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Rome",
    "Delhi", "Berlin", "Madrid", "Seoul", "Dublin", "Vienna",
)  # fmt: skip
SKIES = ("sunny", "cloudy", "rainy", "windy", "snowy")
CURRENCIES = ("EUR", "GBP", "JPY", "INR", "CHF", "CAD")
TODO_ITEMS = (
    "buy milk", "call mom", "pay rent", "book dentist", "water plants",
    "fix bike", "read book", "clean desk", "walk dog", "bake bread",
)  # fmt: skip

OOD_PEOPLE = (
    "Aiko", "Bram", "Chidi", "Dagny", "Emeka", "Freya", "Goran", "Hana", "Idris", "Juno",
    "Kofi", "Lior", "Mateo", "Nadia", "Oren", "Priya", "Quinn", "Rafa", "Sven", "Tariq",
)  # fmt: skip
OOD_CITIES = (
    "Quito", "Hanoi", "Accra", "Perth", "Riga", "Osaka",
    "Lagos", "Bogota", "Tunis", "Manila", "Zagreb", "Denver",
)  # fmt: skip
OOD_ITEMS = ("lamp", "kettle", "chair", "tent", "drill", "guitar", "helmet", "blender")

# ---------------------------------------------------------------------------------------------
# Tool schemas and families.


def _schema(name: str, description: str, /, **params: str) -> dict:
    # Compact schemas (every parameter required, name -> JSON type): the system prompt is most of
    # an episode's tokens, and a tiny policy trains and samples faster on a short one.
    return {"name": name, "description": description, "parameters": dict(params)}


TOOLS: dict[str, dict] = {
    t["name"]: t
    for t in (
        _schema("lookup_user", "A user's id, city and account.", name="string"),
        _schema("get_weather", "Today's weather in a city.", city="string"),
        _schema(
            "convert",
            "Convert dollars to a currency.",
            amount="integer",
            currency="string",
        ),
        _schema("get_balance", "Balance of an account.", account="string"),
        _schema(
            "transfer",
            "Move dollars between accounts.",
            src="string",
            dst="string",
            amount="integer",
        ),
        _schema("add_todo", "Add to a user's todo list.", user_id="string", text="string"),
        _schema("find_member", "A club member's home city.", name="string"),
        _schema("find_flight", "A flight between two cities.", origin="string", dest="string"),
        _schema("book_flight", "Book a seat on a flight.", flight="string", passenger="string"),
        _schema("get_stock", "Stock and price of an item.", item="string"),
        _schema("order", "Order a quantity of an item.", item="string", qty="integer"),
    )
}

FAMILIES: dict[str, tuple[str, ...]] = {
    "directory": ("lookup_user",),
    "weather": ("get_weather",),
    "currency": ("convert",),
    "bank": ("get_balance", "transfer"),
    "todo": ("add_todo",),
}
OOD_FAMILIES: dict[str, tuple[str, ...]] = {
    "members": ("find_member",),
    "flights": ("find_flight", "book_flight"),
    "shop": ("get_stock", "order"),
}
FAMILY_OF = {
    tool: fam for fams in (FAMILIES, OOD_FAMILIES) for fam, ts in fams.items() for tool in ts
}

# World tables that tools may change; the final values of these are part of success.
STATEFUL = ("bank", "todos", "flights", "stock", "bookings")
_TABLES = ("users", "weather", "rates", "bank", "todos", "members", "flights", "stock")


def empty_world() -> dict:
    return {**{t: {} for t in _TABLES}, "bookings": []}


def snapshot(state: dict) -> dict:
    return copy.deepcopy({k: state[k] for k in STATEFUL})


def _quote(value: Any) -> str:
    """A short quotation of a model-supplied value for error messages."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def dumps(result: dict) -> str:
    """A tool result as the short JSON string the model sees."""
    return json.dumps(result, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Tool implementations over an in-memory world.


class _ToolError(Exception):
    """A failed call (unknown entity, insufficient funds, ...), reported to the model."""


def _find(table: dict, key: str, kind: str) -> Any:
    if key not in table:
        raise _ToolError(f"unknown {kind} {_quote(key)}")
    return table[key]


def _positive(value: int, what: str) -> None:
    if value <= 0:
        raise _ToolError(f"{what} must be positive")


def _lookup_user(w: dict, name: str) -> dict:
    return dict(_find(w["users"], name, "user"))


def _get_weather(w: dict, city: str) -> dict:
    return dict(_find(w["weather"], city, "city"))


def _convert(w: dict, amount: int, currency: str) -> dict:
    _positive(amount, "amount")
    rate = _find(w["rates"], currency, "currency")
    return {"amount": amount * rate, "currency": currency}


def _get_balance(w: dict, account: str) -> dict:
    return {"balance": _find(w["bank"], account, "account")}


def _transfer(w: dict, src: str, dst: str, amount: int) -> dict:
    _find(w["bank"], src, "account")
    _find(w["bank"], dst, "account")
    _positive(amount, "amount")
    if src == dst:
        raise _ToolError("src and dst must differ")
    if w["bank"][src] < amount:
        raise _ToolError(f"insufficient funds in {src}")
    w["bank"][src] -= amount
    w["bank"][dst] += amount
    return {"src_balance": w["bank"][src], "dst_balance": w["bank"][dst]}


def _add_todo(w: dict, user_id: str, text: str) -> dict:
    items = _find(w["todos"], user_id, "user_id")
    if not text.strip():
        raise _ToolError("text must not be empty")
    items.append(text)
    return {"count": len(items)}


def _find_member(w: dict, name: str) -> dict:
    return dict(_find(w["members"], name, "member"))


def _find_flight(w: dict, origin: str, dest: str) -> dict:
    for flight_id, f in w["flights"].items():
        if f["origin"] == origin and f["dest"] == dest:
            return {"flight": flight_id, "price": f["price"]}
    raise _ToolError(f"no flight from {_quote(origin)} to {_quote(dest)}")


def _book_flight(w: dict, flight: str, passenger: str) -> dict:
    f = _find(w["flights"], flight, "flight")
    if not passenger.strip():
        raise _ToolError("passenger must not be empty")
    if f["seats"] == 0:
        raise _ToolError(f"flight {flight} is full")
    f["seats"] -= 1
    w["bookings"].append([flight, passenger])
    return {"booked": flight, "seats_left": f["seats"]}


def _get_stock(w: dict, item: str) -> dict:
    return dict(_find(w["stock"], item, "item"))


def _order(w: dict, item: str, qty: int) -> dict:
    entry = _find(w["stock"], item, "item")
    _positive(qty, "qty")
    if qty > entry["stock"]:
        raise _ToolError(f"only {entry['stock']} {item} in stock")
    entry["stock"] -= qty
    return {"total": qty * entry["price"], "stock": entry["stock"]}


_IMPLS: dict[str, Callable[..., dict]] = {
    "lookup_user": _lookup_user,
    "get_weather": _get_weather,
    "convert": _convert,
    "get_balance": _get_balance,
    "transfer": _transfer,
    "add_todo": _add_todo,
    "find_member": _find_member,
    "find_flight": _find_flight,
    "book_flight": _book_flight,
    "get_stock": _get_stock,
    "order": _order,
}
_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
}


def execute(world: dict, allowed: set[str], name: Any, arguments: Any) -> dict:
    """Run one call against `world` (changed in place); problems come back as {"error": ...}.

    Only tools in `allowed` (those the task offers) exist; arguments are checked against the
    tool's schema before the call.
    """
    if not isinstance(name, str) or name not in allowed:
        return {"error": f"unknown tool {_quote(name)}; available: {', '.join(sorted(allowed))}"}
    if not isinstance(arguments, dict):
        return {"error": "arguments must be an object"}
    params = TOOLS[name]["parameters"]
    for arg in arguments:
        if arg not in params:
            return {"error": f"{name} has no argument {_quote(arg)}"}
    for arg in params:
        if arg not in arguments:
            return {"error": f"{name} is missing argument {arg!r}"}
    for arg, value in arguments.items():
        kind = params[arg]
        if not _TYPE_CHECKS[kind](value):
            return {"error": f"argument {arg!r} of {name} must be a {kind}"}
    try:
        return call_with_timeout(_IMPLS[name], world, **arguments)
    except _ToolError as e:
        return {"error": str(e)}
    except ToolTimeout as e:
        return {"error": f"{name} {e}"}


# ---------------------------------------------------------------------------------------------
# Answer checking.


def _normalize(text: str) -> str:
    return re.sub(r"(?<=\d),(?=\d{3})", "", text.lower())


def answer_ok(text: str, expected: list[str]) -> bool:
    """Whether a short answer contains every expected value as a whole word or number."""
    if len(text) > MAX_ANSWER_CHARS:
        return False
    norm = _normalize(text)
    return all(
        re.search(rf"(?<![\w.-]){re.escape(_normalize(v))}(?!\w|\.\d)", norm) for v in expected
    )
