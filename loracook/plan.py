"""The plan: frozen per-tensor tasks built from a recipe and file headers only (no tensor data is read).

One task per output tensor. A task names its base tensor and the terms added to it; each term is one source's
contribution (a LoRA product, a DoRA re-normalisation, a full replacement tensor, or a bias). The executor
walks the tasks in order and never looks back at the recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracook.errors import BadInput, Unsupported
from loracook.io.adapter import Adapter, LoraModule, open_adapter
from loracook.io.checkpoint import Checkpoint, open_checkpoint
from loracook.io.resolve import gguf_to_folder, resolve_path
from loracook.io.tensors import TensorInfo
from loracook.recipe.model import AdapterSource, ExtractSource, Recipe
from loracook.weights import check_weight, weight_for

BLOCK_BYTES = 64 * 2**20  # fp32 bytes of one row block; bounds the executor's working memory


@dataclass(frozen=True)
class LoraTerm:
    """w · s · B @ A (transposed for fan_in_fan_out and embeddings); DoRA when ``magnitude`` is set."""

    source: str
    weight: float
    a: TensorInfo
    b: TensorInfo
    scale: float
    transposed: bool
    magnitude: TensorInfo | None = None

    @property
    def separable(self) -> bool:
        # DoRA normalises each output row; stored transposed, an output row is a column of the tensor.
        return self.magnitude is None or not self.transposed


@dataclass(frozen=True)
class FullTerm:
    """w · (M − W): a tensor the adapter replaces (modules_to_save, saved embedding layers)."""

    source: str
    weight: float
    tensor: TensorInfo
    separable: bool = True


@dataclass(frozen=True)
class BiasTerm:
    """w · s · lora_B.bias (PEFT lora_bias)."""

    source: str
    weight: float
    bias: TensorInfo
    scale: float
    separable: bool = True


Term = LoraTerm | FullTerm | BiasTerm


@dataclass(frozen=True)
class TensorTask:
    """Write ``name``: the base tensor plus its terms, computed in fp32 and cast to ``dtype``."""

    name: str
    base: TensorInfo
    dtype: torch.dtype
    terms: tuple[Term, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def out_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_rows(self) -> int:
        """Rows per block: whole tensor when a term needs it, else what fits BLOCK_BYTES in fp32."""
        rows = self.shape[0] if self.shape else 1
        if not self.shape or len(self.shape) == 1 or not all(t.separable for t in self.terms):
            return rows
        row_bytes = math.prod(self.shape[1:]) * 4
        return max(1, min(rows, BLOCK_BYTES // max(row_bytes, 1)))

    @property
    def passthrough(self) -> bool:
        return not self.terms and self.dtype == self.base.dtype


@dataclass(frozen=True)
class Plan:
    """Everything the executor and writer need, and nothing about YAML or the terminal."""

    kind: str  # "model" | "adapter"
    output: Path
    tasks: tuple[TensorTask, ...]
    shard_size: int
    base: Checkpoint
    sources: dict[str, Adapter] = field(default_factory=dict)
    copy_files: tuple[Path, ...] = ()

    @property
    def bytes_read(self) -> int:
        seen: set[tuple[str, str]] = set()
        total = 0
        for task in self.tasks:
            infos = [task.base] + [i for t in task.terms for i in _term_infos(t)]
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
        """Working memory of the executor: the largest task's block buffers and factors (interpreter excluded)."""
        peak = 0
        for task in self.tasks:
            cols = math.prod(task.shape[1:]) if len(task.shape) > 1 else 1
            block = task.block_rows * cols
            # raw read + fp32 value + one fp32 delta + cast output
            need = block * (task.base.dtype.itemsize + 4 + 4 + task.dtype.itemsize)
            need += sum(i.nbytes * 2 for t in task.terms for i in _term_infos(t))  # factors, raw + fp32
            peak = max(peak, need)
        return peak


def _term_infos(term: Term) -> list[TensorInfo]:
    if isinstance(term, LoraTerm):
        return [term.a, term.b] + ([term.magnitude] if term.magnitude else [])
    if isinstance(term, FullTerm):
        return [term.tensor]
    return [term.bias]


# --------------------------------------------------------------------------------------------- planning

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base(recipe: Recipe) -> Checkpoint:
    spec = recipe.base_spec
    folder = resolve_path(spec.path, revision=spec.revision, kind="base model")
    if spec.gguf_file:
        folder = gguf_to_folder(folder, spec.gguf_file)
    try:
        return open_checkpoint(folder)
    except BadInput as error:
        error.loc = error.loc or ("base",)
        raise


def load_sources(recipe: Recipe) -> dict[str, Adapter]:
    adapters: dict[str, Adapter] = {}
    for name, source in recipe.sources.items():
        if isinstance(source, ExtractSource):
            raise Unsupported(
                "extract sources are not supported yet", loc=("sources", name), fix="use a PEFT adapter"
            )
        if isinstance(source, AdapterSource) and source.dare is not None:
            raise Unsupported("per-source dare is not supported yet", loc=("sources", name, "dare"))
        path = source.adapter if isinstance(source, AdapterSource) else source
        try:
            adapters[name] = open_adapter(resolve_path(path, kind="adapter"))
        except BadInput as error:
            error.loc = error.loc or ("sources", name)
            raise
    return adapters


