"""The words of a message that follow a number: one place for the plural, so that every message says
'1 event', '2 events' (and '1 copy', '3 copies')."""
from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 event', '0 events', '2 events': `n` and `noun`, in the plural (`plural`, or noun + 's') unless n is 1."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
