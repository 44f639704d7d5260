"""The one writer: safetensors shards streamed to disk, plus side files, in a temporary folder renamed at the end.

The plan knows every output tensor's name, dtype and shape before any data is read, so each shard's header is
written first and tensor bytes are appended as they are computed, one block at a time. Nothing is held in
memory to build a shard, and a failed run leaves nothing at the destination.

The output path follows one rule, :func:`check_destination`: never replace or delete an input, anything that
contains one, the recipe's folder, the current or home folder; re-checked at commit time under a lock, with a
rename that cannot replace what another run just wrote. Temporary names embed the pid and the time, so the next
run removes what a killed one left behind (:func:`sweep_stale`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import math
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from loracook.errors import BadInput
from loracook.io.signals import deferred_signals, register_cleanup, unregister_cleanup
from loracook.io.tensors import DTYPE_NAMES

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, the mkdir claim still makes commits exclusive
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_layout(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s] or [[]]


def shard_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


# ------------------------------------------------------------------------------------------ the output path

STALE_AFTER_S = 3600  # an unlocked temporary folder this old is stale even if its pid is alive (pid reuse)
_OWNER_LOCK = ".loracook-owner.lock"  # inside a temporary folder, locked by the run that writes it
_SCRATCH = ".loracook-scratch"  # work files inside the temporary folder, removed before the commit
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


class OutputFolder:
    """A folder built in a temporary sibling of ``dest`` and renamed into place by :meth:`commit`.

    What it guarantees, whatever happens in between (exception, Ctrl-C, SIGTERM, a full disk, SIGKILL):

    - ``dest`` is never touched before :meth:`commit`, so with ``force`` the old output survives a failed run;
    - :func:`check_destination` runs at construction and again at commit, under an exclusive lock beside
      ``dest``; without ``force`` the rename cannot replace anything (``renameat2(RENAME_NOREPLACE)``, or an
      atomic ``mkdir`` claim), so of two concurrent runs exactly one wins and the other gets BadInput;
    - the temporary folder is removed on failure; after a SIGKILL the next run in the same parent folder removes
      it (:func:`sweep_stale`), and puts back an old output that a killed commit had moved aside.

    ``protect``: the run's inputs (model and adapter folders, files) and the recipe file.

    >>> with OutputFolder(Path("out/merged"), force=False, protect=[base, recipe]) as out:  # doctest: +SKIP
    ...     out.write_text("README.md", "# merged")
    ...     out.commit()
    """

    QUEUE = 2

    def __init__(self, dest: Path, *, force: bool, protect: Iterable[str | Path] = ()) -> None:
        self.protect = tuple(p for p in protect if p is not None)
        self.dest = check_destination(dest, force=force, protect=self.protect)
        self.force = force
        self._shards: list[_ShardFile] = []
        self._current = 0
        self._committed = self._closed = self._aborting = False
        self._made = _make_parents(self.dest.parent)
        sweep_stale(self.dest.parent)
        self._owner: int | None = None
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(self.dest.name), dir=self.dest.parent))
            try:
                self._owner = _hold_owner_lock(self.tmp)
            except BaseException:
                _rmtree(self.tmp)
                raise
        except OSError as exc:
            _remove_empty(self._made)
            raise BadInput(
                f"cannot create a folder beside the output: {exc.strerror}",
                file=self.dest.parent,
                fix="make that folder writable, or choose an output on a writable disk",
            ) from None
        self._token = register_cleanup(self.abort)

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()

    def scratch(self, name: str) -> Path:
        """A work folder inside the temporary folder (e.g. adapters extracted on the way), never part of the
        output: removed before the commit, and with the temporary folder on failure or by the next run."""
        folder = self.tmp / _SCRATCH / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # ------------------------------------------------------------------------------------------ tensors

    def start_tensors(self, specs: list[TensorSpec], shard_size: int, stem: str = "model") -> None:
        layout = shard_layout(specs, shard_size)
        names = shard_names(len(layout), stem)
        self._shards = [_ShardFile(self.tmp / n, s) for n, s in zip(names, layout, strict=True)]
        self._stem = stem
        self._current = 0
        # Blocks are written by a background thread (file writes release the GIL), so computing the next
        # block overlaps writing this one; at most QUEUE blocks wait, which bounds the extra memory.
        self._queue: queue.Queue = queue.Queue(maxsize=self.QUEUE)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="loracook-writer", daemon=True)
        self._thread.start()

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append a block of rows of tensor ``name``; tensors and rows come in plan order."""
        if self._failure is not None:
            raise self._failure
        self._queue.put((name, block.contiguous()))

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._failure is not None or self._aborting:
                continue  # keep draining so that the producer never blocks forever
            try:
                name, block = item
                while self._shards[self._current].done:
                    self._shards[self._current].close()
                    self._current += 1
                self._shards[self._current].write(name, block)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the producer's thread
                self._failure = exc

    def _join(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join()
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def finish_tensors(self) -> None:
        self._join()
        for shard in self._shards:
            shard.close()
            if not shard.done:
                raise RuntimeError(f"internal error: {shard.path.name} was not written completely")
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for shard in self._shards for s in shard.specs)},
                "weight_map": {s.name: shard.path.name for shard in self._shards for s in shard.specs},
            }
            self.write_text(f"{self._stem}.safetensors.index.json", json.dumps(index, indent=2) + "\n")

    # ----------------------------------------------------------------------------------------- side files

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write a small safetensors file in one go (adapters). Serialized in memory and written by Python, so
        a full disk or a file-size limit raises an OSError that names the file."""
        from safetensors.torch import save

        (self.tmp / name).write_bytes(save(tensors, metadata={"format": "pt"}))

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text, encoding="utf-8")

    def copy(self, source: Path, name: str | None = None) -> None:
        shutil.copyfile(source, self.tmp / (name or source.name))

    # ------------------------------------------------------------------------------------------- finish

    def commit(self) -> Path:
        """Move the finished folder to ``dest``: checked again and renamed under the lock; signals wait."""
        if self._committed:
            return self.dest
        _rmtree(self.tmp / _SCRATCH)
        trash = None
        try:
            with deferred_signals(), _dest_lock(self.dest):
                self._check_again()
                trash = self._swap_in()
                self._committed = True
        finally:  # also when a signal held during the renames is raised at the end of the section
            if self._committed:
                self._close()
                if trash is not None:
                    _rmtree(trash)
        return self.dest

    def _check_again(self) -> None:
        """The destination may have changed while this run worked: another run wrote it, or a link appeared."""
        if not self.force and os.path.lexists(self.dest) and not os.path.islink(self.dest):
            raise BadInput(
                "the output appeared while this run was working (another loracook run?)",
                file=self.dest,
                fix="pass --force to replace it, or choose another output path",
            )
        check_destination(self.dest, force=self.force, protect=self.protect)

    def _swap_in(self) -> Path | None:
        """Rename the temporary folder to ``dest``; an old output is first moved aside (same parent, so that
        its own permissions do not matter) and moved back if the new one cannot take its place."""
        os.chmod(self.tmp, 0o755)
        _unlink(self.tmp / _OWNER_LOCK)
        trash = None
        if os.path.lexists(self.dest):
            trash = self.dest.parent / (temp_prefix(self.dest.name, "old") + secrets.token_hex(4))
            os.rename(self.dest, trash)
        try:
            rename_noreplace(self.tmp, self.dest)
        except BaseException as exc:
            if trash is not None:
                os.rename(trash, self.dest)
            if isinstance(exc, FileExistsError):
                raise BadInput(
                    "the output appeared while this run was working (another loracook run?)",
                    file=self.dest,
                    fix="pass --force to replace it, or choose another output path",
                ) from None
            raise
        return trash

    def abort(self) -> None:
        """Remove everything this run created (idempotent; also run by the signal cleanup)."""
        if self._closed:
            return
        self._aborting = True
        try:
            self._join()
        except BaseException:  # noqa: BLE001 - aborting anyway
            pass
        for shard in self._shards:
            try:
                shard.close()
            except OSError:
                pass
        if not self._committed:
            _rmtree(self.tmp)
            _remove_empty(self._made)
        self._close()

    def _close(self) -> None:
        self._closed = True
        unregister_cleanup(self._token)
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None


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


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def rename_noreplace(source: Path, dest: Path) -> None:
    """Rename ``source`` to ``dest`` only if nothing is at ``dest``: FileExistsError otherwise, atomically.

    ``renameat2(RENAME_NOREPLACE)`` where the C library and the file system have it; else an atomic ``mkdir``
    claims ``dest`` (exactly one process can create it) and the rename replaces that empty folder."""
    function = _renameat2()
    if function is not None:
        if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(code, os.strerror(code), str(dest))
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(source), None, str(dest))
    os.mkdir(dest)  # FileExistsError when taken
    try:
        os.rename(source, dest)
    except BaseException:
        _remove_empty([dest])
        raise


class _ShardFile:
    """One safetensors file whose header is written up front; tensor bytes are appended in order."""

    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        self.path = path
        self.specs = specs
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._index = 0
        self._written = 0  # bytes of the current tensor

    @property
    def done(self) -> bool:
        return self._index >= len(self.specs)

    def write(self, name: str, block: torch.Tensor) -> None:
        spec = self.specs[self._index]
        if name != spec.name or block.dtype != spec.dtype:
            raise RuntimeError(
                f"internal error: expected {spec.name} ({spec.dtype}), got {name} ({block.dtype})"
            )
        data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            self._file.write(memoryview(data))
        except OSError as exc:  # a full disk or the file-size limit: name the file for the one-line message
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        self._written += data.nbytes
        if self._written > spec.nbytes:
            raise RuntimeError(f"internal error: too many bytes for {name}")
        if self._written == spec.nbytes:
            self._index += 1
            self._written = 0

    def close(self) -> None:
        if not self._file.closed:
            try:
                self._file.close()
            except OSError as exc:  # the last buffered bytes could not be written
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None