def make_plan(recipe: Recipe, output: Path | None = None) -> Plan:
    """Check the recipe against the files' headers and build the task list.

    >>> plan = make_plan(load_recipe("recipes/merge-into-model.yaml").recipe)  # doctest: +SKIP
    >>> len(plan.tasks), plan.bytes_written  # doctest: +SKIP
    """
    out = output or (Path(recipe.output.path) if recipe.output.path else None)
    if out is None:
        raise BadInput(
            "no output path", loc=("output",), fix="set output.path in the recipe or pass --output"
        )
    if recipe.output.kind != "model":
        raise Unsupported(
            "output kind `adapter` is not supported yet", loc=("output", "kind"), fix="use kind: model"
        )
    if recipe.merge.method not in ("linear", "task_arithmetic"):
        raise Unsupported(
            f"merge method {recipe.merge.method!r} is not supported yet",
            loc=("merge", "method"),
            fix="use linear or task_arithmetic",
        )
    if getattr(recipe.merge, "rank", None) is not None:
        raise BadInput("merge.rank only applies to adapter outputs", loc=("merge", "rank"), fix="remove it")
    base = load_base(recipe)
    sources = load_sources(recipe)
    for name, spec in recipe.merge.weights.items():
        check_weight(spec, base.num_layers, name)
    terms = _collect_terms(recipe, base, sources)
    dtype_name = recipe.output.dtype
    tasks = []
    for name, info in sorted(base.tensors.items(), key=lambda kv: (kv[1].file, kv[1].offset or 0, kv[0])):
        dtype = info.dtype
        if dtype_name != "auto" and info.dtype.is_floating_point:
            dtype = _DTYPES[dtype_name]
        tasks.append(TensorTask(name=name, base=info, dtype=dtype, terms=tuple(terms.get(name, ()))))
    return Plan(
        kind="model",
        output=out,
        tasks=tuple(tasks),
        shard_size=recipe.output.shard_size,
        base=base,
        sources=sources,
        copy_files=tuple(base.copy_files()),
    )


def _embedding_name(base: Checkpoint) -> str | None:
    for name in base.tensors:
        if name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")):
            return name
    return None


def _target(base: Checkpoint, name: str) -> str | None:
    """The base tensor an adapter tensor applies to; lm_head goes to the embedding when they are tied."""
    if name in base.tensors:
        return name
    if name == "lm_head.weight" and base.tied_embeddings:
        return _embedding_name(base)
    return None


def _collect_terms(recipe: Recipe, base: Checkpoint, sources: dict[str, Adapter]) -> dict[str, list[Term]]:
    terms: dict[str, list[Term]] = {}
    problems: list[tuple[str, str]] = []  # (source, message)
    layers = base.num_layers

    def weight(source: str, name: str) -> float:
        return weight_for(recipe.merge.weights.get(source, 1.0), name, layers, source)

    for source, adapter in sources.items():
        for module in adapter.modules.values():
            problem = _check_module(base, module)
            if problem:
                problems.append((source, problem))
                continue
            target = _target(base, module.weight_name)
            assert target is not None
            w = weight(source, target)
            transposed = module.kind == "embedding" or module.fan_in_fan_out
            terms.setdefault(target, []).append(
                LoraTerm(source, w, module.a, module.b, module.scale, transposed, module.magnitude)
            )
            if module.bias is not None:
                bias_name = f"{module.module}.bias"
                terms.setdefault(bias_name, []).append(BiasTerm(source, w, module.bias, module.scale))
        for name, info in adapter.full.items():
            target = _target(base, name)
            if target is None:
                problems.append((source, f"{name} (saved in full) is not in the base"))
            elif base.tensors[target].shape != info.shape:
                what = (
                    "vocabulary sizes differ" if "embed" in target or "lm_head" in name else "shapes differ"
                )
                problems.append(
                    (
                        source,
                        f"{name}: {what}, adapter {list(info.shape)} vs base {list(base.tensors[target].shape)}",
                    )
                )
            else:
                terms.setdefault(target, []).append(FullTerm(source, weight(source, target), info))
    if problems:
        source = problems[0][0]
        mine = [p for s, p in problems if s == source]
        shown = "; ".join(mine[:8]) + (f"; and {len(mine) - 8} more" if len(mine) > 8 else "")
        raise BadInput(
            f"adapter {source!r} does not fit the base model ({len(mine)} problem{'s' if len(mine) > 1 else ''}): "
            + shown,
            file=sources[source].file,
            loc=("sources", source),
            fix="was it trained on this base? check `base:`",
        )
    for name, found in terms.items():
        dora = [t for t in found if isinstance(t, LoraTerm) and t.magnitude is not None]
        if dora and len(found) > 1 and any(isinstance(t, FullTerm) for t in found):
            raise Unsupported(f"{name}: a DoRA module merged with a replaced tensor", loc=("sources",))
    return terms


def _check_module(base: Checkpoint, module: LoraModule) -> str | None:
    target = _target(base, module.weight_name)
    if target is None:
        return f"module {module.module} is not in the base"
    shape = base.tensors[target].shape
    if len(shape) != 2:
        return f"module {module.module} is {len(shape)}-D in the base, not a linear layer"
    if tuple(shape) != module.delta_shape:
        return f"module {module.module} has shape {list(module.delta_shape)} but the base has {list(shape)}"
    if module.magnitude is not None:
        out = shape[1] if module.fan_in_fan_out else shape[0]
        if module.magnitude.shape != (out,):
            return f"module {module.module}: DoRA magnitude has shape {list(module.magnitude.shape)}, expected [{out}]"
    if module.bias is not None:
        bias = base.tensors.get(f"{module.module}.bias")
        if bias is None:
            return f"module {module.module} has lora_bias but the base layer has no bias"
        if bias.shape != module.bias.shape:
            return f"module {module.module}: lora bias shape {list(module.bias.shape)} vs base {list(bias.shape)}"
    return None
