"""The search space: which numbers a trial picks (Optuna suggestions) and how they become the plan's Values.

One weight per source (``w.<source>``), or per source × layer group (``w.<source>.g<k>``, groups of consecutive
layers: layer l of L is in group ⌊l·G/L⌋), and optionally one density per source (``d.<source>``) for methods
that take one. A layer-group point becomes a per-layer list of length ``num_layers`` in the recipe, so the plan
and ``best.yaml`` read it with the ordinary per-layer rule (tensors outside the layers: embeddings take the
first group's value, the final norm and lm_head the last group's).

>>> space = Space(("a", "b"), (-1.5, 1.5), per="layer_group", groups=2, num_layers=4)
>>> point = space.point({"w.a.g0": 0.5, "w.a.g1": 1.0, "w.b.g0": 0.0, "w.b.g1": -1.0})
>>> point.weights["a"], point.l1_mean
([0.5, 0.5, 1.0, 1.0], 0.625)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loracook.errors import BadInput
from loracook.plan.values import Values, weight_for
from loracook.recipe.types import FilterRule


@dataclass(frozen=True)
class Point:
    """One candidate: the recipe-style weights (a number or a per-layer list per source), the densities
    (empty when not searched), and the raw parameters that Optuna stores."""

    params: Mapping[str, float]
    weights: Mapping[str, float | list[float]]
    densities: Mapping[str, float] = field(default_factory=dict)

    @property
    def l1_mean(self) -> float:
        """mean |w| over the searched weights (LoraHub's L1 term, before its factor)."""
        searched = [abs(v) for k, v in self.params.items() if k.startswith("w.")]
        return sum(searched) / len(searched) if searched else 0.0

    def values(self, num_layers: int, fixed_densities: Mapping[str, float]) -> Values:
        """The plan's run-time values for this candidate (densities not searched keep the recipe's)."""
        return Values(dict(self.weights), {**fixed_densities, **self.densities}, num_layers)


@dataclass(frozen=True)
class Space:
    """Bounds and layout of the searched numbers for ``sources`` on a model of ``num_layers`` layers."""

    sources: tuple[str, ...]
    bounds: tuple[float, float]
    per: str = "source"  # source | layer_group
    groups: int = 1
    num_layers: int = 1
    density: tuple[float, float] | None = None

    @classmethod
    def from_recipe(cls, recipe, num_layers: int, method) -> Space:
        """The recipe's ``search.space`` for this base; bad combinations are BadInput naming the key."""
        space = recipe.search.space
        groups = space.layer_groups if space.per == "layer_group" else 1
        if space.per == "layer_group" and groups > max(num_layers, 1):
            raise BadInput(
                f"search.space.layer_groups is {groups} but the base has {num_layers} layers",
                loc=("search", "space", "layer_groups"),
                fix=f"use at most {num_layers} groups",
            )
        if space.density is not None and not method.density:
            raise BadInput(
                f"search.space.density: merge method {method.name} takes no density",
                loc=("search", "space", "density"),
                fix="remove it, or use ties, dare_linear, dare_ties or magnitude_prune",
            )
        density = tuple(map(float, space.density)) if space.density is not None else None
        bounds = (float(space.weights[0]), float(space.weights[1]))
        return cls(tuple(recipe.sources), bounds, space.per, groups, num_layers, density)

    # ------------------------------------------------------------------------------------------ names

    def weight_names(self, source: str) -> list[str]:
        if self.per == "source":
            return [f"w.{source}"]
        return [f"w.{source}.g{g}" for g in range(self.groups)]

    @property
    def names(self) -> list[str]:
        names = [n for s in self.sources for n in self.weight_names(s)]
        return names + ([f"d.{s}" for s in self.sources] if self.density else [])

    @property
    def dimensions(self) -> int:
        return len(self.names)

    def group_of(self, layer: int) -> int:
        return min(layer * self.groups // max(self.num_layers, 1), self.groups - 1)

    # ------------------------------------------------------------------------------------------ points

    def suggest(self, trial) -> Point:
        """Ask an Optuna trial for every searched number (in a fixed order) and return the point."""
        params = {}
        for name in self.names:
            low, high = self.density if name.startswith("d.") else self.bounds
            params[name] = float(trial.suggest_float(name, low, high))
        return self.point(params)

    def point(self, params: Mapping[str, float]) -> Point:
        weights: dict[str, float | list[float]] = {}
        for source in self.sources:
            if self.per == "source":
                weights[source] = float(params[f"w.{source}"])
            else:
                per_group = [float(params[f"w.{source}.g{g}"]) for g in range(self.groups)]
                weights[source] = [per_group[self.group_of(layer)] for layer in range(self.num_layers)]
        densities = {s: float(params[f"d.{s}"]) for s in self.sources} if self.density else {}
        return Point(dict(params), weights, densities)

    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import FloatDistribution

        out = {}
        for name in self.names:
            low, high = self.density if name.startswith("d.") else self.bounds
            out[name] = FloatDistribution(low, high)
        return out

    # ---------------------------------------------------------------------------------- starting points

    def starting_points(self, recipe) -> list[tuple[str, dict[str, float]]]:
        """The points tried first: every weight 1 (clipped to the bounds), then the recipe's own
        ``merge.weights`` when given and representable (numbers; per-layer lists averaged per group)."""
        densities = _recipe_densities(recipe)
        ones = {s: 1.0 for s in self.sources}
        points = [("all weights 1", self._params(ones, densities))]
        own = self._recipe_weights(recipe)
        if own is not None:
            params = self._params(own, densities)
            if params != points[0][1]:
                points.append(("the recipe's merge.weights", params))
        return points

    def _params(self, weights: Mapping[str, Any], densities: Mapping[str, float]) -> dict[str, float]:
        params: dict[str, float] = {}
        for source in self.sources:
            spec = weights.get(source, 1.0)
            if self.per == "source":
                params[f"w.{source}"] = self._clip(float(spec), self.bounds)
                continue
            for g in range(self.groups):
                layers = [layer for layer in range(self.num_layers) if self.group_of(layer) == g]
                values = [
                    weight_for(spec, f"model.layers.{layer}.x.weight", self.num_layers, source)
                    for layer in layers
                ]
                params[f"w.{source}.g{g}"] = self._clip(sum(values) / len(values), self.bounds)
        if self.density:
            for source in self.sources:
                params[f"d.{source}"] = self._clip(densities.get(source, 1.0), self.density)
        return params

    def _recipe_weights(self, recipe) -> dict[str, Any] | None:
        given = dict(recipe.merge.weights)
        if not given:
            return None
        for spec in given.values():
            if isinstance(spec, list) and spec and isinstance(spec[0], FilterRule):
                return None  # filter rules have no place in this space
            if isinstance(spec, list) and self.per == "source" and len(spec) > 1:
                return None
        return {s: (v[0] if isinstance(v, list) and self.per == "source" else v) for s, v in given.items()}

    @staticmethod
    def _clip(value: float, bounds: tuple[float, float]) -> float:
        return min(max(float(value), bounds[0]), bounds[1])


def _recipe_densities(recipe) -> dict[str, float]:
    density = getattr(recipe.merge, "density", None)
    if density is None:
        return {}
    if isinstance(density, dict):
        return {k: float(v) for k, v in density.items()}
    return {s: float(density) for s in recipe.sources}
