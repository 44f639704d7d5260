"""Planning an extraction from headers only: which base tensors to compare with the fine-tune's
(:func:`plan_extraction`, every mismatch reported at once), its cost, and the adapter it will be at most
(:func:`virtual_adapter`), which the planner sees until the extraction has run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loracook.errors import BadInput
from loracook.io.checkpoint import Checkpoint, open_checkpoint
from loracook.io.names import is_embedding, is_token_embedding, stores_transposed
from loracook.io.peft import Adapter, LoraModule, factor_names
from loracook.io.tensors import TensorInfo
from loracook.recipe.model import ExtractSpec
from loracook.safe_regex import compile_regex


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
