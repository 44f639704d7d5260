"""Element-wise merge methods on dense deltas of one module: TIES, DARE, magnitude pruning, task arithmetic.

Every function takes the deltas ΔW_i of one module (same shape, fp32, per-adapter scale already applied)
and plain numbers, and returns a new tensor; inputs are never modified. The semantic choices (sign
election on weighted deltas, disjoint mean over the agreeing sources, zero where no sign wins, rescaling)
are explained in docs/merge-methods.md.

References: TIES-Merging, Yadav et al. 2023 (arXiv:2306.01708); DARE, Yu et al. 2023 (arXiv:2311.03099);
task arithmetic, Ilharco et al. 2023 (arXiv:2212.04089).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "SignMethod",
    "keep_count",
    "magnitude_prune",
    "dare",
    "elect_sign",
    "disjoint_merge",
    "task_arithmetic",
    "magnitude_prune_merge",
    "ties",
    "dare_linear",
    "dare_ties",
]

SignMethod = Literal["total", "frequency"]


def _check_density(density: float) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density is the fraction of entries kept and must be in (0, 1], got {density}")
    return density


def keep_count(density: float, numel: int) -> int:
    """Number of entries magnitude pruning keeps: round(density * numel), halves rounded up.

    >>> keep_count(0.5, 5), keep_count(0.2, 10), keep_count(1.0, 7)
    (3, 2, 7)
    """
    return min(numel, math.floor(_check_density(density) * numel + 0.5))


def magnitude_prune(delta: Tensor, density: float, rescale: bool = False) -> Tensor:
    """Keep the ``keep_count(density, n)`` entries of largest |value|, zero the rest.

    Ties at the threshold are broken by position: the entry with the lower flat (row-major) index is kept,
    so the result does not depend on the sorting algorithm. With ``rescale`` the kept entries are divided
    by ``density`` (off by default: the kept entries are the largest ones, so this does not preserve the
    expected value the way DARE's rescale does).

    >>> magnitude_prune(torch.tensor([[0.1, -3.0], [2.0, -0.5]]), 0.5)
    tensor([[ 0., -3.],
            [ 2.,  0.]])
    """
    density = _check_density(density)
    flat = delta.reshape(-1)
    n = flat.numel()
    keep = keep_count(density, n)
    if keep == n:
        out = delta.clone()
    elif keep == 0:
        out = torch.zeros_like(delta)
    else:
        magnitude = flat.abs()
        threshold = torch.kthvalue(magnitude, n - keep + 1).values  # the keep-th largest |value|
        mask = magnitude >= threshold
        if int(mask.sum()) != keep:  # ties at the threshold (or a NaN): apply the rule by index
            mask = _tie_mask(magnitude, threshold, keep)
        out = torch.where(mask, flat, 0.0).reshape(delta.shape)
    return out / density if rescale else out


def _tie_mask(magnitude: Tensor, threshold: Tensor, keep: int) -> Tensor:
    """The entries above ``threshold``, filled up to ``keep`` with the first entries equal to it, by index.

    Without ties (exactly ``keep`` entries ≥ threshold) this is ``magnitude >= threshold``, which is what
    :func:`magnitude_prune` computes first; this slower path only runs when that count is off.
    """
    mask = magnitude > threshold
    missing = keep - int(mask.sum())
    if missing > 0:
        mask[torch.nonzero(magnitude == threshold).squeeze(1)[:missing]] = True
    return mask


_SMALL = 1 << 16
"""Sources of at most this many entries are pruned and merged together, stacked on a new first dim: the
cores of the LoRA-native merges (R × R, R × in) cost mostly per-operation overhead, which stacking divides by
the number of sources. Larger deltas go one at a time, so no (n, ...) copies of full matrices are made."""


def _stacked(deltas: Sequence[Tensor]) -> Tensor | None:
    """``deltas`` stacked on dim 0 when there are at least two and they are small float32/float64 tensors of
    one shape, dtype and device; None otherwise."""
    if len(deltas) < 2:
        return None
    first = deltas[0]
    if first.dtype not in (torch.float32, torch.float64) or first.numel() > _SMALL:
        return None
    if any(d.shape != first.shape or d.dtype != first.dtype or d.device != first.device for d in deltas):
        return None
    return torch.stack(tuple(deltas))


def _prune_each(deltas: Sequence[Tensor], densities: Sequence[float], rescale: bool) -> Sequence[Tensor]:
    """``[magnitude_prune(d, p, rescale) for d, p in zip(deltas, densities)]``, bit for bit; stacked on dim 0
    (one kthvalue, one mask) when the deltas are small and share one density and there are no ties."""
    density = densities[0]
    if all(p == density for p in densities) and len(deltas) == len(densities):
        stacked = _stacked(deltas)
        numel = deltas[0].numel()
        keep = keep_count(density, numel) if stacked is not None else 0
        if 0 < keep < numel:
            flat = stacked.reshape(len(deltas), numel)
            magnitude = flat.abs()
            threshold = torch.kthvalue(magnitude, numel - keep + 1, dim=1, keepdim=True).values
            mask = magnitude >= threshold
            if mask.sum(dim=1).tolist() == [keep] * len(deltas):  # no ties: the mask of every source
                out = torch.where(mask, flat, 0.0).reshape(stacked.shape)
                return out / _check_density(density) if rescale else out
    return [magnitude_prune(d, p, rescale) for d, p in zip(deltas, densities, strict=True)]


def dare(delta: Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: keep each entry independently with probability ``density``, zero the others.

    The mask is ``torch.rand(delta.shape, generator=generator) < density`` (one uniform draw per entry, in
    row-major order), so a generator from :func:`loracook.ops.rng.tensor_generator` makes it reproducible.
    With ``rescale`` (the default, as in the paper) kept entries are divided by ``density``, which keeps the
    expected value: E[dare(x)] = x. ``density == 1`` returns a copy and draws nothing.

    >>> g = torch.Generator().manual_seed(0)
    >>> out = dare(torch.ones(1000), 0.25, g)
    >>> sorted(set(out.tolist())), 200 < int((out != 0).sum()) < 300  # about 250 kept, each 1 / 0.25
    ([0.0, 4.0], True)
    """
    density = _check_density(density)
    if density == 1.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device) < density
    out = torch.where(keep, delta, 0.0)
    return out / density if rescale else out


