"""The compiled plan: frozen tasks built from a recipe and file headers only (no tensor data is read).

Output kind `model`: one :class:`TensorTask` per output tensor, the base tensor plus the terms added to it.
Output kind `adapter`: one :class:`ModuleTask` per adapted module (its merged LoRA factors), plus
:class:`TensorTask` s for tensors saved in full (modules_to_save).
Each term is one source's contribution and carries the source's name, not its weight: weights and densities
are bound when the plan is executed (:class:`~loracook.plan.values.Values`), so one plan serves many weight
sets (a search). A :class:`Combine` says how the terms of a task combine. The executor walks the tasks in
order and never looks back at the recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracook.io.checkpoint import Checkpoint
from loracook.io.peft import Adapter, factor_names
from loracook.io.tensors import TensorInfo
from loracook.methods import MergeMethod
from loracook.recipe.types import MergeParams

# fp32 bytes of one row block; bounds the executor's working memory. Small enough that a block is still in
# the CPU caches when the writer thread copies it into the page cache, large enough that per-block overhead
# does not show (docs/benchmarks.md, "Block size", has the measurements).
BLOCK_BYTES = 4 * 2**20


@dataclass(frozen=True)
class Dare:
    """Per-source DARE pre-processing of ΔW: drop entries with probability ``drop``, rescale by 1/(1-drop)."""

    drop: float
    rescale: bool
    seed: int


@dataclass(frozen=True)
class LoraTerm:
    """w · s · B @ A (transposed for fan_in_fan_out and embeddings); DoRA when ``magnitude`` is set.

    ``at`` names the tensor whose merge weight w applies (the base weight), resolved at execution."""

    source: str
    at: str
    a: TensorInfo
    b: TensorInfo
    scale: float
    transposed: bool
    magnitude: TensorInfo | None = None
    dare: Dare | None = None

    @property
    def separable(self) -> bool:
        # DoRA normalises each output row; stored transposed, an output row is a column of the tensor.
        return (self.magnitude is None or not self.transposed) and self.dare is None


@dataclass(frozen=True)
class FullTerm:
    """w · (M − W): a tensor the adapter replaces (modules_to_save, saved embedding layers)."""

    source: str
    at: str
    tensor: TensorInfo
    dare: Dare | None = None

    @property
    def separable(self) -> bool:
        return self.dare is None


@dataclass(frozen=True)
class BiasTerm:
    """w · s · lora_B.bias (PEFT lora_bias); weighted like its module's weight (``at``)."""

    source: str
    at: str
    bias: TensorInfo
    scale: float
    dare: Dare | None = None
    separable: bool = True


Term = LoraTerm | FullTerm | BiasTerm


@dataclass(frozen=True)
class Combine:
    """How the terms of a task combine: the registered method and the recipe's parameters for it
    (docs/merge-methods.md). Weights and densities are not here: they are bound at execution."""

    method: MergeMethod
    params: MergeParams
    seed: int = 0

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def rank(self) -> int | None:
        return self.method.rank_of(self.params)

    @property
    def dense(self) -> bool:
        """Element-wise methods need each ΔW_i whole, in fp32."""
        return self.method.elementwise


def term_infos(term: Term) -> list[TensorInfo]:
    if isinstance(term, LoraTerm):
        return [term.a, term.b] + ([term.magnitude] if term.magnitude else [])
    if isinstance(term, FullTerm):
        return [term.tensor]
    return [term.bias]


