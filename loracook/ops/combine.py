"""Combine dense per-source deltas by a merge method (pure; the parameters come in as plain values)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loracook.ops import sparsify
from loracook.ops.rng import tensor_generator


def combine_dense(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    method: str,
    densities: Sequence[float],
    majority_sign: str = "total",
    rescale: bool = False,
    seed: int = 0,
    names: Sequence[str] = (),
) -> torch.Tensor:
    """Merge fp32 deltas of one tensor. ``names`` (one per source) seed DARE's masks reproducibly.

    >>> d = [torch.ones(2, 2), -torch.ones(2, 2)]
    >>> combine_dense(d, [0.5, 0.25], method="linear", densities=[1, 1]).tolist()
    [[0.25, 0.25], [0.25, 0.25]]
    """
    if method in ("linear", "task_arithmetic", "cat", "svd"):
        return sparsify.task_arithmetic(list(deltas), list(weights))
    if method == "magnitude_prune":
        pruned = [
            sparsify.magnitude_prune(d, p, rescale=rescale) for d, p in zip(deltas, densities, strict=True)
        ]
        return sparsify.task_arithmetic(pruned, list(weights))
    if method == "ties":
        return sparsify.ties(
            list(deltas), list(weights), list(densities), majority_sign=majority_sign, rescale=rescale
        )
    generators = [tensor_generator(seed, name) for name in names]
    if method == "dare_linear":
        return sparsify.dare_linear(list(deltas), list(weights), list(densities), generators, rescale=rescale)
    if method == "dare_ties":
        return sparsify.dare_ties(
            list(deltas),
            list(weights),
            list(densities),
            generators,
            majority_sign=majority_sign,
            rescale=rescale,
        )
    raise ValueError(f"unknown merge method {method!r}")
