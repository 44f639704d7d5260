"""The element-wise family: TIES, DARE (linear and TIES), magnitude pruning.

Each works on every source's whole ΔW in fp32, so an adapter output is recompressed to `merge.rank` by a
randomized SVD whose error is reported per module. Densities are bound per source at run time (a search may
vary them); DARE's masks are seeded by tensor and source name, so a run is reproducible."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loracook.methods.base import MergeMethod, generators
from loracook.recipe.types import Density, MergeParams


class SparsifyMerge(MergeParams):
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


class _Elementwise(MergeMethod):
    elementwise = True
    density = True


class Ties(_Elementwise):
    name = "ties"
    params = TiesMerge
    reference_url = "https://arxiv.org/abs/2306.01708"

    def dense(self, deltas, inputs, params):
        from loracook.ops import sparsify

        return sparsify.ties(
            list(deltas),
            list(inputs.weights),
            list(inputs.densities),
            majority_sign=params.majority_sign,
            rescale=params.rescale,
        )


class DareLinear(_Elementwise):
    name = "dare_linear"
    params = DareLinearMerge
    reference_url = "https://arxiv.org/abs/2311.03099"

    def dense(self, deltas, inputs, params):
        from loracook.ops import sparsify

        return sparsify.dare_linear(
            list(deltas),
            list(inputs.weights),
            list(inputs.densities),
            generators(inputs),
            rescale=params.rescale,
        )


class DareTies(_Elementwise):
    name = "dare_ties"
    params = DareTiesMerge
    reference_url = "https://arxiv.org/abs/2311.03099"

    def dense(self, deltas, inputs, params):
        from loracook.ops import sparsify

        return sparsify.dare_ties(
            list(deltas),
            list(inputs.weights),
            list(inputs.densities),
            generators(inputs),
            majority_sign=params.majority_sign,
            rescale=params.rescale,
        )


class MagnitudePrune(_Elementwise):
    name = "magnitude_prune"
    params = MagnitudePruneMerge
    reference_url = "https://arxiv.org/abs/1506.02626"

    def dense(self, deltas, inputs, params):
        from loracook.ops import sparsify

        pruned = [
            sparsify.magnitude_prune(d, p, rescale=params.rescale)
            for d, p in zip(deltas, inputs.densities, strict=True)
        ]
        return sparsify.task_arithmetic(pruned, list(inputs.weights))
