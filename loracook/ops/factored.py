"""Exact linear algebra on LoRA factors.

A LoRA delta is ΔW = B @ A with B (d × r) and A (r × k), r ≪ min(d, k). Everything here works with QR
decompositions of B and Aᵀ and an SVD of an r × r core, so it costs O((d + k) r²) and never forms a d × k
matrix. Low-rank approximation of dense matrices (extraction, recompression) is in :mod:`loracook.ops.lowrank`.

All functions compute in the dtype they are given (callers pass float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "cosine_similarity",
    "effective_rank",
    "factored_svd",
    "frobenius_inner",
    "frobenius_norm",
    "stack_factors",
    "subspace_similarity",
    "truncate_factors",
    "Truncated",
]


def _check_pair(B: Tensor, A: Tensor) -> None:
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"expected B (d × r) and A (r × k), got {tuple(B.shape)} and {tuple(A.shape)}")


def stack_factors(terms: Sequence[tuple[float, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Factors of Σ w_i B_i A_i: B_cat = [w_1 B_1, w_2 B_2, ...] (d × Σr_i), A_cat = [A_1; A_2; ...].

    B_cat @ A_cat equals the weighted sum exactly (block product, no cross terms B_i A_j), which is
    loracook's ``linear`` / ``cat`` in factored form. Fold each adapter's scale (alpha / r) into w_i or B_i.

    >>> B1, A1, B2, A2 = torch.randn(6, 2), torch.randn(2, 5), torch.randn(6, 3), torch.randn(3, 5)
    >>> B, A = stack_factors([(0.5, B1, A1), (-1.0, B2, A2)])
    >>> B.shape, A.shape
    (torch.Size([6, 5]), torch.Size([5, 5]))
    >>> torch.allclose(B @ A, 0.5 * B1 @ A1 - B2 @ A2, atol=1e-5)
    True
    """
    if not terms:
        raise ValueError("stack_factors needs at least one (weight, B, A) term")
    for _, B, A in terms:
        _check_pair(B, A)
        if B.shape[0] != terms[0][1].shape[0] or A.shape[1] != terms[0][2].shape[1]:
            raise ValueError(
                f"all terms must have one output shape, got {terms[0][1].shape[0]} × {terms[0][2].shape[1]} "
                f"and {B.shape[0]} × {A.shape[1]}"
            )
    B_cat = torch.cat([float(w) * B for w, B, _ in terms], dim=1)
    A_cat = torch.cat([A for _, _, A in terms], dim=0)
    return B_cat, A_cat


