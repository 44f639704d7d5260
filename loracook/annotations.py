"""GitHub Actions annotations for bad recipes: ``loracook validate --format github``.

A workflow step that prints ``::error file=F,line=L,col=C::message`` makes GitHub show the message on that line
of the pull request's diff, as ruff's ``--output-format github`` does. The escaping follows the runner's own
rules (actions/toolkit ``command.ts``): in the message ``%``, CR and LF are percent-encoded; in a property value
``:`` and ``,`` are too, because they separate the properties from each other and from the message.

This module has no dependency beyond :mod:`loracook.errors`, so the CLI can import it without torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from loracook.errors import BadInput

__all__ = ["escape_data", "escape_property", "github_line", "github_lines"]


def escape_data(text: str) -> str:
    """Escape the message part of a workflow command (after the ``::``)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a property value (``file=...``): also ``:`` and ``,``, the property and message separators."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _relative(file: str, root: str | Path | None) -> str:
    """GitHub matches annotations against paths relative to the repository root; keep others as given."""
    base = Path(root) if root is not None else Path.cwd()
    try:
        return Path(os.path.relpath(Path(file).resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return file


def _message(error: BadInput) -> str:
    """The problem and its fix, without the ``file:line:col:`` prefix that the properties already carry."""
    text = error.message if not error.fix else f"{error.message}; {error.fix}"
    return " ".join(text.split())


def github_line(
    error: BadInput, *, root: str | Path | None = None, level: str = "error", title: str | None = None
) -> str:
    """One ``::error`` workflow command for ``error``.

    ``file`` is made relative to ``root`` (default: the working directory, which is the checkout in a workflow)
    when it lies inside it, because GitHub only places annotations on paths relative to the repository root;
    ``line`` and ``col`` (1-based, as the recipe layer records them) are left out when unknown, and the
    annotation then lands on the file. ``level`` is ``error``, ``warning`` or ``notice``.
    """
    if level not in ("error", "warning", "notice"):
        raise ValueError(f"level must be error, warning or notice, not {level!r}")
    props: list[str] = []
    if error.file:
        rel = _relative(error.file, root)
        if rel.startswith("../"):  # outside the checkout: the absolute path is the most useful
            rel = error.file
        props.append(f"file={escape_property(rel)}")
        if error.line is not None:
            props.append(f"line={int(error.line)}")
            if error.column is not None:
                props.append(f"col={int(error.column)}")
    if title:
        props.append(f"title={escape_property(title)}")
    head = f"::{level} {','.join(props)}" if props else f"::{level}"
    return f"{head}::{escape_data(_message(error))}"


def github_lines(errors: list[BadInput], **kwargs) -> list[str]:
    """One annotation per error, in order (``validate`` reports every bad recipe, not only the first)."""
    return [github_line(error, **kwargs) for error in errors]
