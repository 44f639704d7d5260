"""KnOTS, Core Space, TSV, Model Breadcrumbs and DELLA against references written here from the papers.

The low-rank references form every ΔW_i densely in float64 and follow each paper's definition with full
``torch.linalg.svd`` calls (of [ΔW_1 | … | ΔW_n], of the stacked factors, of each ΔW_i); they share no code with
loracook.ops.lowrank_merge. The element-wise ``inner`` merges they are given (a weighted sum, TIES, DARE-TIES)
are inputs of the methods, not code under test. The Breadcrumbs and DELLA references are plain Python over
lists of floats, written from mergekit's definitions (mergekit/sparsify.py) with loracook's documented
conventions (round(ρ·n) kept, ties by index, zero sign elects nothing).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from loracook.ops import lowrank_merge, sparsify
from loracook.ops.lowrank_merge import core_space, knots, polar, tsv, tsv_dense
from loracook.ops.prune_ranked import (
    breadcrumbs,
    breadcrumbs_prune,
    breadcrumbs_ties,
    della,
    della_prune,
    della_ties,
)
from loracook.ops.sparsify import dare_linear, dare_ties, magnitude_prune

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-10  # the documented numerical-rank rule: σ ≤ 1e-10 σ_1 is zero
TOL = 1e-5  # the acceptance bar: relative Frobenius error per module

# ---------------------------------------------------------------- adapters


def make_pairs(out: int, inp: int, ranks, weights, seed: int, *, rslora=(), deficient=(), zero=()):
    """(w_i, s_i B_i, A_i) in float32 with PEFT-like scales: s = α/r, or α/√r for indices in ``rslora``.

    Indices in ``deficient`` get an exactly rank-deficient B (its last columns repeat its first ones, so the
    deficiency survives float32); indices in ``zero`` an all-zero B (an untrained module).
    """
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i, (r, w) in enumerate(zip(ranks, weights, strict=True)):
        B = torch.randn(out, r, generator=g) / math.sqrt(out)
        A = torch.randn(r, inp, generator=g) / math.sqrt(inp)
        if i in deficient:
            half = (r + 1) // 2
            B[:, half:] = B[:, : r - half]
        if i in zero:
            B.zero_()
        alpha = 2.0 * r
        scale = alpha / math.sqrt(r) if i in rslora else alpha / r
        pairs.append((float(w), (scale * B).float(), A.float()))
    return pairs


CASES = {
    # name: (out, in, ranks, weights, extra)
    "mixed": (24, 20, (3, 5, 4), (1.0, 0.7, 0.4), {}),
    "rslora_negative": (18, 26, (4, 2, 6), (0.8, -0.5, 1.2), {"rslora": (0, 2)}),
    "deficient": (20, 16, (4, 6, 3), (0.6, 1.0, -0.3), {"deficient": (1,)}),
    "rank_above_out": (8, 14, (4, 5, 3), (1.0, 0.5, 0.5), {"rslora": (1,)}),  # R = 12 > out = 8
    "zero_adapter": (16, 12, (3, 4, 2), (1.0, 1.0, 2.0), {"zero": (2,)}),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def pairs(request):
    out, inp, ranks, weights, extra = CASES[request.param]
    return make_pairs(out, inp, ranks, weights, seed=len(request.param), **extra)


def dense(pairs) -> list[torch.Tensor]:
    return [B.double() @ A.double() for _, B, A in pairs]


def weights_of(pairs) -> list[float]:
    return [w for w, _, _ in pairs]


def total_rank(pairs) -> int:
    return sum(B.shape[1] for _, B, _ in pairs)


def rel_err(B: torch.Tensor, A: torch.Tensor, ref: torch.Tensor) -> float:
    got = B.double() @ A.double()
    return float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref).clamp_min(1e-300))


def num_rank(S: torch.Tensor) -> int:
    return int((S > RTOL * S[0]).sum()) if S.numel() and S[0] > 0 else 0


# ---------------------------------------------------------------- inner merges (inputs of the methods)


def weighted_sum(mats, weights):
    return sum(w * m for w, m in zip(weights, mats, strict=True))


def ties_inner(mats, weights):
    return sparsify.ties(mats, weights, [0.4] * len(mats))


def dare_ties_inner(seed: int):
    def inner(mats, weights):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(mats))]
        return sparsify.dare_ties(mats, weights, [0.6] * len(mats), gens)

    return inner


INNERS = {"sum": lambda: weighted_sum, "ties": lambda: ties_inner, "dare_ties": lambda: dare_ties_inner(7)}

# ---------------------------------------------------------------- dense references from the papers


def ref_knots(pairs, inner):
    """KnOTS: SVD of [ΔW_1 | … | ΔW_n]; merge the Σ-scaled V_iᵀ blocks; ΔW = U · merged."""
    deltas = dense(pairs)
    inp = deltas[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    k = num_rank(S)
    sv = torch.diag(S[:k]) @ Vh[:k]
    blocks = [sv[:, i * inp : (i + 1) * inp] for i in range(len(deltas))]
    return U[:, :k] @ inner(blocks, weights_of(pairs))


def ref_core_space(pairs, inner):
    """Core Space: U_B from SVD([B_1 … B_n]), V_A from SVD([A_1; …; A_n]); M_i = U_Bᵀ ΔW_i V_A."""
    U, Sb, _ = torch.linalg.svd(torch.cat([B.double() for _, B, _ in pairs], dim=1), full_matrices=False)
    _, Sa, Vh = torch.linalg.svd(torch.cat([A.double() for _, _, A in pairs], dim=0), full_matrices=False)
    U_B, V_A = U[:, : num_rank(Sb)], Vh[: num_rank(Sa)].mT
    cores = [U_B.mT @ d @ V_A for d in dense(pairs)]
    return U_B @ inner(cores, weights_of(pairs)) @ V_A.mT


def ref_polar(M):
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def ref_tsv(deltas, weights, ks, alpha=1.0):
    """TSV-Merge: top-k_i SVD of each ΔW_i, concatenate, orthogonalise U and V by their polar factors."""
    Us, Ss, Vs = [], [], []
    for d, w, k in zip(deltas, weights, ks, strict=True):
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        k = min(k, num_rank(S))
        Us.append(U[:, :k])
        Ss.append(w * S[:k])
        Vs.append(Vh[:k].mT)
    U, V, s = torch.cat(Us, dim=1), torch.cat(Vs, dim=1), torch.cat(Ss)
    return alpha * ref_polar(U) @ torch.diag(s) @ ref_polar(V).mT


# ---------------------------------------------------------------- KnOTS and Core Space


@pytest.mark.parametrize("inner_name", list(INNERS))
@pytest.mark.parametrize(
    "method, reference", [(knots, ref_knots), (core_space, ref_core_space)], ids=["knots", "core"]
)
def test_matches_dense_reference(pairs, inner_name, method, reference):
    B, A = method(pairs, INNERS[inner_name]())
    ref = reference(pairs, INNERS[inner_name]())
    assert B.dtype == A.dtype == torch.float32
    assert B.shape[0] == pairs[0][1].shape[0] and A.shape[1] == pairs[0][2].shape[1]
    assert B.shape[1] == A.shape[0] <= total_rank(pairs)
    assert rel_err(B, A, ref) <= TOL


@pytest.mark.parametrize("method", [knots, core_space], ids=["knots", "core"])
def test_linear_inner_is_the_weighted_sum(pairs, method):
    B, A = method(pairs, weighted_sum)
    target = sum(w * d for w, d in zip(weights_of(pairs), dense(pairs), strict=True))
    assert rel_err(B, A, target) <= TOL
    assert int(torch.linalg.matrix_rank(B.double() @ A.double())) <= total_rank(pairs)


def test_knots_basis_is_orthonormal_and_rank_is_the_concatenation_rank():
    pairs = make_pairs(20, 16, (4, 6, 3), (0.6, 1.0, -0.3), seed=3, deficient=(1,))
    B, A = knots(pairs, weighted_sum)
    assert torch.allclose(B.double().mT @ B.double(), torch.eye(B.shape[1], dtype=torch.float64), atol=1e-6)
    assert (
        B.shape[1] == int(torch.linalg.matrix_rank(torch.cat(dense(pairs), dim=1))) == 10
    )  # 13 - 3 repeated


@pytest.mark.parametrize("inner_name", ["sum", "ties"])
def test_core_space_forming_q_gives_the_same_merge(pairs, inner_name, monkeypatch):
    """Core Space applies its bases as B_stack W S⁻¹ unless a stack is ill-conditioned, then as Q P; both ways
    match the reference (here Q P is forced on every case)."""
    fast = core_space(pairs, INNERS[inner_name]())
    monkeypatch.setattr(lowrank_merge, "COND_NO_Q", 0.0)
    with_q = core_space(pairs, INNERS[inner_name]())
    ref = ref_core_space(pairs, INNERS[inner_name]())
    assert rel_err(*with_q, ref) <= TOL and rel_err(*fast, ref) <= TOL
    assert with_q[0].shape == fast[0].shape and with_q[1].shape == fast[1].shape


def test_core_space_ill_conditioned_stack_matches_reference(monkeypatch):
    """Two nearly equal adapters: σ_min / σ_1 of the stacked B's is about 1e-7, above the rank cut (1e-10) but
    past COND_NO_Q, so the basis is formed from Q; the merge still matches the reference."""
    g = torch.Generator().manual_seed(11)
    B1, A1 = torch.randn(24, 4, generator=g) / 5, torch.randn(4, 20, generator=g) / 5
    B2 = B1 + 1e-7 * torch.randn(24, 4, generator=g)
    A2 = torch.randn(4, 20, generator=g) / 5
    pairs = [(1.0, B1, A1), (0.5, B2, A2), (-0.4, *make_pairs(24, 20, (3,), (1.0,), seed=2)[0][1:])]
    S = torch.linalg.svdvals(torch.cat([B.double() for _, B, _ in pairs], dim=1))
    assert 1e-10 < float(S[-1] / S[0]) < 1 / lowrank_merge.COND_NO_Q
    formed = []
    householder = torch.linalg.householder_product
    monkeypatch.setattr(torch.linalg, "householder_product", lambda *a: formed.append(1) or householder(*a))
    for inner in (weighted_sum, ties_inner):
        B, A = core_space(pairs, inner)
        assert rel_err(B, A, ref_core_space(pairs, inner)) <= TOL
    assert formed  # the Q path ran


def test_all_zero_adapters_give_an_empty_merge():
    pairs = make_pairs(6, 5, (2, 3), (1.0, 1.0), seed=0, zero=(0, 1))
    for B, A in (knots(pairs, ties_inner), core_space(pairs, ties_inner), tsv(pairs)):
        assert B.shape == (6, 0) and A.shape == (0, 5)


def test_inputs_are_not_modified():
    pairs = make_pairs(10, 9, (2, 3), (1.0, -1.0), seed=4)
    before = [(B.clone(), A.clone()) for _, B, A in pairs]
    knots(pairs, ties_inner)
    core_space(pairs, ties_inner)
    tsv(pairs)
    for (_, B, A), (B0, A0) in zip(pairs, before, strict=True):
        assert torch.equal(B, B0) and torch.equal(A, A0)


def test_mismatched_shapes_are_rejected():
    good = (1.0, torch.randn(4, 2), torch.randn(2, 3))
    with pytest.raises(ValueError, match="one shape"):
        knots([good, (1.0, torch.randn(5, 2), torch.randn(2, 3))], weighted_sum)
    with pytest.raises(ValueError, match="B \\(out × r\\)"):
        core_space([(1.0, torch.randn(4, 2), torch.randn(3, 3))], weighted_sum)
    with pytest.raises(ValueError, match="at least one"):
        tsv([])


# ---------------------------------------------------------------- TSV


def default_ks(pairs):
    return [total_rank(pairs) // len(pairs)] * len(pairs)


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_tsv_matches_dense_reference(pairs, alpha):
    B, A = tsv(pairs, alpha=alpha)
    ref = ref_tsv(dense(pairs), weights_of(pairs), default_ks(pairs), alpha)
    assert B.shape[1] == A.shape[0] <= total_rank(pairs)
    assert rel_err(B, A, ref) <= TOL


def test_tsv_explicit_ranks_match_dense_reference():
    pairs = make_pairs(30, 22, (6, 8, 4), (1.0, -0.6, 0.9), seed=5, rslora=(1,))
    ks = [2, 5, 4]
    B, A = tsv(pairs, ranks_per_source=ks, alpha=0.5)
    assert B.shape[1] == sum(ks)
    assert rel_err(B, A, ref_tsv(dense(pairs), weights_of(pairs), ks, 0.5)) <= TOL


def test_tsv_one_source_at_weight_one_is_its_delta():
    pairs = make_pairs(24, 20, (6,), (1.0,), seed=6, rslora=(0,))
    B, A = tsv(pairs, ranks_per_source=[6], alpha=1.0)
    assert rel_err(B, A, dense(pairs)[0]) <= TOL
    B, A = tsv(pairs)  # default k = R / n = r
    assert rel_err(B, A, dense(pairs)[0]) <= TOL


def test_tsv_of_orthogonal_adapters_is_the_weighted_sum():
    """Adapters in mutually orthogonal row and column spaces are already decorrelated: TSV changes nothing."""
    g = torch.Generator().manual_seed(8)
    Qo = torch.linalg.qr(torch.randn(20, 9, generator=g, dtype=torch.float64))[0]
    Qi = torch.linalg.qr(torch.randn(15, 9, generator=g, dtype=torch.float64))[0]
    pairs = [
        (w, (Qo[:, 3 * i : 3 * i + 3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)).float(),
         Qi[:, 3 * i : 3 * i + 3].mT.float())
        for i, w in enumerate([1.0, -0.5, 2.0])
    ]  # fmt: skip
    B, A = tsv(pairs)
    target = sum(w * d for w, d in zip(weights_of(pairs), dense(pairs), strict=True))
    assert rel_err(B, A, target) <= 1e-5


def test_core_space_with_tsv_inner_is_tsv():
    """The Core Space paper's "Core Space + TSV": TSV of the R × R cores is TSV of the full deltas."""
    pairs = make_pairs(26, 21, (4, 4, 4), (1.0, 0.5, -0.8), seed=9, rslora=(2,))
    B, A = core_space(pairs, tsv_dense)
    Bt, At = tsv(pairs)
    assert rel_err(B, A, Bt.double() @ At.double()) <= TOL


