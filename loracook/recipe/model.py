"""Pydantic models of recipe format v1 (see DESIGN.md).

Every model is frozen and forbids unknown keys, so a typo is an error and not a silently ignored setting.
Paths are resolved against the recipe's folder at validation time (``context={"root": folder}``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Resolve a relative path against the recipe folder; keep hub ids and ``package:`` references."""
    root = (info.context or {}).get("root")
    if not value.strip():
        raise ValueError("path is empty")
    if root is None or value.startswith("package:"):
        return value
    expanded = Path(value).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    local = Path(root) / expanded
    if not local.exists() and _HUB_ID.match(value) and not value.startswith("."):
        return value  # a hub model id such as HuggingFaceTB/SmolLM2-135M
    return str(local.resolve())


PathStr = Annotated[str, AfterValidator(_resolve_path)]


def parse_size(value: Any) -> int:
    """``"2GB"`` -> 2_000_000_000; ``"1GiB"`` -> 2**30; integers are bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 2GB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"cannot read size {value!r}; write it like 500MB, 2GB or 1GiB")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if size <= 0:
        raise ValueError("size must be positive")
    return size


Size = Annotated[int, BeforeValidator(parse_size), Field(json_schema_extra={"examples": ["2GB"]})]
SourceName = Annotated[str, Field(pattern=r"^[A-Za-z_][\w.-]*$")]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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

# ------------------------------------------------------------------------------------------------- weights


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"regex {pattern!r} does not compile: {exc}") from None
    return pattern


class FilterRule(Strict):
    """``{filter: regex, value: x}``: the first rule whose regex is found in the tensor name wins."""

    filter: Annotated[str, AfterValidator(_check_regex)] | None = Field(
        None, description="regex searched in the module name; a rule without filter is the default"
    )
    value: Number


def _weight_tag(value: Any) -> str:
    if isinstance(value, list):
        return (
            "layers"
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            else "rules"
        )
    return "scalar"


Weight = Annotated[
    Annotated[Number, Tag("scalar")]
    | Annotated[list[Number], Field(min_length=1), Tag("layers")]
    | Annotated[list[FilterRule], Field(min_length=1), Tag("rules")],
    Discriminator(_weight_tag),
]


def _density_tag(value: Any) -> str:
    return "per_source" if isinstance(value, dict) else "all"


Density = Annotated[
    Annotated[Fraction, Tag("all")] | Annotated[dict[SourceName, Fraction], Tag("per_source")],
    Discriminator(_density_tag),
]

# ------------------------------------------------------------------------------------------- merge methods


class MergeBase(Strict):
    weights: dict[SourceName, Weight] = Field(
        default_factory=dict,
        description="per source: a number, a per-layer list (interpolated over layers), or filter rules; "
        "sources not listed get 1.0",
    )
    seed: int = Field(0, description="seed for the random parts (DARE masks, randomized SVD)")


class LinearMerge(MergeBase):
    """Σ w_i ΔW_i exactly (no cross terms); adapter output rank Σ r_i unless `rank` recompresses it."""

    method: Literal["linear"]
    rank: int | None = Field(None, gt=0, description="recompress an adapter output to this rank (exact SVD)")


class TaskArithmeticMerge(MergeBase):
    """Same exact semantics as linear: Σ w_i ΔW_i (Ilharco et al. 2023)."""

    method: Literal["task_arithmetic"]
    rank: int | None = Field(None, gt=0)


class CatMerge(MergeBase):
    """Concatenate the weighted factors: exact, rank Σ r_i."""

    method: Literal["cat"]


class SvdMerge(MergeBase):
    """Best rank-k approximation of Σ w_i ΔW_i, from the factors."""

    method: Literal["svd"]
    rank: int = Field(gt=0)


class SparsifyMerge(MergeBase):
    density: Density = Field(1.0, description="fraction of entries kept, global or per source")
    rank: int | None = Field(None, gt=0, description="rank of an adapter output (required for kind adapter)")


class TiesMerge(SparsifyMerge):
    """TIES (Yadav et al. 2023): trim to `density`, elect a sign per entry, mean of the agreeing entries."""

    method: Literal["ties"]
    majority_sign: Literal["total", "frequency"] = "total"
    rescale: bool = False


class DareLinearMerge(SparsifyMerge):
    """DARE (Yu et al. 2023): drop entries with probability 1 - density, rescale, weighted sum."""

    method: Literal["dare_linear"]
    rescale: bool = True


class DareTiesMerge(SparsifyMerge):
    """DARE drop-and-rescale, then TIES sign election and disjoint merge."""

    method: Literal["dare_ties"]
    majority_sign: Literal["total", "frequency"] = "total"
    rescale: bool = True


class MagnitudePruneMerge(SparsifyMerge):
    """Keep the `density` largest-magnitude entries of each ΔW_i, then the weighted sum."""

    method: Literal["magnitude_prune"]
    rescale: bool = False


Merge = Annotated[
    LinearMerge
    | TaskArithmeticMerge
    | CatMerge
    | SvdMerge
    | TiesMerge
    | DareLinearMerge
    | DareTiesMerge
    | MagnitudePruneMerge,
    Field(discriminator="method"),
]
METHODS = ("linear", "task_arithmetic", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")

# -------------------------------------------------------------------------------------------------- output


class Output(Strict):
    kind: Literal["adapter", "model"] = "adapter"
    path: PathStr | None = Field(None, description="output folder; `loracook run --output` overrides it")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto keeps the base dtype for models and writes float32 adapters"
    )
    shard_size: Size = Field(5 * 10**9, description="largest safetensors shard, e.g. 2GB")


class Evaluate(Strict):
    tasks: list[str] = Field(min_length=1, description="lm-eval task names, task YAML files or folders")
    limit: int | float | None = None
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, gt=0)
    device: str | None = None
    apply_chat_template: bool = False
    baselines: list[str] = Field(default_factory=list, description="base and/or source names to score too")


class Search(Strict):
    examples: PathStr
    budget: int = Field(40, gt=0)
    bounds: tuple[Number, Number] = (-1.5, 1.5)
    l1: float = Field(0.05, ge=0.0)


# -------------------------------------------------------------------------------------------------- recipe


class Recipe(Strict):
    """A loracook recipe, format v1."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="loracook recipe",
    )

    loracook: Literal[1] = Field(description="recipe format version")
    name: str | None = None
    base: Base
    sources: dict[SourceName, Source] = Field(min_length=1)
    merge: Merge = Field(default_factory=lambda: LinearMerge(method="linear"))
    output: Output = Field(default_factory=Output)
    evaluate: Evaluate | None = None
    search: Search | None = None

    @property
    def base_spec(self) -> BaseSpec:
        return self.base if isinstance(self.base, BaseSpec) else BaseSpec(path=self.base)


def _unknown_source(name: str, known: set[str], extra: tuple[str, ...] = ()) -> str:
    import difflib

    choices = sorted(known) + list(extra)
    hint = difflib.get_close_matches(name, choices, n=1)
    text = f"unknown source {name!r}; the sources are {', '.join(choices)}"
    return text + (f" (did you mean {hint[0]!r}?)" if hint else "")
