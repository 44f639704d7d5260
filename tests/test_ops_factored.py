"""Factor-space linear algebra and dense low-rank approximation against dense float64 references.

Every expected value is computed here from the dense product in float64 (torch.linalg.svd / svdvals,
explicit sums), never with loracook.ops.factored itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from loracook.ops.factored import (
    cosine_similarity,
    effective_rank,
    factored_svd,
    frobenius_inner,
    frobenius_norm,
    stack_factors,
    subspace_similarity,
    truncate_factors,
)
from loracook.ops.lowrank import low_rank_dense

# small tensors: one thread is faster, and immune to a busy machine (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")

EPS = torch.finfo(torch.float32).eps


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def dense64(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return B.double() @ A.double()


def with_spectrum(m: int, n: int, sv, seed: int) -> torch.Tensor:
    """float32 m × n matrix with the given singular values and random singular vectors."""
    g = gen(seed)
    sv = torch.as_tensor(sv, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(m, len(sv), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(sv), generator=g, dtype=torch.float64)).Q
    return ((U * sv) @ V.T).float()


# ---------------------------------------------------------------- stack_factors


def test_stack_factors_is_the_exact_weighted_sum():
    terms = [
        (0.7, randn(12, 2, seed=1), randn(2, 9, seed=2)),
        (-1.3, randn(12, 5, seed=3), randn(5, 9, seed=4)),
    ]
    B, A = stack_factors(terms)
    assert B.shape == (12, 7) and A.shape == (7, 9) and B.dtype == A.dtype == torch.float32
    expected = sum(w * dense64(b, a) for w, b, a in terms)
    torch.testing.assert_close(dense64(B, A), expected, rtol=1e-6, atol=1e-5)


def test_stack_factors_rejects_mismatched_terms():
    with pytest.raises(ValueError, match="at least one"):
        stack_factors([])
    with pytest.raises(ValueError, match="one output shape"):
        stack_factors(
            [(1.0, randn(4, 2, seed=0), randn(2, 5, seed=0)), (1.0, randn(4, 2, seed=0), randn(2, 6, seed=0))]
        )
    with pytest.raises(ValueError, match="d × r"):
        stack_factors([(1.0, randn(4, 2, seed=0), randn(3, 5, seed=0))])


# ---------------------------------------------------------------- factored_svd and truncation


def rank_deficient(d: int, k: int, r: int, true_rank: int, seed: int):
    """B (d × r), A (r × k) whose product has rank ``true_rank`` (repeated columns of B)."""
    base = randn(d, true_rank, seed=seed)
    B = base[:, torch.arange(r) % true_rank] * torch.linspace(1, 2, r)
    return B, randn(r, k, seed=seed + 1)


CASES = {
    "thin": (randn(40, 6, seed=1), randn(6, 30, seed=2)),
    "r > min(d, k)": (randn(5, 10, seed=3), randn(10, 7, seed=4)),
    "rank deficient": rank_deficient(40, 30, 8, 3, seed=5),
    "zero": (torch.zeros(20, 4), torch.zeros(4, 10)),
    "zero A only": (randn(20, 4, seed=6), torch.zeros(4, 10)),
}


@pytest.mark.parametrize("case", CASES)
def test_factored_svd_matches_dense_svd(case):
    B, A = CASES[case]
    d, r, k = B.shape[0], B.shape[1], A.shape[1]
    U, S, Vh = factored_svd(B, A)
    n = min(d, k, r)
    assert U.shape == (d, n) and S.shape == (n,) and Vh.shape == (n, k)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    P = dense64(B, A)
    scale = float(torch.linalg.matrix_norm(P)) + 1.0
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(P)[:n], rtol=0, atol=1e-5 * scale)
    assert bool((S[:-1] >= S[1:]).all())
    torch.testing.assert_close(
        U.double().T @ U.double(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        Vh.double() @ Vh.double().T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-5
    )
    torch.testing.assert_close((U.double() * S.double()) @ Vh.double(), P, rtol=0, atol=1e-5 * scale)


def test_factored_svd_rank_zero():
    U, S, Vh = factored_svd(torch.zeros(6, 0), torch.zeros(0, 4))
    assert U.shape == (6, 0) and S.shape == (0,) and Vh.shape == (0, 4)


@pytest.mark.parametrize("rank", [0, 1, 3, 6, 50])
def test_truncate_factors_is_the_dense_best_approximation(rank):
    B, A = randn(40, 6, seed=7), randn(6, 30, seed=8)
    Bk, Ak, err, _ = truncate_factors(B, A, rank)
    keep = min(rank, 6)
    assert Bk.shape == (40, keep) and Ak.shape == (keep, 30)
    P = dense64(B, A)
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    best = (U[:, :keep] * S[:keep]) @ Vh[:keep]
    torch.testing.assert_close(dense64(Bk, Ak), best, rtol=0, atol=1e-4)
    assert err == pytest.approx(float(torch.linalg.vector_norm(S[keep:])), rel=1e-5, abs=1e-4)
    assert err == pytest.approx(float(torch.linalg.matrix_norm(P - dense64(Bk, Ak))), rel=1e-4, abs=1e-3)
    # √S on both sides: column norms of B_k equal row norms of A_k
    torch.testing.assert_close(Bk.norm(dim=0), Ak.norm(dim=1), rtol=1e-5, atol=1e-6)


def test_truncate_factors_is_exact_at_or_above_the_true_rank():
    B, A = rank_deficient(30, 25, 8, 3, seed=9)
    for rank in (3, 8, 100):
        Bk, Ak, err, _ = truncate_factors(B, A, rank)
        scale = float(torch.linalg.matrix_norm(dense64(B, A)))
        assert err <= 1e-5 * scale
        torch.testing.assert_close(dense64(Bk, Ak), dense64(B, A), rtol=0, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="rank"):
        truncate_factors(B, A, -1)


def test_truncate_factors_of_zero_and_rank_zero():
    Bk, Ak, err, _ = truncate_factors(torch.zeros(10, 3), torch.zeros(3, 8), 2)
    assert err == 0.0 and Bk.abs().sum() == 0 and Ak.abs().sum() == 0
    B, A = randn(10, 3, seed=1), randn(3, 8, seed=2)
    Bk, Ak, err, _ = truncate_factors(B, A, 0)
    assert Bk.shape == (10, 0) and Ak.shape == (0, 8)
    assert err == pytest.approx(float(torch.linalg.matrix_norm(dense64(B, A))), rel=1e-5)


# ---------------------------------------------------------------- inner products and similarities


def test_frobenius_inner_norm_and_cosine_match_dense():
    B1, A1, B2, A2 = randn(20, 3, seed=1), randn(3, 15, seed=2), randn(20, 5, seed=3), randn(5, 15, seed=4)
    P1, P2 = dense64(B1, A1), dense64(B2, A2)
    inner = float((P1 * P2).sum())
    assert float(frobenius_inner(B1, A1, B2, A2)) == pytest.approx(inner, rel=1e-5, abs=1e-4)
    assert float(frobenius_norm(B1, A1)) == pytest.approx(float(torch.linalg.matrix_norm(P1)), rel=1e-6)
    expected = inner / float(torch.linalg.matrix_norm(P1) * torch.linalg.matrix_norm(P2))
    assert float(cosine_similarity(B1, A1, B2, A2)) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert float(cosine_similarity(B1, A1, 2 * B1, A1)) == pytest.approx(1.0, abs=1e-6)
    assert float(cosine_similarity(B1, A1, torch.zeros(20, 2), torch.zeros(2, 15))) == 0.0
    assert float(frobenius_norm(torch.zeros(20, 0), torch.zeros(0, 15))) == 0.0


def test_frobenius_norm_survives_cancellation():
    # B A = b (a2 - a1) with a2 - a1 tiny: the Gram form tr(BᵀB AAᵀ) subtracts numbers ~1e8 apart in float32
    b, a = randn(30, 1, seed=1), randn(1, 20, seed=2)
    tiny = 1e-4 * randn(1, 20, seed=3)
    B = torch.cat([b, b], dim=1)
    A = torch.cat([-a, a + tiny], dim=0)
    expected = float(torch.linalg.matrix_norm(b.double() @ (A[0:1] + A[1:2]).double()))
    assert float(frobenius_norm(B, A)) == pytest.approx(expected, rel=1e-2)


def test_subspace_similarity_matches_sum_of_squared_cosines():
    U1 = torch.linalg.qr(randn(30, 6, seed=1)).Q
    U2 = torch.linalg.qr(randn(30, 4, seed=2)).Q
    for i, j in [(1, 1), (3, 2), (6, 4)]:
        expected = sum(float(U1[:, a].double() @ U2[:, b].double()) ** 2 for a in range(i) for b in range(j))
        assert subspace_similarity(U1, U2, i, j) == pytest.approx(expected / min(i, j), rel=1e-5)
    assert subspace_similarity(U1, U1, 2, 5) == pytest.approx(1.0, abs=1e-6)
    assert subspace_similarity(U1[:, :3], U1[:, 3:], 3, 3) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="need 1 <= i"):
        subspace_similarity(U1, U2, 0, 1)
    with pytest.raises(ValueError, match="need 1 <= i"):
        subspace_similarity(U1, U2, 2, 5)


@pytest.mark.parametrize("energy", [0.0, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_effective_rank_matches_a_loop(energy):
    S = torch.tensor([0.5, 4.0, 2.0, 1.0, 0.0, 0.25])
    squares = sorted((float(s) ** 2 for s in S), reverse=True)
    total, running, expected = sum(squares), 0.0, 0
    while running < energy * total - 1e-12:
        running += squares[expected]
        expected += 1
    assert effective_rank(S, energy) == expected
    assert effective_rank(torch.zeros(4), energy) == 0
    with pytest.raises(ValueError, match="energy"):
        effective_rank(S, 1.5)


# ---------------------------------------------------------------- low_rank_dense


def optimal_error(M: torch.Tensor, rank: int) -> tuple[float, float]:
    sv = torch.linalg.svdvals(M.double())
    return float(torch.linalg.vector_norm(sv[rank:])), float(torch.linalg.vector_norm(sv))


def true_error(M: torch.Tensor, low) -> float:
    return float(torch.linalg.matrix_norm(M.double() - dense64(low.B, low.A)))


def flat_plus_cluster(m: int, n: int, size: int, level: float, seed: int) -> torch.Tensor:
    sv = torch.ones(min(m, n), dtype=torch.float64)
    sv[:size] = level
    return with_spectrum(m, n, sv, seed)


def hard_case(name: str, m: int, n: int) -> torch.Tensor:
    i = torch.arange(1, min(m, n) + 1, dtype=torch.float64)
    if name == "slow decay i^-0.25":
        return with_spectrum(m, n, i**-0.25, seed=42)
    if name == "slow decay i^-0.5":
        return with_spectrum(m, n, i**-0.5, seed=43)
    if name == "geometric 0.99^i":
        return with_spectrum(m, n, 0.99**i, seed=44)
    if name == "gaussian noise (flat)":
        return randn(m, n, seed=40)
    if name == "flat + rank-5 spike":
        spike = with_spectrum(m, n, [40.0, 30.0, 25.0, 20.0, 15.0], seed=41)
        return randn(m, n, seed=40) / math.sqrt(n) + spike / 40
    # a cluster of exactly `rank` (32) singular values 20 % above a flat bulk: subspace iteration stalls on
    # it (plain niter=2 is 2 % off), and the last increase of captured energy is too small to reveal that
    assert name == "flat + cluster of rank at 1.2"
    return flat_plus_cluster(m, n, 32, 1.2, seed=45)


HARD = [
    "slow decay i^-0.25",
    "slow decay i^-0.5",
    "geometric 0.99^i",
    "gaussian noise (flat)",
    "flat + rank-5 spike",
    "flat + cluster of rank at 1.2",
]


@pytest.mark.parametrize("shape", [(192, 480), (384, 960)], ids=["192x480", "384x960"])
@pytest.mark.parametrize("check", ["estimate", "exact"])
@pytest.mark.parametrize("case", HARD)
def test_randomized_error_is_within_one_percent_of_optimal(case, check, shape):
    M = hard_case(case, *shape)
    opt, norm = optimal_error(M, 32)
    if shape == (192, 480):
        plain = low_rank_dense(M, 32, generator=gen(0), tol=None, niter=2)
        assert true_error(M, plain) > 1.01 * opt  # hard: plain subspace iteration (niter=2) misses the target
    low = low_rank_dense(M, 32, generator=gen(0), check=check)
    # at 192 × 480 the Krylov space may outgrow 3/4 of the matrix first, and the exact SVD is then cheaper
    assert low.method_used == "randomized" or (check == "estimate" and shape == (192, 480))
    err = true_error(M, low)
    assert err <= 1.01 * opt + 64 * EPS * norm
    assert low.err == pytest.approx(err, rel=1e-4)
    assert low.rel_err == pytest.approx(err / norm, rel=1e-4)
    assert low.energy == pytest.approx(1 - (err / norm) ** 2, abs=1e-4)
    assert low.B.shape == (shape[0], 32) and low.A.shape == (32, shape[1]) and low.B.dtype == torch.float32


def near_cluster(m: int, n: int, size: int, level: float, seed: int) -> torch.Tensor:
    """A cluster of ``size`` singular values around ``level`` above a bulk around 1, each spread by ±1 %:
    not exactly degenerate, so no Krylov space becomes invariant early."""
    g = torch.Generator().manual_seed(seed)
    sv = 1 + 0.02 * (torch.rand(min(m, n), generator=g, dtype=torch.float64) - 0.5)
    sv[:size] *= level
    return with_spectrum(m, n, sv.sort(descending=True).values, seed)


@pytest.mark.parametrize(
    "size, level",
    [(32, 1.2), (32, 1.05), (48, 1.1), (24, 1.5)],
    ids=["cluster=rank", "cluster=rank, 5% above", "cluster > block", "cluster < rank"],
)
def test_estimate_is_not_fooled_by_clusters_above_a_flat_bulk(size, level):
    # the cases where the last decrease of the error under subspace iteration is small while the error
    # is still far from optimal; the Krylov estimate must not stop there
    M = near_cluster(240, 600, size, level, seed=size)
    opt, norm = optimal_error(M, 32)
    low = low_rank_dense(M, 32, tol=0.005)
    assert true_error(M, low) <= 1.005 * opt + 64 * EPS * norm
    assert low.err == pytest.approx(true_error(M, low), rel=1e-4)


def test_estimate_on_random_spectra_stays_within_twice_the_tolerance():
    """scripts/estimate_sweep.py on 60 matrices: six spectrum families, random shapes and ranks. The estimate
    is not a bound (in 1,200 matrices of the full sweep one run returned 1.19 × tol above optimal), so the
    test holds it to what extraction relies on: within 2 × tol (CHECK_TOLERANCE 0.005 → 1 %)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "estimate_sweep.py"
    spec = importlib.util.spec_from_file_location("estimate_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    rows = sweep.sweep(60, tols=(0.005,), seed=7)
    assert len(rows) >= 45 and {row["family"] for row in rows} == set(sweep.FAMILIES)
    worst = max(rows, key=lambda row: row["ratio"])
    assert worst["ratio"] <= 1 + 2 * 0.005, worst


def test_randomized_at_real_module_size_576x1536():
    # SmolLM2-135M MLP shape; flat spectrum (the common case of a noisy fine-tune delta) at rank 64
    M = randn(576, 1536, seed=50) + with_spectrum(576, 1536, torch.linspace(200, 100, 8), seed=51)
    low = low_rank_dense(M, 64)
    opt, norm = optimal_error(M, 64)
    assert low.method_used == "randomized"
    assert true_error(M, low) <= 1.01 * opt + 64 * EPS * norm


@pytest.mark.parametrize("true_rank", [1, 8, 32])
def test_true_rank_at_most_k_is_exact_to_rounding(true_rank):
    M = with_spectrum(192, 480, torch.linspace(10, 0.1, true_rank), seed=true_rank)
    low = low_rank_dense(M, 32)
    norm = float(torch.linalg.matrix_norm(M.double()))
    assert low.method_used == "randomized"
    assert true_error(M, low) <= 64 * EPS * norm
    assert low.rel_err <= 64 * EPS


def test_exact_method_is_the_truncated_svd():
    M = hard_case("slow decay i^-0.5", 64, 90)
    low = low_rank_dense(M, 10, method="exact")
    opt, norm = optimal_error(M, 10)
    assert low.method_used == "exact" and low.niter == 0
    assert low.err == pytest.approx(opt, rel=1e-5)
    assert true_error(M, low) == pytest.approx(opt, rel=1e-4)
    torch.testing.assert_close(low.S.double(), torch.linalg.svdvals(M.double())[:10], rtol=1e-5, atol=1e-6)


def test_failed_check_falls_back_to_the_exact_svd():
    # no extra iteration allowed: the stalled cluster case cannot pass at niter=0, so the SVD is used
    M = flat_plus_cluster(192, 480, 32, 1.2, seed=45)
    low = low_rank_dense(M, 32, niter=0, max_niter=0)
    opt, _ = optimal_error(M, 32)
    assert low.method_used == "exact" and low.niter == 0
    assert true_error(M, low) == pytest.approx(opt, rel=1e-4)
    # with room to iterate, the same matrix passes the check (its Krylov space becomes invariant: two
    # distinct singular values), and so does the exact check after a few more power iterations
    assert low_rank_dense(M, 32).method_used == "randomized"
    low = low_rank_dense(M, 32, check="exact")
    assert low.method_used == "randomized" and low.niter > 2


@pytest.mark.parametrize("shape", [(192, 480), (480, 192)], ids=["wide", "tall"])
@pytest.mark.parametrize("r", [32, 7])
def test_exact_fallback_from_the_gram_matrix_is_the_truncated_svd(shape, r):
    """The fallback uses the eigenvectors of the Gram matrix it built for the check: B A must be the truncated
    SVD (a full SVD in float64 is the reference), for wide and tall matrices, at the rank asked for or at a
    smaller one (what an energy target picks)."""
    from loracook.ops import lowrank as factored

    M = flat_plus_cluster(*shape, 32, 1.2, seed=45) + with_spectrum(*shape, [9.0, 6.0, 4.0], seed=46)
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    if r == 32:  # through low_rank_dense: no iteration allowed, so the check fails and the fallback runs
        low = low_rank_dense(M, 32, niter=0, max_niter=0)
    else:
        share = torch.cumsum(S**2, 0) / (S**2).sum()
        energy = float(share[r - 2] + share[r - 1]) / 2  # picks exactly r
        low = factored._exact_from_gram(M, factored._gram(M), 32, float((S**2).sum()), 0, energy)
    reference = (U[:, :r] * S[:r]) @ Vh[:r]
    assert low.method_used == "exact" and low.rank == r
    assert float(torch.linalg.matrix_norm(dense64(low.B, low.A) - reference)) <= 1e-5 * float(S[0])
    assert low.err == pytest.approx(float(torch.linalg.vector_norm(S[r:])), rel=1e-5)
    assert torch.allclose(low.S.double(), S[:32], rtol=1e-5)


def test_exact_fallback_of_a_rank_deficient_matrix():
    from loracook.ops import lowrank as factored

    M = with_spectrum(60, 90, [3.0, 2.0, 1.0], seed=7)  # rank 3, asked for 8: five zero singular values
    norm2 = float(torch.linalg.matrix_norm(M.double()) ** 2)
    low = factored._exact_from_gram(M, factored._gram(M), 8, norm2, 0)  # the fallback path itself
    assert low.B.shape == (60, 8) and low.A.shape == (8, 90)
    assert torch.isfinite(low.B).all() and torch.isfinite(low.A).all()
    assert true_error(M, low) <= 64 * EPS * float(torch.linalg.matrix_norm(M.double()))


def test_without_check_it_is_plain_randomized_svd():
    M = hard_case("gaussian noise (flat)", 192, 480)
    low = low_rank_dense(M, 32, tol=None, niter=1)
    assert low.method_used == "randomized" and low.niter == 1
    assert low.err == pytest.approx(true_error(M, low), rel=1e-4)


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_energy_picks_the_smallest_sufficient_rank(method):
    M = with_spectrum(150, 200, 0.8 ** torch.arange(100, dtype=torch.float64), seed=60)
    sv2 = torch.linalg.svdvals(M.double()) ** 2
    share = torch.cumsum(sv2, 0) / sv2.sum()
    for energy in (0.5, 0.9, 0.99):
        expected = int((share < energy).sum()) + 1
        low = low_rank_dense(M, 40, method=method, energy=energy)
        assert low.B.shape[1] == expected and low.rank == expected
        assert low.energy >= energy - 1e-4
        assert low.S.shape == (40,)
    assert low_rank_dense(M, 5, method=method, energy=0.999).rank == 5  # capped by `rank`


def test_deterministic_and_generator_dependent():
    M = hard_case("slow decay i^-0.25", 192, 480)
    a, b = low_rank_dense(M, 16), low_rank_dense(M, 16)
    assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)
    c = low_rank_dense(M, 16, generator=gen(123), tol=None)
    assert not torch.equal(a.B, c.B)


