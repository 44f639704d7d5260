"""`della` and `della_linear` (Deep et al., "DELLA-Merging", 2024; mergekit's names and semantics).

Each entry of ΔW_i is kept with a probability that grows with its magnitude rank in its row, between
density − epsilon and density + epsilon, and rescaled by 1/probability; then TIES sign election and the
disjoint mean (`della`, as mergekit's `della`) or the weighted sum (`della_linear`). Masks are seeded by tensor
and source like DARE's, so a run is reproducible; epsilon 0 is exactly `dare_ties` / `dare_linear`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from loracook.methods.base import generators
from loracook.methods.sparsify import SparsifyMerge, _Elementwise


class DellaLinearMerge(SparsifyMerge):
    """DELLA's magnitude-ranked drop and rescale, then the weighted sum."""

    method: Literal["della_linear"]
    epsilon: float = Field(0.1, ge=0.0, lt=1.0, description="half-width of the keep probabilities")
    rescale: bool = True

    @model_validator(mode="after")
    def _fits(self):
        densities = self.density.values() if isinstance(self.density, dict) else [self.density]
        for d in densities:
            if d < 1.0 and not (d - self.epsilon > 0.0 and d + self.epsilon <= 1.0):
                raise ValueError(
                    f"density ± epsilon must lie in (0, 1] (density {d}, epsilon {self.epsilon}); "
                    "lower epsilon"
                )
        return self


class DellaMerge(DellaLinearMerge):
    """DELLA with TIES sign election and the disjoint mean (mergekit's `della`)."""

    method: Literal["della"]  # type: ignore[assignment]
    majority_sign: Literal["total", "frequency"] = "total"


class DellaLinear(_Elementwise):
    name = "della_linear"
    params = DellaLinearMerge
    reference_url = "https://arxiv.org/abs/2406.11617"

    def dense(self, deltas, inputs, params):
        from loracook.ops import prune_ranked as sparsify

        return sparsify.della(
            list(deltas),
            list(inputs.weights),
            list(inputs.densities),
            params.epsilon,
            generators(inputs),
            rescale=params.rescale,
        )


class Della(_Elementwise):
    name = "della"
    params = DellaMerge
    reference_url = "https://arxiv.org/abs/2406.11617"

    def dense(self, deltas, inputs, params):
        from loracook.ops import prune_ranked as sparsify

        return sparsify.della_ties(
            list(deltas),
            list(inputs.weights),
            list(inputs.densities),
            params.epsilon,
            generators(inputs),
            majority_sign=params.majority_sign,
            rescale=params.rescale,
        )
