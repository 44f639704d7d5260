"""What `knots` and `core_space` share: the adapters are brought into one basis, and their aligned pieces are
merged element-wise by an inner method (`merge.inner`) with that method's own keys.

Not a method itself: the parameter base class and the inner merge they both call.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, model_validator

from loracook.methods.base import DenseInputs, Factors, stacked, truncated, weighted_sum
from loracook.recipe.types import Density, MergeParams


class AlignedMerge(MergeParams):
    inner: Literal["ties", "dare_ties", "linear"] = Field(
        "ties", description="the element-wise method applied in the aligned space"
    )
    density: Density = Field(1.0, description="inner ties/dare_ties: fraction of entries kept")
    majority_sign: Literal["total", "frequency"] = "total"
    rescale: bool | None = Field(None, description="inner: rescale kept entries (default: the inner's own)")
    rank: int | None = Field(None, gt=0, description="recompress an adapter output to this rank (exact SVD)")

    @model_validator(mode="after")
    def _inner_keys_apply(self) -> AlignedMerge:
        if self.inner == "linear" and (self.density != 1.0 or self.rescale is not None):
            raise ValueError("density and rescale have no effect with inner: linear; remove them or use ties")
        return self


def inner_merge(params: AlignedMerge, inputs: DenseInputs):
    """The inner method as ``inner(mats, weights)``: the registered method's dense combine, with this
    module's bound densities and RNG names, and the inner's own parameters taken from ``params``."""
    if params.inner == "linear":
        return lambda mats, weights: weighted_sum(mats, weights)
    if params.inner == "tsv":
        from loracook.ops.lowrank_merge import tsv_dense

        return lambda mats, weights: tsv_dense(mats, weights)
    from loracook import methods

    method = methods.get(params.inner)
    rescale = params.rescale
    if rescale is None:
        rescale = method.params.model_fields["rescale"].default
    own = method.params(
        method=params.inner,
        density=params.density,
        majority_sign=params.majority_sign,
        rescale=rescale,
        seed=params.seed,
    )
    return lambda mats, weights: method.dense(mats, replace(inputs, weights=list(weights)), own)


def within_rank(B, A, rank: int, how: str) -> Factors:
    """The method's factors, truncated to ``rank`` (best rank-k, error reported) when they are wider."""
    if B.shape[1] > rank:
        return truncated(B, A, rank)
    return Factors(B, A, 0.0, 0.0, how)


__all__ = ["AlignedMerge", "inner_merge", "stacked", "within_rank"]