@dataclass(frozen=True)
class TensorTask:
    """Write ``name``: the base tensor plus its combined terms, computed in fp32 and cast to ``dtype``."""

    name: str
    base: TensorInfo
    dtype: torch.dtype
    terms: tuple[Term, ...] = ()
    combine: Combine | None = None  # None: a plain copy (or cast) of the base tensor
    out_name: str | None = None  # name in the output file, when it differs (adapter modules_to_save)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def out_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def streamed(self) -> bool:
        """True when the task can run block by block (rows independent); else the tensor is done whole."""
        if not self.terms:
            return True
        method = self.combine.method
        if method.elementwise:
            return False
        if not method.exact and not self.plain_lora:  # factored methods need plain LoRA factors
            return False
        return all(t.separable for t in self.terms)

    @property
    def plain_lora(self) -> bool:
        return all(isinstance(t, LoraTerm) and t.magnitude is None for t in self.terms)

    @property
    def block_rows(self) -> int:
        """Rows per block: what fits BLOCK_BYTES in fp32, or the whole tensor when it cannot stream."""
        rows = self.shape[0] if self.shape else 1
        if len(self.shape) < 2 or not self.streamed:
            return rows
        row_bytes = math.prod(self.shape[1:]) * 4
        return max(1, min(rows, BLOCK_BYTES // max(row_bytes, 1)))

    @property
    def passthrough(self) -> bool:
        return not self.terms and self.dtype == self.base.dtype

    @property
    def working_bytes(self) -> int:
        cols = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        block = self.block_rows * cols
        need = block * (self.base.dtype.itemsize + 4 + 4 + self.dtype.itemsize)
        if not self.streamed:  # every source's dense delta at once
            need += block * 4 * (len(self.terms) + 1)
        return need + sum(i.nbytes * 2 for t in self.terms for i in term_infos(t))


@dataclass(frozen=True)
class ModuleTask:
    """One module of an output adapter: its terms combined into factors B (out × rank), A (rank × in)."""

    module: str
    kind: str  # "linear" | "embedding"
    out_features: int  # rows of B
    in_features: int  # columns of A
    rank: int  # output rank
    terms: tuple[LoraTerm, ...]
    combine: Combine
    dtype: torch.dtype = torch.float32

    @property
    def exact(self) -> bool:
        """Exact in factored form (rank Σ r_i, nothing dropped)."""
        return (
            self.combine.method.exact
            and self.rank >= sum(t.a.shape[0] for t in self.terms)
            and all(t.dare is None for t in self.terms)
        )

    @property
    def factored(self) -> bool:
        """Computed from the factors alone, without forming the d×k delta."""
        return self.combine.method.factored_form and all(t.dare is None for t in self.terms)

    @property
    def out_bytes(self) -> int:
        return self.rank * (self.out_features + self.in_features) * self.dtype.itemsize

    @property
    def working_bytes(self) -> int:
        factors = sum(i.nbytes * 2 for t in self.terms for i in term_infos(t))
        if self.factored:
            return factors + self.out_bytes * 2
        return factors + self.out_features * self.in_features * 4 * (len(self.terms) + 2)

    @property
    def names(self) -> tuple[str, str]:
        return factor_names(self.module, self.kind == "embedding")


Task = TensorTask | ModuleTask


@dataclass(frozen=True)
class Plan:
    """Everything the executor and writer need, and nothing about YAML or the terminal."""

    kind: str  # the output kind's name: "model" | "adapter" | …
    tasks: tuple[Task, ...]
    base: Checkpoint
    combine: Combine
    sources: dict[str, Adapter] = field(default_factory=dict)
    shard_size: int = 5 * 10**9
    adapter_config: dict | None = None  # the adapter_config.json to write, for kind adapter
    notes: tuple[str, ...] = ()  # e.g. the extractions that run before this plan
    # Small independent tasks (adapter modules): computed side by side on every core and kept until the end,
    # instead of streamed one after the other in row blocks.
    parallel: bool = False

    @property
    def tensor_tasks(self) -> list[TensorTask]:
        return [t for t in self.tasks if isinstance(t, TensorTask)]

    def output_specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor the plan writes, in plan order (a module's A, then its B)."""
        specs = []
        for task in self.tasks:
            if isinstance(task, ModuleTask):
                name_a, name_b = task.names
                specs.append((name_a, task.dtype, (task.rank, task.in_features)))
                specs.append((name_b, task.dtype, (task.out_features, task.rank)))
            else:
                specs.append((task.out_name or task.name, task.dtype, task.shape))
        return specs

    @property
    def method(self) -> str:
        return self.combine.name

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    @property
    def copy_files(self) -> tuple[Path, ...]:
        return tuple(self.base.copy_files())

    @property
    def virtual(self) -> bool:
        """True when some source is an extraction not yet run: the plan shows its upper bound."""
        return any(a.virtual for a in self.sources.values())

    @property
    def bytes_read(self) -> int:
        seen: set[tuple[str, str]] = set()
        total = 0
        for task in self.tasks:
            infos = [i for t in task.terms for i in term_infos(t)]
            if isinstance(task, TensorTask):
                infos.append(task.base)
            for info in infos:
                if (info.file, info.name) not in seen:
                    seen.add((info.file, info.name))
                    total += info.nbytes
        return total

    @property
    def bytes_written(self) -> int:
        return sum(task.out_bytes for task in self.tasks)

    @property
    def peak_memory(self) -> int:
        """Estimated working memory beyond the interpreter: the largest task (adapters are also kept whole)."""
        peak = max((task.working_bytes for task in self.tasks), default=0)
        return peak + (self.bytes_written if self.parallel else 0)  # parallel outputs are kept until the end