def elect_sign(
    deltas: Tensor | Sequence[Tensor], method: SignMethod = "total", weights: Sequence[float] | None = None
) -> Tensor:
    """The elected sign (-1, 0 or +1) of each entry, over sources (a list, or a tensor stacked on dim 0).

    ``"total"`` (TIES): sign of the sum over sources, so larger entries weigh more. ``"frequency"``: sign of
    (number of positive entries - number of negative entries). A tie or an all-zero entry gives 0. With
    ``weights`` the election is on w_i·δ_i (without materializing the weighted copies).

    >>> d = torch.tensor([[3.0, 1.0, 0.0], [-1.0, -2.0, 0.0], [-1.0, 2.0, 0.0]])
    >>> elect_sign(d, "total"), elect_sign(d, "frequency")
    (tensor([1., 1., 0.]), tensor([-1.,  1.,  0.]))
    >>> elect_sign(d, "total", weights=[0.1, 1.0, 1.0])
    tensor([-1.,  1.,  0.])
    """
    if method not in ("total", "frequency"):
        raise ValueError(f"majority sign method must be 'total' or 'frequency', got {method!r}")
    weights = [1.0] * len(deltas) if weights is None else [float(w) for w in weights]
    total = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights, strict=True):  # source by source: no (n, ...) temporaries
        if method == "total":
            total.add_(d, alpha=w)
        else:  # the vote of w·d is sign(w)·sign(d)
            total.add_(torch.sign(d), alpha=(w > 0) - (w < 0))
    return torch.sign(total)


def disjoint_merge(deltas: Tensor | Sequence[Tensor], signs: Tensor, weights: Sequence[float]) -> Tensor:
    """TIES disjoint mean: average of the weighted deltas w_i·δ_i whose sign equals the elected sign.

    ``deltas`` are the (trimmed, unweighted) deltas (a list, or stacked on dim 0), ``signs`` the elected
    signs (from :func:`elect_sign` with the same ``weights``). Entry p of the result is
    Σ_{i∈A_p} w_i δ_i[p] / |A_p| with A_p = {i : sign(w_i δ_i[p]) = signs[p] ≠ 0}; it is 0 where A_p is
    empty, in particular where the elected sign is 0.

    >>> d = torch.tensor([[2.0, 1.0], [4.0, -1.0]])
    >>> disjoint_merge(d, torch.tensor([1.0, 0.0]), [1.0, 0.5])
    tensor([2., 0.])
    """
    total = torch.zeros_like(signs)
    count = torch.zeros_like(signs)
    elected = signs != 0
    for d, w in zip(deltas, weights, strict=True):
        x = d * float(w)
        agree = (torch.sign(x) == signs) & elected
        total += torch.where(agree, x, 0.0)
        count += agree
    return total / count.clamp_min(1)


