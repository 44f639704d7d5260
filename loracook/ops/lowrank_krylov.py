"""The randomized path of :func:`loracook.ops.lowrank.low_rank_dense` with its convergence estimate
(``check="estimate"``): block Krylov iteration on the Gram matrix of the smaller side, Rayleigh–Ritz on the whole
Krylov space, and the factors of the top Ritz vectors."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from loracook.ops.factored import _rank_for_energy
from loracook.ops.lowrank_exact import LowRank, _exact_from_gram, _gram, _residual_norm, _result


def _randomized_estimated(
    M: Tensor,
    rank: int,
    width: int,
    niter: int,
    tol: float,
    energy: float | None,
    generator: torch.Generator,
    max_niter: int,
    norm2: float,
) -> LowRank:
    """The randomized path with the convergence estimate: block Krylov iteration and Rayleigh–Ritz.

    The Krylov space of depth q is span[Y, G Y, …, G^q Y] with Y = X Ω and G = X Xᵀ (X is M's wider
    orientation, s × t), one block of ``width`` columns per step; the Ritz vectors of G in that space give the
    factors. For the same number of products with M, a Krylov space approximates the top singular subspace
    much better than subspace iteration does on flat spectra (Musco & Musco 2015), and it does not stall on a
    cluster of singular values above a flat bulk. The estimate: the factors of depth q + 1 are returned once
    the best rank-r error within the space shrank by at most ``tol`` from depth q to q + 1; their own
    distance to the optimum is then almost always smaller still (measured: see ``low_rank_dense``)."""
    m, n = M.shape
    wide = m <= n
    X = M if wide else M.mT  # s × t, s ≤ t
    s = X.shape[0]
    rounding = 64 * torch.finfo(M.dtype).eps * math.sqrt(norm2)
    omega = torch.randn(X.shape[1], width, generator=generator, dtype=M.dtype).to(M.device)
    Z = torch.linalg.qr(X @ omega).Q
    XtZ = X.mT @ Z  # Xᵀ Z; its last ``last`` columns belong to the newest block
    H = (XtZ.mT @ XtZ).double()  # Zᵀ G Z: its eigenvalues are the squared Ritz singular values
    last, r, before = Z.shape[1], rank, None  # before: (columns, r, error) one depth earlier
    for depth in range(max_niter + 1):
        ritz = _ritz(H)
        if energy is not None:
            r = min(rank, _rank_for_energy(ritz.values.sqrt(), norm2, energy))
        err = _space_error(X, Z, XtZ, ritz, r, norm2)
        converged = err <= rounding
        if before is not None and not converged:
            p, r_before, err_before = before
            if r_before != r:
                err_before = _space_error(X, Z[:, :p], XtZ[:, :p], _ritz(H[:p, :p]), r, norm2)
            converged = err_before <= (1 + tol) * err + rounding
        if converged and depth >= niter:
            return _ritz_result(M, Z, XtZ, ritz, rank, r, err, norm2, depth)
        before = (Z.shape[1], r, err)
        if depth == max_niter or Z.shape[1] + width > 3 * s // 4:  # the exact SVD is cheaper from here
            break
        new = _new_directions(X @ XtZ[:, -last:], Z)
        if new.shape[1] == 0:  # span(Z) is invariant under G: its Ritz pairs are exact
            return _ritz_result(M, Z, XtZ, ritz, rank, r, err, norm2, depth)
        XtN = X.mT @ new
        cross, corner = (XtZ.mT @ XtN).double(), (XtN.mT @ XtN).double()  # H grows by one block row/column
        H = torch.cat([torch.cat([H, cross], 1), torch.cat([cross.mT, corner], 1)], 0)
        Z, XtZ, last = torch.cat([Z, new], 1), torch.cat([XtZ, XtN], 1), new.shape[1]
    return _exact_from_gram(M, _gram(M), rank, norm2, depth, energy)


def _project_out(Y: Tensor, Z: Tensor) -> Tensor:
    """(I − Z Zᵀ) Y for orthonormal Z, twice (one pass of classical Gram–Schmidt loses orthogonality)."""
    Y = Y - Z @ (Z.mT @ Y)
    return Y - Z @ (Z.mT @ Y)


def _new_directions(Y: Tensor, Z: Tensor) -> Tensor:
    """An orthonormal basis of the part of span(Y) orthogonal to span(Z), without the directions that are
    rounding noise (which would break the orthonormality of [Z, new])."""
    Q, R = torch.linalg.qr(_project_out(Y, Z))
    Q = Q[:, R.diagonal().abs() > 1e-5 * float(torch.linalg.vector_norm(Y, dim=0).max())]
    return torch.linalg.qr(Q - Z @ (Z.mT @ Q)).Q if Q.shape[1] else Q  # one more pass: Q is orthonormal


# Below this share of ‖X‖², ‖X‖² − Σ S_i² is computed from the factors instead: the float32 singular values
# carry an absolute error of about sqrt(r)·eps·‖X‖² in Σ S_i², which is 0.1 % of the difference here.
_CANCELLATION = 1e-3


class _Ritz(NamedTuple):
    """The eigenpairs of H = Zᵀ G Z, decreasing: the squared singular values of Zᵀ X and their vectors."""

    values: Tensor
    vectors: Tensor


def _ritz(H: Tensor) -> _Ritz:
    values, vectors = torch.linalg.eigh(H)
    return _Ritz(values.flip(0).clamp_min(0.0), vectors.flip(1))


def _space_error(X: Tensor, Z: Tensor, XtZ: Tensor, ritz: _Ritz, r: int, norm2: float) -> float:
    """‖X − P X‖_F for P the projector on the top-r Ritz vectors of span(Z) (orthonormal Z, XtZ = Xᵀ Z,
    H = Zᵀ G Z): sqrt(‖X‖² − Σ_{i≤r} S_i²), or from the factors themselves when that difference would cancel
    too many digits."""
    kept = float(ritz.values[:r].sum())
    if norm2 - kept > _CANCELLATION * norm2:
        return math.sqrt(norm2 - kept)
    return _residual_norm(X, *_ritz_factors(Z, XtZ, ritz, r)[:2])


def _ritz_factors(Z: Tensor, XtZ: Tensor, ritz: _Ritz, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bx (s × r), Ax (r × t) with Bx Ax = P X, P the projector on the top-r Ritz vectors Z V_r, and the Ritz
    singular values S. From the eigenvectors V of H = Zᵀ G Z: Zᵀ X = V S Whᵀ, so Bx = Z V_r √S_r and
    Ax = S_r^-½ V_rᵀ Zᵀ X; whatever the rounding of S, Bx Ax = Z V_r V_rᵀ Zᵀ X is the projection."""
    S, V = ritz.values.sqrt(), ritz.vectors[:, :r]
    root = S[:r].sqrt()
    inverse = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    Vx = V.to(Z.dtype)
    Bx = Z @ (Vx * root.to(Z.dtype))
    Ax = (inverse.to(Z.dtype)[:, None] * Vx.mT) @ XtZ.mT
    return Bx, Ax, S.to(Z.dtype)


def _ritz_result(
    M: Tensor, Z: Tensor, XtZ: Tensor, ritz: _Ritz, rank: int, r: int, err: float, norm2: float, depth: int
) -> LowRank:
    """The factors of the top-r Ritz vectors, whose error ``err`` the caller has from :func:`_space_error`."""
    Bx, Ax, S = _ritz_factors(Z, XtZ, ritz, r)
    B, A = (Bx, Ax) if M.shape[0] <= M.shape[1] else (Ax.mT.contiguous(), Bx.mT.contiguous())
    return _result(B, A, S[:rank], err, norm2, "randomized", depth)
