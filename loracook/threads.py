"""Thread settings for the hot loops."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread inside the block.

    Streaming merges are memory-bound and leave the other core to the writer thread; the per-module SVDs of
    an extraction are small. On a busy 2-core machine torch's spinning thread pool otherwise burns several
    times the CPU (measured: 12.6 s vs 2.8 s of CPU for the 1.5B merge benchmark; eigvalsh of a 576×576
    matrix up to 16 s instead of 35 ms).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
