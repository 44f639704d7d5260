"""LoRA-native merges computed on the factors: KnOTS, Core Space and Task Singular Vectors (TSV).

Each function takes one module's adapters as ``pairs`` = [(w_i, B_i, A_i), ...], where B_i (out × r_i) already
carries the adapter's scale s_i (ΔW_i = B_i A_i, the convention of :func:`loracook.ops.factored.stack_factors`)
and w_i is the source's merge weight, and returns factors (B, A) of the merged delta with rank ≤ R = Σ r_i.

Why factors: every method below is defined by SVDs of matrices built from the ΔW_i (the concatenation
[ΔW_1 | … | ΔW_n] for KnOTS, the stacked B's and A's for Core Space, each ΔW_i for TSV). Those matrices are
products of the factors, so QR decompositions of the stacked factors (out × R and in × r_i) reduce each SVD
to one of an R × R core, exactly. Nothing out × in (or out × n·in) is formed; the only dense tensors are the
ones the method merges element-wise: n matrices of R × in (KnOTS) or R × R (Core Space).

Numerics: the inputs are converted to float64 (exactly) and every step runs in float64; the result is cast
back to the dtype of the inputs. The cores are small, so this costs little, and it matters: the element-wise
``inner`` merges (TIES trim, DARE masks) are discontinuous in their input, so float32 rounding of the aligned
matrices could move an entry across a trim threshold and change the result by far more than the rounding.

Singular values σ_j ≤ ``rtol`` · σ_1 (default 1e-10) count as zero and their directions are dropped: their
singular vectors are an arbitrary completion of the basis (they depend on the LAPACK build), and dropping
them keeps the result well defined for exactly rank-deficient adapters (an untrained B = 0, repeated columns,
R > out). The range of every ΔW_i is kept, so nothing of the deltas is lost.

``inner(mats, weights)`` combines n same-shaped dense tensors with the n merge weights (a weighted sum,
``sparsify.ties``, ``sparsify.dare_ties``, ...). The singular vectors that define the aligned matrices are
unique only up to sign, so ``inner`` must commute with flipping the sign of the same entries in every input
(f(D∘x_1, …, D∘x_n) = D∘f(x_1, …, x_n) for a diagonal ±1 D); linear maps, TIES, DARE, magnitude pruning,
Breadcrumbs and DELLA all do. docs/lora-native-merges.md has the formulas, the choices and the costs.

References: KnOTS, Stoica et al., ICLR 2025 (arXiv:2410.19735); Core Space, Panariello et al., NeurIPS 2025
(arXiv:2509.17786); Task Singular Vectors, Gargiulo et al., CVPR 2025 (arXiv:2412.00081).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Inner", "RANK_RTOL", "knots", "core_space", "tsv", "tsv_dense", "polar"]

Inner = Callable[[list[Tensor], list[float]], Tensor]
"""An element-wise merge of same-shaped dense tensors with per-source weights: ``inner(mats, weights)``."""

RANK_RTOL = 1e-10
"""Singular values at most this fraction of the largest one are treated as zero (float64 arithmetic)."""


# ---------------------------------------------------------------- helpers


def _check_pairs(pairs: Sequence[tuple[float, Tensor, Tensor]]) -> tuple[int, int, torch.dtype]:
    """(out, in, dtype) of one module's pairs, after checking that every B_i A_i has that shape."""
    if not pairs:
        raise ValueError("a low-rank merge needs at least one (weight, B, A) pair")
    out, inp = pairs[0][1].shape[0], pairs[0][2].shape[-1]
    for _, B, A in pairs:
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"expected B (out × r) and A (r × in), got {tuple(B.shape)} and {tuple(A.shape)}"
            )
        if B.shape[0] != out or A.shape[1] != inp:
            raise ValueError(
                f"all pairs must have one shape, got {out} × {inp} and {B.shape[0]} × {A.shape[1]}"
            )
    return out, inp, pairs[0][1].dtype


def _rank(S: Tensor, rtol: float) -> int:
    """Number of singular values above rtol · σ_1 (S sorted in decreasing order; 0 for an all-zero S).

    Counted in Python on the (short) list of values, the same float64 comparisons as on the tensor without
    four small-tensor operations per call.
    """
    return _count_above(S.tolist(), rtol)


