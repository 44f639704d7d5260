"""`knots` (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025).

[ΔW_1 | … | ΔW_n] = U Σ [V_1ᵀ | … | V_nᵀ] (truncated at its numerical rank ≤ R = Σ r_i); U Σ is the shared
basis; the aligned Σ V_iᵀ are merged by `merge.inner` (TIES by default) with the weights; ΔW = U · merged.
Computed from the factors (QR of the stacked B's and of each Aᵀ, SVD of an R × R core): nothing out × in is
formed, and an adapter output keeps the result's own rank (≤ R) without recompression. docs/merge-methods.md
and docs/lora-native-merges.md have the choices."""

from __future__ import annotations

from typing import Literal

from loracook.methods.aligned import AlignedMerge, inner_merge, within_rank
from loracook.methods.base import Factors, MergeMethod


class KnotsMerge(AlignedMerge):
    """KnOTS: merge in the shared basis of the SVD of the concatenated updates."""

    method: Literal["knots"]


class Knots(MergeMethod):
    name = "knots"
    params = KnotsMerge
    reference_url = "https://arxiv.org/abs/2410.19735"
    factored_form = True
    dense_form = False

    def factored(self, pairs, rank, params, inputs) -> Factors:
        from loracook.ops.lowrank_merge import knots

        B, A = knots(pairs, inner_merge(params, inputs))
        return within_rank(B, A, rank, self.name)
