"""`svd`: the best rank-k approximation of Σ w_i ΔW_i, computed from the factors.

The stacked factors' QR decomposition and an SVD of the small (Σ r_i)² core give the truncation without
forming a d×k matrix. Sources that are not plain LoRAs (saved tensors, DoRA) are summed densely and truncated
by a randomized SVD with an error check."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loracook.methods.base import Factors, MergeMethod, stacked, truncated, weighted_sum
from loracook.recipe.types import MergeParams


class SvdMerge(MergeParams):
    """Best rank-k approximation of Σ w_i ΔW_i, from the factors."""

    method: Literal["svd"]
    rank: int = Field(gt=0)


class Svd(MergeMethod):
    name = "svd"
    params = SvdMerge
    reference_url = (
        "https://huggingface.co/docs/peft/package_reference/lora#peft.LoraModel.add_weighted_adapter"
    )
    truncates = True
    factored_form = True

    def dense(self, deltas, inputs, params):
        return weighted_sum(deltas, inputs.weights)

    def factored(self, pairs, rank, params, inputs) -> Factors:
        B, A = stacked(pairs)
        return truncated(B, A, rank)
