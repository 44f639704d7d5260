"""`cat`: the weighted factors concatenated, exact at rank Σ r_i (PEFT's exact `cat`)."""

from __future__ import annotations

from typing import Literal

from loracook.methods.linear import Linear
from loracook.recipe.types import MergeParams


class CatMerge(MergeParams):
    """Concatenate the weighted factors: exact, rank Σ r_i."""

    method: Literal["cat"]


class Cat(Linear):
    name = "cat"
    params = CatMerge
    reference_url = (
        "https://huggingface.co/docs/peft/package_reference/lora#peft.LoraModel.add_weighted_adapter"
    )
