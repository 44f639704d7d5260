"""Running an extraction: ΔW = W_ft − W_base tensor by tensor on every core, low-rank factors by (randomized)
SVD, written as a PEFT adapter (through io/peft) whose scale is 1, plus extract_report.json."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracook.errors import BadInput
from loracook.execute.scratch import Scratch
from loracook.io.peft import adapter_config, factor_names, save_adapter, saved_name
from loracook.io.tensors import Readers, TensorInfo
from loracook.sources.extract_plan import ExtractItem, ExtractJob
from loracook.threads import map_ordered

# The randomized SVD's factors are accepted within 0.5% of the optimal rank-k error (check: exact), or once
# the block Krylov iteration gains less than 0.5% per step (check: estimate), so an extraction stays within 1%
# of a full SVD's (mergekit's) error even after rounding to the output dtype.
CHECK_TOLERANCE = 0.005


@dataclass(frozen=True)
class ExtractedModule:
    name: str
    kind: str  # lora | embedding-lora | full | skipped | unchanged
    rank: int
    energy: float  # retained share of ‖ΔW‖²
    relative_error: float  # ‖ΔW − ΔW_k‖ / ‖ΔW‖
    change: float  # ‖ΔW‖ / ‖W‖
    method: str = ""


@dataclass
class ExtractReport:
    source: str
    modules: list[ExtractedModule] = field(default_factory=list)

    def to_json(self) -> dict:
        loras = [m for m in self.modules if m.kind in ("lora", "embedding-lora")]
        return {
            "source": self.source,
            "modules": [m.__dict__ for m in self.modules],
            "lora_modules": len(loras),
            "max_relative_error": max((m.relative_error for m in loras), default=0.0),
            "mean_energy": sum(m.energy for m in loras) / len(loras) if loras else 1.0,
            "counts": dict(Counter(m.kind for m in self.modules)),
        }


def extract(
    job: ExtractJob, out: Path, seed: int = 0, on_item: Callable[[int, int, str], None] | None = None
) -> ExtractReport:
    """Run the extraction and write a PEFT adapter (plus extract_report.json) into the folder ``out``.

    Items are computed side by side on every core (one torch thread each) and applied in plan order, so the
    adapter does not depend on the number of cores; a few items are in flight at a time, so memory stays
    bounded by a few tensors."""

    report = ExtractReport(job.source)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    saved: set[str] = set()
    readers, scratch = Readers(), _Scratch()
    try:
        outcomes = map_ordered(lambda item: _extract_item(job, item, seed, readers.read, scratch), job.items)
        for step, (item, outcome) in enumerate(zip(job.items, outcomes, strict=True)):
            if on_item:
                on_item(step, len(job.items), item.name)
            tensors.update(outcome.tensors)
            report.modules.append(outcome.entry)
            if outcome.kind in ("lora", "embedding-lora"):
                ranks[outcome.module] = outcome.entry.rank
            elif outcome.kind == "full":
                saved.add(outcome.module)
    finally:
        readers.close()
    _finish(job, out, tensors, ranks, saved, report)
    return report


@dataclass(frozen=True)
class _Outcome:
    """What one item contributes: its tensors (if any) and its report line."""

    module: str
    entry: ExtractedModule
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.entry.kind


class _Scratch(threading.local, Scratch):
    """Buffers of one worker thread, reused from tensor to tensor: the raw bytes of both tensors, the fp32
    base and ΔW. A fresh tensor of tens of MB per module costs a page fault per 4 KiB page on its first
    touch, which showed as system time larger than the math. Buffers above ``LIMIT`` bytes (embeddings) are
    not kept: those tensors get fresh memory, so the buffers stay at the size of the largest linear layer.
    The raw bytes are kept only up to ``RAW_LIMIT``: larger raw buffers measured no faster and held more
    (docs/benchmarks.md, "Extraction scratch buffers", has the figures)."""

    LIMIT = 64 << 20  # bytes: 2048 × 8192 in fp32
    RAW_LIMIT = 16 << 20

    def __init__(self) -> None:
        Scratch.__init__(self, self.LIMIT)

    def raw(self, key: str, info: TensorInfo) -> torch.Tensor | None:
        """A uint8 buffer for ``TensorReader.read(into=...)``."""
        return self.get(key, (info.nbytes,), torch.uint8, self.RAW_LIMIT)


def _extract_item(job: ExtractJob, item: ExtractItem, seed: int, read, scratch: _Scratch) -> _Outcome:
    """ΔW of one tensor, and what becomes of it (runs on a worker thread). Everything that leaves this
    function is a copy: ``w``, ``w_ft``, the fp32 base and ΔW live in the worker's scratch buffers."""
    from loracook.ops.lowrank import low_rank_dense
    from loracook.ops.rng import tensor_generator

    spec = job.spec
    module = "lm_head" if item.name == "lm_head.weight" else item.module
    # in the stored dtypes
    w, w_ft = (
        read(item.base, into=scratch.raw("w", item.base)),
        read(item.tuned, into=scratch.raw("ft", item.tuned)),
    )
    if w.shape != w_ft.shape:  # vocabulary resized: only the whole tensor can carry it
        return _full(item, module, w_ft, change=float("inf"))
    if w.dtype == w_ft.dtype and torch.equal(w, w_ft):  # the common case, without fp32 copies
        return _Outcome(module, ExtractedModule(item.name, "unchanged", 0, 1.0, 0.0, 0.0))
    shape = tuple(w.shape)
    base32 = _fp32(w, scratch.get("base", shape, torch.float32))
    scale = float(torch.linalg.vector_norm(base32)) or 1.0
    delta = _fp32(w_ft, scratch.get("delta", shape, torch.float32)).sub_(base32)
    del base32, w
    change = float(torch.linalg.vector_norm(delta)) / scale
    if change <= spec.tolerance:
        return _Outcome(module, ExtractedModule(item.name, "unchanged", 0, 1.0, 0.0, change))
    skipped = _Outcome(module, ExtractedModule(item.name, "skipped", 0, 0.0, 1.0, change))
    if item.role == "vector":
        if spec.vectors == "error":
            raise BadInput(
                f"{item.name} changed in the fine-tune (‖ΔW‖/‖W‖ = {change:.2e}); 1-D tensors cannot be a LoRA",
                file=job.tuned_path,
                loc=("sources", job.source, "extract"),
                fix="set extract.vectors: full (ship it as modules_to_save) or skip",
            )
        return skipped if spec.vectors == "skip" else _full(item, module, w_ft, change)
    embedding_like = item.role in ("embedding", "lm_head")
    if embedding_like and spec.embeddings == "skip":
        return skipped
    if embedding_like and spec.embeddings == "full":
        return _full(item, module, w_ft, change)
    # Factor space: PEFT computes ΔW = B @ A (out × in); transposed storage for Conv1D and embeddings.
    transposed = item.role == "embedding" or job.fan_in_fan_out
    target = delta.T.contiguous() if transposed else delta
    del delta, w_ft
    low = low_rank_dense(
        target,
        min(spec.rank, *target.shape),
        method=spec.method,
        energy=spec.energy,
        tol=CHECK_TOLERANCE,
        check=spec.check,
        generator=tensor_generator(seed, f"extract|{job.source}|{item.name}"),
    )
    del target
    name_a, name_b = factor_names(module, embedding=item.role == "embedding")
    factors = {name_a: low.A.contiguous(), name_b: low.B.contiguous()}
    kind = "embedding-lora" if item.role == "embedding" else "lora"
    entry = ExtractedModule(
        item.name, kind, low.B.shape[1], float(low.energy), float(low.rel_err), change, low.method_used
    )
    return _Outcome(module, entry, factors)


