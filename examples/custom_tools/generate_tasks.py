"""Write tasks.jsonl for the loan-desk example, deterministically: `python generate_tasks.py`.

Each task draws a small library (4 books, 3 members, some loans) and 1-2 user turns from five
templates (copies on the shelf, lend, return, a member's loans, and two-turn follow-ups). The
solution's calls run on a live `LoanDesk`, so every answer and the final state are real; the
final state is each task's `expected_state`.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

from library import LoanDesk

TITLES = [
    "Dune", "Emma", "Ulysses", "Beloved", "Rebecca", "Dracula", "Persuasion", "Middlemarch",
    "Frankenstein", "Matilda", "Coraline", "Walden",
]  # fmt: skip
NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jon", "Kai", "Lea"]
N_TRAIN, N_TEST = 400, 60


def library(rng: random.Random) -> dict:
    ids = rng.sample(range(10, 100), 7)
    books = {
        f"B{i}": {"title": t, "copies": rng.randint(1, 5)}
        for i, t in zip(ids[:4], rng.sample(TITLES, 4), strict=True)
    }
    members = {f"C{i}": {"name": n, "loans": []} for i, n in zip(ids[4:], rng.sample(NAMES, 3))}
    for card in members:
        for book_id in rng.sample(sorted(books), rng.randint(0, 2)):
            members[card]["loans"].append(book_id)
    return {"books": books, "members": members}


class Turns:
    """Builds a task's turns while running the solution on a live desk."""

    def __init__(self, state: dict) -> None:
        self.desk = LoanDesk(**copy.deepcopy(state))
        self.turns: list[str] = []
        self.solution: list[list[dict]] = []
        self.answers: list[str] = []
        self.expected: list[list[str]] = []

    def call(self, tool: str, **arguments):
        self.solution[-1].append({"name": tool, "arguments": arguments})
        return getattr(self.desk, tool)(**arguments)

    def turn(self, question: str) -> None:
        self.turns.append(question)
        self.solution.append([])

    def answer(self, text: str, expected: list[str]) -> None:
        self.answers.append(text)
        self.expected.append(expected)


def copies(t: Turns, rng: random.Random, title: str) -> None:
    t.turn(f"How many copies of {title} are on the shelf?")
    n = t.call("find_book", title=title)["copies"]
    t.answer(f"{n} copies of {title} are on the shelf.", [str(n)])


def lend(t: Turns, rng: random.Random, title: str, name: str, question: str | None = None) -> None:
    t.turn(question or f"Please lend {title} to {name}.")
    card = t.call("card_of", name=name)
    book_id = t.call("find_book", title=title)["book_id"]
    t.call("lend", card=card, book_id=book_id)
    t.answer(f"Done, {title} is lent to {name}.", [title])


def give_back(t: Turns, rng: random.Random, title: str, name: str) -> None:
    t.turn(f"{name} brings back {title}.")
    card = t.call("card_of", name=name)
    book_id = t.call("find_book", title=title)["book_id"]
    t.call("take_back", card=card, book_id=book_id)
    t.answer(f"Thanks, {title} is back.", [title])


def loans(t: Turns, rng: random.Random, name: str) -> list[str]:
    t.turn(f"Which books does {name} have?")
    card = t.call("card_of", name=name)
    titles = t.call("loans", card=card)
    if titles:
        t.answer(f"{name} has {' and '.join(titles)}.", titles)
    else:
        t.answer(f"{name} has no books.", ["no"])
    return titles


def draw(rng: random.Random) -> dict:
    state = library(rng)
    t = Turns(state)
    books = {b["title"]: i for i, b in state["books"].items()}
    members = state["members"]
    title = rng.choice(sorted(books))
    card = rng.choice(sorted(members))
    name = members[card]["name"]
    kind = rng.choice(["copies", "lend", "return", "loans", "copies+lend", "loans+return",
                       "lend+copies"])  # fmt: skip
    borrowed = [b for b in members[card]["loans"]]
    if kind in ("return", "loans+return") and not borrowed:
        kind = "lend"
    if kind == "copies":
        copies(t, rng, title)
    elif kind == "lend":
        lend(t, rng, title, name)
    elif kind == "return":
        give_back(t, rng, state["books"][rng.choice(borrowed)]["title"], name)
    elif kind == "loans":
        loans(t, rng, name)
    elif kind == "copies+lend":
        copies(t, rng, title)
        lend(t, rng, title, name, question=f"Then lend it to {name}.")
    elif kind == "loans+return":
        titles = loans(t, rng, name)
        give_back(t, rng, rng.choice(titles), name)
    else:
        lend(t, rng, title, name)
        copies(t, rng, title)
    row: dict = {"turns": t.turns} if len(t.turns) > 1 else {"question": t.turns[0]}
    return {
        **row,
        "initial_state": state,
        "expected": t.expected,
        "expected_state": {"books": t.desk.books, "members": t.desk.members},
        "solution": t.solution,
        "answers": t.answers,
    }


def main() -> None:
    rows = []
    for split, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        rng = random.Random(seed)
        for i in range(n):
            rows.append({"id": f"library/{split}/{i:04d}", "split": split, **draw(rng)})
    out = Path(__file__).with_name("tasks.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} tasks to {out}")


if __name__ == "__main__":
    main()
