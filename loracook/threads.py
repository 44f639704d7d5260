"""Thread settings for the hot loops, and an ordered parallel map for per-module math."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread inside the block.

    Streaming merges are memory-bound and leave the other core to the writer thread; the per-module SVDs of
    an extraction are small. On a busy machine torch's spinning thread pool otherwise burns several times
    the CPU for no gain (docs/benchmarks.md, "Threads", has the measurements).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """``fn`` over ``items`` on ``workers`` threads (default: one per core), results in the order of ``items``.

    Each call runs torch on one intra-op thread: many small matrices (a module's QR, SVD or sparsification)
    are done faster side by side than one after the other on a shared thread pool, and the results do not
    depend on the number of workers. torch releases the GIL inside its kernels. At most ``2 × workers`` calls
    are submitted ahead of the consumer, so memory stays bounded by a few modules. On an error the calls not
    yet started are cancelled and the error is raised.
    """
    workers = workers or cores()
    with one_thread():
        if workers <= 1:
            yield from map(fn, items)
            return
        # OpenMP keeps its thread count per thread: set it in each worker too, or the first op a worker runs
        # may use the default count and round differently (seen as 3e-8 differences in the first module).
        pool = ThreadPoolExecutor(workers, thread_name_prefix="loracook-math", initializer=torch.set_num_threads,
                                  initargs=(1,))  # fmt: skip
        pending: list[Future[R]] = []
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