def test_tsv_dense_matches_reference():
    deltas = dense(make_pairs(12, 10, (3, 4), (1.0, 1.0), seed=10))
    got = tsv_dense(deltas, [0.5, -1.0], alpha=2.0)
    assert torch.allclose(got, ref_tsv(deltas, [0.5, -1.0], [5, 5], 2.0), rtol=0, atol=1e-10)


def test_polar_is_the_nearest_orthonormal_matrix():
    g = torch.Generator().manual_seed(11)
    for shape in [(9, 4), (4, 9)]:
        M = torch.randn(*shape, generator=g, dtype=torch.float64)
        assert torch.allclose(polar(M), ref_polar(M), atol=1e-12)


# ---------------------------------------------------------------- Breadcrumbs (plain-Python references)


def sgn(x: float) -> int:
    return (x > 0) - (x < 0)


def ref_breadcrumbs(values: list[float], density: float, gamma: float, rescale=False) -> list[float]:
    """mergekit's magnitude_outliers: sort by |v| ascending, drop n_bot smallest and n_top largest."""
    n = len(values)
    target = math.floor(density * n + 0.5)
    n_top = math.floor(gamma * n + 0.5)
    n_bot = n - target - n_top
    if n_bot < 0:  # fewer outliers, so that the target density is met
        n_top += n_bot
        n_bot = 0
    ascending = sorted(range(n), key=lambda i: (abs(values[i]), -i))  # equal |v|: the lower index is larger
    kept = set(ascending[n_bot : n - n_top])
    out = [v if i in kept else 0.0 for i, v in enumerate(values)]
    if rescale == "l1":
        before, after = sum(abs(v) for v in values), sum(abs(v) for v in out)
        return out if before < 1e-7 or after < 1e-7 else [v * before / after for v in out]
    return [v / density for v in out] if rescale else out


