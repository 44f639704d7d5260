"""The one writer: safetensors shards streamed to disk, plus side files, in a temporary folder renamed at the end.

The plan knows every output tensor's name, dtype and shape before any data is read, so each shard's header is
written first and tensor bytes are appended as they are computed, one block at a time. Nothing is held in
memory to build a shard, and a failed run leaves nothing at the destination.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from loracook.errors import BadInput
from loracook.io.tensors import DTYPE_NAMES


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


class OutputFolder:
    """A folder built in a temporary sibling of ``dest`` and renamed into place by :meth:`commit`.

    >>> with OutputFolder(Path("out/merged"), force=False) as out:  # doctest: +SKIP
    ...     out.write_text("README.md", "# merged")
    ...     out.commit()
    """

    def __init__(self, dest: Path, *, force: bool) -> None:
        self.dest = Path(dest)
        if self.dest.exists() and not force:
            raise BadInput("the output already exists", file=self.dest, fix="pass --force to replace it")
        if self.dest.exists() and not self.dest.is_dir():
            raise BadInput("the output path is a file, not a folder", file=self.dest)
        self.force = force
        parent = self.dest.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.loracook-", dir=parent))
        except OSError as exc:
            raise BadInput(f"cannot create the output folder: {exc.strerror}", file=self.dest) from None
        self._shards: list[_ShardFile] = []
        self._current = 0
        self._committed = False

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()

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

    QUEUE = 2

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
            if self._failure is not None:
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
        """Write a small safetensors file in one go (adapters)."""
        from safetensors.torch import save_file

        save_file(tensors, str(self.tmp / name), metadata={"format": "pt"})

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text, encoding="utf-8")

    def copy(self, source: Path, name: str | None = None) -> None:
        shutil.copyfile(source, self.tmp / (name or source.name))

    # ------------------------------------------------------------------------------------------- finish

    def commit(self) -> Path:
        os.chmod(self.tmp, 0o755)
        if self.dest.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.old-", dir=self.dest.parent))
            self.dest.rename(trash / "old")
            self.tmp.rename(self.dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            self.tmp.rename(self.dest)
        self._committed = True
        return self.dest

    def abort(self) -> None:
        try:
            self._join()
        except BaseException:  # noqa: BLE001 - aborting anyway
            pass
        for shard in self._shards:
            shard.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


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
        self._file.write(memoryview(data))
        self._written += data.nbytes
        if self._written > spec.nbytes:
            raise RuntimeError(f"internal error: too many bytes for {name}")
        if self._written == spec.nbytes:
            self._index += 1
            self._written = 0

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
