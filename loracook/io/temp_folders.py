"""Temporary folders beside an output, named so that a later run recognises them: the pid and the time are in
the name, so :func:`sweep_stale` removes what a killed run left behind (and puts back an old output that a killed
commit had moved aside); :func:`work_folder` for work files that are never part of an output."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loracook.errors import BadInput
from loracook.io.locks import _dest_lock, _hold_owner_lock, _owner_lock_held, _remove_idle_lock
from loracook.io.signals import register_cleanup, unregister_cleanup

STALE_AFTER_S = 3600  # an unlocked temporary folder this old is stale even if its pid is alive (pid reuse)
# .{dest name}.loracook-{new|old|work}-{pid}-{unix time}-{random}: a run's new output, an old one moved aside,
# or a run's work folder (adapters extracted on the way)
_TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.loracook-(?P<kind>new|old|work)-(?P<pid>\d+)-(?P<time>\d+)-[a-z0-9_]+$"
)
_LOCK_NAME = re.compile(r"^\.(?P<name>.+)\.loracook-lock$")


def temp_prefix(name: str, kind: str = "new") -> str:
    """The start of a temporary name beside ``name`` that a later run recognises: it embeds the pid and the
    time, so :func:`sweep_stale` can tell a folder left by a killed run from one that a live run is writing."""
    return f".{name}.loracook-{kind}-{os.getpid()}-{int(time.time())}-"


@contextmanager
def work_folder(dest: str | Path) -> Iterator[Path]:
    """A temporary work folder beside ``dest`` (e.g. for adapters extracted before the merge), removed when the
    block ends, whatever ends it; named and locked like an output's temporary folder, so that after a SIGKILL
    the next run in that parent folder removes it. Use it instead of ``tempfile.TemporaryDirectory``."""
    dest = Path(dest)
    made = _make_parents(dest.parent)
    try:
        folder = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name, "work"), dir=dest.parent))
    except OSError as exc:
        _remove_empty(made)
        raise BadInput(
            f"cannot create a folder beside the output: {exc.strerror}",
            file=dest.parent,
            fix="make that folder writable, or choose an output on a writable disk",
        ) from None
    owner = None
    token = register_cleanup(lambda: _rmtree(folder))
    try:
        owner = _hold_owner_lock(folder)
        yield folder
    finally:
        _rmtree(folder)
        _remove_empty(made)
        unregister_cleanup(token)
        if owner is not None:
            os.close(owner)


def _make_parents(parent: Path) -> list[Path]:
    """Create the missing folders above the output; returns them (deepest last) so a failed run removes them."""
    missing: list[Path] = []
    for folder in [parent, *parent.parents]:
        if folder.exists():
            break
        missing.append(folder)
    made: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            _remove_empty(made)
            raise BadInput(
                f"cannot create the output's parent folder: {exc.strerror}",
                file=folder,
                fix="make its parent writable, or choose an output on a writable disk",
            ) from None
        made.append(folder)
    return made


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a run's temp folder, a search worker's trial)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: Path, *, now: float | None = None) -> list[Path]:
    """Remove what killed runs left in ``folder``; returns what it removed. Best effort: never raises.

    A temporary folder is stale when no process holds its owner lock and either its pid is gone or it is older
    than an hour (a reused pid). An old output that a killed commit had moved aside is put back when its
    destination is missing, else removed. Lock files that nobody holds are removed."""
    removed: list[Path] = []
    now = time.time() if now is None else now
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    for name in names:
        match = _TEMP_NAME.match(name)
        path = folder / name
        try:
            if match is not None and _is_stale(path, int(match["pid"]), int(match["time"]), now):
                if match["kind"] == "old":
                    _restore_or_remove(path, folder / match["name"])
                else:
                    _rmtree(path)
                removed.append(path)
            elif _LOCK_NAME.match(name) and _remove_idle_lock(path):
                removed.append(path)
        except OSError:
            continue
    return removed


def _is_stale(path: Path, pid: int, started: int, now: float) -> bool:
    if _owner_lock_held(path):
        return False
    return not pid_alive(pid) or now - started > STALE_AFTER_S


def _restore_or_remove(old: Path, dest: Path) -> None:
    with _dest_lock(dest):
        if not os.path.lexists(dest):
            os.rename(old, dest)
        else:
            _rmtree(old)


def _rmtree(path: Path) -> None:
    """Remove a tree, making read-only folders inside it writable first (an old output may hold some)."""

    def retry(function, name, excinfo) -> None:  # noqa: ANN001 - shutil's onerror signature
        try:
            os.chmod(os.path.dirname(name), 0o700)
            function(name)
        except OSError:
            pass

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=retry)
