"""User-facing errors: one exception type that carries where the problem is.

Every stage raises :class:`DeriveError` for bad input; the CLI prints ``str(err)`` as one line
and exits with code 2. Internal bugs are ordinary exceptions and are not caught there.
"""

from __future__ import annotations


class DeriveError(Exception):
    """Bad input from a user, with its location (file, field path, line) where known."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.field = field
        self.line = line

    def located(
        self, *, source: str | None = None, field: str | None = None, line: int | None = None
    ) -> DeriveError:
        """A copy with the missing location parts filled in."""
        return DeriveError(
            self.message,
            source=self.source or source,
            field=self.field or field,
            line=self.line or line,
        )

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = self.source + (f":{self.line}" if self.line else "")
        if self.field:
            where = f"{where}: {self.field}" if where else self.field
        return f"{where}: {self.message}" if where else self.message
