"""The run-time values of a compiled plan: each source's merge weight per tensor, and its density.

A plan's terms name their source; :class:`Values` binds the numbers when the plan is executed, so one
compiled plan serves many weight sets (a search, or a test that compares two runs). A weight is a number, a
per-layer list, or filter rules (:func:`weight_for`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loracook import safe_regex
from loracook.errors import BadInput
from loracook.io.checkpoint import layer_index
from loracook.io.names import is_embedding
from loracook.recipe.types import FilterRule

WeightSpec = Any  # float | list[float] | list[FilterRule]


@dataclass(frozen=True)
class Values:
    """Weights (per source: a number, a per-layer list or filter rules; unlisted sources get 1.0) and
    densities (per source; unlisted get 1.0), for a model of ``num_layers`` layers.

    >>> v = Values({"a": [0.0, 1.0]}, {}, num_layers=3)
    >>> v.weight("a", "model.layers.1.mlp.up_proj.weight"), v.weight("b", "lm_head.weight")
    (0.5, 1.0)
    """

    weights: Mapping[str, WeightSpec] = field(default_factory=dict)
    densities: Mapping[str, float] = field(default_factory=dict)
    num_layers: int = 0
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def weight(self, source: str, at: str) -> float:
        key = (source, at)
        if key not in self._cache:
            self._cache[key] = weight_for(self.weights.get(source, 1.0), at, self.num_layers, source)
        return self._cache[key]

    def density(self, source: str) -> float:
        return float(self.densities.get(source, 1.0))

    def check(self) -> None:
        for source, spec in self.weights.items():
            check_weight(spec, self.num_layers, source)


def check_weight(spec: float | list, num_layers: int, source: str) -> None:
    """Refuse a per-layer list that no layer count explains (longer than the model's layer count)."""
    if (
        isinstance(spec, list)
        and spec
        and not isinstance(spec[0], FilterRule)
        and len(spec) > max(num_layers, 1)
    ):
        raise BadInput(
            f"merge.weights.{source} has {len(spec)} per-layer values but the base has {num_layers} layers",
            loc=("merge", "weights", source),
            fix=f"give {num_layers} values (one per layer) or fewer anchors to interpolate between",
        )


def weight_for(spec: float | list, name: str, num_layers: int, source: str) -> float:
    """The weight of ``source`` for tensor ``name``.

    A list of numbers is per layer: with one value per layer it is used as is; with fewer it gives anchors
    spread evenly over the layers and linearly interpolated. Tensors outside the layers take the first value
    (embeddings) or the last (final norm, lm_head). Filter rules: the first rule whose regex is found in the
    name wins; a rule without `filter` matches everything.

    >>> weight_for([0.0, 1.0], "model.layers.1.mlp.up_proj.weight", 3, "a")
    0.5
    """
    if isinstance(spec, int | float):
        return float(spec)
    if spec and isinstance(spec[0], FilterRule):
        for rule in spec:
            if rule.filter is None or safe_regex.search(rule.filter, name):
                return float(rule.value)
        raise BadInput(
            f"no weight rule of source {source!r} matches {name!r}",
            loc=("merge", "weights", source),
            fix="add a default rule without `filter`, e.g. {value: 1.0}",
        )
    values = [float(v) for v in spec]
    layer = layer_index(name)
    if layer is None:
        return values[0] if is_embedding(name) else values[-1]
    if len(values) == 1:
        return values[0]
    if len(values) == num_layers:
        return values[layer]
    position = layer / max(num_layers - 1, 1) * (len(values) - 1)
    low = min(int(position), len(values) - 2)
    frac = position - low
    return values[low] * (1 - frac) + values[low + 1] * frac
