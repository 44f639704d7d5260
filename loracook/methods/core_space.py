"""`core_space` (Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS
2025).

Reference bases U_B (stacked B's) and V_A (stacked A's) span every adapter, so each ΔW_i = U_B M_i V_Aᵀ
exactly with an R × R core M_i; the cores are merged by `merge.inner` (ties, dare_ties, linear or tsv) and
ΔW = U_B M V_Aᵀ. Everything is R × R or thin: nothing out × in is formed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loracook.methods.aligned import AlignedMerge, inner_merge, within_rank
from loracook.methods.base import Factors, MergeMethod


class CoreSpaceMerge(AlignedMerge):
    """Core Space: merge the adapters' R × R cores in shared reference bases."""

    method: Literal["core_space"]
    inner: Literal["ties", "dare_ties", "linear", "tsv"] = Field(
        "ties", description="the method applied to the cores"
    )


class CoreSpace(MergeMethod):
    name = "core_space"
    params = CoreSpaceMerge
    reference_url = "https://arxiv.org/abs/2509.17786"
    factored_form = True
    dense_form = False

    def factored(self, pairs, rank, params, inputs) -> Factors:
        from loracook.ops.lowrank_merge import core_space

        B, A = core_space(pairs, inner_merge(params, inputs))
        return within_rank(B, A, rank, self.name)
