"""Output kinds: what `output.kind` makes, as small strategy objects (one module each).

A kind checks that the merge method suits it, builds its plan's tasks from the collected terms, gives the
sink the executor writes into and the side files beside it, the facts of its model card, and the candidate
that evaluation scores. Outside this package nothing tests which kind an output is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from loracook.errors import BadInput
from loracook.io.writer import OutputFolder
from loracook.plan.tasks import Combine, Plan


class OutputKind(Protocol):
    name: str

    def check_method(self, recipe: Any, combine: Combine, sources: dict) -> None:
        """Refuse method options that make no sense for this kind (before any file is opened)."""

    def plan(self, recipe: Any, base: Any, adapters: dict, terms: dict, combine: Combine) -> Plan: ...

    def sink(self, plan: Plan, out: OutputFolder, spec: Any):
        """Where the executed tensors go; ``spec`` is the recipe's `output:` section (format, types)."""

    def side_files(self, plan: Plan, out: OutputFolder, spec: Any) -> None: ...

    def card_facts(self, plan: Plan) -> tuple[str, list[str], list[str]]:
        """(what was made, fact lines, front-matter lines) for the model card."""

    def memory_sink(self, plan: Plan):
        """A sink that keeps the result in memory for evaluation, or None to evaluate from the folder."""

    def candidate(self, name: str, plan: Plan, folder: Path, memory, base: Any): ...


def gguf_type(spec: Any, default: str) -> str:
    """The GGUF tensor type of an output: `output.gguf_type`, else the one `output.dtype` names."""
    named = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    return spec.gguf_type or named.get(spec.dtype, default)


def output_kind(name: str) -> OutputKind:
    from loracook.outputs.adapter import ADAPTER
    from loracook.outputs.model import MODEL
    from loracook.outputs.router import ROUTER

    kinds = {k.name: k for k in (MODEL, ADAPTER, ROUTER)}
    if name not in kinds:
        raise BadInput(
            f"unknown output kind {name!r}", loc=("output", "kind"), fix=f"use {' or '.join(kinds)}"
        )
    return kinds[name]
