"""Reused buffers. Page-faulting a fresh 10–100 MB allocation for every block or module costs more than the
math on it, so the executor and the extraction keep named buffers and hand out views of them.

>>> pool = Scratch()
>>> a = pool.get("work", (2, 3), torch.float32); b = pool.get("work", (3,), torch.float32)
>>> a.data_ptr() == b.data_ptr()
True
"""

from __future__ import annotations

import math

import torch


class Scratch:
    """Named buffers, grown on demand. ``get`` returns a view of ``shape``; a request above ``limit`` bytes
    gets fresh memory instead (None), so the pool stays at the size of the usual request."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.buffers: dict[str, torch.Tensor] = {}

    def get(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, limit: int | None = None
    ) -> torch.Tensor | None:
        numel = math.prod(shape)
        cap = limit if limit is not None else self.limit
        if cap is not None and numel * dtype.itemsize > cap:
            return None
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self.buffers[key] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)


class Buffers:
    """The executor's block buffers: the raw input bytes, the fp32 work block, and output blocks that cycle
    through enough buffers that none is reused while the sink (its writer thread) still holds it."""

    def __init__(self, block_bytes: int, in_flight: int) -> None:
        self.block_bytes = block_bytes
        self._pool = Scratch()
        self._count = in_flight + 2
        self._next = 0

    def raw(self) -> torch.Tensor:
        return self._pool.get("raw", (self.block_bytes,), torch.uint8)

    def work(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._pool.get("work", shape, torch.float32)

    def out(self) -> torch.Tensor:
        index, self._next = self._next, (self._next + 1) % self._count
        return self._pool.get(f"out{index}", (self.block_bytes,), torch.uint8)