def _qr_core(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """B @ A = Qb @ core @ Qaᵀ with orthonormal Qb (d × p), Qa (k × q) and core (p × q), p, q ≤ r."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    return Qb, Rb @ Ra.mT, Qa


def factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of B @ A from the factors: U (d × n), S (n), Vh (n × k), n = min(d, k, r).

    QR of B and of Aᵀ reduce the problem to the SVD of a small core, so the cost is O((d + k) r²).
    S is sorted in decreasing order and includes the zero singular values of rank-deficient or zero
    inputs (their singular vectors are then an arbitrary orthonormal completion).

    >>> B, A = torch.randn(8, 3), torch.randn(3, 6)
    >>> U, S, Vh = factored_svd(B, A)
    >>> U.shape, S.shape, Vh.shape
    (torch.Size([8, 3]), torch.Size([3]), torch.Size([3, 6]))
    >>> torch.allclose((U * S) @ Vh, B @ A, atol=1e-5)
    True
    """
    _check_pair(B, A)
    (d, r), k = B.shape, A.shape[1]
    if min(d, k, r) == 0:
        return B.new_zeros(d, 0), B.new_zeros(0), A.new_zeros(0, k)
    Qb, core, Qa = _qr_core(B, A)
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    return Qb @ Uc, S, Vch @ Qa.mT


class Truncated(NamedTuple):
    """A rank-k approximation B @ A of a factored matrix M, with ‖M − B A‖_F and ‖M‖_F."""

    B: Tensor
    A: Tensor
    err: float
    norm: float


def truncate_factors(B: Tensor, A: Tensor, rank: int) -> Truncated:
    """Best rank-``rank`` approximation of B @ A as factors (U√S, √S Vh), its exact Frobenius error and norm.

    The result has min(rank, d, k, r) columns; it is exact (err = 0 up to rounding) when ``rank`` is at
    least the rank of B @ A. err = sqrt(Σ discarded S²) = ‖B A − B_k A_k‖_F (Eckart–Young), and
    norm = sqrt(Σ S²) = ‖B A‖_F, from the same small SVD.

    >>> B, A = torch.randn(8, 4), torch.randn(4, 6)
    >>> Bk, Ak, err, norm = truncate_factors(B, A, 2)
    >>> Bk.shape, Ak.shape
    (torch.Size([8, 2]), torch.Size([2, 6]))
    >>> abs(err - float(torch.linalg.norm(B @ A - Bk @ Ak))) < 1e-4 * float(torch.linalg.norm(B @ A))
    True
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    _check_pair(B, A)
    (d, r), k = B.shape, A.shape[1]
    if min(d, k, r) == 0:
        return Truncated(B.new_zeros(d, 0), A.new_zeros(0, k), 0.0, 0.0)
    # As factored_svd, but the orthonormal factors stay in Householder form (geqrf) and only the kept
    # singular vectors are mapped back (ormqr): forming Q would cost as much again as the factorization.
    hb, tau_b = torch.geqrf(B)
    ha, tau_a = torch.geqrf(A.mT)
    pb, pa = min(d, r), min(k, r)
    core = hb[:pb].triu() @ ha[:pa].triu().mT
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    keep = min(int(rank), S.numel())
    U = B.new_zeros(d, keep)
    U[:pb] = Uc[:, :keep]
    V = A.new_zeros(k, keep)
    V[:pa] = Vch[:keep].mT
    U, V = torch.ormqr(hb, tau_b, U), torch.ormqr(ha, tau_a, V)
    root = S[:keep].sqrt()
    err = float(torch.linalg.vector_norm(S[keep:]))
    return Truncated(U * root, root[:, None] * V.mT, err, float(torch.linalg.vector_norm(S)))


def frobenius_inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """⟨B1 A1, B2 A2⟩_F = tr((B1ᵀ B2)(A2 A1ᵀ)), from r1 × r2 Gram matrices (0-dim tensor).

    >>> B1, A1, B2, A2 = torch.randn(5, 2), torch.randn(2, 4), torch.randn(5, 3), torch.randn(3, 4)
    >>> torch.allclose(frobenius_inner(B1, A1, B2, A2), ((B1 @ A1) * (B2 @ A2)).sum(), atol=1e-4)
    True
    """
    _check_pair(B1, A1)
    _check_pair(B2, A2)
    if B1.shape[0] != B2.shape[0] or A1.shape[1] != A2.shape[1]:
        raise ValueError(f"shapes differ: {B1.shape[0]} × {A1.shape[1]} and {B2.shape[0]} × {A2.shape[1]}")
    return ((B1.mT @ B2) * (A1 @ A2.mT)).sum()


def frobenius_norm(B: Tensor, A: Tensor) -> Tensor:
    """‖B A‖_F (0-dim tensor), as the norm of the small QR core.

    The core is used instead of sqrt(frobenius_inner(B, A, B, A)) because the Gram-matrix form squares the
    condition number: for a nearly cancelling B @ A it loses all digits, the core does not.

    >>> B, A = torch.randn(5, 2), torch.randn(2, 4)
    >>> torch.allclose(frobenius_norm(B, A), torch.linalg.norm(B @ A), rtol=1e-5)
    True
    """
    _check_pair(B, A)
    if B.numel() == 0 or A.numel() == 0:
        return B.new_zeros(())
    return torch.linalg.matrix_norm(_qr_core(B, A)[1])


def cosine_similarity(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """⟨B1A1, B2A2⟩_F / (‖B1A1‖_F ‖B2A2‖_F) in [-1, 1]; 0 when either product is zero.

    >>> B, A = torch.randn(5, 2), torch.randn(2, 4)
    >>> round(float(cosine_similarity(B, A, -3 * B, A)), 4)
    -1.0
    """
    norms = frobenius_norm(B1, A1) * frobenius_norm(B2, A2)
    if norms == 0:
        return norms.new_zeros(())
    return (frobenius_inner(B1, A1, B2, A2) / norms).clamp(-1.0, 1.0)


def subspace_similarity(U1: Tensor, U2: Tensor, i: int, j: int) -> float:
    """φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) in [0, 1] (Hu et al. 2021, LoRA paper section 7).

    U1 and U2 have orthonormal columns (e.g. left singular vectors from :func:`factored_svd`); φ is 1 when
    the smaller of the two subspaces lies in the other, 0 when they are orthogonal.

    >>> U = torch.linalg.qr(torch.randn(10, 4))[0]
    >>> round(subspace_similarity(U, U, 2, 4), 5), round(subspace_similarity(U[:, :2], U[:, 2:], 2, 2), 5)
    (1.0, 0.0)
    """
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"U1 and U2 must have the same number of rows, got {U1.shape[0]} and {U2.shape[0]}")
    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):
        raise ValueError(f"need 1 <= i <= {U1.shape[1]} and 1 <= j <= {U2.shape[1]}, got i={i}, j={j}")
    overlap = U1[:, :i].mT @ U2[:, :j]
    return float(overlap.square().sum()) / min(i, j)


def _rank_for_energy(S: Tensor, total: float, energy: float) -> int:
    """Smallest n with Σ_{i<n} S_i² >= energy · total (len(S) if never reached; 0 if total is 0)."""
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy is a share of the squared spectrum and must be in [0, 1], got {energy}")
    if total <= 0.0 or energy == 0.0:
        return 0
    # float64 cumulative sum: fp32 rounding of a long sum can keep the share at 0.99999 < 1.0 forever.
    share = torch.cumsum(S.double().square(), 0) / total
    return min(int((share < energy * (1 - 1e-12)).sum()) + 1, S.numel())


def effective_rank(S: Tensor, energy: float) -> int:
    """Smallest k whose top-k share of ΣS² is >= ``energy`` (0 for an all-zero spectrum).

    >>> effective_rank(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0.9)
    2
    >>> effective_rank(torch.tensor([3.0, 2.0, 1.0, 0.0]), 1.0)
    3
    """
    S = torch.sort(S.abs(), descending=True).values
    return _rank_for_energy(S, float(S.double().square().sum()), energy)
