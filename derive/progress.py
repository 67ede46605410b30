"""A one-line progress indicator on stderr, for work that can take a while.

Stages that loop over a network (the derivation, node by node; a document, formula by
formula) take an optional ``progress(what, done, total)`` callback and call it as they go; the
command line passes a :class:`Progress`. Nothing is shown for work that ends within ``after``
seconds. After that, on a terminal, one line is redrawn in place
(``derive: deriving 500/1000 (3.2 s)``), at most ten times a second, and cleared when the work
ends; elsewhere (a pipe, a log file) nothing is drawn, so captured output stays clean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Self, TextIO

#: The callback stages accept: (what is being done, how many done, how many in all).
Report = Callable[[str, int, int], None]


class Progress:
    """Draws ``derive: WHAT DONE/TOTAL (SECONDS s)`` on one line of ``stream``."""

    def __init__(self, stream: TextIO | None = None, *, after: float = 1.0,
                 every: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.after, self.every = after, every
        self.start = time.perf_counter()
        self.drawn_at: float | None = None
        self.width = 0
        self.live = self.stream.isatty()

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if not self.live or now - self.start < self.after:
            return
        if self.drawn_at is not None and now - self.drawn_at < self.every and done < total:
            return
        line = f"derive: {what} {done}/{total} ({now - self.start:.1f} s)"
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width, self.drawn_at = len(line), now

    def close(self) -> None:
        """Clear the line, if one was drawn."""
        if self.drawn_at is not None:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.drawn_at, self.width = None, 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