def _count_above(values: list[float], rtol: float) -> int:
    """:func:`_rank` on the values as a list."""
    if not values or values[0] <= 0.0:
        return 0
    cut = rtol * values[0]
    return sum(v > cut for v in values)


def _blocks(ranks: Sequence[int]) -> list[slice]:
    """Column slices of each source in a concatenation of blocks of the given widths."""
    starts = [0]
    for r in ranks:
        starts.append(starts[-1] + r)
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


COND_NO_Q = 1e6
"""Core Space applies a basis U = Q P as M W S⁻¹ (without forming Q) while σ_1/σ_k ≤ this: the rounding that
the division amplifies by σ_1/σ_k then stays below about 1e-16 · 1e6 = 1e-10 of a unit vector."""


def _stack_bases(Mb: Tensor, Ma: Tensor, rtol: float):
    """The left singular vectors of two tall-thin matrices M (m × p, p small), from a QR M = Q T and an SVD
    T = P S Wᵀ of the p × p triangular factor: O(m p²) instead of an SVD of M.

    Returns per matrix (T, P, F, C), truncated to the numerical rank k: T gives the coordinates of M's columns
    (Uᵀ M = Pᵀ T for U = Q P), and the basis itself is U = F C. While M is well conditioned (σ_1/σ_k ≤
    ``COND_NO_Q``) F = M and C = W S⁻¹ (M W = Q P S), which skips forming Q (LAPACK orgqr, as costly as the QR
    itself on SmolLM2 shapes); otherwise F = Q and C = P. When both triangular factors are square of one size
    (out, in ≥ R), their SVDs run as one batched call (one LAPACK call per matrix, as before, one dispatch).
    """
    (hb, tau_b), (ha, tau_a) = torch.geqrf(Mb), torch.geqrf(Ma)  # R in the upper triangle, reflectors below
    Tb, Ta = hb[: min(Mb.shape)].triu(), ha[: min(Ma.shape)].triu()
    if Tb.shape == Ta.shape:
        svds = list(zip(*torch.linalg.svd(torch.stack((Tb, Ta)), full_matrices=False), strict=True))
    else:
        svds = [torch.linalg.svd(Tb, full_matrices=False), torch.linalg.svd(Ta, full_matrices=False)]
    out = []
    for M, T, (h, tau), (P, S, Wh) in zip((Mb, Ma), (Tb, Ta), ((hb, tau_b), (ha, tau_a)), svds, strict=True):
        values = S.tolist()  # one conversion for the rank and the condition number
        k = _count_above(values, rtol)
        if k < len(values):
            P, S, Wh = P[:, :k], S[:k], Wh[:k]
        if k and values[0] <= COND_NO_Q * values[k - 1]:
            out.append((T, P, M, Wh.mT / S))
        else:
            out.append((T, P, torch.linalg.householder_product(h[:, : tau.shape[0]], tau), P))
    return out


def polar(M: Tensor) -> Tensor:
    """The orthogonal polar factor P Wᵀ of M = P S Wᵀ: the matrix with orthonormal columns (rows if M is wide)
    closest to M in Frobenius norm (orthogonal Procrustes), as TSV uses to decorrelate its singular vectors.

    Computed through a QR of M, so a tall-thin M (out × K, K ≤ R) costs O(out K²). It is unique when M has full
    rank; otherwise the directions of the zero singular values are an arbitrary completion.

    >>> U = polar(torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
    >>> torch.allclose(U.mT @ U, torch.eye(2), atol=1e-6)
    True
    """
    if M.shape[0] < M.shape[1]:
        return polar(M.mT).mT
    Q, T = torch.linalg.qr(M)
    P, _, Wh = torch.linalg.svd(T, full_matrices=False)
    return Q @ (P @ Wh)


