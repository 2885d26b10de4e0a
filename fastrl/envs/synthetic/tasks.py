"""Task generation for the synthetic world: the builder, the templates, the held-out hash.

A task draws 1-4 expert calls in all, split over 1-3 user turns; each turn is a template that asks
the builder for entities (which grows the initial world as it goes) and runs the expert's calls on
a live copy, so every recorded result is real. A hash of what the model sees of a task decides
whether it is a train or a held-out (test / format_ood) task, so no instance lands in both.

Everything is kept short and regular for tiny policies with small vocabularies: the system prompt
lists only the tool families the task needs plus at most one distractor family. Account numbers
(A10-A99), balances (20-99) and exchange rates (2-5) are drawn from small ranges, so the ids and
balances a `test` task copies are numbers the train tasks show often (converted amounts and
balances after a transfer still reach three digits): the presets' tokenizer keeps a frequent
number whole, and a tiny policy copies a whole number far more reliably than one split into
pieces (docs/DEMO_RL.md has the measurements).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastrl.envs.synthetic.tools import (
    CITIES,
    CURRENCIES,
    FAMILIES,
    FAMILY_OF,
    OOD_CITIES,
    OOD_FAMILIES,
    OOD_ITEMS,
    OOD_PEOPLE,
    PEOPLE,
    SKIES,
    TODO_ITEMS,
    TOOLS,
    empty_world,
    execute,
    snapshot,
)

# One content hash bucket in this many is held out for test / format_ood.
_HELD_OUT_EVERY = 5
_CALL_COUNT_WEIGHTS = {1: 30, 2: 35, 3: 25, 4: 10}
_TURN_COUNT_WEIGHTS = {1: 5, 2: 4, 3: 1}
_DISTRACTOR_PROB = 0.5

# ---------------------------------------------------------------------------------------------
# Task generation: a builder grows the world as templates ask for entities, and runs the expert's
# calls on a live copy so that every recorded result is real.


@dataclass
class _Turn:
    question: str
    answer: str
    expected: list[str]
    hint: str


class _Builder:
    def __init__(self, rng: random.Random, ood: bool) -> None:
        self.rng = rng
        self.people = OOD_PEOPLE if ood else PEOPLE
        self.cities = OOD_CITIES if ood else CITIES
        self.world = empty_world()  # the initial world, never changed by calls
        self.live = empty_world()  # the world the expert's calls run on
        self.calls: list[dict] = []
        self.families: set[str] = set()
        self._ids: set[str] = set()

    def _add(self, table: str, key: str, value: Any) -> None:
        self.world[table][key] = copy.deepcopy(value)
        self.live[table][key] = copy.deepcopy(value)

    def _fresh_id(self, prefix: str, lo: int, hi: int) -> str:
        while (ident := f"{prefix}{self.rng.randint(lo, hi)}") in self._ids:
            pass
        self._ids.add(ident)
        return ident

    def choose(self, *options: str) -> str:
        return self.rng.choice(options)

    def call(self, name: str, /, **arguments: Any) -> dict:
        result = execute(self.live, set(TOOLS), name, arguments)
        if "error" in result:
            raise RuntimeError(f"template bug: expert call {name} failed: {result['error']}")
        self.calls.append({"name": name, "arguments": arguments, "result": result})
        self.families.add(FAMILY_OF[name])
        return result

    def city(self, exclude: tuple[str, ...] = ()) -> str:
        city = self.rng.choice([c for c in self.cities if c not in exclude])
        if city not in self.world["weather"]:
            temp, sky = self.rng.randint(-5, 35), self.rng.choice(SKIES)
            self._add("weather", city, {"temp": temp, "sky": sky})
        return city

    def account(self) -> str:
        account = self._fresh_id("A", 10, 99)
        self._add("bank", account, self.rng.randint(20, 99))
        return account

    def person(self, exclude: tuple[str, ...] = (), city_not: tuple[str, ...] = ()) -> str:
        """A person of this world; an earlier one is reused sometimes so later turns build on it.

        Only people with money left are reused, so any of them can pay in a transfer.
        """
        known = [
            p
            for p, u in self.world["users"].items()
            if p not in exclude
            and u["city"] not in city_not
            and self.live["bank"][u["account"]] >= 5
        ]
        if known and self.rng.random() < 0.3:
            return self.rng.choice(known)
        name = self.rng.choice(
            [p for p in self.people if p not in self.world["users"] and p not in exclude]
        )
        user_id = self._fresh_id("u", 10, 99)
        user = {"user_id": user_id, "city": self.city(city_not), "account": self.account()}
        self._add("users", name, user)
        self._add("todos", user_id, self.rng.sample(TODO_ITEMS, self.rng.randint(0, 3)))
        return name

    def currency(self) -> str:
        currency = self.rng.choice(CURRENCIES)
        if currency not in self.world["rates"]:
            self._add("rates", currency, self.rng.randint(2, 5))
        return currency

    def member(self, exclude: tuple[str, ...] = (), home_not: tuple[str, ...] = ()) -> str:
        name = self.rng.choice(
            [p for p in self.people if p not in self.world["members"] and p not in exclude]
        )
        home = self.rng.choice([c for c in self.cities if c not in home_not])
        self._add("members", name, {"home": home})
        return name

    def flight(self, origin: str, dest: str) -> None:
        if any(f["origin"] == origin and f["dest"] == dest for f in self.world["flights"].values()):
            return
        flight = {
            "origin": origin,
            "dest": dest,
            "price": 10 * self.rng.randint(8, 90),
            "seats": self.rng.randint(3, 9),  # a task books at most 3 seats: never full
        }
        self._add("flights", self._fresh_id("F", 100, 999), flight)

    def route(self, origin_not: tuple[str, ...] = ()) -> tuple[str, str]:
        origin = self.rng.choice([c for c in self.cities if c not in origin_not])
        dest = self.rng.choice([c for c in self.cities if c != origin])
        self.flight(origin, dest)
        return origin, dest

    def item(self, exclude: tuple[str, ...] = ()) -> str:
        sold_out = [i for i, e in self.live["stock"].items() if e["stock"] == 0]
        item = self.rng.choice([i for i in OOD_ITEMS if i not in exclude and i not in sold_out])
        if item not in self.world["stock"]:
            self._add(
                "stock", item, {"stock": self.rng.randint(1, 20), "price": self.rng.randint(3, 60)}
            )
        return item


# --- train / test / format_ood templates ---------------------------------------------------


def _weather(b: _Builder) -> _Turn:
    city = b.city()
    r = b.call("get_weather", city=city)
    q = b.choose(f"What is the temperature in {city}?", f"How warm is it in {city} today?")
    return _Turn(
        q,
        f"It is {r['temp']} degrees in {city}.",
        [str(r["temp"])],
        f"Call get_weather for {city}.",
    )


def _user_city(b: _Builder) -> _Turn:
    name = b.person()
    r = b.call("lookup_user", name=name)
    q = b.choose(f"Which city does {name} live in?", f"Where does {name} live?")
    return _Turn(q, f"{name} lives in {r['city']}.", [r["city"]], f"Call lookup_user for {name}.")


def _balance(b: _Builder) -> _Turn:
    account = b.account()
    r = b.call("get_balance", account=account)
    q = b.choose(
        f"What is the balance of account {account}?", f"How much money is in account {account}?"
    )
    return _Turn(
        q,
        f"Account {account} has {r['balance']} dollars.",
        [str(r["balance"])],
        f"Call get_balance for {account}.",
    )


def _convert_usd(b: _Builder) -> _Turn:
    amount, currency = 5 * b.rng.randint(2, 40), b.currency()
    r = b.call("convert", amount=amount, currency=currency)
    q = b.choose(
        f"How much is {amount} dollars in {currency}?", f"Convert {amount} dollars to {currency}."
    )
    return _Turn(
        q,
        f"{amount} dollars is {r['amount']} {currency}.",
        [str(r["amount"])],
        f"Call convert with {amount} and {currency}.",
    )


def _send(b: _Builder) -> _Turn:
    src, dst = b.account(), b.account()
    amount = b.rng.randint(5, min(100, b.world["bank"][src]))
    r = b.call("transfer", src=src, dst=dst, amount=amount)
    q = b.choose(
        f"Send {amount} dollars from account {src} to account {dst}.",
        f"Please move {amount} dollars from account {src} to account {dst}.",
    )
    return _Turn(
        q,
        f"Done. Account {src} now has {r['src_balance']} dollars.",
        [str(r["src_balance"])],
        f"Call transfer from {src} to {dst} with {amount}.",
    )


def _todo(b: _Builder) -> _Turn:
    user_id = b.world["users"][b.person()]["user_id"]
    text = b.rng.choice(TODO_ITEMS)
    r = b.call("add_todo", user_id=user_id, text=text)
    q = b.choose(
        f"Add '{text}' to the todo list of user {user_id}.",
        f"Put '{text}' on the todo list of {user_id}.",
    )
    return _Turn(
        q,
        f"Added. User {user_id} now has {r['count']} todos.",
        [str(r["count"])],
        f"Call add_todo for {user_id}.",
    )


def _user_weather(b: _Builder) -> _Turn:
    name = b.person()
    city = b.call("lookup_user", name=name)["city"]
    r = b.call("get_weather", city=city)
    q = b.choose(
        f"What is the temperature where {name} lives?", f"How warm is it in {name}'s city today?"
    )
    return _Turn(
        q,
        f"It is {r['temp']} degrees in {city}.",
        [str(r["temp"])],
        f"Call lookup_user for {name}, then get_weather with the city.",
    )


def _user_balance(b: _Builder) -> _Turn:
    name = b.person()
    account = b.call("lookup_user", name=name)["account"]
    r = b.call("get_balance", account=account)
    q = b.choose(f"How much money does {name} have?", f"What is the balance of {name}'s account?")
    return _Turn(
        q,
        f"{name} has {r['balance']} dollars.",
        [str(r["balance"])],
        f"Call lookup_user for {name}, then get_balance with the account.",
    )


def _balance_convert(b: _Builder) -> _Turn:
    account, currency = b.account(), b.currency()
    balance = b.call("get_balance", account=account)["balance"]
    r = b.call("convert", amount=balance, currency=currency)
    q = b.choose(
        f"What is the balance of account {account} in {currency}?",
        f"How much is account {account} worth in {currency}?",
    )
    return _Turn(
        q,
        f"Account {account} has {r['amount']} {currency}.",
        [str(r["amount"])],
        f"Call get_balance for {account}, then convert the balance to {currency}.",
    )


def _user_todo(b: _Builder) -> _Turn:
    name, text = b.person(), b.rng.choice(TODO_ITEMS)
    user_id = b.call("lookup_user", name=name)["user_id"]
    r = b.call("add_todo", user_id=user_id, text=text)
    q = b.choose(f"Add '{text}' to {name}'s todo list.", f"Remind {name} to {text} with a todo.")
    return _Turn(
        q,
        f"Added. {name} now has {r['count']} todos.",
        [str(r["count"])],
        f"Call lookup_user for {name}, then add_todo with the user_id.",
    )


def _send_convert(b: _Builder) -> _Turn:
    src, dst, currency = b.account(), b.account(), b.currency()
    amount = b.rng.randint(5, min(100, b.world["bank"][src]))
    balance = b.call("transfer", src=src, dst=dst, amount=amount)["dst_balance"]
    r = b.call("convert", amount=balance, currency=currency)
    q = f"Send {amount} dollars from account {src} to {dst}, then give its balance in {currency}."
    return _Turn(
        q,
        f"Done. Account {dst} now has {r['amount']} {currency}.",
        [str(r["amount"])],
        f"Call transfer, then convert the dst_balance to {currency}.",
    )


def _user_send(b: _Builder) -> _Turn:
    src = b.person()
    dst = b.person(exclude=(src,))
    src_account = b.call("lookup_user", name=src)["account"]
    dst_account = b.call("lookup_user", name=dst)["account"]
    amount = b.rng.randint(5, min(100, b.live["bank"][src_account]))
    r = b.call("transfer", src=src_account, dst=dst_account, amount=amount)
    q = b.choose(
        f"Send {amount} dollars from {src} to {dst}.", f"{src} wants to pay {dst} {amount} dollars."
    )
    return _Turn(
        q,
        f"Done. {src} now has {r['src_balance']} dollars.",
        [str(r["src_balance"])],
        f"Call lookup_user for {src} and {dst}, then transfer between their accounts.",
    )


def _user_balance_convert(b: _Builder) -> _Turn:
    name, currency = b.person(), b.currency()
    account = b.call("lookup_user", name=name)["account"]
    balance = b.call("get_balance", account=account)["balance"]
    r = b.call("convert", amount=balance, currency=currency)
    q = b.choose(
        f"How much money does {name} have in {currency}?",
        f"What is {name}'s balance in {currency}?",
    )
    return _Turn(
        q,
        f"{name} has {r['amount']} {currency}.",
        [str(r["amount"])],
        f"Call lookup_user for {name}, get_balance, then convert to {currency}.",
    )


def _user_empty(b: _Builder) -> _Turn:
    name, dst = b.person(), b.account()
    account = b.call("lookup_user", name=name)["account"]
    balance = b.call("get_balance", account=account)["balance"]
    r = b.call("transfer", src=account, dst=dst, amount=balance)
    q = b.choose(
        f"Move all of {name}'s money to account {dst}.",
        f"Empty {name}'s account into account {dst}.",
    )
    return _Turn(
        q,
        f"Done. Account {dst} now has {r['dst_balance']} dollars.",
        [str(r["dst_balance"])],
        f"Call lookup_user for {name}, get_balance, then transfer it all to {dst}.",
    )


def _user_send_convert(b: _Builder) -> _Turn:
    src = b.person()
    dst = b.person(exclude=(src,))
    currency = b.currency()
    src_account = b.call("lookup_user", name=src)["account"]
    dst_account = b.call("lookup_user", name=dst)["account"]
    amount = b.rng.randint(5, min(100, b.live["bank"][src_account]))
    balance = b.call("transfer", src=src_account, dst=dst_account, amount=amount)["dst_balance"]
    r = b.call("convert", amount=balance, currency=currency)
    q = f"Send {amount} dollars from {src} to {dst}, then tell me {dst}'s balance in {currency}."
    return _Turn(
        q,
        f"Done. {dst} now has {r['amount']} {currency}.",
        [str(r["amount"])],
        f"Call lookup_user for {src} and {dst}, transfer, then convert to {currency}.",
    )


def _two_user_weather(b: _Builder) -> _Turn:
    first = b.person()
    second = b.person(exclude=(first,), city_not=(b.world["users"][first]["city"],))
    city1 = b.call("lookup_user", name=first)["city"]
    temp1 = b.call("get_weather", city=city1)["temp"]
    city2 = b.call("lookup_user", name=second)["city"]
    temp2 = b.call("get_weather", city=city2)["temp"]
    q = b.choose(
        f"What are the temperatures where {first} and {second} live?",
        f"How warm is it in the cities of {first} and {second}?",
    )
    return _Turn(
        q,
        f"It is {temp1} degrees in {city1} and {temp2} degrees in {city2}.",
        [str(temp1), str(temp2)],
        f"For {first} and then {second}: call lookup_user, then get_weather with the city.",
    )


def _user_empty_to_user(b: _Builder) -> _Turn:
    src = b.person()
    dst = b.person(exclude=(src,))
    src_account = b.call("lookup_user", name=src)["account"]
    balance = b.call("get_balance", account=src_account)["balance"]
    dst_account = b.call("lookup_user", name=dst)["account"]
    r = b.call("transfer", src=src_account, dst=dst_account, amount=balance)
    q = b.choose(f"Move all of {src}'s money to {dst}.", f"{src} gives all their money to {dst}.")
    return _Turn(
        q,
        f"Done. {dst} now has {r['dst_balance']} dollars.",
        [str(r["dst_balance"])],
        f"Call lookup_user for {src}, get_balance, lookup_user for {dst}, then transfer it all.",
    )


# --- content_ood templates ---------------------------------------------------------------------


def _stock(b: _Builder) -> _Turn:
    item = b.item()
    r = b.call("get_stock", item=item)
    q = b.choose(f"How many {item}s are in stock?", f"How many {item}s does the shop have?")
    return _Turn(
        q,
        f"There are {r['stock']} {item}s in stock.",
        [str(r["stock"])],
        f"Call get_stock for {item}.",
    )


def _flight_price(b: _Builder) -> _Turn:
    origin, dest = b.route()
    r = b.call("find_flight", origin=origin, dest=dest)
    q = f"How much is a flight from {origin} to {dest}?"
    return _Turn(
        q,
        f"The flight costs {r['price']} dollars.",
        [str(r["price"])],
        f"Call find_flight from {origin} to {dest}.",
    )


def _member_home(b: _Builder) -> _Turn:
    name = b.member()
    r = b.call("find_member", name=name)
    q = f"Which city is {name}'s home?"
    return _Turn(q, f"{name} lives in {r['home']}.", [r["home"]], f"Call find_member for {name}.")


def _order_some(b: _Builder) -> _Turn:
    item = b.item()
    qty = b.rng.randint(1, b.live["stock"][item]["stock"])
    r = b.call("order", item=item, qty=qty)
    q = f"Order {qty} {item}s for me."
    return _Turn(
        q,
        f"Ordered. The total is {r['total']} dollars.",
        [str(r["total"])],
        f"Call order for {qty} {item}s.",
    )


def _buy_all(b: _Builder) -> _Turn:
    item = b.item()
    stock = b.call("get_stock", item=item)["stock"]
    r = b.call("order", item=item, qty=stock)
    q = f"Buy every {item} that is in stock."
    return _Turn(
        q,
        f"Ordered. The total is {r['total']} dollars.",
        [str(r["total"])],
        f"Call get_stock for {item}, then order that many.",
    )


def _book(b: _Builder) -> _Turn:
    name = b.rng.choice(b.people)
    origin, dest = b.route()
    flight = b.call("find_flight", origin=origin, dest=dest)["flight"]
    b.call("book_flight", flight=flight, passenger=name)
    q = f"Book {name} on a flight from {origin} to {dest}."
    return _Turn(
        q,
        f"{name} is booked on flight {flight}.",
        [flight],
        f"Call find_flight, then book_flight for {name}.",
    )


def _member_price(b: _Builder) -> _Turn:
    name = b.member()
    home = b.world["members"][name]["home"]
    dest = b.rng.choice([c for c in b.cities if c != home])
    b.flight(home, dest)
    b.call("find_member", name=name)
    r = b.call("find_flight", origin=home, dest=dest)
    q = f"How much is a flight from {name}'s home to {dest}?"
    return _Turn(
        q,
        f"The flight costs {r['price']} dollars.",
        [str(r["price"])],
        f"Call find_member for {name}, then find_flight from the home to {dest}.",
    )


def _member_book(b: _Builder) -> _Turn:
    name = b.member()
    home = b.world["members"][name]["home"]
    dest = b.rng.choice([c for c in b.cities if c != home])
    b.flight(home, dest)
    b.call("find_member", name=name)
    flight = b.call("find_flight", origin=home, dest=dest)["flight"]
    b.call("book_flight", flight=flight, passenger=name)
    q = f"Book {name} on a flight from their home to {dest}."
    return _Turn(
        q,
        f"{name} is booked on flight {flight}.",
        [flight],
        f"Call find_member for {name}, find_flight from the home, then book_flight.",
    )


def _two_member_price(b: _Builder) -> _Turn:
    first = b.member()
    home1 = b.world["members"][first]["home"]
    second = b.member(exclude=(first,), home_not=(home1,))
    home2 = b.world["members"][second]["home"]
    b.flight(home1, home2)
    b.call("find_member", name=first)
    b.call("find_member", name=second)
    r = b.call("find_flight", origin=home1, dest=home2)
    q = f"How much is a flight from {first}'s home to {second}'s home?"
    return _Turn(
        q,
        f"The flight costs {r['price']} dollars.",
        [str(r["price"])],
        f"Call find_member for {first} and {second}, then find_flight between the homes.",
    )


def _visit(b: _Builder) -> _Turn:
    first = b.member()
    home1 = b.world["members"][first]["home"]
    second = b.member(exclude=(first,), home_not=(home1,))
    home2 = b.world["members"][second]["home"]
    b.flight(home1, home2)
    b.call("find_member", name=first)
    b.call("find_member", name=second)
    flight = b.call("find_flight", origin=home1, dest=home2)["flight"]
    b.call("book_flight", flight=flight, passenger=first)
    q = f"Book {first} on a flight to visit {second}."
    return _Turn(
        q,
        f"{first} is booked on flight {flight}.",
        [flight],
        f"Call find_member for both, find_flight between the homes, then book_flight for {first}.",
    )


def _buy_two(b: _Builder) -> _Turn:
    first = b.item()
    second = b.item(exclude=(first,))
    totals = []
    for item in (first, second):
        stock = b.call("get_stock", item=item)["stock"]
        totals.append(b.call("order", item=item, qty=stock)["total"])
    q = f"Buy every {first} and every {second} in stock."
    return _Turn(
        q,
        f"Ordered. The totals are {totals[0]} and {totals[1]} dollars.",
        [str(t) for t in totals],
        f"For {first} and {second}: call get_stock, then order that many.",
    )


_Template = Callable[[_Builder], _Turn]
TEMPLATES: dict[int, tuple[_Template, ...]] = {
    1: (_weather, _user_city, _balance, _convert_usd, _send, _todo),
    2: (_user_weather, _user_balance, _balance_convert, _user_todo, _send_convert),
    3: (_user_send, _user_balance_convert, _user_empty),
    4: (_user_send_convert, _two_user_weather, _user_empty_to_user),
}
OOD_TEMPLATES: dict[int, tuple[_Template, ...]] = {
    1: (_stock, _flight_price, _member_home, _order_some),
    2: (_buy_all, _book, _member_price),
    3: (_member_book, _two_member_price),
    4: (_visit, _buy_two),
}


def _weighted(rng: random.Random, weights: dict[int, int], at_most: int) -> int:
    options = [k for k in weights if k <= at_most]
    return rng.choices(options, [weights[k] for k in options])[0]


def _draw_content(rng: random.Random, ood: bool) -> dict:
    """One task's content: the world, the per-turn expert calls and answers, the tools offered."""
    n_calls = _weighted(rng, _CALL_COUNT_WEIGHTS, 4)
    n_turns = _weighted(rng, _TURN_COUNT_WEIGHTS, n_calls)
    cuts = sorted(rng.sample(range(1, n_calls), n_turns - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n_calls], strict=True)]
    templates = OOD_TEMPLATES if ood else TEMPLATES
    families_pool = OOD_FAMILIES if ood else FAMILIES

    b = _Builder(rng, ood)
    turns = []
    for size in sizes:
        b.calls = []
        turn = rng.choice(templates[size])(b)
        turns.append(
            {
                "question": turn.question,
                "calls": b.calls,
                "answer": turn.answer,
                "expected": turn.expected,
                "hint": turn.hint,
            }
        )
    # Templates add entities as they need them, so the expert's state after each turn comes from
    # re-running its calls on the complete initial world, as the env will.
    state = copy.deepcopy(b.world)
    for turn in turns:
        for c in turn["calls"]:
            execute(state, set(TOOLS), c["name"], c["arguments"])
        turn["state"] = snapshot(state)

    families = [f for f in families_pool if f in b.families]
    unused = [f for f in families_pool if f not in b.families]
    if unused and rng.random() < _DISTRACTOR_PROB:
        families.append(rng.choice(unused))
    rng.shuffle(families)
    tools = [TOOLS[t] for f in families for t in families_pool[f]]
    return {"world": b.world, "turns": turns, "tools": tools, "families": sorted(b.families)}


def content_key(turns: list[dict]) -> str:
    """A canonical string of what the model sees of a task: questions, calls, results, answers."""
    return json.dumps(
        [[t["question"], t["calls"], t["answer"]] for t in turns],
        sort_keys=True,
        ensure_ascii=False,
    )


def _held_out(turns: list[dict]) -> bool:
    digest = hashlib.sha256(content_key(turns).encode()).digest()
    return int.from_bytes(digest[:8], "big") % _HELD_OUT_EVERY == 0


def draw(stream: str, seed: int, index: int) -> dict:
    """Content of task `index` of `stream` (train | held_out | content_ood) for `seed`.

    Deterministic in its arguments: one random stream per task, so task i does not depend on how
    many tasks are drawn.
    """
    rng = random.Random(f"synthetic/{stream}/{seed}/{index}")
    ood = stream == "content_ood"
    while True:
        content = _draw_content(rng, ood)
        # A content hash, not the seed, decides train vs held out, so equal draws cannot land in
        # both; content_ood has its own pools and needs no such split.
        if ood or _held_out(content["turns"]) == (stream == "held_out"):
            return content