def _fp32(tensor: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    return tensor.to(torch.float32, copy=True) if buffer is None else buffer.copy_(tensor)


def _full(item: ExtractItem, module: str, value: torch.Tensor, change: float) -> _Outcome:
    """The fine-tuned tensor shipped whole (modules_to_save), as an fp32 copy (``value`` may be scratch)."""
    entry = ExtractedModule(item.name, "full", 0, 1.0, 0.0, change)
    return _Outcome(module, entry, {saved_name(item.name): value.to(torch.float32, copy=True)})


def _finish(job, out, tensors, ranks, saved, report) -> None:
    clash = sorted(m for m in saved if m in ranks)
    if clash:
        raise BadInput(
            f"{clash[0]} changed both its weight and its 1-D parameters; it cannot be a LoRA and saved in full",
            file=job.tuned_path,
            loc=("sources", job.source, "extract"),
            fix=f"exclude it (extract.exclude: ['{re.escape(clash[0])}$']) or set extract.vectors: skip",
        )
    if not tensors:
        raise BadInput(
            "the fine-tune does not differ from the base (nothing to extract)",
            file=job.tuned_path,
            loc=("sources", job.source, "extract", "model"),
            fix="check extract.model, or lower extract.tolerance",
        )
    out.mkdir(parents=True, exist_ok=True)
    config = adapter_config(
        ranks,
        target_modules=sorted(ranks) or None,
        modules_to_save=sorted(saved) or None,
        base_model=job.config.get("_name_or_path") or None,
        fan_in_fan_out=job.fan_in_fan_out,
        default_rank=job.spec.rank,
        extra={"loracook_extracted_from": str(job.tuned_path)},
    )
    save_adapter(out, tensors, config)
    (out / "extract_report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
