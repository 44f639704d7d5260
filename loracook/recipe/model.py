"""Pydantic models of recipe format v1 (docs/recipe.md; the JSON schema in schemas/ is generated from them).

The `merge` section is a discriminated union of the registered merge methods' parameter classes
(loracook.methods), so a new method changes the schema without touching this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from loracook import methods
from loracook.recipe.types import (
    MergeParams,
    Number,
    PathStr,
    Size,
    SourceName,
    Strict,
    _check_regex,
)

# ---------------------------------------------------------------------------------------------- base model


class BaseSpec(Strict):
    """A base model: a local HF folder, a hub id, or a GGUF file to dequantize once into a cached folder."""

    path: PathStr = Field(
        description="HF model folder, hub id, or package:NAME for a model shipped by a package"
    )
    revision: str | None = Field(None, description="hub revision (only for hub ids)")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path`, dequantized to fp32 once")


def _base_tag(value: Any) -> str:
    return "path" if isinstance(value, str) else "spec"


Base = Annotated[
    Annotated[PathStr, Tag("path")] | Annotated[BaseSpec, Tag("spec")],
    Discriminator(_base_tag),
]

# ------------------------------------------------------------------------------------------------- sources


class DareSpec(Strict):
    """Per-source DARE pre-processing (Yu et al. 2023): drop entries of ΔW at random, rescale the rest."""

    drop: float = Field(ge=0.0, lt=1.0, description="probability of dropping each entry of ΔW")
    rescale: bool = Field(True, description="divide kept entries by (1 - drop)")
    seed: int | None = Field(None, description="defaults to merge.seed")


class AdapterSource(Strict):
    adapter: PathStr = Field(description="PEFT adapter folder or hub id")
    dare: DareSpec | None = None


class ExtractSpec(Strict):
    model: PathStr = Field(description="a full fine-tune of `base`")
    rank: int = Field(gt=0, description="maximum rank per module")
    energy: float | None = Field(None, gt=0.0, le=1.0, description="smallest rank keeping this energy share")
    include: list[str] | None = Field(None, description="regexes on module names to extract")
    exclude: list[str] = Field(default_factory=list, description="regexes on module names to skip")
    method: Literal["randomized", "exact"] = Field(
        "randomized", description="randomized SVD with an error check (falls back to exact), or a full SVD"
    )
    check: Literal["estimate", "exact"] = Field(
        "estimate",
        description="how a randomized SVD is accepted: when its block Krylov iteration has converged to 0.5 %"
        " (estimate, fast), or against the optimal error from the exact spectrum (exact: a guarantee, several"
        " times slower on large matrices)",
    )
    embeddings: Literal["lora", "full", "skip"] = Field(
        "lora",
        description="changed embeddings/lm_head: an embedding LoRA at `rank`, modules_to_save, or dropped",
    )
    vectors: Literal["full", "error", "skip"] = Field(
        "full", description="changed 1-D tensors (norms, biases): modules_to_save, an error, or dropped"
    )
    tolerance: float = Field(
        1e-6, ge=0.0, description="a tensor whose change ‖ΔW‖/‖W‖ is at most this counts as unchanged"
    )

    @field_validator("include", "exclude")
    @classmethod
    def _compile(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or []:
            _check_regex(pattern)
        return patterns


class ExtractSource(Strict):
    extract: ExtractSpec
    dare: DareSpec | None = None


def _source_tag(value: Any) -> str:
    if isinstance(value, str):
        return "path"
    if isinstance(value, dict) and "extract" in value:
        return "extract"
    return "adapter"


Source = Annotated[
    Annotated[PathStr, Tag("path")]
    | Annotated[AdapterSource, Tag("adapter")]
    | Annotated[ExtractSource, Tag("extract")],
    Discriminator(_source_tag),
]

# -------------------------------------------------------------------------------------------------- output


class Output(Strict):
    kind: Literal["adapter", "model", "router"] = "adapter"
    path: PathStr | None = Field(None, description="output folder; `loracook run --output` overrides it")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto keeps the base dtype for models and writes float32 adapters"
    )
    shard_size: Size = Field(5 * 10**9, description="largest safetensors shard, e.g. 2GB")
    format: Literal["safetensors", "gguf"] = Field(
        "safetensors", description="gguf: one GGUF file for llama.cpp/Ollama (docs/gguf.md)"
    )
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] | None = Field(
        None,
        description="GGUF tensor type (default: from dtype; f16 for a model with dtype auto, f32 for an adapter)",
    )
    serve: list[Literal["vllm", "lorax"]] | None = Field(
        None, description="adapter outputs: check at plan time that these engines serve it (docs/serving.md)"
    )
    max_lora_rank: int | None = Field(None, gt=0, description="with serve: the vLLM --max-lora-rank to fit")

    @field_validator("serve", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Evaluate(Strict):
    tasks: list[str] = Field(min_length=1, description="lm-eval task names, task YAML files or folders")
    limit: Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0)] | None = Field(
        None, description="items per task: a count, or a share of the items when below 1"
    )
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, gt=0)
    device: str | None = None
    apply_chat_template: bool = False
    baselines: list[str] = Field(default_factory=list, description="base and/or source names to score too")

    @field_validator("tasks")
    @classmethod
    def _resolve_task_paths(cls, tasks: list[str], info: ValidationInfo) -> list[str]:
        return _task_paths(tasks, info)


def _task_paths(tasks: list[str], info: ValidationInfo) -> list[str]:
    """Task files and folders resolve against the recipe's folder, like every other path; names stay."""
    root = (info.context or {}).get("root")
    if root is None:
        return tasks
    resolved = []
    for spec in tasks:
        path = Path(root) / Path(spec).expanduser()
        looks_like_path = "/" in spec or spec.endswith((".yaml", ".yml")) or spec.startswith(".")
        resolved.append(str(path.resolve()) if spec.strip() and (path.exists() or looks_like_path) else spec)
    return resolved