def _empty(out: int, inp: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.zeros(out, 0, dtype=dtype), torch.zeros(0, inp, dtype=dtype)


# ---------------------------------------------------------------- KnOTS


def knots(
    pairs: Sequence[tuple[float, Tensor, Tensor]], inner: Inner, *, rtol: float = RANK_RTOL
) -> tuple[Tensor, Tensor]:
    """KnOTS (Stoica et al. 2025): merge in the shared basis of the SVD of [ΔW_1 | … | ΔW_n].

    The concatenation along the input side is U Σ [V_1ᵀ | … | V_nᵀ] (rank k ≤ R). The adapters now share the
    output basis U Σ, and their "aligned" parts X_i = Σ V_iᵀ (k × in) are merged element-wise:
    ΔW = U · inner([X_1, …, X_n], [w_1, …, w_n]). As in the official code, ``inner`` sees the Σ-scaled V_iᵀ
    (so a magnitude trim compares entries on their real scale) and the weights (a linear ``inner`` gives
    Σ w_i ΔW_i exactly); the basis is computed from the unweighted ΔW_i.

    In factor space: [ΔW_1 | …] = Q · K · blockdiag(Q_1ᵀ, …, Q_nᵀ) with B_cat = Q R_B (QR of the out × R stacked
    B's), A_iᵀ = Q_i T_i and the R × R core K = [R_B,1 T_1ᵀ | … | R_B,n T_nᵀ]; the SVD of K gives U = Q P and
    V_iᵀ = W_iᵀ Q_iᵀ. Cost O((out + n·in) R²) plus ``inner`` on n matrices of k × in.

    Returns (B, A) with B = U (out × k, orthonormal columns) and A = the merged k × in matrix.

    >>> B1, A1, B2, A2 = torch.randn(6, 2), torch.randn(2, 5), torch.randn(6, 3), torch.randn(3, 5)
    >>> weighted_sum = lambda mats, w: sum(wi * m for wi, m in zip(w, mats))
    >>> B, A = knots([(0.5, B1, A1), (-1.0, B2, A2)], weighted_sum)
    >>> torch.allclose(B @ A, 0.5 * B1 @ A1 - B2 @ A2, atol=1e-5)
    True
    """
    out, inp, dtype = _check_pairs(pairs)
    Q, R_B = torch.linalg.qr(torch.cat([B.double() for _, B, _ in pairs], dim=1))
    a_bases, a_cores = zip(*(torch.linalg.qr(A.double().mT) for _, _, A in pairs), strict=True)
    b_blocks = _blocks([B.shape[1] for _, B, _ in pairs])
    core = torch.cat([R_B[:, blk] @ T.mT for blk, T in zip(b_blocks, a_cores, strict=True)], dim=1)
    P, S, Wh = torch.linalg.svd(core, full_matrices=False)
    k = _rank(S, rtol)
    if k == 0:
        return _empty(out, inp, dtype)
    SWh = S[:k, None] * Wh[:k]
    aligned = [
        SWh[:, blk] @ Qa.mT for blk, Qa in zip(_blocks([Qa.shape[1] for Qa in a_bases]), a_bases, strict=True)
    ]
    merged = inner(aligned, [float(w) for w, _, _ in pairs])
    return (Q @ P[:, :k]).to(dtype), merged.to(dtype)


# ---------------------------------------------------------------- Core Space


def core_space(
    pairs: Sequence[tuple[float, Tensor, Tensor]], inner: Inner, *, rtol: float = RANK_RTOL
) -> tuple[Tensor, Tensor]:
    """Core Space merging (Panariello et al. 2025): merge the adapters' R × R cores in shared reference bases.

    U_B = left singular vectors of [B_1 … B_n] (out × R), V_A = right singular vectors of [A_1; …; A_n]
    (R × in); each ΔW_i = U_B M_i V_Aᵀ exactly, with the core M_i = U_Bᵀ B_i A_i V_A (R × R), because U_B and
    V_A span every B_i's columns and A_i's rows. ΔW = U_B · inner([M_1, …, M_n], [w_1, …, w_n]) · V_Aᵀ. A
    linear ``inner`` gives Σ w_i ΔW_i exactly (no information loss, the paper's point); the bases are those of
    the official code (SVDs of the stacked factors, with each adapter's scale inside its B).

    In factor space: QR of the stacked B's (out × R) and of the stacked Aᵀ's (in × R), SVDs of the two R × R
    triangular factors; U_Bᵀ B_i and A_i V_A are read off the triangular factors, so each core costs O(R² r_i),
    and the bases are applied from the stacks themselves (U_B = B_stack W_b S_b⁻¹) unless a stack is
    ill-conditioned (see :data:`COND_NO_Q`). Cost O((out + in) R²) plus ``inner`` on n matrices of R × R.

    Returns (B, A) = (U_B, merged · V_Aᵀ), or (U_B · merged, V_Aᵀ) when V_A is the narrower basis: rank ≤ R,
    and one factor has orthonormal columns or rows (to rounding).

    >>> B1, A1, B2, A2 = torch.randn(6, 2), torch.randn(2, 5), torch.randn(6, 3), torch.randn(3, 5)
    >>> weighted_sum = lambda mats, w: sum(wi * m for wi, m in zip(w, mats))
    >>> B, A = core_space([(0.5, B1, A1), (-1.0, B2, A2)], weighted_sum)
    >>> torch.allclose(B @ A, 0.5 * B1 @ A1 - B2 @ A2, atol=1e-5)
    True
    """
    out, inp, dtype = _check_pairs(pairs)
    (Tb, Pb, Fb, Cb), (Ta, Pa, Fa, Ca) = _stack_bases(
        torch.cat([B for _, B, _ in pairs], dim=1).double(),  # [B_1 … B_n], out × R
        torch.cat([A for _, _, A in pairs], dim=0).double().mT,  # [A_1; …; A_n]ᵀ, in × R
        rtol,
    )
    if Pb.shape[1] == 0 or Pa.shape[1] == 0:
        return _empty(out, inp, dtype)
    left, right = Pb.mT @ Tb, Ta.mT @ Pa  # U_Bᵀ [B_1 … B_n] and [A_1; …; A_n] V_A, both small
    cores = [left[:, blk] @ right[blk] for blk in _blocks([B.shape[1] for _, B, _ in pairs])]
    merged = inner(cores, [float(w) for w, _, _ in pairs])
    # U_B = Fb Cb, V_A = Fa Ca; the output is the narrower of (U_B, merged V_Aᵀ) and (U_B merged, V_Aᵀ)
    if Pb.shape[1] <= Pa.shape[1]:
        return (Fb @ Cb).to(dtype), ((merged @ Ca.mT) @ Fa.mT).to(dtype)
    return (Fb @ (Cb @ merged)).to(dtype), (Ca.mT @ Fa.mT).to(dtype)


# ---------------------------------------------------------------- Task Singular Vectors


def _default_keep(total: int, n: int, requested: Sequence[int] | None) -> list[int]:
    if requested is None:
        return [total // n] * n
    if len(requested) != n:
        raise ValueError(f"got {n} sources but {len(requested)} ranks_per_source")
    if any(int(k) < 0 for k in requested):
        raise ValueError(f"ranks_per_source must be >= 0, got {list(requested)}")
    return [int(k) for k in requested]


def _tsv_from_svds(
    svds: Sequence[tuple[Tensor, Tensor, Tensor]],
    weights: Sequence[float],
    keep: Sequence[int],
    alpha: float,
    rtol: float,
) -> tuple[Tensor, Tensor] | None:
    """TSV-Merge from each source's SVD (U_i, S_i, V_i with V_i as columns): α U⊥ diag(w_i Σ_i) and V⊥ᵀ."""
    ks = [min(k, _rank(S, rtol)) for k, (_, S, _) in zip(keep, svds, strict=True)]
    if sum(ks) == 0:
        return None
    U = torch.cat([U[:, :k] for k, (U, _, _) in zip(ks, svds, strict=True)], dim=1)
    V = torch.cat([V[:, :k] for k, (_, _, V) in zip(ks, svds, strict=True)], dim=1)
    s = torch.cat([float(w) * S[:k] for w, k, (_, S, _) in zip(weights, ks, svds, strict=True)])
    return polar(U) * (float(alpha) * s), polar(V).mT


def _factor_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (U, S, V) of B A from the factors, V as columns (QR of B and Aᵀ, SVD of an r × r core)."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    P, S, Wh = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
    return Qb @ P, S, Qa @ Wh.mT


def tsv(
    pairs: Sequence[tuple[float, Tensor, Tensor]],
    ranks_per_source: Sequence[int] | None = None,
    alpha: float = 1.0,
    *,
    rtol: float = RANK_RTOL,
) -> tuple[Tensor, Tensor]:
    """TSV-Merge (Gargiulo et al. 2025): keep each adapter's top singular vectors, decorrelate them, sum.

    ΔW_i = U_i Σ_i V_iᵀ; keep the top k_i triplets; U = [U_1,k_1 | … | U_n,k_n] and V likewise (the task
    singular vectors of all sources side by side), replaced by their orthogonal polar factors U⊥ = polar(U),
    V⊥ = polar(V) (the nearest matrices with orthonormal columns: interference between tasks is removed with
    the least change to each task's directions); ΔW = α U⊥ blockdiag(w_1 Σ_1,k_1, …, w_n Σ_n,k_n) V⊥ᵀ.

    k_i defaults to ⌊R/n⌋ (the paper keeps 1/n of each task's spectrum; R plays the role of the full rank) and
    is capped at the numerical rank of ΔW_i, since singular vectors of zero singular values are arbitrary but
    would still change the polar factors. With equal ranks r_i = r every direction is kept. The weights w_i
    scale each source's singular values (the paper has one global α; w_i gives per-source control and makes one
    source at weight 1, k = r, α = 1 return ΔW_1 exactly).

    In factor space each SVD comes from QR of B_i and A_iᵀ and an r_i × r_i core, and the polar factors from a
    QR of the out × K and in × K concatenations (K = Σ k_i ≤ R). Cost O((out + in) R²); nothing dense.

    Returns (B, A) = (α U⊥ diag(w Σ), V⊥ᵀ), of rank ≤ K.

    >>> B, A = torch.randn(6, 2), torch.randn(2, 5)
    >>> Bm, Am = tsv([(1.0, B, A)])
    >>> torch.allclose(Bm @ Am, B @ A, atol=1e-5)
    True
    """
    out, inp, dtype = _check_pairs(pairs)
    keep = _default_keep(sum(B.shape[1] for _, B, _ in pairs), len(pairs), ranks_per_source)
    svds = [_factor_svd(B.double(), A.double()) for _, B, A in pairs]
    result = _tsv_from_svds(svds, [w for w, _, _ in pairs], keep, alpha, rtol)
    if result is None:
        return _empty(out, inp, dtype)
    return result[0].to(dtype), result[1].to(dtype)


def tsv_dense(
    mats: Sequence[Tensor],
    weights: Sequence[float],
    ranks_per_source: Sequence[int] | None = None,
    alpha: float = 1.0,
    *,
    rtol: float = RANK_RTOL,
) -> Tensor:
    """TSV-Merge of dense matrices (as :func:`tsv`; k_i defaults to ⌊min(shape)/n⌋), for use as an ``inner``.

    Meant for the small R × R cores of :func:`core_space` (the "Core Space + TSV" of the Core Space paper): the
    cores' singular vectors are those of the ΔW_i expressed in the bases U_B, V_A, and polar(U_B X) = U_B polar(X)
    for orthonormal U_B, so ``core_space(pairs, tsv_dense)`` equals ``tsv(pairs)`` when the stacked factors have
    full rank. On a full out × in matrix it is the paper's dense TSV (with an O(out · in · min) SVD per source).

    >>> M = torch.randn(4, 3)
    >>> torch.allclose(tsv_dense([M], [2.0], [3]), 2 * M, atol=1e-5)
    True
    """
    if not mats:
        raise ValueError("tsv_dense needs at least one matrix")
    if len(weights) != len(mats):
        raise ValueError(f"got {len(mats)} matrices but {len(weights)} weights")
    keep = _default_keep(min(mats[0].shape), len(mats), ranks_per_source)
    svds = []
    for M in mats:
        U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
        svds.append((U, S, Vh.mT))
    result = _tsv_from_svds(svds, weights, keep, alpha, rtol)
    if result is None:
        return torch.zeros_like(mats[0])
    return (result[0] @ result[1]).to(mats[0].dtype)
