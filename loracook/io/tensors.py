"""Read safetensors files without mmap, and .bin files only through weights-only unpickling.

Reading with plain ``readinto`` at the header's offsets (instead of ``safe_open``'s mmap) keeps the process's
resident memory at what it actually holds: mapped pages of a multi-GB checkpoint would otherwise count in RSS
until the mapping goes away. It also lets the executor read a block of rows of a tensor, so that even the
largest embedding never has to be in memory whole.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracook.errors import BadInput

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte offset (absolute, in the file)."""

    file: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int | None  # None for tensors that come from a .bin file (no direct offsets)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * _itemsize(self.dtype) if self.shape else self.nbytes


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header and check that the file holds every byte it promises."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise BadInput("not a safetensors file (shorter than its 8-byte header length)", file=path)
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER or 8 + length > size:
                raise BadInput("not a safetensors file, or truncated (bad header length)", file=path)
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise BadInput("file not found", file=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BadInput("not a safetensors file (its header is not JSON)", file=path) from None
    if not isinstance(header, dict):
        raise BadInput("not a safetensors file (its header is not a JSON object)", file=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInput(
            "broken safetensors header: __metadata__ must map names to strings",
            file=path,
            fix="re-save the file",
        )
    infos: dict[str, TensorInfo] = {}
    data_start = 8 + length
    end = 0
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, stop = (int(x) for x in entry["data_offsets"])
        except KeyError as exc:
            raise BadInput(
                f"tensor {name!r} has unsupported dtype or a broken header entry ({exc})", file=path
            ) from None
        except (TypeError, ValueError):
            raise BadInput(f"tensor {name!r} has a broken header entry", file=path) from None
        if any(d < 0 for d in shape) or not 0 <= begin <= stop:
            raise BadInput(f"tensor {name!r} has a negative size or offset in its header", file=path)
        info = TensorInfo(str(path), name, dtype, shape, data_start + begin)
        if stop - begin != info.nbytes:
            raise BadInput(f"tensor {name!r}: header offsets disagree with its shape", file=path)
        infos[name] = info
        end = max(end, stop)
    if data_start + end > size:
        raise BadInput(
            f"truncated safetensors file: {size} bytes, the header promises {data_start + end}",
            file=path,
            fix="re-download or re-save it",
        )
    return infos, metadata


class TensorReader:
    """Reads tensors (or blocks of rows) of one checkpoint file by name, without mmap.

    >>> reader = TensorReader.open("model.safetensors")  # doctest: +SKIP
    >>> reader.read("lm_head.weight", rows=(0, 128)).shape  # doctest: +SKIP
    """

    def __init__(
        self, path: str | Path, infos: dict[str, TensorInfo], loaded: dict[str, torch.Tensor] | None = None
    ):
        self.path = Path(path)
        self.infos = infos
        self._loaded = loaded  # .bin files are loaded whole (there is no safe partial read of a pickle)
        self._fd: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path) -> TensorReader:
        path = Path(path)
        if path.suffix == ".safetensors":
            infos, _ = read_header(path)
            return cls(path, infos)
        tensors = load_bin(path)
        infos = {n: TensorInfo(str(path), n, t.dtype, tuple(t.shape), None) for n, t in tensors.items()}
        return cls(path, infos, tensors)

    def read(
        self, name: str, rows: tuple[int, int] | None = None, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tensor ``name`` (or rows [start, stop) of it). ``into``: a uint8 buffer to read into and view,
        so a caller streaming many blocks can reuse one buffer instead of allocating each time."""
        info = self.infos[name]
        if self._loaded is not None:
            tensor = self._loaded[name]
            return tensor[rows[0] : rows[1]].clone() if rows else tensor.clone()
        start, stop = rows if rows else (0, info.shape[0] if info.shape else 1)
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        count = info.row_bytes * (stop - start)
        if not count:
            return torch.empty(shape, dtype=info.dtype)
        raw = (
            into[:count]
            if into is not None and into.numel() >= count
            else torch.empty(count, dtype=torch.uint8)
        )
        fd = self._fd if self._fd is not None else self._open_fd()
        view = memoryview(raw.numpy())
        done = 0
        while done < count:  # positional reads: several threads may read one file
            n = os.preadv(fd, [view[done:]], info.offset + start * info.row_bytes + done)
            if n <= 0:
                raise BadInput(f"tensor {name!r} is cut short", file=self.path)
            done += n
        return raw.view(info.dtype).reshape(shape)

    def _open_fd(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):  # plans read in file order: ask for aggressive read-ahead
                    os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def load_bin(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch .bin state dict with ``weights_only=True``: a pickle holding code is refused, not run."""
    path = Path(path)
    try:
        with (
            warnings.catch_warnings()
        ):  # torch warns about old pickle protocols; the refusal below says enough
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except FileNotFoundError:
        raise BadInput("file not found", file=path) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad or unsafe pickle
        reason = _first_sentence(str(exc)) or exc.__class__.__name__
        raise BadInput(
            f"refused to load: not a plain weights file ({reason})",
            file=path,
            fix="only tensors are loaded from .bin files (weights_only); convert it to safetensors",
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise BadInput("a .bin weights file must hold a dict of tensors", file=path)
    return data


def _first_sentence(text: str) -> str:
    """The gist of torch's multi-paragraph unpickling error, e.g. "Unsupported global: GLOBAL posix.system"."""
    for line in text.splitlines():
        line = line.strip()
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.split(" was not an allowed global")[0]
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:200]


@dataclass
class Readers:
    """Open file handles by path, shared by threads; with ``last_use`` (path -> last step that reads it), each
    is closed by :meth:`release` after that step, else by :meth:`close` at the end."""

    open: dict[str, TensorReader] = field(default_factory=dict)
    last_use: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(
        self, info: TensorInfo, rows: tuple[int, int] | None = None, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        with self.lock:
            reader = self.open.get(info.file)
            if reader is None:
                reader = self.open[info.file] = TensorReader.open(info.file)
        return reader.read(info.name, rows, into)

    def release(self, step: int) -> None:
        for file in [f for f, last in self.last_use.items() if last == step and f in self.open]:
            self.open.pop(file).close()

    def close(self) -> None:
        for reader in self.open.values():
            reader.close()