class Objective(Strict):
    """What a search candidate is scored on: few-shot examples (LoraHub's loss) or lm-eval tasks."""

    examples: PathStr | list[PathStr] | None = Field(
        None,
        description='JSONL of {"input": ..., "output": ...}: mean cross-entropy of the output tokens; a list of '
        "files makes one objective per file",
    )
    tasks: list[str] | None = Field(
        None, description="lm-eval task names or YAML files: each task's primary metric is one objective"
    )
    limit: int | None = Field(None, gt=0, description="examples (or items per task) to score on")
    chat_template: bool = Field(False, description="format each input with the tokenizer's chat template")
    split: str = Field("validation", description="tasks: the split to score on (never the test split)")
    allow_test_split: bool = Field(
        False, description="tasks: allow scoring on the test split (then the test scores are not held out)"
    )
    batch_size: int = Field(16, gt=0)

    @field_validator("tasks")
    @classmethod
    def _resolve_task_paths(cls, tasks: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return None if tasks is None else _task_paths(tasks, info)

    @model_validator(mode="after")
    def _one_kind(self) -> Objective:
        if (self.examples is None) == (self.tasks is None):
            raise ValueError("give exactly one of `examples` (a JSONL file) and `tasks` (lm-eval tasks)")
        if self.examples == [] or self.tasks == []:
            raise ValueError("the objective's list of examples files or tasks is empty")
        return self


class SearchSpace(Strict):
    weights: tuple[Number, Number] = Field((-1.5, 1.5), description="bounds of every searched weight")
    per: Literal["source", "layer_group"] = Field("source", description="one weight per source, or per group")
    layer_groups: int = Field(4, gt=0, description="with per: layer_group, consecutive groups of layers")
    density: tuple[Number, Number] | None = Field(
        None, description="ties/dare family: also search each source's density within these bounds"
    )

    @field_validator("weights", "density")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float] | None, info: ValidationInfo) -> tuple[float, float] | None:
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(
                f"bounds {list(bounds)} are reversed or empty; write [low, high] with low < high"
            )
        if bounds is not None and info.field_name == "density" and not (0 < bounds[0] and bounds[1] <= 1):
            raise ValueError(f"density bounds {list(bounds)} must lie in (0, 1]")
        return bounds


class Search(Strict):
    """A gradient-free search of merge.weights (Optuna) before the merge is written (docs/search.md)."""

    objective: Objective
    space: SearchSpace = Field(default_factory=SearchSpace)
    l1: float = Field(0.05, ge=0.0, description="+ l1 · mean|w| (LoraHub)")
    budget: int = Field(40, gt=0, description="trials")
    sampler: Literal["tpe", "cmaes", "random", "nsga2"] = "tpe"
    seed: int = 0
    workers: int = Field(1, gt=0, description="processes sharing the study storage")
    storage: str | None = Field(
        None, description="default: an Optuna journal file in <output>/search/; or an RDB URL"
    )
    select: Literal["worst", "mean", "improve"] = Field(
        "worst",
        description="several objectives: the written result maximises the worst task score, the mean, or "
        "(improve) the smaller of its gains over the starting points in mean and in worst score; tpe, cmaes and "
        "random optimise that score itself, nsga2 a Pareto front of the objectives",
    )


class Route(Strict):
    """A router instead of a merge (output.kind: router; docs/routing.md)."""

    method: Literal["centroid", "gate", "arrow"] = "centroid"
    exemplars: dict[SourceName, PathStr] = Field(
        default_factory=dict, description='centroid/gate: {"prompt": ...} lines per source'
    )
    top_k: int | None = Field(None, gt=0, description="keep the k best sources per input (all when unset)")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature")
    layer: int | None = Field(
        None, description="centroid/gate: hidden-state layer to embed prompts at (default: the middle layer)"
    )
    seed: int = 0


# -------------------------------------------------------------------------------------------------- recipe


def _version(value: Any) -> Any:
    """`loracook: true` is not version 1 (YAML booleans compare equal to 1 in Python)."""
    if isinstance(value, bool):
        raise ValueError("the format version is a number: write `loracook: 1`")
    return value


class Recipe(Strict):
    """A loracook recipe, format v1."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="loracook recipe",
    )

    loracook: Annotated[Literal[1], BeforeValidator(_version)] = Field(description="recipe format version")
    name: str | None = None
    base: Base
    sources: dict[SourceName, Source] = Field(min_length=1)
    merge: MergeParams = Field(
        default_factory=lambda: methods.get("linear").params(method="linear"),
        description="the merge method and its parameters (one of the registered methods)",
    )
    output: Output = Field(default_factory=Output)
    evaluate: Evaluate | None = None
    search: Search | None = None
    route: Route | None = None

    @property
    def base_spec(self) -> BaseSpec:
        return self.base if isinstance(self.base, BaseSpec) else BaseSpec(path=self.base)


def merge_union() -> Any:
    """The `merge:` section's type: a union of every registered method's parameters, tagged by `method`."""
    return Annotated[Union[methods.param_classes()], Field(discriminator="method")]  # noqa: UP007


def _rebuild() -> None:
    """Re-type `merge` with the registry's current methods (at import, and when a method is registered)."""
    Recipe.model_fields["merge"].annotation = merge_union()
    Recipe.model_rebuild(force=True)


_rebuild()
methods.on_change(_rebuild)
