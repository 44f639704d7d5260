"""Property-based tests (hypothesis) of the merge algebra, each against a float64 computation written here:
cat equals linear, linear is additive and homogeneous in the weights, svd at a rank at least the true rank is
exact, TIES of one source at density 1 is w·ΔW, and DARE's mean over seeds tends to ΔW."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loracook import methods
from loracook.methods import DenseInputs
from loracook.ops.factored import truncate_factors
from loracook.ops.sparsify import dare, ties

SETTINGS = settings(max_examples=40, deadline=None)
weights = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)


@st.composite
def adapters(draw, n_min: int = 1, n_max: int = 3):
    """n LoRA pairs (w_i, s_i·B_i, A_i) on one out × in module, ranks 1-4, from a drawn seed."""
    out, inp = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    n = draw(st.integers(n_min, n_max))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pairs = []
    for _ in range(n):
        r = draw(st.integers(1, 4))
        pairs.append((draw(weights), torch.randn(out, r, generator=gen), torch.randn(r, inp, generator=gen)))
    return pairs


def dense_sum(pairs) -> torch.Tensor:
    return sum(w * (b.double() @ a.double()) for w, b, a in pairs)


def factored(method: str, pairs, rank: int | None = None) -> torch.Tensor:
    m = methods.get(method)
    total = sum(b.shape[1] for _, b, _ in pairs)
    params = m.params(method=method)
    inputs = DenseInputs([w for w, _, _ in pairs], [1.0] * len(pairs), [f"t|{i}" for i in range(len(pairs))])
    result = m.factored(pairs, rank or total, params, inputs)
    return result.B.double() @ result.A.double()


@SETTINGS
@given(adapters())
def test_cat_equals_linear_equals_the_dense_sum(pairs):
    expected = dense_sum(pairs)
    scale = max(1.0, float(expected.abs().max()))
    assert torch.allclose(factored("cat", pairs), expected, atol=1e-5 * scale)
    assert torch.allclose(factored("linear", pairs), factored("cat", pairs), atol=1e-5 * scale)


@SETTINGS
@given(adapters(n_min=2), st.lists(weights, min_size=3, max_size=3), weights)
def test_linear_is_additive_and_homogeneous_in_the_weights(pairs, other, c):
    w = [p[0] for p in pairs]
    v = other[: len(pairs)] + [0.0] * (len(pairs) - len(other))

    def f(ws):
        return factored("linear", [(x, b, a) for x, (_, b, a) in zip(ws, pairs, strict=True)])

    scale = max(1.0, float(f(w).abs().max()), float(f(v).abs().max()))
    assert torch.allclose(f([x + y for x, y in zip(w, v, strict=True)]), f(w) + f(v), atol=1e-4 * scale)
    assert torch.allclose(f([c * x for x in w]), c * f(w), atol=1e-4 * scale * max(1.0, abs(c)))


@SETTINGS
@given(adapters(), st.integers(0, 3))
def test_svd_at_or_above_the_true_rank_is_exact(pairs, extra):
    expected = dense_sum(pairs)
    true_rank = int(torch.linalg.matrix_rank(expected, rtol=1e-6))
    stacked_b = torch.cat([w * b for w, b, _ in pairs], dim=1)
    stacked_a = torch.cat([a for _, _, a in pairs], dim=0)
    low = truncate_factors(stacked_b, stacked_a, true_rank + extra)
    scale = max(1.0, float(expected.abs().max()))
    assert torch.allclose(low.B.double() @ low.A.double(), expected, atol=1e-4 * scale)
    assert low.err <= 1e-4 * scale * expected.numel() ** 0.5


@SETTINGS
@given(adapters(n_min=1, n_max=1))
def test_ties_of_one_source_at_density_one_is_the_weighted_delta(pairs):
    w, b, a = pairs[0]
    delta = b @ a
    assert torch.allclose(ties([delta], [w], [1.0]).double(), w * delta.double(), atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.2, 0.9))
def test_dare_mean_over_seeds_tends_to_the_delta(seed, density):
    delta = torch.randn(6, 7, generator=torch.Generator().manual_seed(seed))
    n = 2000
    total = torch.zeros_like(delta, dtype=torch.float64)
    for s in range(n):
        total += dare(delta, density, torch.Generator().manual_seed(seed + s)).double()
    mean = total / n
    # each entry is delta/p with probability p, else 0: std of the mean is |delta|·sqrt((1-p)/p)/sqrt(n)
    sigma = delta.double().abs() * ((1 - density) / density) ** 0.5 / n**0.5
    assert torch.all((mean - delta.double()).abs() <= 6 * sigma + 1e-9)
