"""The math of one task: a model tensor (streamed in row blocks, or whole) or an adapter module (factors).

Every path reads a LoRA term the same way (:func:`scaled_factors`: A and s·B in fp32) and asks the task's
merge method to combine: ``factored`` from the factors where the method has that form, else ``dense`` on the
whole per-source deltas. The merge weights come from the bound :class:`~loracook.plan.values.Values`.
"""

from __future__ import annotations

import torch

from loracook.errors import BadInput
from loracook.execute.executor import ModuleReport, Report
from loracook.execute.sinks import require_finite
from loracook.io.peft import read_factors
from loracook.io.tensors import Readers
from loracook.methods import DenseInputs
from loracook.ops.lora import dora_delta, lora_rows
from loracook.plan.tasks import BiasTerm, FullTerm, LoraTerm, ModuleTask, TensorTask, Term, term_infos
from loracook.plan.values import Values
from loracook.threads import one_thread

# ------------------------------------------------------------------------------------------- reading terms


def scaled_factors(term: LoraTerm, readers: Readers) -> tuple[torch.Tensor, torch.Tensor]:
    """A and s·B of a LoRA term in fp32 (the merge weight is applied by the caller)."""
    return read_factors(readers.read, term)


def _pairs(terms, readers: Readers, values: Values) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    pairs = []
    for term in terms:
        a, b = scaled_factors(term, readers)
        pairs.append((values.weight(term.source, term.at), b, a))
    return pairs


def _refuse_broken(info, source: str) -> None:
    raise BadInput(
        f"tensor {info.name} of source {source!r} holds NaN or infinite values",
        file=info.file,
        fix="the adapter is broken; retrain or re-save it",
    )


def _prepared(term: Term, readers: Readers, values: Values):
    """A plain LoRA term as (A, w·s·B, transposed) in fp32, its factors checked for NaN/Inf; others as is."""
    if not isinstance(term, LoraTerm) or term.magnitude is not None:
        return term
    a = readers.read(term.a).to(torch.float32)
    b = readers.read(term.b).to(torch.float32)
    for info, value in ((term.a, a), (term.b, b)):
        if not bool(torch.isfinite(value).all()):
            _refuse_broken(info, term.source)
    weight = values.weight(term.source, term.at)
    b = b * (term.scale * weight)  # one product, as PEFT scales: the output bytes depend on it
    if not bool(torch.isfinite(b).all()):  # the factors are finite: the scale or the weight overflows
        raise BadInput(
            f"merging {term.at}: source {term.source!r} at weight {weight:g} overflowed to infinity",
            fix="check the merge weights",
        )
    return (a, b, term.transposed)


def check_finite(value: torch.Tensor, name: str, terms, readers: Readers) -> None:
    """Refuse NaN/Inf produced by a merge (as PEFT's safe_merge does) instead of writing a broken model."""
    if not value.is_floating_point() or bool(torch.isfinite(value).all()):
        return
    for term in terms:
        for info in term_infos(term):
            if not bool(torch.isfinite(readers.read(info).to(torch.float32)).all()):
                _refuse_broken(info, term.source)
    raise BadInput(
        f"merging {name} overflowed to NaN or infinity", fix="check the merge weights and the sources"
    )


# ------------------------------------------------------------------------------------------- model tensors


def tensor_task(task: TensorTask, readers: Readers, values: Values, sink, report: Report, buffers) -> None:
    if not task.streamed:  # whole-tensor math (element-wise methods, DoRA transposed) uses every core
        value = whole(task, readers, values, report)
        check_finite(value, task.name, task.terms, readers)
        sink.write(task.name, value.to(task.dtype))
        return
    rows = task.shape[0] if task.shape else 1
    spans = (
        [(s, min(s + task.block_rows, rows)) for s in range(0, rows, task.block_rows)]
        if task.shape
        else [None]
    )
    with one_thread():
        _stream(task, readers, values, sink, report, buffers, spans)


def _stream(task: TensorTask, readers, values, sink, report, buffers, spans) -> None:
    factors = _low_rank_first(task, readers, values, report)
    if factors is None:
        factors = [_prepared(term, readers, values) for term in task.terms]
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
                    value += _block(loaded, base, readers, values, span)
            if not checked:
                check_finite(value, task.name, task.terms, readers)
            block = (
                buffers.out().view(task.dtype)[: value.numel()].view(value.shape) if value.numel() else value
            )
            block.copy_(value)
        sink.write(task.name, block)


def _low_rank_first(task: TensorTask, readers, values, report: Report) -> list | None:
    """For a method that is low-rank but not a plain sum (svd, the LoRA-native methods): its factors of the
    whole module, computed once and then streamed as one term. None for exact sums."""
    if not task.terms or task.combine.method.exact:
        return None
    pairs = _pairs(task.terms, readers, values)
    total = sum(b.shape[1] for _, b, _ in pairs)
    rank = min(task.combine.rank or total, total)
    inputs = dense_inputs(task.terms, task.combine, task.name, values)
    result = task.combine.method.factored(pairs, rank, task.combine.params, inputs)
    report.modules.append(
        ModuleReport(
            task.name,
            rank,
            result.err,
            result.err / result.total if result.total else 0.0,
            result.how,
        )
    )
    return [(result.A, result.B, task.terms[0].transposed)]


def _needs_base(term: Term) -> bool:
    return isinstance(term, FullTerm) or (isinstance(term, LoraTerm) and term.magnitude is not None)


