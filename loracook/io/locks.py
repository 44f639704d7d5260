"""File locks for the writer: the owner lock inside a run's temporary folder (held while the run lives, dropped
by the kernel when it dies) and the lock beside a destination that serialises commits and the sweep's restores."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, the mkdir claim still makes commits exclusive
    fcntl = None  # type: ignore[assignment]


_OWNER_LOCK = ".loracook-owner.lock"  # inside a temporary folder, locked by the run that writes it


def _hold_owner_lock(folder: Path) -> int | None:
    """Lock a file inside the temporary folder for as long as this run owns it: the sweep of a later run never
    removes a folder whose lock is held, however old it is, and the kernel drops the lock when we die."""
    fd = os.open(folder / _OWNER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _owner_lock_held(folder: Path) -> bool:
    if fcntl is None:
        return False
    try:
        fd = os.open(folder / _OWNER_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # no lock file (yet, or any more): the pid and the age decide
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing also releases a lock we just took
    return False


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ------------------------------------------------------------------------------------- locks and renames


def _lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.loracook-lock"


def _acquire(path: Path, *, blocking: bool) -> int | None:
    """An exclusive flock on ``path`` that is still the file at ``path`` (a holder unlinks it on release)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it while we waited: lock the new file instead


@contextmanager
def _dest_lock(dest: Path) -> Iterator[None]:
    """Serialise commits (and the sweep's restores) to one destination across processes."""
    if fcntl is None:
        yield
        return
    path = _lock_path(dest)
    fd = _acquire(path, blocking=True)
    try:
        yield
    finally:
        _unlink(path)
        os.close(fd)  # type: ignore[arg-type]


def _remove_idle_lock(path: Path) -> bool:
    if fcntl is None:
        return False
    fd = _acquire(path, blocking=False)
    if fd is None:
        return False
    _unlink(path)
    os.close(fd)
    return True
