"""Walk a plan: read each base tensor in row blocks, add the terms in fp32, cast, hand blocks to the writer.

Working memory is one row block (at most plan.BLOCK_BYTES in fp32) plus the current task's LoRA factors; each
value is dropped after its task, and each base shard's file handle is closed after its last tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loracook.io.tensors import TensorInfo, TensorReader
from loracook.io.writer import OutputFolder, TensorSpec
from loracook.ops.lora import dora_delta, lora_rows
from loracook.plan import BiasTerm, FullTerm, LoraTerm, Plan, TensorTask

OnTask = Callable[[int, int, TensorTask], None]


@dataclass
class Readers:
    """Open file handles by path; closed when the last task that reads a file is done."""

    open: dict[str, TensorReader]
    last_use: dict[str, int]

    def get(self, info: TensorInfo, infos: dict[str, TensorInfo] | None = None) -> TensorReader:
        reader = self.open.get(info.file)
        if reader is None:
            reader = TensorReader.open(info.file) if infos is None else TensorReader(info.file, infos)
            self.open[info.file] = reader
        return reader

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.get(info).read(info.name, rows)

    def release(self, step: int) -> None:
        for file in [f for f, last in self.last_use.items() if last == step and f in self.open]:
            self.open.pop(file).close()


def execute(plan: Plan, out: OutputFolder, on_task: OnTask | None = None) -> None:
    """Compute every task of ``plan`` and stream it into ``out`` (which the caller commits)."""
    out.start_tensors([TensorSpec(t.name, t.dtype, t.shape) for t in plan.tasks], plan.shard_size)
    readers = Readers({}, _last_use(plan))
    try:
        for step, task in enumerate(plan.tasks):
            _run_task(task, readers, out)
            readers.release(step)
            if on_task:
                on_task(step + 1, len(plan.tasks), task)
    finally:
        for reader in readers.open.values():
            reader.close()
    out.finish_tensors()


def _last_use(plan: Plan) -> dict[str, int]:
    last: dict[str, int] = {}
    for step, task in enumerate(plan.tasks):
        last[task.base.file] = step
        for term in task.terms:
            for info in _infos(term):
                last[info.file] = step
    return last


def _infos(term: LoraTerm | FullTerm | BiasTerm) -> list[TensorInfo]:
    if isinstance(term, LoraTerm):
        return [term.a, term.b] + ([term.magnitude] if term.magnitude else [])
    return [term.tensor] if isinstance(term, FullTerm) else [term.bias]


def _run_task(task: TensorTask, readers: Readers, out: OutputFolder) -> None:
    rows = task.shape[0] if task.shape else 1
    step = task.block_rows
    if task.passthrough:  # same bytes in and out: no conversion
        for start in range(0, rows, step) if task.shape else [0]:
            stop = min(start + step, rows)
            out.write(task.name, readers.read(task.base, (start, stop) if task.shape else None))
        return
    factors = _load_factors(task, readers)
    for start in range(0, rows, step) if task.shape else [0]:
        stop = min(start + step, rows)
        span = (start, stop) if task.shape else None
        value = readers.read(task.base, span).to(torch.float32)
        base = value.clone() if any(_needs_base(t) for t in task.terms) else value
        for term, loaded in zip(task.terms, factors):
            value += _term_block(term, loaded, base, readers, span)
        out.write(task.name, value.to(task.dtype))
        del value, base


def _needs_base(term: LoraTerm | FullTerm | BiasTerm) -> bool:
    return isinstance(term, FullTerm) or (isinstance(term, LoraTerm) and term.magnitude is not None)


def _load_factors(task: TensorTask, readers: Readers) -> list[tuple[torch.Tensor, ...]]:
    """The small per-term tensors, in fp32 with weight and scale folded into B (or the bias)."""
    loaded: list[tuple[torch.Tensor, ...]] = []
    for term in task.terms:
        if isinstance(term, LoraTerm):
            a = readers.read(term.a).to(torch.float32)
            b = readers.read(term.b).to(torch.float32) * term.scale
            if term.magnitude is None:
                loaded.append((a, b * term.weight))
            else:  # DoRA: the weight applies to the re-normalised delta, not to B
                loaded.append((a, b, readers.read(term.magnitude).to(torch.float32)))
        elif isinstance(term, BiasTerm):
            loaded.append((readers.read(term.bias).to(torch.float32) * (term.scale * term.weight),))
        else:
            loaded.append(())
    return loaded


def _term_block(
    term: LoraTerm | FullTerm | BiasTerm,
    loaded: tuple[torch.Tensor, ...],
    base: torch.Tensor,
    readers: Readers,
    span: tuple[int, int] | None,
) -> torch.Tensor:
    if isinstance(term, BiasTerm):
        return loaded[0][span[0] : span[1]] if span else loaded[0]
    if isinstance(term, FullTerm):
        return (readers.read(term.tensor, span).to(torch.float32) - base) * term.weight
    rows = span or (0, base.shape[0])
    if term.magnitude is None:
        return lora_rows(loaded[0], loaded[1], term.transposed, rows)
    a, b, magnitude = loaded
    delta = lora_rows(a, b, term.transposed, rows)
    if not term.transposed:
        magnitude = magnitude[rows[0] : rows[1]]
    return dora_delta(base, delta, magnitude, term.transposed) * term.weight
