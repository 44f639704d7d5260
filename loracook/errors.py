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


# ------------------------------------------------------------------------------------------ the environment

# errno -> (what happened, how to fix it). These are the failures of the machine, not of loracook: the CLI turns
# them into one line with the path (exit 2) instead of a traceback, whichever code path hit them.
_OS_FIXES: dict[str, tuple[str, str]] = {
    "EACCES": ("permission denied", "make it writable (or readable) for this user, or choose another path"),
    "EPERM": ("operation not permitted", "check the permissions, or choose another path"),
    "EROFS": ("read-only file system", "write the output to a writable disk (--output)"),
    "ENOSPC": ("no space left on the device", "free some space, or write the output to another disk"),
    "EDQUOT": ("disk quota exceeded", "free some space, or write the output to another disk"),
    "EFBIG": (
        "file too large for the file-size limit (ulimit -f) or the file system",
        "raise the limit (`ulimit -f unlimited`) or write smaller shards (output.shard_size)",
    ),
    "ENOTDIR": ("a part of the path is a file, not a folder", "fix the path"),
    "EISDIR": ("a folder where a file was expected", "fix the path"),
    "ENOENT": ("no such file or folder", "check the path (was it removed while loracook ran?)"),
    "ENAMETOOLONG": ("the path is too long", "choose a shorter path"),
    "ELOOP": ("too many levels of symbolic links", "fix the links in the path"),
    "EMFILE": ("too many open files", "raise the limit (`ulimit -n`)"),
    "EIO": ("input/output error", "check the disk (dmesg) and try again"),
}


def os_error_line(exc: OSError) -> str | None:
    """One line for an OSError caused by the environment (permissions, full disk, file-size limit, read-only
    disk, a vanished path), naming the path and the fix; None for an errno that means a bug in loracook."""
    import errno as errno_module

    name = errno_module.errorcode.get(exc.errno or -1, "")
    if name not in _OS_FIXES:
        return None
    what, fix = _OS_FIXES[name]
    paths = [str(p) for p in (exc.filename, exc.filename2) if p not in (None, "")]
    where = " -> ".join(paths)
    text = f"{where}: {what}" if where else what
    return " ".join(f"{text} ({name}); {fix}".split())
