"""Model Breadcrumbs and DELLA: magnitude-ranked pruning of task vectors, pure functions like ops/sparsify.py.

Model Breadcrumbs, Davari & Belilovsky 2024 (arXiv:2312.06795); DELLA-Merging, Deep et al. 2024
(arXiv:2406.11617). Semantics follow mergekit's `breadcrumbs`/`breadcrumbs_ties` and `della_linear`/`della`
(mergekit/sparsify.py): docs/lora-native-merges.md has the formulas and where loracook differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from loracook.ops.sparsify import (
    SignMethod,
    _check,
    _check_density,
    disjoint_merge,
    elect_sign,
    keep_count,
    task_arithmetic,
)

__all__ = [
    "Rescale",
    "breadcrumbs_prune",
    "della_prune",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_ties",
]

Rescale = bool | Literal["l1"]


def _per_source(value: float | Sequence[float], n: int, name: str) -> list[float]:
    """One value per source: a number is used for every source."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"got {n} deltas but {len(values)} values of {name}")
    return values


def _rescale_l1(delta: Tensor, kept: Tensor) -> Tensor:
    """mergekit's norm-matching rescale: kept · ‖delta‖₁ / ‖kept‖₁, unchanged when either norm is below 1e-7."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def _descending_order(magnitude: Tensor) -> Tensor:
    """Indices sorting ``magnitude`` (along its last dim) from largest to smallest, equal values by lower index.

    The tie rule is the one of :func:`magnitude_prune` (the lower flat index counts as larger), so results do
    not depend on the sorting algorithm.
    """
    return torch.sort(magnitude, dim=-1, descending=True, stable=True).indices


def breadcrumbs_prune(delta: Tensor, density: float, gamma: float, rescale: Rescale = False) -> Tensor:
    """Model Breadcrumbs mask: drop the largest-magnitude ``gamma`` share (outliers) and the smallest entries,
    keeping ``keep_count(density, n)`` entries of middling magnitude.

    As mergekit's ``magnitude_outliers``: the round(γ·n) largest |values| go first, then the smallest ones
    until round(ρ·n) are left; when γ + ρ > 1 fewer outliers are dropped so that exactly round(ρ·n) stay.
    ``gamma=0`` is :func:`magnitude_prune`. Ties in |value| count the lower row-major index as larger.
    ``rescale``: False keeps the values, True divides them by ``density`` (as ``magnitude_prune``), ``"l1"``
    matches the L1 norm of ``delta`` (mergekit's ``rescale: true``).

    >>> breadcrumbs_prune(torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0]), 0.4, 0.2)
    tensor([ 0., -4.,  3.,  0.,  0.])
    """
    density = _check_density(density)
    gamma = float(gamma)
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma is the share of largest entries dropped and must be in [0, 1), got {gamma}")
    flat = delta.reshape(-1)
    n = flat.numel()
    keep = keep_count(density, n)
    top = min(math.floor(gamma * n + 0.5), n - keep)
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[_descending_order(flat.abs())[top : top + keep]] = True
    out = torch.where(mask, flat, 0.0).reshape(delta.shape)
    if rescale == "l1":
        return _rescale_l1(delta, out)
    return out / density if rescale else out


def della_prune(
    delta: Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: Rescale = True
) -> Tensor:
    """DELLA's MagPrune: keep each entry with a probability that grows with its magnitude rank in its row.

    Per row (the last dim; a 1-D delta is one row) of m entries, the entry of magnitude rank j (0 = smallest,
    ties: the lower index counts as larger) is kept with probability q = ρ − ε + 2ε · j / (m − 1) (ρ for
    m = 1), so q spans [ρ − ε, ρ + ε] and averages ρ (mergekit's convention: ε is the half-width). The draw is
    ``torch.rand(shape, generator) < q``, DARE's, so ε = 0 gives exactly :func:`dare` with the same generator.
    ``rescale``: True divides each kept entry by its own q (the paper's 1/(1 − p_i), which keeps the expected
    value: E[della_prune(x)] = x), ``"l1"`` matches the L1 norm of ``delta`` (mergekit), False keeps values.
    ``density == 1`` returns a copy and draws nothing (as mergekit).

    >>> g = torch.Generator().manual_seed(0)
    >>> out = della_prune(torch.ones(3, 1000), 0.5, 0.0, g)
    >>> sorted(set(out.flatten().tolist()))
    [0.0, 2.0]
    """
    density = _check_density(density)
    epsilon = float(epsilon)
    if density == 1.0:
        return delta.clone()
    if not (epsilon >= 0.0 and density - epsilon > 0.0 and density + epsilon <= 1.0):
        raise ValueError(
            f"need epsilon >= 0 and density ± epsilon in (0, 1], got density {density}, epsilon {epsilon}"
        )
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 0 else delta.reshape(1, 1)
    m = rows.shape[-1]
    rank = torch.empty(rows.shape, dtype=torch.float64, device=delta.device)
    descending = torch.arange(m - 1, -1, -1, dtype=torch.float64, device=delta.device).expand(rows.shape)
    rank.scatter_(-1, _descending_order(rows.abs()), descending)  # rank[p] = m - 1 - position of p
    share = rank / (m - 1) if m > 1 else torch.full_like(rank, 0.5)
    q = ((density - epsilon) + 2.0 * epsilon * share).reshape(delta.shape)
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device) < q
    out = torch.where(keep, delta, 0.0)
    if rescale == "l1":
        return _rescale_l1(delta, out)
    return torch.where(keep, delta / q.to(delta.dtype), 0.0) if rescale else out


def breadcrumbs(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gamma: float | Sequence[float] = 0.01,
    rescale: Rescale = False,
) -> Tensor:
    """Model Breadcrumbs: Σ w_i breadcrumbs_prune(ΔW_i, ρ_i, γ_i), task arithmetic on the pruned deltas.

    >>> breadcrumbs([torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])], [1, 1], [0.5, 0.5], 0.25)
    tensor([0., 5., 5., 0.])
    """
    _check(deltas, weights, densities)
    gammas = _per_source(gamma, len(deltas), "gamma")
    pruned = [breadcrumbs_prune(d, p, g, rescale) for d, p, g in zip(deltas, densities, gammas, strict=True)]
    return task_arithmetic(pruned, weights)


def breadcrumbs_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gamma: float | Sequence[float] = 0.01,
    majority_sign: SignMethod = "total",
    rescale: Rescale = False,
) -> Tensor:
    """Breadcrumbs pruning, then TIES sign election on the weighted deltas and the disjoint mean (as :func:`ties`).

    >>> a, b = torch.tensor([9.0, 2.0, -3.0, 0.1]), torch.tensor([-1.0, -2.0, -3.0, 0.2])
    >>> breadcrumbs_ties([a, b], [1.0, 1.0], [0.5, 0.5], 0.25)
    tensor([-1.,  0., -3.,  0.])
    """
    _check(deltas, weights, densities)
    gammas = _per_source(gamma, len(deltas), "gamma")
    pruned = [breadcrumbs_prune(d, p, g, rescale) for d, p, g in zip(deltas, densities, gammas, strict=True)]
    return disjoint_merge(pruned, elect_sign(pruned, majority_sign, weights), weights)


def della(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilon: float | Sequence[float],
    generators: Sequence[torch.Generator],
    rescale: Rescale = True,
) -> Tensor:
    """DELLA without sign election (mergekit's ``della_linear``): Σ w_i della_prune(ΔW_i, ρ_i, ε_i).

    >>> g = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    >>> della([torch.ones(2, 3), torch.ones(2, 3)], [0.5, 0.5], [1.0, 1.0], 0.1, g)
    tensor([[1., 1., 1.],
            [1., 1., 1.]])
    """
    _check(deltas, weights, densities, generators)
    epsilons = _per_source(epsilon, len(deltas), "epsilon")
    dropped = [
        della_prune(d, p, e, g, rescale)
        for d, p, e, g in zip(deltas, densities, epsilons, generators, strict=True)
    ]
    return task_arithmetic(dropped, weights)


def della_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilon: float | Sequence[float],
    generators: Sequence[torch.Generator],
    majority_sign: SignMethod = "total",
    rescale: Rescale = True,
) -> Tensor:
    """DELLA with TIES sign election and disjoint mean (mergekit's ``della``; the paper's Drop, Elect, Fuse).

    >>> g = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    >>> della_ties([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])], [1.0, 1.0], [1.0, 1.0], 0.1, g)
    tensor([ 2., -2.])
    """
    _check(deltas, weights, densities, generators)
    epsilons = _per_source(epsilon, len(deltas), "epsilon")
    dropped = [
        della_prune(d, p, e, g, rescale)
        for d, p, e, g in zip(deltas, densities, epsilons, generators, strict=True)
    ]
    return disjoint_merge(dropped, elect_sign(dropped, majority_sign, weights), weights)
