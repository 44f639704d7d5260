"""The one rule for an output path (:func:`check_destination`): never replace or delete an input, anything that
contains one, the recipe's folder, the current or home folder; checked before any work and again at commit."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from loracook.errors import BadInput


def check_destination(dest: str | Path, *, force: bool, protect: Iterable[str | Path] = ()) -> Path:
    """The one rule for an output path; raises BadInput (one line, with the fix) before any work is done.

    Refused whatever ``--force`` says: an empty path or ``.``; the current folder, the home folder, ``/`` or
    any of their parents; a path that is, contains or lies inside one of ``protect`` (the run's inputs, and
    the recipe file, so its folder is refused too); a symbolic link (a dangling one would fail only after all
    the work, and replacing a link would silently move the output elsewhere); a file. An existing folder is
    refused without ``force``. Compared after resolving symlinks, so no spelling of a path slips through.

    >>> check_destination("", force=True)  # doctest: +SKIP
    BadInput: the output path is empty (or `.`, the current folder)
    """
    raw = os.fspath(dest)
    if raw.strip() in ("", "."):
        raise BadInput(
            "the output path is empty (or `.`, the current folder)",
            file=repr(raw),
            fix="name a new folder, e.g. --output out/merged",
        )
    path = Path(raw)
    real = Path(os.path.realpath(path))
    _refuse_special(path, real)
    _refuse_inputs(path, real, protect)
    if os.path.islink(path):
        what = "a symbolic link" if path.exists() else "a symbolic link to nothing (dangling)"
        raise BadInput(
            f"the output path is {what}, pointing to {os.readlink(path)}",
            file=path,
            fix="remove the link, or give the real folder as the output",
        )
    if path.exists():
        if not path.is_dir():
            raise BadInput("the output path is a file, not a folder", file=path, fix="choose another path")
        if not force:
            raise BadInput("the output already exists", file=path, fix="pass --force to replace it")
    else:
        _refuse_file_in_path(path)
    return path


def _refuse_special(path: Path, real: Path) -> None:
    places = (
        (Path(os.path.realpath(os.getcwd())), "the current folder"),
        (Path(os.path.realpath(os.path.expanduser("~"))), "the home folder"),
        (Path("/"), "the root folder"),
    )
    for place, what in places:
        if real == place or real in place.parents:
            relation = "" if real == place else "a parent of "
            raise BadInput(
                f"the output path is {relation}{what}, which loracook would replace",
                file=path,
                fix="name a new folder, e.g. --output out/merged",
            )


def _refuse_inputs(path: Path, real: Path, protect: Iterable[str | Path]) -> None:
    for item in protect:
        if item is None or os.fspath(item) == "":
            continue
        guarded = Path(os.path.realpath(item))
        if real == guarded:
            relation = "is"
        elif real in guarded.parents:
            relation = "contains"
        elif guarded in real.parents and guarded.is_dir():
            relation = "lies inside"
        else:
            continue
        raise BadInput(
            f"the output folder {relation} an input of this run ({item})",
            file=path,
            fix="choose another output path; loracook never replaces, deletes or writes into its inputs",
        )


def _refuse_file_in_path(path: Path) -> None:
    for ancestor in path.parents:
        if ancestor.exists() or os.path.islink(ancestor):
            if not ancestor.is_dir():
                raise BadInput(
                    "a part of the output path is a file, not a folder",
                    file=ancestor,
                    fix="fix the output path",
                )
            return
