"""Source kind `extract`: a LoRA extracted from a full fine-tune, ΔW = W_ft − W_base per tensor, low-rank
factors by (randomized) SVD.

Planning reads headers only (:func:`plan_extraction`, once per run: the job is kept in the opened source);
:func:`extract` streams tensor by tensor and writes a PEFT adapter (through io/peft) whose scale is 1 (lora_alpha = r per module), with √S split over both factors, so that
B @ A reproduces the rank-k ΔW. Unchanged tensors are skipped; changed embeddings, lm_head and 1-D tensors are
handled by the options of the source (embedding LoRA, modules_to_save, error or skip).
"""

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
from loracook.io.checkpoint import Checkpoint, open_checkpoint
from loracook.io.names import is_embedding, is_token_embedding, stores_transposed
from loracook.io.peft import Adapter, LoraModule, adapter_config, factor_names, save_adapter, saved_name
from loracook.io.resolve import resolve_path
from loracook.io.tensors import Readers, TensorInfo
from loracook.recipe.model import ExtractSpec
from loracook.safe_regex import compile_regex
from loracook.threads import map_ordered

# The randomized SVD's factors are accepted within 0.5% of the optimal rank-k error (check: exact), or once
# the block Krylov iteration gains less than 0.5% per step (check: estimate), so an extraction stays within 1%
# of a full SVD's (mergekit's) error even after rounding to the output dtype.
CHECK_TOLERANCE = 0.005


@dataclass(frozen=True)
class ExtractItem:
    """One base tensor to compare with its fine-tuned counterpart."""

    name: str  # base tensor name
    role: str  # linear | embedding | lm_head | vector
    base: TensorInfo
    tuned: TensorInfo

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class ExtractJob:
    source: str
    spec: ExtractSpec
    tuned_path: Path
    items: tuple[ExtractItem, ...]
    fan_in_fan_out: bool
    config: dict

    @property
    def bytes_read(self) -> int:
        return sum(i.base.nbytes + i.tuned.nbytes for i in self.items)

    @property
    def flops(self) -> float:
        """Rough cost of the SVDs: block Krylov to depth 3 (8 products of ΔW with a block of rank + 8 columns,
        what the fine-tunes of the extraction benchmark needed), or a full SVD."""
        total = 0.0
        for item in self.items:
            if len(item.base.shape) != 2:
                continue
            m, n = item.base.shape
            k = min(self.spec.rank + 8, m, n)
            total += 2 * m * n * k * 8 if self.spec.method == "randomized" else 4 * m * n * min(m, n)
        return total


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


def plan_extraction(source: str, spec: ExtractSpec, base: Checkpoint, tuned_path: Path) -> ExtractJob:
    """Match the fine-tune's tensors to the base's (headers only); report every mismatch at once."""
    tuned = open_checkpoint(tuned_path)
    arch_base = base.config.get("architectures") or [base.config.get("model_type")]
    arch_tuned = tuned.config.get("architectures") or [tuned.config.get("model_type")]
    if base.config and tuned.config and arch_base != arch_tuned:
        raise BadInput(
            f"the fine-tune is a {arch_tuned[0]} but the base is a {arch_base[0]}",
            file=tuned.path,
            loc=("sources", source, "extract", "model"),
            fix="extract from a fine-tune of this base",
        )
    problems: list[str] = []
    items: list[ExtractItem] = []
    include = [compile_regex(p, what="extract.include") for p in spec.include or []]
    exclude = [compile_regex(p, what="extract.exclude") for p in spec.exclude]
    embedding = next((n for n in base.tensors if is_token_embedding(n)), None)
    for name, info in sorted(base.tensors.items(), key=lambda kv: (kv[1].file, kv[1].offset or 0)):
        other = tuned.tensors.get(name)
        if other is None:
            problems.append(f"{name} is missing")
            continue
        role = _role(name, info)
        if role is None:
            continue
        if other.shape != info.shape and not (
            role in ("embedding", "lm_head") and other.shape[1:] == info.shape[1:]
        ):
            problems.append(f"{name} has shape {list(other.shape)}, the base {list(info.shape)}")
            continue
        module = name.rsplit(".", 1)[0]
        if role == "linear" and (
            (include and not any(p.search(module) for p in include)) or any(p.search(module) for p in exclude)
        ):
            continue
        items.append(ExtractItem(name, role, info, other))
    if "lm_head.weight" in tuned.tensors and "lm_head.weight" not in base.tensors and embedding:
        # a tied base, an untied fine-tune: the fine-tuned head is compared with the shared embedding
        items.append(
            ExtractItem("lm_head.weight", "lm_head", base.tensors[embedding], tuned.tensors["lm_head.weight"])
        )
    extra = sorted(set(tuned.tensors) - set(base.tensors) - {"lm_head.weight"})
    problems += [f"{n} is not in the base" for n in extra[:3]]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise BadInput(
            f"the fine-tune does not match the base ({len(problems)} problems): {shown}",
            file=tuned.path,
            loc=("sources", source, "extract", "model"),
            fix="extract from a complete fine-tune of this base",
        )
    fifo = stores_transposed(base.config)
    return ExtractJob(source, spec, tuned.path, tuple(items), fifo, base.config)


def _role(name: str, info: TensorInfo) -> str | None:
    if not info.dtype.is_floating_point:
        return None
    if len(info.shape) == 1:
        return "vector"
    if len(info.shape) != 2:
        return None
    if is_embedding(name):
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    return "linear"


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


def estimate_seconds(job: ExtractJob) -> float:
    """A rough wall-time estimate on 2 CPU cores (≈ 20 GFLOP/s sustained in fp32 matmuls, plus I/O)."""
    return job.flops / 20e9 + job.bytes_read / 1e9


def describe(job: ExtractJob) -> str:
    linear = sum(1 for i in job.items if i.role == "linear")
    return (
        f"extract {job.source}: {linear} linear tensors + {len(job.items) - linear} others at rank ≤ {job.spec.rank}"
        f"{f', energy {job.spec.energy}' if job.spec.energy else ''} ({job.spec.method}); "
        f"≈ {job.flops / 1e9:.0f} GFLOP, ≈ {estimate_seconds(job):.1f} s"
    )


def virtual_adapter(job: ExtractJob) -> Adapter:
    """What the extraction will produce at most (every candidate module at the maximum rank), for planning."""
    modules: dict[str, LoraModule] = {}
    for item in job.items:
        if item.role == "vector" or (item.role in ("embedding", "lm_head") and job.spec.embeddings != "lora"):
            continue
        if item.base.shape != item.tuned.shape:
            continue
        transposed = item.role == "embedding" or job.fan_in_fan_out
        rows, cols = item.base.shape
        out_f, in_f = (cols, rows) if transposed else (rows, cols)
        k = min(job.spec.rank, out_f, in_f)
        module = "lm_head" if item.name == "lm_head.weight" else item.module
        embedding = item.role == "embedding"
        a_name, b_name = factor_names(module, embedding)
        where = f"<extract {job.source}>"
        modules[module] = LoraModule(
            module=module,
            kind="embedding" if embedding else "linear",
            a=TensorInfo(where, a_name, torch.float32, (k, in_f), None),
            b=TensorInfo(where, b_name, torch.float32, (out_f, k), None),
            rank=k,
            alpha=float(k),
            scale=1.0,
            fan_in_fan_out=job.fan_in_fan_out and not embedding,
        )
    return Adapter(
        job.tuned_path, job.tuned_path, {"fan_in_fan_out": job.fan_in_fan_out}, modules, virtual=True
    )


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
