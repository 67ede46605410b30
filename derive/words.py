"""Words for counts in messages and reports, one place for every stage."""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """``1 output``, ``10 outputs``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