def ref_ties_combine(pruned: list[list[float]], weights: list[float]) -> list[float]:
    """TIES election on weighted values ('total') and disjoint mean over agreeing sources; zero sign -> 0."""
    out = []
    for p in range(len(pruned[0])):
        x = [w * t[p] for w, t in zip(weights, pruned, strict=True)]
        s = sgn(sum(x))
        agree = [v for v in x if s != 0 and sgn(v) == s]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return out


def rand_values(n: int, seed: int, repeats: bool = False) -> list[float]:
    rng = random.Random(seed)
    vals = [rng.gauss(0.0, 1.0) for _ in range(n)]
    if repeats:  # equal magnitudes exercise the tie rule
        vals = [round(v, 1) for v in vals]
    return vals


@pytest.mark.parametrize(
    "density, gamma", [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0), (0.2, 0.05), (1.0, 0.1), (0.05, 0.5)]
)
@pytest.mark.parametrize("rescale", [False, True, "l1"])
def test_breadcrumbs_prune_matches_reference(density, gamma, rescale):
    for seed, repeats in [(0, False), (1, True)]:
        vals = rand_values(60, seed, repeats)
        got = breadcrumbs_prune(torch.tensor(vals).reshape(6, 10), density, gamma, rescale).flatten().tolist()
        assert got == pytest.approx(ref_breadcrumbs(vals, density, gamma, rescale), rel=1e-6, abs=1e-7)


