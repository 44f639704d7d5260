"""Field types shared by the recipe models and the merge methods' parameter classes.

Every model is frozen and forbids unknown keys (:class:`Strict`), so a typo is an error and not a silently
ignored setting. Paths are resolved against the recipe's folder at validation time
(``context={"root": folder}``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
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


# ------------------------------------------------------------------------------------------------- weights


def _check_regex(pattern: str) -> str:
    """A user regex must compile for a linear-time engine (loracook.safe_regex): no catastrophic backtracking."""
    from loracook.safe_regex import check_regex

    return check_regex(pattern)


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


class MergeParams(Strict):
    """What every merge method's parameters share; a method's own class adds ``method: Literal[name]``."""

    weights: dict[SourceName, Weight] = Field(
        default_factory=dict,
        description="per source: a number, a per-layer list (interpolated over layers), or filter rules; "
        "sources not listed get 1.0",
    )
    seed: int = Field(0, description="seed for the random parts (DARE masks, randomized SVD)")
