"""Walk a plan: read tensors, combine the terms in fp32, cast, and hand the results to the writer.

Model outputs stream: each base tensor is read in row blocks (at most plan.BLOCK_BYTES in fp32) unless its
method needs the whole delta (TIES, DARE, magnitude pruning, DoRA stored transposed), and blocks are appended
to shards whose headers were written up front. Adapter outputs are small and are written at the end. Each value
is dropped after its task, and each input file's handle is closed after its last use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loracook.errors import BadInput
from loracook.io.tensors import Readers
from loracook.io.writer import OutputFolder, TensorSpec
from loracook.ops.lora import dora_delta, lora_rows
from loracook.plan import BiasTerm, FullTerm, LoraTerm, ModuleTask, Plan, TensorTask, Term, term_infos
from loracook.threads import map_ordered, one_thread

OnTask = Callable[[int, int, str], None]  # done, total, what is being worked on
OnTensor = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class ModuleReport:
    """How well an output module reproduces its exact target (Frobenius norms)."""

    name: str
    rank: int
    error: float
    relative_error: float
    method: str  # exact | factored-svd | randomized | exact-svd


@dataclass
class Report:
    modules: list[ModuleReport] = field(default_factory=list)

    def to_json(self) -> dict:
        errors = [m.relative_error for m in self.modules]
        return {
            "modules": [m.__dict__ for m in self.modules],
            "max_relative_error": max(errors, default=0.0),
            "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
        }


def execute(
    plan: Plan, out: OutputFolder, on_task: OnTask | None = None, on_tensor: OnTensor | None = None
) -> Report:
    """Compute every task of ``plan`` into ``out`` (which the caller commits); returns the error report.

    ``on_tensor`` receives each finished output tensor (model outputs only: whole tensors are assembled for it,
    so use it only when the model fits in memory, e.g. to evaluate the merge without reloading it).
    """
    readers = Readers({}, _last_use(plan))
    report = Report()
    adapter_tensors: dict[str, torch.Tensor] = {}
    buffers = None
    if plan.kind == "model":
        out.start_tensors([TensorSpec(t.name, t.dtype, t.shape) for t in plan.tasks], plan.shard_size)
        biggest = max((_block_bytes(t) for t in plan.tasks if t.streamed), default=0)
        buffers = Buffers(-(-biggest // 8) * 8, OutputFolder.QUEUE)
    try:
        if plan.kind == "adapter":  # small per-module math, side by side on every core
            results = map_ordered(lambda task: _adapter_task(task, readers), plan.tasks)
            for step, (task, (tensors, modules)) in enumerate(zip(plan.tasks, results, strict=True)):
                adapter_tensors.update(tensors)
                report.modules.extend(modules)
                if on_task:
                    on_task(step + 1, len(plan.tasks), _what(task))
        else:
            for step, task in enumerate(plan.tasks):
                _tensor(task, readers, out, report, on_tensor, buffers)
                readers.release(step)
                if on_task:
                    on_task(step + 1, len(plan.tasks), _what(task))
    finally:
        readers.close()
    if plan.kind == "model":
        out.finish_tensors()
    else:
        out.save_tensors("adapter_model.safetensors", adapter_tensors)
    return report


def _what(task: TensorTask | ModuleTask) -> str:
    return task.module if isinstance(task, ModuleTask) else task.name


def _adapter_task(
    task: TensorTask | ModuleTask, readers: Readers
) -> tuple[dict[str, torch.Tensor], list[ModuleReport]]:
    """One task of an adapter output: its tensors and report lines (runs on a worker thread)."""
    report = Report()
    if isinstance(task, ModuleTask):
        return _module(task, readers, report), report.modules
    value = _whole(task, readers, report)
    _check_finite(value, task, readers)
    return {task.out_name or task.name: value.to(task.dtype)}, report.modules


def _last_use(plan: Plan) -> dict[str, int]:
    last: dict[str, int] = {}
    for step, task in enumerate(plan.tasks):
        if isinstance(task, TensorTask):
            last[task.base.file] = step
        for term in task.terms:
            for info in term_infos(term):
                last[info.file] = step
    return last


# ------------------------------------------------------------------------------------------ model tensors


def _tensor(
    task: TensorTask,
    readers: Readers,
    out: OutputFolder,
    report: Report,
    on_tensor: OnTensor | None,
    buffers: Buffers,
) -> None:
    rows = task.shape[0] if task.shape else 1
    spans = (
        [(s, min(s + task.block_rows, rows)) for s in range(0, rows, task.block_rows)]
        if task.shape
        else [None]
    )
    if not task.streamed:  # whole-tensor math (TIES, DARE, SVD) uses every core
        value = _whole(task, readers, report)
        _check_finite(value, task, readers)
        value = value.to(task.dtype)
        out.write(task.name, value)
        if on_tensor:
            on_tensor(task.name, value)
        return
    with one_thread():
        _stream(task, readers, out, report, on_tensor, buffers, spans)


def _stream(task, readers, out, report, on_tensor, buffers, spans) -> None:
    parts = []
    factors = _stream_factors(task, readers, report)
    if factors is None:
        factors = [_prepared(term, readers) for term in task.terms]
    checked = all(isinstance(f, tuple) for f in factors)  # plain LoRA factors were checked on load
    for span in spans:
        if task.passthrough:
            block = readers.read(task.base, span, into=buffers.out())
        else:
            raw = readers.read(task.base, span, into=buffers.raw())
            value = buffers.work(raw.shape)
            value.copy_(raw)
            base = value.clone() if any(_needs_base(t) for t in task.terms) else value
            for loaded in factors:
                if isinstance(loaded, tuple):  # value += rows of B @ A, in place, no temporary
                    a, b, transposed = loaded
                    start, stop = span or (0, value.shape[0])
                    if transposed:
                        value.addmm_(a[:, start:stop].T, b.T)
                    else:
                        value.addmm_(b[start:stop], a)
                else:
                    value += _block(loaded, None, base, readers, span, task)
            if not checked:
                _check_finite(value, task, readers)
            block = (
                buffers.out().view(task.dtype)[: value.numel()].view(value.shape) if value.numel() else value
            )
            block.copy_(value)
        out.write(task.name, block)
        if on_tensor:
            parts.append(block.clone())
    if on_tensor:
        on_tensor(task.name, torch.cat(parts) if len(parts) > 1 else parts[0])


def _block_bytes(task: TensorTask) -> int:
    """Bytes of one block in the wider of the input and output dtypes."""
    elements = task.block_rows * (task.base.row_bytes // task.base.dtype.itemsize if task.shape else 1)
    return elements * max(task.base.dtype.itemsize, task.dtype.itemsize)


class Buffers:
    """Reused block buffers: page-faulting fresh 10-100 MB allocations for every block costs more than the
    math. ``out`` cycles through enough buffers that none is reused while the writer still holds it."""

    def __init__(self, block_bytes: int, in_flight: int) -> None:
        self.block_bytes = block_bytes
        self._raw = torch.empty(0, dtype=torch.uint8)
        self._work = torch.empty(0, dtype=torch.float32)
        self._outs = [torch.empty(0, dtype=torch.uint8) for _ in range(in_flight + 2)]
        self._next = 0

    def raw(self) -> torch.Tensor:
        if self._raw.numel() < self.block_bytes:
            self._raw = torch.empty(self.block_bytes, dtype=torch.uint8)
        return self._raw

    def work(self, shape: tuple[int, ...]) -> torch.Tensor:
        count = 1
        for d in shape:
            count *= d
        if self._work.numel() < count:
            self._work = torch.empty(count, dtype=torch.float32)
        return self._work[:count].view(shape)

    def out(self) -> torch.Tensor:
        index = self._next
        self._next = (index + 1) % len(self._outs)
        if self._outs[index].numel() < self.block_bytes:
            self._outs[index] = torch.empty(self.block_bytes, dtype=torch.uint8)
        return self._outs[index]


def _prepared(term: Term, readers: Readers):
    """A plain LoRA term as (A, w·s·B, transposed) in fp32, its factors checked for NaN/Inf; others as is."""
    if not isinstance(term, LoraTerm) or term.magnitude is not None:
        return term
    a = readers.read(term.a).to(torch.float32)
    b = readers.read(term.b).to(torch.float32) * (term.scale * term.weight)
    for info, value in ((term.a, a), (term.b, b)):
        if not bool(torch.isfinite(value).all()):
            raise BadInput(
                f"tensor {info.name} of source {term.source!r} holds NaN or infinite values",
                file=info.file,
                fix="the adapter is broken; retrain or re-save it",
            )
    return (a, b, term.transposed)


def _check_finite(value: torch.Tensor, task: TensorTask, readers: Readers) -> None:
    """Refuse NaN/Inf produced by a merge (as PEFT's safe_merge does) instead of writing a broken model."""
    if not value.is_floating_point() or bool(torch.isfinite(value).all()):
        return
    for term in task.terms:
        for info in term_infos(term):
            if not bool(torch.isfinite(readers.read(info).to(torch.float32)).all()):
                raise BadInput(
                    f"tensor {info.name} of source {term.source!r} holds NaN or infinite values",
                    file=info.file,
                    fix="the adapter is broken; retrain or re-save it",
                )
    raise BadInput(
        f"merging {task.name} overflowed to NaN or infinity", fix="check the merge weights and the sources"
    )


def _needs_base(term: Term | None) -> bool:
    return isinstance(term, FullTerm) or (isinstance(term, LoraTerm) and term.magnitude is not None)


def _stream_factors(task: TensorTask, readers: Readers, report: Report) -> list | None:
    """For svd into a model: the truncated factors of Σ w_i ΔW_i, as one term. None for other methods."""

    if task.combine.method != "svd" or not task.terms:
        return None
    # ops are imported here so that plain merges do not load the heavier math modules
    from loracook.ops.factored import stack_factors, truncate_factors

    pairs = [_scaled_factors(t, readers) for t in task.terms]
    b, a = stack_factors(pairs)
    rank = min(task.combine.rank or b.shape[1], b.shape[1])
    b_k, a_k, err, total = truncate_factors(b, a, rank)
    report.modules.append(
        ModuleReport(task.name, rank, float(err), float(err) / total if total else 0.0, "factored-svd")
    )
    return [(a_k, b_k, task.terms[0].transposed)]


def _scaled_factors(term: LoraTerm, readers: Readers) -> tuple[float, torch.Tensor, torch.Tensor]:
    a = readers.read(term.a).to(torch.float32)
    b = readers.read(term.b).to(torch.float32) * term.scale
    return term.weight, b, a


def _block(
    term: Term | None, loaded, base: torch.Tensor, readers: Readers, span, task: TensorTask
) -> torch.Tensor:
    """One source's weighted delta for the rows ``span`` (exact methods, row-separable terms)."""
    rows = span or (0, base.shape[0] if base.dim() else 1)
    if term is None:  # pre-truncated svd factors
        a, b, transposed = loaded
        return lora_rows(a, b, transposed, rows)
    if isinstance(term, BiasTerm):
        bias = readers.read(term.bias).to(torch.float32) * (term.scale * term.weight)
        return bias[rows[0] : rows[1]] if span else bias
    if isinstance(term, FullTerm):
        return (readers.read(term.tensor, span).to(torch.float32) - base) * term.weight
    a = readers.read(term.a).to(torch.float32)
    b = readers.read(term.b).to(torch.float32) * term.scale
    if term.magnitude is None:
        return lora_rows(a, b * term.weight, term.transposed, rows)
    magnitude = readers.read(term.magnitude).to(torch.float32)[rows[0] : rows[1]]
    return dora_delta(base, lora_rows(a, b, term.transposed, rows), magnitude, term.transposed) * term.weight


def _whole(task: TensorTask, readers: Readers, report: Report) -> torch.Tensor:
    """The whole tensor W + combine(ΔW_1..n) in fp32, for methods that need each delta whole."""

    base = readers.read(task.base).to(torch.float32)
    if not task.terms:
        return base
    combine = task.combine
    deltas = [_dense_delta(t, base, readers, task.name) for t in task.terms]
    merged = _combine_dense(deltas, task.terms, combine, task.name)
    del deltas
    if combine.method == "svd" and merged.dim() == 2:
        from loracook.ops.factored import low_rank_dense

        low = low_rank_dense(merged, min(combine.rank or min(merged.shape), min(merged.shape)))
        report.modules.append(
            ModuleReport(task.name, low.B.shape[1], float(low.err), float(low.rel_err), low.method_used)
        )
        merged = low.B @ low.A
    return base + merged


def _combine_dense(deltas: list[torch.Tensor], terms, combine, name: str) -> torch.Tensor:
    """The method's combination of whole per-source deltas; DARE masks are seeded by tensor and source."""
    from loracook.ops.combine import combine_dense

    return combine_dense(
        deltas,
        [t.weight for t in terms],
        method=combine.method,
        densities=[combine.density(t.source) for t in terms],
        majority_sign=combine.majority_sign,
        rescale=combine.rescale,
        seed=combine.seed,
        names=[f"{name}|{t.source}" for t in terms],
    )


def _dense_delta(term: Term, base: torch.Tensor, readers: Readers, name: str) -> torch.Tensor:
    """One source's unweighted ΔW for the whole tensor, after its own DARE pre-processing."""
    from loracook.ops.rng import tensor_generator
    from loracook.ops.sparsify import dare

    if isinstance(term, BiasTerm):
        delta = readers.read(term.bias).to(torch.float32) * term.scale
    elif isinstance(term, FullTerm):
        delta = readers.read(term.tensor).to(torch.float32) - base
    else:
        a = readers.read(term.a).to(torch.float32)
        b = readers.read(term.b).to(torch.float32) * term.scale
        delta = lora_rows(a, b, term.transposed, (0, base.shape[0]))
        if term.magnitude is not None:
            magnitude = readers.read(term.magnitude).to(torch.float32)
            delta = dora_delta(base, delta, magnitude, term.transposed)
    if term.dare is not None:
        generator = tensor_generator(term.dare.seed, f"{name}|{term.source}|pre")
        delta = dare(delta, 1.0 - term.dare.drop, generator, rescale=term.dare.rescale)
    return delta


# ----------------------------------------------------------------------------------------- adapter modules


def _module(task: ModuleTask, readers: Readers, report: Report) -> dict[str, torch.Tensor]:
    """Merged LoRA factors of one module, padded to ``task.rank``."""
    from loracook.ops.factored import stack_factors, truncate_factors
    from loracook.ops.rng import tensor_generator
    from loracook.ops.sparsify import dare

    name_a, name_b = task.names
    if task.factored:
        b, a = stack_factors([_scaled_factors(t, readers) for t in task.terms])
        if task.exact:
            report.modules.append(ModuleReport(task.module, b.shape[1], 0.0, 0.0, "exact"))
        else:
            b, a, err, total = truncate_factors(b, a, task.rank)
            report.modules.append(
                ModuleReport(
                    task.module, task.rank, float(err), float(err) / total if total else 0.0, "factored-svd"
                )
            )
    else:
        from loracook.ops.factored import low_rank_dense

        deltas = []
        for term in task.terms:
            w, b, a = _scaled_factors(term, readers)
            delta = b @ a
            if term.dare is not None:
                generator = tensor_generator(term.dare.seed, f"{task.module}.weight|{term.source}|pre")
                delta = dare(delta, 1.0 - term.dare.drop, generator, rescale=term.dare.rescale)
            deltas.append(delta)
        c = task.combine
        merged = _combine_dense(deltas, task.terms, c, f"{task.module}.weight")
        del deltas
        low = low_rank_dense(merged, task.rank, generator=tensor_generator(c.seed, f"{task.module}|svd"))
        b, a = low.B, low.A
        report.modules.append(
            ModuleReport(task.module, task.rank, float(low.err), float(low.rel_err), low.method_used)
        )
    b, a = _pad(b, a, task.rank)
    return {name_a: a.to(task.dtype).contiguous(), name_b: b.to(task.dtype).contiguous()}


def _pad(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    have = b.shape[1]
    if have == rank:
        return b, a
    if have > rank:
        return b[:, :rank], a[:rank]
    return (
        torch.cat([b, b.new_zeros(b.shape[0], rank - have)], dim=1),
        torch.cat([a, a.new_zeros(rank - have, a.shape[1])], dim=0),
    )
