"""The one writer: safetensors shards streamed to disk, plus side files, in a temporary folder renamed at the end.

The plan knows every output tensor's name, dtype and shape before any data is read, so each shard's header is
written first and tensor bytes are appended as they are computed, one block at a time. Nothing is held in
memory to build a shard, and a failed run leaves nothing at the destination.

The output path follows one rule, :func:`check_destination`: never replace or delete an input, anything that
contains one, the recipe's folder, the current or home folder; re-checked at commit time under a lock, with a
rename that cannot replace what another run just wrote. Temporary names embed the pid and the time, so the next
run removes what a killed one left behind (:func:`sweep_stale`).

The shard layout is in ``shards``, the output path rule in ``destination``, temporary names, the sweep and work
folders in ``temp_folders``, the locks in ``locks``; their public names are importable from here too.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import queue
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from loracook.errors import BadInput
from loracook.io.destination import check_destination
from loracook.io.locks import _OWNER_LOCK, _dest_lock, _hold_owner_lock, _unlink
from loracook.io.shards import TensorSpec, shard_layout, shard_names
from loracook.io.signals import deferred_signals, register_cleanup, unregister_cleanup
from loracook.io.temp_folders import (
    _TEMP_NAME,  # noqa: F401 - read as writer._TEMP_NAME by tests
    STALE_AFTER_S,
    _make_parents,
    _remove_empty,
    _rmtree,
    pid_alive,
    sweep_stale,
    temp_prefix,
    work_folder,
)
from loracook.io.tensors import DTYPE_NAMES

__all__ = [
    "STALE_AFTER_S",
    "OutputFolder",
    "TensorSpec",
    "check_destination",
    "pid_alive",
    "rename_noreplace",
    "shard_layout",
    "shard_names",
    "sweep_stale",
    "temp_prefix",
    "work_folder",
]

_SCRATCH = ".loracook-scratch"  # work files inside the temporary folder, removed before the commit


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
