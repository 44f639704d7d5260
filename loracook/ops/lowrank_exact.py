"""The result of a dense low-rank approximation (:class:`LowRank`) and the exact pieces every path ends in: the
full SVD, the truncated SVD from the float64 Gram matrix of the smaller side, its spectrum, and the residual
‖M − B A‖_F computed block by block.

All functions compute in the dtype they are given (callers pass float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from loracook.ops.factored import _rank_for_energy
from loracook.threads import one_thread

# ---------------------------------------------------------------- dense low-rank approximation


@dataclass(frozen=True, eq=False)  # tensors have no boolean equality
class LowRank:
    """A rank-r approximation B @ A of a dense matrix M (see :func:`low_rank_dense`).

    B (m × r) = U√S and A (r × n) = √S Vh; S holds the top singular values as computed (at most the
    requested rank; B @ A uses the first r). err = ‖M − B A‖_F, rel_err = err / ‖M‖_F, energy = retained
    share ‖B A‖_F² / ‖M‖_F² (1.0 for M = 0). method_used is "randomized" or "exact"; niter is the number
    of steps the randomized path ran: block Krylov steps with ``check="estimate"``, power iterations with
    ``check="exact"`` or ``tol=None`` (0 if the randomized path was not used).
    """

    B: Tensor
    A: Tensor
    S: Tensor
    err: float
    rel_err: float
    energy: float
    method_used: Literal["randomized", "exact"]
    niter: int

    @property
    def rank(self) -> int:
        return self.B.shape[1]


def _sqrt_split(U: Tensor, S: Tensor, Vh: Tensor, r: int) -> tuple[Tensor, Tensor]:
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def _result(B: Tensor, A: Tensor, S: Tensor, err: float, norm2: float, method, niter: int) -> LowRank:
    kept = float(torch.linalg.vector_norm(S[: B.shape[1]]).double() ** 2)
    energy = min(kept / norm2, 1.0) if norm2 > 0 else 1.0
    rel_err = err / math.sqrt(norm2) if norm2 > 0 else 0.0
    return LowRank(B, A, S, err, rel_err, energy, method, niter)


def _exact(M: Tensor, rank: int, energy: float | None, norm2: float, niter: int) -> LowRank:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    r = rank if energy is None else min(rank, _rank_for_energy(S, norm2, energy))
    B, A = _sqrt_split(U, S, Vh, r)
    return _result(B, A, S[:rank], float(torch.linalg.vector_norm(S[r:])), norm2, "exact", niter)


def _exact_from_gram(
    M: Tensor, G: Tensor, rank: int, norm2: float, niter: int, energy: float | None = None
) -> LowRank:
    """The exact truncated SVD from the float64 Gram matrix G of M's smaller side: its top-r eigenvectors U
    give B = U√S and A = S^-½ Uᵀ M (Uᵀ M = S Vᵀ), with r = ``rank``, or the smallest r ≤ ``rank`` keeping
    ``energy`` of ‖M‖² (from the same eigenvalues). Several times cheaper than ``torch.linalg.svd`` of M once
    G is built (576 × 576: eigh 34 ms against 115 ms for the SVD of 576 × 1536), and as accurate for the
    leading singular vectors, which are all a rank-r approximation keeps."""
    m, n = M.shape
    wide = m <= n
    X = M if wide else M.mT
    with one_thread():  # see _spectrum
        values, vectors = torch.linalg.eigh(G)
    values = values.flip(0).clamp_min(0.0)
    S = values.sqrt()
    r = rank if energy is None else min(rank, _rank_for_energy(S, norm2, energy))
    U = vectors.flip(1)[:, :r]
    root = S[:r].sqrt()
    inverse = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    Bx = (U * root).to(M.dtype)
    Ax = (inverse[:, None] * (U.mT @ X.double())).to(M.dtype)
    B, A = (Bx, Ax) if wide else (Ax.mT.contiguous(), Bx.mT.contiguous())
    return _result(B, A, S[:rank].to(M.dtype), _residual_norm(M, B, A), norm2, "exact", niter)


def _blocks(M: Tensor, size: int = 4096):
    """Column blocks of a wide M (row blocks of a tall one), so temporaries stay small for embeddings."""
    wide = M.shape[0] <= M.shape[1]
    X = M if wide else M.mT
    for start in range(0, X.shape[1], size):
        yield X[:, start : start + size], wide, start


def _gram(M: Tensor) -> Tensor:
    """The float64 Gram matrix of M's smaller side (M Mᵀ for a wide M, Mᵀ M for a tall one).

    float64 on purpose: in float32 the eigenvalues of the Gram matrix carry errors up to about
    k·sqrt(n)·eps·‖M‖_F² on a sum of k of them, which can hide a 1 % change of a small rank-k error; in
    float64 they are exact to far below the float32 rounding of M itself.
    """
    G = None
    for X, _, _ in _blocks(M):
        X = X.double()
        G = X @ X.mT if G is None else G.addmm_(X, X.mT)
    return G


def _spectrum(G: Tensor) -> Tensor:
    """All eigenvalues of a Gram matrix (the squared singular values of M), decreasing."""
    # One thread: the tridiagonal reduction inside eigvalsh synchronizes its threads once per column, and on
    # a 2-core machine that other processes keep busy 2-thread eigvalsh of a 576 × 576 matrix took 0.1–16 s
    # against 33–72 ms on one thread (measured; ~15 ms on two idle cores). The thread count is restored.
    with one_thread():
        return torch.linalg.eigvalsh(G).flip(0).clamp_min(0.0)


def _residual_norm(M: Tensor, B: Tensor, A: Tensor) -> float:
    """‖M − B A‖_F computed directly (no cancellation against ‖M‖), block by block."""
    total = 0.0
    for X, wide, start in _blocks(M):
        if wide:
            part = X - B @ A[:, start : start + X.shape[1]]
        else:
            part = X - (B[start : start + X.shape[1]] @ A).mT
        total += float(torch.linalg.vector_norm(part).double() ** 2)
    return math.sqrt(total)