def test_breadcrumbs_without_outliers_is_magnitude_prune():
    x = torch.tensor(rand_values(50, 2, repeats=True)).reshape(5, 10)
    assert torch.equal(breadcrumbs_prune(x, 0.3, 0.0), magnitude_prune(x, 0.3))


@pytest.mark.parametrize("rescale", [False, "l1"])
def test_breadcrumbs_merges_match_reference(rescale):
    srcs = [rand_values(40, s) for s in (3, 4, 5)]
    weights, densities, gammas = [1.0, -0.5, 0.8], [0.5, 0.4, 0.6], [0.1, 0.05, 0.0]
    pruned = [ref_breadcrumbs(v, p, g, rescale) for v, p, g in zip(srcs, densities, gammas, strict=True)]
    deltas = [torch.tensor(v) for v in srcs]
    linear = breadcrumbs(deltas, weights, densities, gammas, rescale).tolist()
    expect = [sum(w * t[p] for w, t in zip(weights, pruned, strict=True)) for p in range(40)]
    assert linear == pytest.approx(expect, rel=1e-6, abs=1e-6)
    tied = breadcrumbs_ties(deltas, weights, densities, gammas, rescale=rescale).tolist()
    assert tied == pytest.approx(ref_ties_combine(pruned, weights), rel=1e-6, abs=1e-6)