def _block(term: Term, base: torch.Tensor, readers: Readers, values: Values, span) -> torch.Tensor:
    """One source's weighted delta for the rows ``span`` (exact methods, row-separable terms)."""
    rows = span or (0, base.shape[0] if base.dim() else 1)
    weight = values.weight(term.source, term.at)
    if isinstance(term, BiasTerm):
        bias = readers.read(term.bias).to(torch.float32) * (term.scale * weight)
        return bias[rows[0] : rows[1]] if span else bias
    if isinstance(term, FullTerm):
        return (readers.read(term.tensor, span).to(torch.float32) - base) * weight
    a, b = scaled_factors(term, readers)
    magnitude = readers.read(term.magnitude).to(torch.float32)[rows[0] : rows[1]]
    return dora_delta(base, lora_rows(a, b, term.transposed, rows), magnitude, term.transposed) * weight


def whole(task: TensorTask, readers: Readers, values: Values, report: Report) -> torch.Tensor:
    """The whole tensor W + combine(ΔW_1..n) in fp32, for methods that need each delta whole."""
    base = readers.read(task.base).to(torch.float32)
    if not task.terms:
        return base
    combine = task.combine
    deltas = [_dense_delta(t, base, readers, task.name) for t in task.terms]
    merged = combine_dense(deltas, task.terms, combine, task.name, values)
    del deltas
    if combine.method.truncates and merged.dim() == 2:
        from loracook.ops.lowrank import low_rank_dense

        low = low_rank_dense(merged, min(combine.rank or min(merged.shape), min(merged.shape)))
        report.modules.append(
            ModuleReport(task.name, low.B.shape[1], float(low.err), float(low.rel_err), low.method_used)
        )
        merged = low.B @ low.A
    return base + merged


def dense_inputs(terms, combine, name: str, values: Values) -> DenseInputs:
    """The bound weights and densities of a task's terms; random masks are seeded by tensor and source."""
    return DenseInputs(
        weights=[values.weight(t.source, t.at) for t in terms],
        densities=[values.density(t.source) for t in terms],
        names=[f"{name}|{t.source}" for t in terms],
        seed=combine.seed,
        sources=[t.source for t in terms],
    )


def combine_dense(deltas: list[torch.Tensor], terms, combine, name: str, values: Values) -> torch.Tensor:
    """The method's combination of whole per-source deltas."""
    return combine.method.dense(deltas, dense_inputs(terms, combine, name, values), combine.params)


def _dense_delta(term: Term, base: torch.Tensor, readers: Readers, name: str) -> torch.Tensor:
    """One source's unweighted ΔW for the whole tensor, after its own DARE pre-processing."""
    if isinstance(term, BiasTerm):
        delta = readers.read(term.bias).to(torch.float32) * term.scale
    elif isinstance(term, FullTerm):
        delta = readers.read(term.tensor).to(torch.float32) - base
    else:
        a, b = scaled_factors(term, readers)
        delta = lora_rows(a, b, term.transposed, (0, base.shape[0]))
        if term.magnitude is not None:
            magnitude = readers.read(term.magnitude).to(torch.float32)
            delta = dora_delta(base, delta, magnitude, term.transposed)
    return _predare(delta, term, name)


def _predare(delta: torch.Tensor, term: Term, name: str) -> torch.Tensor:
    """A source's own DARE pre-processing (`sources.X.dare`), seeded by tensor and source."""
    if term.dare is None:
        return delta
    from loracook.ops.rng import tensor_generator
    from loracook.ops.sparsify import dare

    generator = tensor_generator(term.dare.seed, f"{name}|{term.source}|pre")
    return dare(delta, 1.0 - term.dare.drop, generator, rescale=term.dare.rescale)


def block_bytes(task: TensorTask) -> int:
    """Bytes of one block in the wider of the input and output dtypes."""
    elements = task.block_rows * (task.base.row_bytes // task.base.dtype.itemsize if task.shape else 1)
    return elements * max(task.base.dtype.itemsize, task.dtype.itemsize)


# ----------------------------------------------------------------------------------------- adapter modules


def module_task(task, readers: Readers, values: Values) -> tuple[dict[str, torch.Tensor], list[ModuleReport]]:
    """One task of an adapter output: its tensors (each checked finite) and report lines (a worker thread)."""
    report = Report()
    if isinstance(task, ModuleTask):
        tensors = _module(task, readers, values, report)
    else:
        value = whole(task, readers, values, report)
        check_finite(value, task.name, task.terms, readers)
        tensors = {task.out_name or task.name: value.to(task.dtype)}
    for name, tensor in tensors.items():
        require_finite(name, tensor)
    return tensors, report.modules


def _module(task: ModuleTask, readers: Readers, values: Values, report: Report) -> dict[str, torch.Tensor]:
    """Merged LoRA factors of one module, padded to ``task.rank``."""
    name_a, name_b = task.names
    method = task.combine.method
    if task.factored:
        inputs = dense_inputs(task.terms, task.combine, f"{task.module}.weight", values)
        result = method.factored(_pairs(task.terms, readers, values), task.rank, task.combine.params, inputs)
        b, a = result.B, result.A
        report.modules.append(
            ModuleReport(
                task.module,
                b.shape[1] if result.how == "exact" else task.rank,
                result.err,
                result.err / result.total if result.total else 0.0,
                result.how,
            )
        )
    else:
        from loracook.ops.lowrank import low_rank_dense
        from loracook.ops.rng import tensor_generator

        deltas = []
        for term in task.terms:
            a, b = scaled_factors(term, readers)
            deltas.append(_predare(b @ a, term, f"{task.module}.weight"))
        merged = combine_dense(deltas, task.terms, task.combine, f"{task.module}.weight", values)
        del deltas
        generator = tensor_generator(task.combine.seed, f"{task.module}|svd")
        low = low_rank_dense(merged, task.rank, generator=generator)
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
