"""The extension points: a merge method added through the public registry alone runs end to end, and one
compiled plan executed into memory with two weight sets equals two separate `loracook run` outputs."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
import yaml
from fixtures import read_tensors
from test_merge_model import assert_same_tensors, dense_merge, model_recipe, run_ok

from loracook import methods
from loracook.methods import MergeMethod
from loracook.recipe.types import MergeParams


class HalfSumMerge(MergeParams):
    """A toy method: half the weighted sum, element-wise (so an adapter output needs merge.rank)."""

    method: Literal["half_sum"]
    rank: int | None = None


class HalfSum(MergeMethod):
    name = "half_sum"
    params = HalfSumMerge
    elementwise = True

    def dense(self, deltas, inputs, params):
        return 0.5 * sum(w * d for w, d in zip(inputs.weights, deltas, strict=True))


@pytest.fixture
def half_sum():
    methods.register(HalfSum())
    yield
    methods.unregister("half_sum")


def test_toy_method_through_the_registry_runs_end_to_end(zoo, tmp_path, capfd, half_sum):
    base, a, b = zoo.models["llama"], zoo.adapters["a"], zoo.adapters["b"]
    recipe = model_recipe(tmp_path, base, {"a": a, "b": b}, {"a": 1.0, "b": -0.5}, method="half_sum")
    run_ok(recipe, capfd)
    expected = dense_merge(base, [(a, 0.5), (b, -0.25)])  # float64, from PEFT's own adapter files
    assert_same_tensors(read_tensors(tmp_path / "out"), expected, names=set(expected))
    from loracook.recipe.schema import schema_text

    assert "HalfSumMerge" in schema_text()  # the schema follows the registry


def test_toy_method_is_unknown_once_unregistered(zoo, tmp_path, capfd):
    from fixtures import run_cli

    recipe = model_recipe(tmp_path, zoo.models["llama"], {"a": zoo.adapters["a"]}, {}, method="half_sum")
    res = run_cli(["validate", recipe], capfd)
    assert res.code == 2 and "unknown merge method 'half_sum'" in res.err


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_one_plan_two_weight_sets_equal_two_runs(zoo, tmp_path, capfd, method):
    """Compile once, execute many: weights (and densities) are bound at execution, not at compile time."""
    from loracook.engine import prepare
    from loracook.execute.executor import execute
    from loracook.execute.sinks import MemorySink
    from loracook.plan.values import Values
    from loracook.recipe import load_recipe

    base, a, b = zoo.models["llama"], zoo.adapters["a"], zoo.adapters["b"]
    sets = [({"a": 1.0, "b": 0.5}, 0.5), ({"a": [0.0, -1.0], "b": 2.0}, 0.9)]
    compiled = load_recipe(model_recipe(tmp_path / "compiled", base, {"a": a, "b": b}, {}, method=method))
    plan = prepare(compiled.recipe).plan
    for index, (weights, density) in enumerate(sets):
        sink = MemorySink()
        densities = {"a": density, "b": density} if method == "ties" else {}
        execute(plan, Values(weights, densities, plan.num_layers), sink)
        folder = tmp_path / f"run{index}"
        recipe = model_recipe(folder, base, {"a": a, "b": b}, weights, method=method)
        if method == "ties":
            data = yaml.safe_load(recipe.read_text())
            data["merge"]["density"] = density
            recipe.write_text(yaml.safe_dump(data))
        run_ok(recipe, capfd)
        written = read_tensors(folder / "out")
        assert set(written) == set(sink.tensors)
        for name, tensor in written.items():
            assert torch.equal(tensor, sink.tensors[name]), name
