"""Walk a compiled plan with bound values: read tensors, combine the terms in fp32, cast, hand to a sink.

Model outputs stream: each base tensor is read in row blocks (at most plan.tasks.BLOCK_BYTES in fp32) unless
its method needs the whole delta (element-wise methods, DoRA stored transposed), and blocks go to the sink in
plan order. Adapter plans are small per-module math, run side by side on every core and handed to the sink
in plan order. Each input file's handle is closed after its last use. The executor knows no recipe: the
plan's terms name their sources, and :class:`~loracook.plan.values.Values` gives their weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from loracook.execute.sinks import Finite, Sink
from loracook.io.tensors import Readers
from loracook.io.writer import TensorSpec
from loracook.plan.tasks import ModuleTask, Plan, TensorTask, term_infos
from loracook.plan.values import Values
from loracook.threads import map_ordered

OnTask = Callable[[int, int, str], None]  # done, total, what is being worked on


@dataclass(frozen=True)
class ModuleReport:
    """How well an output module reproduces its exact target (Frobenius norms)."""

    name: str
    rank: int
    error: float
    relative_error: float
    method: str  # exact | factored-svd | randomized | exact (a dense SVD) | the method's own name


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


def execute(plan: Plan, values: Values, sink: Sink, on_task: OnTask | None = None) -> Report:
    """Compute every task of ``plan`` with ``values`` bound, into ``sink``; returns the error report.

    >>> from loracook.execute.sinks import MemorySink  # doctest: +SKIP
    >>> sink = MemorySink(); execute(plan, Values({"a": 0.5}), sink)  # doctest: +SKIP
    >>> sink.tensors["model.layers.0.self_attn.q_proj.weight"]  # doctest: +SKIP
    """
    from loracook.execute.scratch import Buffers
    from loracook.execute.tensors import block_bytes, module_task, tensor_task

    values.check()
    if not plan.parallel:  # parallel tasks check their own tensors on the worker threads (module_task)
        sink = Finite(sink)
    readers, report = Readers({}, _last_use(plan)), Report()
    sink.start([TensorSpec(*spec) for spec in plan.output_specs()])
    try:
        if plan.parallel:  # small per-module math, side by side on every core
            results = map_ordered(lambda task: module_task(task, readers, values), plan.tasks)
            for step, (task, (tensors, modules)) in enumerate(zip(plan.tasks, results, strict=True)):
                for name, tensor in tensors.items():
                    sink.write(name, tensor)
                report.modules.extend(modules)
                _progress(on_task, step, plan, task)
        else:
            biggest = max((block_bytes(t) for t in plan.tasks if t.streamed), default=0)
            buffers = Buffers(-(-biggest // 8) * 8, sink.in_flight)
            for step, task in enumerate(plan.tasks):
                tensor_task(task, readers, values, sink, report, buffers)
                readers.release(step)
                _progress(on_task, step, plan, task)
    finally:
        readers.close()
    sink.finish()
    return report


def _progress(on_task: OnTask | None, step: int, plan: Plan, task: TensorTask | ModuleTask) -> None:
    if on_task:
        on_task(step + 1, len(plan.tasks), task.module if isinstance(task, ModuleTask) else task.name)


def _last_use(plan: Plan) -> dict[str, int]:
    last: dict[str, int] = {}
    for step, task in enumerate(plan.tasks):
        if isinstance(task, TensorTask):
            last[task.base.file] = step
        for term in task.terms:
            for info in term_infos(term):
                last[info.file] = step
    return last