def _disjoint_elected(stacked: Tensor, signs: Tensor, weights: Sequence[float]) -> Tensor:
    """:func:`disjoint_merge` of float32/float64 deltas stacked on dim 0, for ``signs`` from :func:`elect_sign`
    on them (values -1, 0 or +1, their dtype and shape), bit for bit, with each operation run once for all
    sources: w_i·δ_i with w_i rounded to the dtype (as a Python number is), agreement as w_i·δ_i·s > 0 (for
    s in {-1, 0, +1} that is sign(w_i·δ_i) = s ≠ 0, also for inf and NaN), the kept terms summed source by
    source in order (0 + t = t: a kept term is never -0.0), and the counts as exact small integers."""
    w = torch.tensor([float(v) for v in weights], dtype=stacked.dtype, device=stacked.device)
    x = stacked * w.view(-1, *([1] * signs.dim()))
    agree = x * signs > 0
    kept = torch.where(agree, x, 0.0)
    total = kept[0] + kept[1]
    for term in kept[2:]:
        total += term
    return total / agree.sum(dim=0, dtype=signs.dtype).clamp_min(1)


def _check(deltas: Sequence[Tensor], *per_source: Sequence[object]) -> None:
    if len(deltas) == 0:
        raise ValueError("at least one delta is needed")
    for values in per_source:
        if len(values) != len(deltas):
            raise ValueError(f"got {len(deltas)} deltas but {len(values)} per-source values")
    shape = deltas[0].shape
    for d in deltas:
        if d.shape != shape:
            raise ValueError(
                f"deltas of one module must have one shape, got {tuple(shape)} and {tuple(d.shape)}"
            )


def task_arithmetic(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ w_i ΔW_i (Ilharco et al. 2023); with dense deltas this is also loracook's ``linear``.

    >>> task_arithmetic([torch.ones(2), torch.full((2,), 2.0)], [1.0, -0.5])
    tensor([0., 0.])
    """
    _check(deltas, weights)
    total = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights, strict=True):
        total.add_(d, alpha=float(w))
    return total


def magnitude_prune_merge(
    deltas: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float], rescale: bool = False
) -> Tensor:
    """Σ w_i magnitude_prune(ΔW_i, density_i): task arithmetic on magnitude-pruned deltas, no sign election.

    >>> magnitude_prune_merge([torch.tensor([1.0, -4.0]), torch.tensor([3.0, 0.5])], [1.0, 1.0], [0.5, 0.5])
    tensor([ 3., -4.])
    """
    _check(deltas, weights, densities)
    pruned = [magnitude_prune(d, p, rescale) for d, p in zip(deltas, densities, strict=True)]
    return task_arithmetic(pruned, weights)


def ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    majority_sign: SignMethod = "total",
    rescale: bool = False,
) -> Tensor:
    """TIES-Merging: trim (magnitude prune), elect sign on the weighted deltas, disjoint mean.

    With one source and density 1 the result is ``w * delta``; with equal weights w it is w times the
    paper's merged task vector (the paper's λ plays the role of w).

    >>> a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-4.0, -2.0, 1.0])
    >>> ties([a, b], [1.0, 1.0], [1.0, 1.0])
    tensor([-4., -2.,  2.])
    """
    _check(deltas, weights, densities)
    trimmed = _prune_each(deltas, densities, rescale)
    signs = elect_sign(trimmed, majority_sign, weights)
    if isinstance(trimmed, Tensor):  # small deltas, stacked by _prune_each (at least two)
        return _disjoint_elected(trimmed, signs, weights)
    return disjoint_merge(trimmed, signs, weights)


def dare_linear(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    generators: Sequence[torch.Generator],
    rescale: bool = True,
) -> Tensor:
    """Σ w_i dare(ΔW_i, density_i, generator_i): DARE on each delta, then task arithmetic.

    >>> g = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    >>> dare_linear([torch.ones(4), torch.ones(4)], [0.5, 0.5], [1.0, 1.0], g)
    tensor([1., 1., 1., 1.])
    """
    _check(deltas, weights, densities, generators)
    dropped = [dare(d, p, g, rescale) for d, p, g in zip(deltas, densities, generators, strict=True)]
    return task_arithmetic(dropped, weights)


def dare_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    generators: Sequence[torch.Generator],
    majority_sign: SignMethod = "total",
    rescale: bool = True,
) -> Tensor:
    """DARE on each delta (instead of TIES' magnitude trim), then TIES sign election and disjoint mean.

    >>> g = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    >>> dare_ties([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])], [1.0, 1.0], [1.0, 1.0], g)
    tensor([ 2., -2.])
    """
    _check(deltas, weights, densities, generators)
    dropped = [dare(d, p, g, rescale) for d, p, g in zip(deltas, densities, generators, strict=True)]
    return disjoint_merge(dropped, elect_sign(dropped, majority_sign, weights), weights)
