"""Low-rank approximation of dense matrices: a full fine-tune's ΔW (extraction), or an element-wise merge
result to recompress into an adapter. ``low_rank_dense`` is the entry point: block Krylov iteration with an
a-posteriori convergence estimate (or an exact check against the optimal error, or a full SVD).

All functions compute in the dtype they are given (callers pass float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from loracook.ops.factored import _rank_for_energy
from loracook.threads import one_thread

__all__ = ["LowRank", "low_rank_dense"]


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


def low_rank_dense(
    M: Tensor,
    rank: int,
    *,
    method: Literal["randomized", "exact"] = "randomized",
    oversample: int = 8,
    niter: int = 1,
    tol: float | None = 0.01,
    check: Literal["estimate", "exact"] = "estimate",
    energy: float | None = None,
    generator: torch.Generator | None = None,
    max_niter: int = 10,
) -> LowRank:
    """Best rank-``rank`` approximation B @ A of a dense matrix M, with its exact error.

    ``method="exact"`` uses ``torch.linalg.svd``. ``method="randomized"`` draws an n × (rank + oversample)
    Gaussian test matrix from ``generator`` (a fixed seed when None, so results are deterministic); what
    follows depends on ``check``.

    ``check="estimate"`` (the default): block Krylov iteration (Musco & Musco 2015) on the smaller side's
    Gram matrix G, one block of rank + oversample columns per step, with Rayleigh–Ritz on the whole Krylov
    space. Its a-posteriori estimate: the best rank-r error within the space, exact for the space, is
    compared between successive depths, and the factors of depth q + 1 are returned once the error shrank
    by at most ``tol`` (relative) from depth q, and at depth ≥ ``niter``. Krylov spaces do not stall the way
    subspace iteration does on a cluster of singular values just above a flat bulk (where the last gain of
    subspace iteration is tiny while it is still 2 % from optimal), and their distance to the optimum after
    q + 1 steps is almost always below the last gain: on the fine-tunes of the extraction benchmark 1.00003×
    (SmolLM2) and 1.003× (synthetic 1.5B) optimal at ``tol`` 0.005; in 1,200 random matrices of
    scripts/estimate_sweep.py (2,246 runs) once above 1 + tol, at 1 + 1.19·tol; the 99th percentile was
    0.27–0.49·tol.
    It is an estimate, not a bound. When the space would outgrow 3/4 of the smaller side, or after
    ``max_niter`` steps, the exact truncated SVD is returned instead (``method_used="exact"``).

    ``check="exact"``: subspace iteration (Halko, Martinsson & Tropp 2011, algorithm 4.4) with an exact
    check: the optimal error opt_r = sqrt(Σ_{i>r} σ_i²) comes from the eigenvalues of the float64 Gram matrix
    of the smaller side of M, and the factors are accepted only if their actual residual ‖M − B A‖_F is
    ≤ (1 + tol)·opt_r + 64·eps·‖M‖_F (the last term is float32 rounding, which bounds what any float32
    method can reach); power iterations continue up to ``max_niter``, then the exact SVD is returned. A
    guarantee, but the Gram matrix and its spectrum cost 60–85 % of the time. ``tol=None`` skips both
    (plain subspace iteration with ``niter`` power iterations, no guarantee).

    ``energy``: if given, the rank becomes the smallest r ≤ ``rank`` whose retained share of ‖M‖_F² is
    ≥ ``energy`` (from the exact spectrum with the exact check, else from the Ritz values, which can only
    make r larger); it may be 0 for M = 0. Without ``energy`` the result has exactly min(rank, m, n)
    columns. When rank + oversample is at least half of min(m, n), the exact SVD is used from the start.

    Measured (torch 2.13 CPU, MKL, one thread), float32, rank 64, fine-tune deltas of
    benchmarks/bench_extract.py: SmolLM2 576 × 1536 — ``check="exact"`` 50–64 ms (1.003–1.005× optimal),
    ``estimate`` 37 ms (1.00001×); synthetic 1.5B 2048 × 2048 — exact 0.82 s, estimate 0.075 s; 2048 × 8192 —
    exact 1.9 s (1.003×), estimate 0.23 s (1.0015×); the exact SVD of 2048 × 5632 takes 8.0 s.

    >>> g = torch.Generator().manual_seed(0)
    >>> M = torch.randn(600, 8, generator=g) @ torch.randn(8, 900, generator=g)  # rank 8
    >>> lr = low_rank_dense(M, 8)
    >>> lr.B.shape, lr.A.shape, lr.method_used, lr.rel_err < 1e-5
    (torch.Size([600, 8]), torch.Size([8, 900]), 'randomized', True)

    A small matrix, where three Krylov blocks would not fit in 3/4 of its smaller side, goes straight to the
    exact SVD:

    >>> low_rank_dense(M[:60, :90], 8).method_used
    'exact'
    """
    if M.dim() != 2 or M.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"expected a 2-D float32 (or float64) matrix, got {tuple(M.shape)} {M.dtype}")
    if rank < 0 or oversample < 0 or niter < 0 or max_niter < niter:
        raise ValueError(
            f"need rank, oversample, niter >= 0 and max_niter >= niter; got {rank}, {oversample}, {niter}, {max_niter}"
        )
    if method not in ("randomized", "exact"):
        raise ValueError(f"method must be 'randomized' or 'exact', got {method!r}")
    if check not in ("estimate", "exact"):
        raise ValueError(f"check must be 'estimate' or 'exact', got {check!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 or None, got {tol}")
    m, n = M.shape
    rank = min(int(rank), m, n)
    norm2 = float(torch.linalg.vector_norm(M).double() ** 2)
    if not math.isfinite(norm2):  # cheaper than testing every entry first
        if not bool(torch.isfinite(M).all()):
            raise ValueError("matrix has NaN or infinite entries")
        norm2 = float(torch.linalg.vector_norm(M.double()) ** 2)
    if rank == 0 or norm2 == 0.0:
        r = 0 if energy is not None or rank == 0 else rank
        zeros = M.new_zeros(m, r), M.new_zeros(r, n), M.new_zeros(rank)
        return _result(*zeros, math.sqrt(norm2), norm2, "exact", 0)
    width = rank + oversample  # columns of the sketch
    if method == "exact" or (2 * width >= min(m, n) and tol is None):
        return _exact(M, rank, energy, norm2, 0)
    if tol is not None and 4 * width > min(m, n):
        # three Krylov blocks (depth 2, the first step that can pass the estimate on flat spectra) would not
        # fit in 3/4 of the smaller side, so the path would end in this exact SVD anyway (192 × 576 at
        # rank 64: 4.1 ms directly against 7.9 ms through the Krylov steps)
        return _exact_from_gram(M, _gram(M), rank, norm2, 0, energy)
    return _randomized(M, rank, width, niter, tol, check, energy, generator, max_niter, norm2)


def _randomized(
    M: Tensor,
    rank: int,
    width: int,
    niter: int,
    tol: float | None,
    check: str,
    energy: float | None,
    generator: torch.Generator | None,
    max_niter: int,
    norm2: float,
) -> LowRank:
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if tol is not None and check == "exact":
        return _randomized_checked(M, rank, width, niter, tol, energy, generator, max_niter)
    if tol is not None:
        return _randomized_estimated(M, rank, width, niter, tol, energy, generator, max_niter, norm2)
    n = M.shape[1]
    omega = torch.randn(n, width, generator=generator, dtype=M.dtype).to(M.device)
    Q = torch.linalg.qr(M @ omega).Q
    for j in range(niter + 1):
        # W = MᵀQ = Z Rz; the SVD of the small width × width factor Rz gives that of QᵀM = Wᵀ.
        Z, Rz = torch.linalg.qr(M.mT @ Q)
        if j == niter:
            Uz, S, Vzh = torch.linalg.svd(Rz)
            r = rank if energy is None else min(rank, _rank_for_energy(S, norm2, energy))
            B, A = _sqrt_split(Q @ Vzh.mT, S, (Z @ Uz).mT, r)
            return _result(B, A, S[:rank], _residual_norm(M, B, A), norm2, "randomized", j)
        Q = torch.linalg.qr(M @ Z).Q
    raise AssertionError("unreachable")


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


def _randomized_checked(
    M: Tensor,
    rank: int,
    width: int,
    niter: int,
    tol: float,
    energy: float | None,
    generator: torch.Generator,
    max_niter: int,
) -> LowRank:
    """The randomized path with the exact check. The float64 Gram matrix G of M's smaller side, needed for
    the exact spectrum, also carries the power iterations: Q ← orth(G Q) costs s²·w instead of the 2·s·t·w
    of going through M (s × t, s ≤ t), which is most of the iteration cost for wide matrices."""
    m, n = M.shape
    wide = m <= n
    X = M if wide else M.mT  # s × t, s ≤ t
    G = _gram(M)
    spectrum = _spectrum(G)  # σ_i², exact
    norm2 = float(spectrum.sum())
    r = rank if energy is None else min(rank, _rank_for_energy(spectrum.sqrt(), norm2, energy))
    opt = math.sqrt(float(spectrum[r:].sum()))
    allowed = (1 + tol) * opt + 64 * torch.finfo(M.dtype).eps * math.sqrt(norm2)
    Gx = G.to(M.dtype)
    omega = torch.randn(X.shape[1], width, generator=generator, dtype=M.dtype).to(M.device)
    Q = torch.linalg.qr(X @ omega).Q
    for j in range(max_niter + 1):
        if j >= niter:
            Uc, S, Vh = torch.linalg.svd(Q.mT @ X, full_matrices=False)
            Bx, Ax = _sqrt_split(Q @ Uc, S, Vh, r)  # X ≈ Bx @ Ax
            B, A = (Bx, Ax) if wide else (Ax.mT.contiguous(), Bx.mT.contiguous())
            # B A = P X with P the orthogonal projector on Q Uc[:, :r], so ‖X − P X‖² = ‖X‖² − Σ_{i≤r} S_i²;
            # computed directly when that difference would cancel too many digits.
            kept = float((S[:r].double() ** 2).sum())
            err = math.sqrt(norm2 - kept) if norm2 - kept > 1e-2 * norm2 else _residual_norm(M, B, A)
            if err <= allowed:
                return _result(B, A, S[:rank], err, norm2, "randomized", j)
        if j < max_niter:
            Q = torch.linalg.qr(Gx @ Q).Q
    return _exact_from_gram(M, G, rank, norm2, max_niter, energy)