def test_thread_count_is_restored():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        low_rank_dense(hard_case("gaussian noise (flat)", 64, 90), 8)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_edge_cases():
    low = low_rank_dense(torch.zeros(30, 40), 5)
    assert low.rank == 5 and low.err == 0.0 and low.rel_err == 0.0 and low.energy == 1.0
    assert low_rank_dense(torch.zeros(30, 40), 5, energy=0.9).rank == 0
    M = randn(30, 40, seed=1)
    low = low_rank_dense(M, 0)
    assert low.B.shape == (30, 0) and low.A.shape == (0, 40) and low.rel_err == pytest.approx(1.0)
    low = low_rank_dense(M, 100)  # clipped to min(m, n); a sketch that wide uses the exact SVD
    assert low.rank == 30 and low.method_used == "exact" and low.rel_err < 1e-5
    tall = randn(600, 30, seed=2) @ randn(30, 240, seed=3)  # rank 30, more rows than columns
    for X in (tall, tall.T.contiguous()):
        low = low_rank_dense(X, 30)
        assert low.method_used == "randomized" and low.B.shape == (X.shape[0], 30)
        assert true_error(X, low) <= 64 * EPS * float(torch.linalg.matrix_norm(X.double()))
    # an embedding-like shape: the Gram matrix and the residual are accumulated over column blocks
    wide = hard_case("slow decay i^-0.5", 40, 9000)
    opt, norm = optimal_error(wide, 5)
    for check in ("estimate", "exact"):
        low = low_rank_dense(wide, 5, check=check)
        assert true_error(wide, low) <= 1.01 * opt + 64 * EPS * norm
    assert low.err == pytest.approx(true_error(wide, low), rel=1e-4)
    with pytest.raises(ValueError, match="NaN"):
        low_rank_dense(torch.full((30, 40), float("nan")), 3)
    with pytest.raises(ValueError, match="float32"):
        low_rank_dense(M.bfloat16(), 3)
    with pytest.raises(ValueError, match="max_niter"):
        low_rank_dense(M, 3, niter=4, max_niter=2)
    with pytest.raises(ValueError, match="method"):
        low_rank_dense(M, 3, method="lanczos")
    with pytest.raises(ValueError, match="check"):
        low_rank_dense(M, 3, check="guess")
