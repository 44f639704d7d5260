"""`breadcrumbs` and `breadcrumbs_ties` (Davari & Belilovsky, "Model Breadcrumbs", 2023; mergekit's names).

Each ΔW_i loses its largest-magnitude `gamma` share (outliers) and its smallest entries, keeping `density` of
them; then the weighted sum (`breadcrumbs`) or TIES sign election and the disjoint mean (`breadcrumbs_ties`).
Element-wise, like `ties`: an adapter output is recompressed to `merge.rank`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from loracook.methods.sparsify import SparsifyMerge, _Elementwise


class BreadcrumbsMerge(SparsifyMerge):
    """Model Breadcrumbs: drop the largest `gamma` share and the smallest entries, keep `density`."""

    method: Literal["breadcrumbs"]
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="share of the largest-magnitude entries dropped")
    rescale: bool = False

    @model_validator(mode="after")
    def _fits(self):
        densities = self.density.values() if isinstance(self.density, dict) else [self.density]
        if any(d + self.gamma > 1.0 for d in densities):
            raise ValueError(
                f"density + gamma must be at most 1 (gamma {self.gamma}, density {self.density})"
            )
        return self


class BreadcrumbsTiesMerge(BreadcrumbsMerge):
    """Breadcrumbs pruning, then TIES sign election and the disjoint mean."""

    method: Literal["breadcrumbs_ties"]  # type: ignore[assignment]
    majority_sign: Literal["total", "frequency"] = "total"


class Breadcrumbs(_Elementwise):
    name = "breadcrumbs"
    params = BreadcrumbsMerge
    reference_url = "https://arxiv.org/abs/2312.06795"

    def dense(self, deltas, inputs, params):
        from loracook.ops import prune_ranked as sparsify

        return sparsify.breadcrumbs(
            list(deltas), list(inputs.weights), list(inputs.densities), params.gamma, params.rescale
        )


class BreadcrumbsTies(_Elementwise):
    name = "breadcrumbs_ties"
    params = BreadcrumbsTiesMerge
    reference_url = "https://arxiv.org/abs/2312.06795"

    def dense(self, deltas, inputs, params):
        from loracook.ops import prune_ranked as sparsify

        return sparsify.breadcrumbs_ties(
            list(deltas),
            list(inputs.weights),
            list(inputs.densities),
            params.gamma,
            majority_sign=params.majority_sign,
            rescale=params.rescale,
        )
