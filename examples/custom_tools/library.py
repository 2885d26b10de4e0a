"""A library loan desk: the tools of the custom-world example (`env.tools: library.py:LoanDesk`).

Every public method is a tool the model may call; its type hints and docstring become the JSON
schema shown in the system prompt. `books` and `members` are public, so tasks can check them
(`expected_state`) after an episode.
"""

from __future__ import annotations


class LoanDesk:
    """Books on the shelf and the members who borrow them."""

    def __init__(self, books: dict | None = None, members: dict | None = None) -> None:
        # book id -> {"title": str, "copies": copies on the shelf}
        self.books = books or {}
        # card id -> {"name": str, "loans": [book ids]}
        self.members = members or {}

    def find_book(self, title: str) -> dict:
        """Look up a book by its title.

        Args:
            title: The book's title, e.g. "Dune".

        Returns:
            The book's id and the copies on the shelf.
        """
        for book_id, book in self.books.items():
            if book["title"].lower() == title.lower():
                return {"book_id": book_id, "copies": book["copies"]}
        raise KeyError(f"no book titled {title}")

    def card_of(self, name: str) -> str:
        """The library card id of a member.

        Args:
            name: The member's name, e.g. "Ana".
        """
        for card, member in self.members.items():
            if member["name"].lower() == name.lower():
                return card
        raise KeyError(f"no member named {name}")

    def lend(self, card: str, book_id: str) -> str:
        """Lend one copy of a book to a member.

        Args:
            card: The member's card id, e.g. "C31".
            book_id: The book's id, e.g. "B12".
        """
        member, book = self._member(card), self._book(book_id)
        if book["copies"] < 1:
            raise ValueError(f"no copy of {book_id} is on the shelf")
        book["copies"] -= 1
        member["loans"].append(book_id)
        return f"lent {book_id} to {card}"

    def take_back(self, card: str, book_id: str) -> str:
        """Take back a book a member returns.

        Args:
            card: The member's card id, e.g. "C31".
            book_id: The book's id, e.g. "B12".
        """
        member, book = self._member(card), self._book(book_id)
        if book_id not in member["loans"]:
            raise ValueError(f"{card} has not borrowed {book_id}")
        member["loans"].remove(book_id)
        book["copies"] += 1
        return f"{book_id} is back from {card}"

    def loans(self, card: str) -> list[str]:
        """The titles a member has on loan.

        Args:
            card: The member's card id, e.g. "C31".
        """
        return [self.books[b]["title"] for b in self._member(card)["loans"]]

    def _member(self, card: str) -> dict:
        if card not in self.members:
            raise KeyError(f"no card {card}")
        return self.members[card]

    def _book(self, book_id: str) -> dict:
        if book_id not in self.books:
            raise KeyError(f"no book {book_id}")
        return self.books[book_id]