def test_breadcrumbs_bad_parameters():
    with pytest.raises(ValueError, match="gamma"):
        breadcrumbs_prune(torch.ones(4), 0.5, 1.0)
    with pytest.raises(ValueError, match="density"):
        breadcrumbs_prune(torch.ones(4), 0.0, 0.1)
    with pytest.raises(ValueError, match="values of gamma"):
        breadcrumbs([torch.ones(4)], [1.0], [0.5], [0.1, 0.2])


# ---------------------------------------------------------------- DELLA


def ref_della_probs(row: list[float], density: float, epsilon: float) -> list[float]:
    """mergekit's della_magprune: keep probability (ρ − ε) + 2ε · (rank − min) / (max − min), rank by |v|."""
    m = len(row)
    ascending = sorted(range(m), key=lambda i: (abs(row[i]), -i))
    rank = [0] * m
    for position, i in enumerate(ascending):
        rank[i] = position + 1
    if m == 1:
        return [density]
    return [(density - epsilon) + 2 * epsilon * (rank[i] - 1) / (m - 1) for i in range(m)]


def ref_della(values: list[list[float]], density, epsilon, seed, rescale=True) -> list[list[float]]:
    """Per row probabilities; the draw is torch.rand(shape) < q with the given seed (DARE's convention)."""
    u = torch.rand(len(values), len(values[0]), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for row, urow in zip(values, u, strict=True):
        q = ref_della_probs(row, density, epsilon)
        kept = [v if ur < qi else 0.0 for v, ur, qi in zip(row, urow, q, strict=True)]
        if rescale is True:
            kept = [v / qi if ur < qi else 0.0 for v, ur, qi in zip(row, urow, q, strict=True)]
        out.append(kept)
    if rescale == "l1":
        before = sum(abs(v) for r in values for v in r)
        after = sum(abs(v) for r in out for v in r)
        if before >= 1e-7 and after >= 1e-7:
            out = [[v * before / after for v in r] for r in out]
    return out


def as_rows(vals: list[float], rows: int) -> list[list[float]]:
    cols = len(vals) // rows
    return [vals[i * cols : (i + 1) * cols] for i in range(rows)]


@pytest.mark.parametrize("density, epsilon", [(0.5, 0.15), (0.3, 0.25), (0.8, 0.2), (0.6, 0.0)])
@pytest.mark.parametrize("rescale", [True, False, "l1"])
def test_della_prune_masks_match_reference(density, epsilon, rescale):
    for seed, repeats in [(0, False), (1, True)]:
        rows = as_rows(rand_values(48, seed + 10, repeats), 4)
        got = della_prune(torch.tensor(rows), density, epsilon, torch.Generator().manual_seed(seed), rescale)
        ref = ref_della(rows, density, epsilon, seed, rescale)
        assert got.tolist() == [pytest.approx(r, rel=1e-6, abs=1e-7) for r in ref]


def test_della_prune_one_dimensional_delta_is_one_row():
    vals = rand_values(30, 12)
    got = della_prune(torch.tensor(vals), 0.5, 0.2, torch.Generator().manual_seed(3))
    assert got.tolist() == pytest.approx(ref_della([vals], 0.5, 0.2, 3)[0], rel=1e-6)


def test_della_prune_keeps_the_expected_value_and_the_keep_rates():
    """E[della_prune(x)] = x with rescale, and the larger an entry, the more often it is kept (rate q)."""
    x = torch.tensor([[0.1, -0.5, 2.0, -1.0, 0.3]])
    q = torch.tensor([ref_della_probs(x[0].tolist(), 0.5, 0.3)])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([della_prune(x, 0.5, 0.3, g) for _ in range(4000)])
    assert torch.allclose(draws.mean(0), x, atol=4 * float(x.abs().max()) / math.sqrt(4000))
    assert torch.allclose((draws != 0).double().mean(0), q.double(), atol=0.03)


def test_della_without_epsilon_is_dare():
    deltas = [torch.randn(6, 7, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    w, p = [1.0, -0.5, 0.7], [0.5, 0.6, 0.4]

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(3)]

    assert torch.allclose(della(deltas, w, p, 0.0, gens()), dare_linear(deltas, w, p, gens()), atol=1e-6)
    assert torch.allclose(della_ties(deltas, w, p, 0.0, gens()), dare_ties(deltas, w, p, gens()), atol=1e-6)


def test_della_merges_match_reference():
    srcs = [as_rows(rand_values(36, s), 3) for s in (20, 21, 22)]
    w, p, eps = [0.9, -0.4, 1.1], [0.5, 0.4, 0.6], [0.2, 0.1, 0.3]
    dropped = [
        [v for r in ref_della(rows, pi, ei, 50 + i) for v in r]
        for i, (rows, pi, ei) in enumerate(zip(srcs, p, eps, strict=True))
    ]  # noqa: E501

    def gens():
        return [torch.Generator().manual_seed(50 + i) for i in range(3)]

    deltas = [torch.tensor(rows) for rows in srcs]
    linear = della(deltas, w, p, eps, gens()).flatten().tolist()
    assert linear == pytest.approx(
        [sum(wi * d[k] for wi, d in zip(w, dropped, strict=True)) for k in range(36)], rel=1e-6, abs=1e-6
    )  # noqa: E501
    tied = della_ties(deltas, w, p, eps, gens()).flatten().tolist()
    assert tied == pytest.approx(ref_ties_combine(dropped, w), rel=1e-6, abs=1e-6)


def test_della_bad_parameters_and_density_one():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="epsilon"):
        della_prune(x, 0.2, 0.2, torch.Generator())
    with pytest.raises(ValueError, match="epsilon"):
        della_prune(x, 0.9, 0.15, torch.Generator())
    assert torch.equal(della_prune(x, 1.0, 0.5, torch.Generator()), x)


@pytest.mark.parametrize("inner_name", ["breadcrumbs_ties", "della_ties"])
def test_new_element_wise_merges_work_as_knots_inner(inner_name):
    """Breadcrumbs and DELLA commute with flipping signs, so they are valid inners for the low-rank merges."""
    pairs = make_pairs(20, 18, (3, 5, 4), (1.0, 0.6, -0.4), seed=13)
    if inner_name == "breadcrumbs_ties":

        def inner(m, w):
            return breadcrumbs_ties(m, w, [0.5] * len(m), 0.05)
    else:

        def inner(m, w):
            return della_ties(
                m, w, [0.5] * len(m), 0.2, [torch.Generator().manual_seed(i) for i in range(len(m))]
            )

    for method, reference in [(knots, ref_knots), (core_space, ref_core_space)]:
        B, A = method(pairs, inner)
        assert rel_err(B, A, reference(pairs, inner)) <= TOL
