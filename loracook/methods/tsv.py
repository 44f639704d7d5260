"""`tsv` (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025).

Each ΔW_i = U_i Σ_i V_iᵀ exactly from its factors; the top k_i triplets are kept (k_i = ⌊rank/n⌋ capped at
r_i by default, or `merge.ranks`); the concatenated U's and V's are replaced by their polar factors, which
removes the interference between tasks; ΔW = α U⊥ blockdiag(w_i Σ_i) V⊥ᵀ."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loracook.methods.aligned import within_rank
from loracook.methods.base import Factors, MergeMethod
from loracook.recipe.types import MergeParams, SourceName


class TsvMerge(MergeParams):
    """TSV-Merge: each adapter's top singular vectors, decorrelated by polar factors."""

    method: Literal["tsv"]
    rank: int | None = Field(
        None, gt=0, description="total kept rank, split evenly over the sources (default Σ r_i)"
    )
    ranks: dict[SourceName, int] | None = Field(
        None, description="kept rank per source (k_i ≤ r_i), instead of the even split"
    )
    alpha: float = Field(1.0, gt=0.0, description="global scale α")


class Tsv(MergeMethod):
    name = "tsv"
    params = TsvMerge
    reference_url = "https://arxiv.org/abs/2412.00081"
    factored_form = True
    dense_form = False

    def check_terms(self, params, terms) -> str | None:
        for term in terms:
            k = (params.ranks or {}).get(term.source)
            if k is not None and not 0 <= k <= term.a.shape[0]:
                return (
                    f"merge.ranks.{term.source} = {k} but source {term.source!r} has rank {term.a.shape[0]} "
                    f"at {term.at}; use at most {term.a.shape[0]}"
                )
        return None

    def factored(self, pairs, rank, params, inputs) -> Factors:
        from loracook.ops.lowrank_merge import tsv

        ranks = [b.shape[1] for _, b, _ in pairs]
        if params.ranks is not None:
            keep = [params.ranks.get(source, r) for source, r in zip(inputs.sources, ranks, strict=True)]
        else:
            keep = [min(rank // len(pairs), r) for r in ranks]
        B, A = tsv(pairs, keep, params.alpha)
        return within_rank(B, A, rank, self.name)
