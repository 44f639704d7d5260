"""Source kind `extract`: a LoRA extracted from a full fine-tune, ΔW = W_ft − W_base per tensor, low-rank
factors by (randomized) SVD.

Planning reads headers only (:func:`plan_extraction`, once per run: the job is kept in the opened source);
:func:`extract` streams tensor by tensor and writes a PEFT adapter (through io/peft) whose scale is 1 (lora_alpha = r per module), with √S split over both factors, so that
B @ A reproduces the rank-k ΔW. Unchanged tensors are skipped; changed embeddings, lm_head and 1-D tensors are
handled by the options of the source (embedding LoRA, modules_to_save, error or skip).

Planning (headers only) is in ``extract_plan.py``, the extraction itself in ``extract_run.py``; this module is the
source kind, and its names are importable from here too.
"""

from __future__ import annotations

from pathlib import Path

from loracook.io.checkpoint import Checkpoint
from loracook.io.resolve import resolve_path
from loracook.sources.extract_plan import (
    ExtractItem,
    ExtractJob,
    describe,
    estimate_seconds,
    plan_extraction,
    virtual_adapter,
)
from loracook.sources.extract_run import CHECK_TOLERANCE, ExtractedModule, ExtractReport, extract

__all__ = [
    "CHECK_TOLERANCE",
    "EXTRACT",
    "ExtractItem",
    "ExtractJob",
    "ExtractKind",
    "ExtractReport",
    "ExtractedModule",
    "describe",
    "estimate_seconds",
    "extract",
    "plan_extraction",
    "virtual_adapter",
]

# ---------------------------------------------------------------------------------------------- the kind


class ExtractKind:
    """`sources.X: {extract: {...}}`: planned from headers as the adapter it will be at most (every candidate
    module at the maximum rank); made real by running the extraction into a PEFT adapter folder."""

    name = "extract"

    def accepts(self, spec) -> bool:
        return hasattr(spec, "extract")

    def open(self, name: str, spec, base: Checkpoint, seed: int):
        from loracook.sources import Source, dare_of

        tuned = resolve_path(spec.extract.model, kind="fine-tune")
        job = plan_extraction(name, spec.extract, base, tuned)
        return Source(
            name,
            self,
            spec,
            virtual_adapter(job),
            dare_of(spec, seed),
            inputs=(Path(tuned),),
            note=describe(job),
            state=job,
        )

    def make_real(self, source, work: Path, seed: int, on_task):
        from loracook.io.peft import open_adapter
        from loracook.sources import replace

        def progress(done: int, total: int, label: str) -> None:
            if on_task:
                on_task(done, total, f"extract {source.name}: {label}")

        report = extract(source.state, work, seed=seed, on_item=progress)
        return replace(source, adapter=open_adapter(work), report=report)


EXTRACT = ExtractKind()
