"""KnOTS, Core Space, TSV, Breadcrumbs and DELLA through `loracook run`: both output kinds, the identities the
papers imply, a dense KnOTS reference written here from the paper, and the refusals. The factor-space math is
checked against float64 dense references in tests/test_ops_lowrank_merge.py."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import ties_reference
from test_merge_adapter import (
    adapter_recipe,
    model_delta,
    peft_deltas,
    read_tensors_adapter,
    run,
    weighted_sum,
)

WEIGHTS = {"x": 0.7, "y": -0.3}
Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def both_outputs(zoo, tmp_path, capfd, merge: dict):
    """Run ``merge`` on adapters a and b into an adapter and into a model; return both deltas and the folder."""
    outs = {}
    for kind in ("adapter", "model"):
        out = tmp_path / kind
        res = run(tmp_path, capfd, adapter_recipe(zoo, {"x": "a", "y": "b"}, merge, out, kind=kind))
        assert res.code == 0, res
        outs[kind] = out
    base = zoo.models["llama"]
    return peft_deltas(base, outs["adapter"]), model_delta(zoo, outs["model"]), outs["adapter"]


@pytest.mark.parametrize(
    "merge",
    [
        {"method": "knots", "density": 0.5},
        {"method": "knots", "inner": "dare_ties", "density": 0.7},
        {"method": "core_space", "density": 0.5},
        {"method": "core_space", "inner": "tsv"},
        {"method": "tsv", "alpha": 0.8},
    ],
    ids=["knots-ties", "knots-dare_ties", "core_space-ties", "core_space-tsv", "tsv"],
)
def test_adapter_and_model_outputs_agree_without_recompression(zoo, tmp_path, capfd, merge):
    adapter, model, folder = both_outputs(zoo, tmp_path, capfd, {**merge, "weights": WEIGHTS})
    for module, delta in adapter.items():
        assert (model[f"{module}.weight"] - delta).abs().max().item() <= 1e-5, module
    ranks = {k: v.shape[0] for k, v in read_tensors_adapter(folder).items() if k.endswith("lora_A.weight")}
    assert ranks[Q_PROJ] <= 12  # R = 8 + 4
    report = json.loads((folder / "merge_report.json").read_text())
    assert {m["method"] for m in report["modules"]} == {merge["method"]}  # the method's own rank, no SVD


@pytest.mark.parametrize("method", ["knots", "core_space"])
def test_linear_inner_equals_linear(zoo, tmp_path, capfd, method):
    """Both projections lose nothing, so with inner: linear the result is Σ w_i ΔW_i exactly."""
    adapter, model, _ = both_outputs(
        zoo, tmp_path, capfd, {"method": method, "inner": "linear", "weights": WEIGHTS}
    )
    base = zoo.models["llama"]
    expected = weighted_sum(
        [(0.7, peft_deltas(base, zoo.adapters["a"])), (-0.3, peft_deltas(base, zoo.adapters["b"]))]
    )
    assert max((adapter[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5
    assert max((model[f"{k}.weight"] - expected[k]).abs().max().item() for k in expected) <= 1e-5


def test_tsv_of_one_source_is_its_delta(zoo, tmp_path, capfd):
    out = tmp_path / "out"
    recipe = adapter_recipe(zoo, {"x": "a"}, {"method": "tsv", "weights": {"x": 1.0}}, out)
    assert run(tmp_path, capfd, recipe).code == 0
    base = zoo.models["llama"]
    expected, got = peft_deltas(base, zoo.adapters["a"]), peft_deltas(base, out)
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5


def knots_reference(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """KnOTS from the paper, densely: SVD of [ΔW_1 | ΔW_2] in float64, TIES on the Σ-scaled V_iᵀ, U · merged.

    The deltas come from PEFT in float32, so the concatenation's singular values below ~1e-7 σ_1 are rounding
    noise, not directions: the truncation at its rank (≤ R) keeps those above 1e-5 σ_1."""
    cat = torch.cat([d.double() for d in deltas], dim=1)
    U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
    k = int((S > 1e-5 * S[0]).sum())
    inp = deltas[0].shape[1]
    aligned = [(S[:k, None] * Vh[:k, i * inp : (i + 1) * inp]).float() for i in range(len(deltas))]
    return U[:, :k].float() @ ties_reference(aligned, weights, [density] * len(deltas)).double().float()


def test_knots_equals_the_dense_definition(zoo, tmp_path, capfd):
    out = tmp_path / "out"
    merge = {"method": "knots", "density": 0.5, "weights": WEIGHTS}
    assert run(tmp_path, capfd, adapter_recipe(zoo, {"x": "a", "y": "b"}, merge, out, kind="model")).code == 0
    base = zoo.models["llama"]
    da, db = peft_deltas(base, zoo.adapters["a"]), peft_deltas(base, zoo.adapters["b"])
    got = model_delta(zoo, out)
    for module in sorted(set(da) & set(db)):
        expected = knots_reference([da[module], db[module]], [0.7, -0.3], 0.5)
        scale = expected.abs().max().item()
        assert (got[f"{module}.weight"] - expected).abs().max().item() <= 1e-5 * max(scale, 1.0), module


@pytest.mark.parametrize(
    ("method", "same_as"),
    [
        (
            {"method": "breadcrumbs", "gamma": 0.0, "density": 0.5},
            {"method": "magnitude_prune", "density": 0.5},
        ),
        ({"method": "della", "epsilon": 0.0, "density": 0.5}, {"method": "dare_ties", "density": 0.5}),
        (
            {"method": "della_linear", "epsilon": 0.0, "density": 0.5},
            {"method": "dare_linear", "density": 0.5},
        ),
    ],
    ids=["breadcrumbs-gamma0", "della-epsilon0", "della_linear-epsilon0"],
)
def test_breadcrumbs_and_della_reduce_to_their_parents(zoo, tmp_path, capfd, method, same_as):
    """γ = 0 is magnitude pruning and ε = 0 is DARE, with the same masks: the runs agree bit for bit."""
    deltas = []
    for index, merge in enumerate((method, same_as)):
        out = tmp_path / f"out{index}"
        recipe = adapter_recipe(zoo, {"x": "a", "y": "b"}, {**merge, "weights": WEIGHTS}, out, kind="model")
        assert run(tmp_path, capfd, recipe).code == 0
        deltas.append(model_delta(zoo, out))
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])


def test_breadcrumbs_drops_the_outliers(zoo, tmp_path, capfd):
    out = tmp_path / "out"
    merge = {"method": "breadcrumbs", "gamma": 0.1, "density": 0.5, "weights": {"x": 1.0}}
    assert run(tmp_path, capfd, adapter_recipe(zoo, {"x": "a"}, merge, out, kind="model")).code == 0
    delta = peft_deltas(zoo.models["llama"], zoo.adapters["a"])
    got = model_delta(zoo, out)
    module = "model.layers.0.self_attn.q_proj"
    d, g = delta[module].flatten(), got[f"{module}.weight"].flatten()
    order = torch.argsort(d.abs(), descending=True, stable=True)
    n = d.numel()
    top, keep = round(0.1 * n), round(0.5 * n)
    assert torch.all(g[order[:top]] == 0)  # the largest 10% are gone
    assert torch.allclose(g[order[top : top + keep]], d[order[top : top + keep]], atol=1e-6)
    assert torch.all(g[order[top + keep :]] == 0)


@pytest.mark.parametrize(
    ("merge", "phrase"),
    [
        ({"method": "knots", "inner": "svd"}, "inner"),
        ({"method": "knots", "inner": "linear", "density": 0.5}, "no effect with inner: linear"),
        ({"method": "tsv", "ranks": {"x": 99}}, "use at most 8"),
        ({"method": "tsv", "alpha": 0.0}, "alpha"),
        ({"method": "breadcrumbs", "gamma": 1.5}, "gamma"),
        ({"method": "breadcrumbs", "gamma": 0.6, "density": 0.5}, "density + gamma"),
        ({"method": "della", "epsilon": 0.6, "density": 0.5}, "epsilon"),
        ({"method": "della", "epsilon": -0.1}, "epsilon"),
    ],
)
def test_bad_options_are_one_line(zoo, tmp_path, capfd, merge, phrase):
    recipe = adapter_recipe(zoo, {"x": "a", "y": "b"}, merge, tmp_path / "out", kind="model")
    res = run(tmp_path, capfd, recipe)
    assert res.code == 2 and len(res.err_lines) == 1 and "Traceback" not in res.err, res
    assert phrase in res.err, res.err
    assert not (tmp_path / "out").exists()


def test_factor_methods_refuse_dora(zoo, tmp_path, capfd):
    recipe = adapter_recipe(zoo, {"x": "a", "d": "dora"}, {"method": "knots"}, tmp_path / "out", kind="model")
    res = run(tmp_path, capfd, recipe)
    assert res.code == 2 and "plain LoRA factors" in res.err and "DoRA" in res.err, res
