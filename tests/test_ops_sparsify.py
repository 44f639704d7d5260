"""Element-wise merge methods against plain-Python references written independently here.

The references loop over entries of tiny tensors (lists of floats), so they share no code with
loracook.ops.sparsify. Each documented semantic choice of docs/merge-methods.md has a test named after it.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from loracook.ops.rng import tensor_generator, tensor_seed
from loracook.ops.sparsify import (
    dare,
    dare_linear,
    dare_ties,
    disjoint_merge,
    elect_sign,
    keep_count,
    magnitude_prune,
    magnitude_prune_merge,
    task_arithmetic,
    ties,
)

# small tensors: one thread is faster, and immune to a busy machine (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- references (lists of floats)


def sgn(x: float) -> int:
    return (x > 0) - (x < 0)


def ref_prune(values: list[float], density: float, rescale: bool = False) -> list[float]:
    n = len(values)
    keep = int(math.floor(density * n + 0.5))
    order = sorted(range(n), key=lambda i: (-abs(values[i]), i))  # larger first, then lower index
    kept = set(order[:keep])
    return [(v / density if rescale else v) if i in kept else 0.0 for i, v in enumerate(values)]


def ref_elect(columns: list[list[float]], method: str) -> list[int]:
    """columns[i] = values of source i; returns the elected sign per entry."""
    out = []
    for p in range(len(columns[0])):
        entry = [c[p] for c in columns]
        if method == "total":
            out.append(sgn(sum(entry)))
        else:
            out.append(sgn(sum(1 for v in entry if v > 0) - sum(1 for v in entry if v < 0)))
    return out


def ref_disjoint(trimmed: list[list[float]], weights: list[float], method: str) -> list[float]:
    weighted = [[w * v for v in t] for w, t in zip(weights, trimmed, strict=True)]
    signs = ref_elect(weighted, method)
    out = []
    for p, s in enumerate(signs):
        agree = [wv[p] for wv in weighted if s != 0 and sgn(wv[p]) == s]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return out


def ref_ties(deltas, weights, densities, method="total", rescale=False) -> list[float]:
    trimmed = [ref_prune(d, p, rescale) for d, p in zip(deltas, densities, strict=True)]
    return ref_disjoint(trimmed, weights, method)


def ref_dare(values: list[float], density: float, seed: int, rescale: bool = True) -> list[float]:
    # independent restatement of the documented mask: one uniform draw per entry, keep if u < density
    u = torch.rand(len(values), generator=torch.Generator().manual_seed(seed)).tolist()
    return [(v / density if rescale else v) if ui < density else 0.0 for v, ui in zip(values, u, strict=True)]


def T(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(a: torch.Tensor, b: list[float], tol: float = 1e-6) -> bool:
    return a.dtype == torch.float32 and all(
        abs(x - y) <= tol * (1 + abs(y)) for x, y in zip(a.tolist(), b, strict=True)
    )


def rand_list(n: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).tolist()


# ---------------------------------------------------------------- magnitude_prune


def test_keep_count_rounds_half_up():
    assert [keep_count(d, 10) for d in (0.04, 0.05, 0.25, 0.5, 1.0)] == [0, 1, 3, 5, 10]
    assert keep_count(0.5, 5) == 3  # Python's round() would give 2 (banker's rounding)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.25, 0.5, 0.77, 0.9, 1.0])
def test_magnitude_prune_matches_sorted_reference(density):
    values = rand_list(60, seed=int(density * 100))
    out = magnitude_prune(T(values).reshape(6, 10), density)
    assert out.shape == (6, 10) and out.dtype == torch.float32
    assert close(out.reshape(-1), ref_prune(values, density), tol=0)
    assert int((out != 0).sum()) == keep_count(density, 60)


def test_magnitude_prune_breaks_ties_by_lower_index():
    values = [1.0, -2.0, 2.0, 1.0, -1.0, 2.0, 0.5]  # keep 4 of 7: all three 2's and the first 1
    out = magnitude_prune(T(values), 0.5)
    assert out.tolist() == [1.0, -2.0, 2.0, 0.0, 0.0, 2.0, 0.0]
    assert close(out, ref_prune(values, 0.5), tol=0)


def test_magnitude_prune_rescale_divides_kept_entries():
    values = rand_list(20, seed=3)
    assert close(magnitude_prune(T(values), 0.4, rescale=True), ref_prune(values, 0.4, rescale=True))
    assert close(magnitude_prune(T(values), 0.4), ref_prune(values, 0.4))  # default: no rescale


def test_magnitude_prune_density_one_is_identity_and_input_untouched():
    x = torch.randn(4, 5)
    before = x.clone()
    assert torch.equal(magnitude_prune(x, 1.0), x)
    magnitude_prune(x, 0.3, rescale=True)
    assert torch.equal(x, before)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_zero_one_is_rejected(density):
    with pytest.raises(ValueError, match="density"):
        magnitude_prune(torch.ones(3), density)
    with pytest.raises(ValueError, match="density"):
        dare(torch.ones(3), density, torch.Generator())


def test_magnitude_prune_zero_delta():
    assert torch.equal(magnitude_prune(torch.zeros(3, 4), 0.5), torch.zeros(3, 4))


# ---------------------------------------------------------------- dare and generators


def test_dare_mask_and_rescale_match_reference():
    values = rand_list(50, seed=4)
    for rescale in (True, False):
        out = dare(T(values), 0.3, torch.Generator().manual_seed(11), rescale=rescale)
        assert close(out, ref_dare(values, 0.3, 11, rescale))


def test_dare_default_rescale_keeps_the_mean():
    out = dare(torch.ones(200_000), 0.2, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0.0, 5.0}
    assert abs(float(out.mean()) - 1.0) < 0.03


def test_dare_density_one_is_identity():
    x = torch.randn(7, 3)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(dare(x, 1.0, g), x)
    assert torch.equal(dare(x, 1.0, g, rescale=False), x)


def test_tensor_seed_is_sha256_of_seed_and_name():
    expected = int.from_bytes(hashlib.sha256(b"7:model.layers.0.q_proj").digest()[:8], "little") & (2**63 - 1)
    assert tensor_seed(7, "model.layers.0.q_proj") == expected
    assert tensor_seed(7, "a") != tensor_seed(7, "b") != tensor_seed(8, "b")


def test_tensor_generator_is_seeded_from_the_hash_only():
    # no process-dependent input (Python's salted hash(), time, global RNG state): the seed is the sha256
    torch.manual_seed(123)
    g = tensor_generator(3, "lm.q_proj")
    assert g.initial_seed() == tensor_seed(3, "lm.q_proj")
    assert g.device.type == "cpu"
    mine = torch.rand(5, generator=g).tolist()
    torch.manual_seed(456)
    assert torch.rand(5, generator=tensor_generator(3, "lm.q_proj")).tolist() == mine
    assert torch.rand(5, generator=tensor_generator(3, "lm.k_proj")).tolist() != mine


# ---------------------------------------------------------------- sign election and disjoint merge


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_elect_sign_matches_reference(method):
    columns = [rand_list(30, seed=s) for s in range(4)]
    columns[1][:5] = [0.0] * 5
    columns.append([-c for c in columns[0]])  # forces exact ties in some entries
    out = elect_sign(T(columns), method)
    assert out.tolist() == ref_elect(columns, method)
    with pytest.raises(ValueError, match="majority sign"):
        elect_sign(T(columns), "sum")


def test_disjoint_merge_matches_reference():
    trimmed = [ref_prune(rand_list(40, seed=s), 0.6) for s in range(3)]
    weights = [0.7, -0.4, 1.3]
    weighted = T(trimmed) * T(weights)[:, None]
    out = disjoint_merge(T(trimmed), elect_sign(weighted), weights)
    assert close(out, ref_disjoint(trimmed, weights, "total"))
    # a list and a `weights` argument elect the same signs as the stacked weighted deltas
    for method in ("total", "frequency"):
        signs = elect_sign([T(t) for t in trimmed], method, weights=weights)
        assert signs.tolist() == ref_elect(
            [[w * v for v in t] for w, t in zip(weights, trimmed, strict=True)], method
        )
        out = disjoint_merge([T(t) for t in trimmed], signs, weights)
        assert close(out, ref_disjoint(trimmed, weights, method))


# ---------------------------------------------------------------- ties / dare_ties / dare_linear / others


@pytest.mark.parametrize(
    ("weights", "densities", "method", "rescale"),
    [
        ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], "total", False),
        ([0.3, 0.9, 0.5], [0.2, 0.7, 1.0], "total", False),
        ([0.3, 0.9, 0.5], [0.2, 0.7, 1.0], "frequency", False),
        ([1.0, -0.6, 0.5], [0.4, 0.4, 0.9], "total", True),
        ([1.0, -0.6], [0.4, 0.4], "frequency", True),
    ],
)
def test_ties_matches_reference(weights, densities, method, rescale):
    deltas = [rand_list(48, seed=10 + i) for i in range(len(weights))]
    out = ties([T(d).reshape(6, 8) for d in deltas], weights, densities, method, rescale)
    assert out.shape == (6, 8) and out.dtype == torch.float32
    assert close(out.reshape(-1), ref_ties(deltas, weights, densities, method, rescale))


def test_a_sign_is_elected_on_weighted_deltas():
    # unweighted: 1 - 1.5 < 0 would elect "-" and keep b; weighted: 2*1 - 1.5 > 0 elects "+" and keeps a
    assert ties([T([1.0]), T([-1.5])], [2.0, 1.0], [1.0, 1.0]).tolist() == [2.0]


def test_b_disjoint_mean_divides_by_the_number_of_agreeing_sources():
    # weighted deltas 2 and 2 agree: (2 + 2) / 2 = 2; dividing by the agreeing weights would give 4 / 1.5
    assert ties([T([2.0]), T([4.0])], [1.0, 0.5], [1.0, 1.0]).tolist() == [2.0]
    # a source trimmed to zero at an entry does not count there
    assert ties([T([2.0, 0.1]), T([4.0, 3.0])], [1.0, 1.0], [0.5, 1.0]).tolist() == [3.0, 3.0]
    # a weight-0 source does not vote and does not count
    assert ties([T([2.0]), T([-9.0])], [1.0, 0.0], [1.0, 1.0]).tolist() == [2.0]


def test_c_rescale_defaults():
    x = T([4.0, -1.0, 2.0, 0.5])
    assert ties([x], [1.0], [0.5]).tolist() == [4.0, 0.0, 2.0, 0.0]  # TIES: no rescale
    assert ties([x], [1.0], [0.5], rescale=True).tolist() == [8.0, 0.0, 4.0, 0.0]
    out = dare_ties([x], [1.0], [0.5], [torch.Generator().manual_seed(1)])
    assert close(out, ref_dare(x.tolist(), 0.5, 1))  # DARE: kept / density


def test_d_entries_without_a_winning_sign_are_zero():
    a, b = T([1.0, 2.0, 0.0]), T([-1.0, -1.0, 0.0])
    # total: 1 - 1 = 0 -> 0 (PEFT and mergekit would elect "+" and return 1); 2 - 1 > 0 -> 2
    assert ties([a, b], [1.0, 1.0], [1.0, 1.0], "total").tolist() == [0.0, 2.0, 0.0]
    # frequency: one positive, one negative -> no majority -> 0 everywhere
    assert ties([a, b], [1.0, 1.0], [1.0, 1.0], "frequency").tolist() == [0.0, 0.0, 0.0]


def test_e_negative_weight_negates_the_task():
    x = torch.randn(5, 6)
    assert torch.equal(ties([x], [-1.0], [0.3]), -magnitude_prune(x, 0.3))
    # a negated source votes with its flipped sign: here it wins and is subtracted
    assert ties([T([1.0]), T([2.0])], [1.0, -1.0], [1.0, 1.0]).tolist() == [-2.0]
    # scaling every weight by c (also c < 0) scales the result by c
    deltas = [torch.randn(4, 5) for _ in range(3)]
    w = [0.5, -1.0, 0.8]
    for c in (-2.0, 0.5):
        torch.testing.assert_close(
            ties(deltas, [c * x for x in w], [0.6] * 3), c * ties(deltas, w, [0.6] * 3)
        )


def test_single_source_density_one_is_weighted_delta():
    x = torch.randn(6, 4)
    g = [torch.Generator().manual_seed(0)]
    for fn, extra in ((ties, ()), (dare_ties, (g,)), (dare_linear, (g,))):
        torch.testing.assert_close(fn([x], [0.7], [1.0], *extra), 0.7 * x, rtol=0, atol=0)


def test_dare_ties_matches_reference():
    deltas = [rand_list(40, seed=20 + i) for i in range(3)]
    weights, densities, seeds = [0.5, 1.0, -0.7], [0.3, 0.6, 0.9], [5, 6, 7]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = dare_ties([T(d) for d in deltas], weights, densities, gens, "frequency")
    dropped = [ref_dare(d, p, s) for d, p, s in zip(deltas, densities, seeds, strict=True)]
    assert close(out, ref_disjoint(dropped, weights, "frequency"))


def test_dare_linear_and_task_arithmetic_match_reference():
    deltas = [rand_list(30, seed=30 + i) for i in range(2)]
    weights, densities, seeds = [0.8, -0.3], [0.5, 0.25], [1, 2]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    dropped = [ref_dare(d, p, s) for d, p, s in zip(deltas, densities, seeds, strict=True)]
    expected = [sum(w * d[i] for w, d in zip(weights, dropped, strict=True)) for i in range(30)]
    assert close(dare_linear([T(d) for d in deltas], weights, densities, gens), expected)
    expected = [sum(w * d[i] for w, d in zip(weights, deltas, strict=True)) for i in range(30)]
    assert close(task_arithmetic([T(d) for d in deltas], weights), expected)
    pruned = [ref_prune(d, p) for d, p in zip(deltas, densities, strict=True)]
    expected = [sum(w * d[i] for w, d in zip(weights, pruned, strict=True)) for i in range(30)]
    assert close(magnitude_prune_merge([T(d) for d in deltas], weights, densities), expected)


def test_zero_deltas_give_zero():
    z = [torch.zeros(3, 3), torch.zeros(3, 3)]
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    for out in (
        ties(z, [1.0, -1.0], [0.5, 0.5]),
        dare_ties(z, [1.0, 1.0], [0.5, 0.5], g),
        dare_linear(z, [1.0, 1.0], [0.5, 0.5], g),
    ):
        assert torch.equal(out, torch.zeros(3, 3))


def test_inputs_are_validated():
    x = torch.ones(2, 2)
    with pytest.raises(ValueError, match="at least one"):
        ties([], [], [])
    with pytest.raises(ValueError, match="per-source"):
        ties([x, x], [1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="one shape"):
        task_arithmetic([x, torch.ones(2, 3)], [1.0, 1.0])
    with pytest.raises(ValueError, match="density"):
        ties([x], [1.0], [0.0])


def test_real_module_size_is_fast_enough():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(576, 1536, generator=g) for _ in range(3)]
    out = ties(deltas, [1.0, 0.5, 0.5], [0.3, 0.3, 0.3])
    # about 30% of each source survives the trim; the merged delta is sparse but not empty
    assert 0.3 < float((out != 0).float().mean()) < 0.8
