"""The one exception type for bad input.

Anything the user can fix (a recipe, a file, an option) raises :class:`BadInput`. The CLI prints it as one line
and exits 2; every other exception is an internal error (exit 1). ``loc`` is a path into the recipe, such as
``("sources", "med")``, that the recipe layer turns into a YAML line; the engine never sees YAML itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class BadInput(Exception):
    """A problem the user can fix: names the file, where in the recipe, and how to fix it."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        loc: Sequence[str | int] | None = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = str(file) if file is not None else None
        self.loc = tuple(loc) if loc else None
        self.fix = fix
        self.line: int | None = None  # filled in by the recipe layer when it knows the YAML position
        self.column: int | None = None

    def one_line(self) -> str:
        where = self.file or ""
        if where and self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text += f"; {self.fix}"
        return " ".join(text.split())  # one line, always


class Unsupported(BadInput):
    """A recipe feature that loracook does not do (yet); never silently ignored."""
