"""`linear` and `task_arithmetic`: Σ w_i ΔW_i exactly, with no cross terms B_i A_j.

In factor space the sum is exact at rank Σ r_i: the factors are stacked, [w_1 s_1 B_1 | …] @ [A_1; …]. An
adapter output with a smaller `rank` is the best rank-k approximation of that sum (an exact SVD from the
factors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loracook.methods.base import Factors, MergeMethod, stacked, truncated, weighted_sum
from loracook.recipe.types import MergeParams


class LinearMerge(MergeParams):
    """Σ w_i ΔW_i exactly (no cross terms); adapter output rank Σ r_i unless `rank` recompresses it."""

    method: Literal["linear"]
    rank: int | None = Field(None, gt=0, description="recompress an adapter output to this rank (exact SVD)")


class TaskArithmeticMerge(MergeParams):
    """Same exact semantics as linear: Σ w_i ΔW_i (Ilharco et al. 2023)."""

    method: Literal["task_arithmetic"]
    rank: int | None = Field(None, gt=0)


class Linear(MergeMethod):
    name = "linear"
    params = LinearMerge
    reference_url = "https://arxiv.org/abs/2203.05482"
    exact = True
    factored_form = True

    def dense(self, deltas, inputs, params):
        return weighted_sum(deltas, inputs.weights)

    def factored(self, pairs, rank, params, inputs) -> Factors:
        B, A = stacked(pairs)
        if rank >= B.shape[1]:
            return Factors(B, A, 0.0, 0.0, "exact")
        return truncated(B, A, rank)


class TaskArithmetic(Linear):
    name = "task_arithmetic"
    params = TaskArithmeticMerge
    reference_url = "https://arxiv.org/abs/2212.04089"
