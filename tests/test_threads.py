"""The ordered thread map: results in order, errors raised, and outputs that do not depend on the core count."""

from __future__ import annotations

import threading

import pytest
import torch
from fixtures import read_tensors, run_cli, write_recipe
from test_extraction import extract_recipe, make_finetune
from test_merge_adapter import adapter_recipe

import loracook.threads as threads
from loracook.threads import map_ordered


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_in_order_and_each_call_runs_on_one_torch_thread(workers):
    seen_threads = set()

    def work(i: int) -> tuple[int, int]:
        seen_threads.add(threading.get_ident())
        return i, torch.get_num_threads()

    results = list(map_ordered(work, range(50), workers))
    assert [i for i, _ in results] == list(range(50))
    assert {n for _, n in results} == {1}
    assert len(seen_threads) <= workers


def test_an_error_is_raised_and_later_calls_are_not_all_run():
    started = []

    def work(i: int) -> int:
        started.append(i)
        if i == 3:
            raise ValueError("item 3")
        return i

    with pytest.raises(ValueError, match="item 3"):
        list(map_ordered(work, range(1000), 2))
    assert len(started) < 1000


def assert_same_output_on_1_and_2_cores(recipe: dict, tmp_path, capfd, monkeypatch) -> None:
    """Run ``recipe`` (its output path replaced) with 1 and with 2 cores; every written tensor must be equal."""
    outputs = []
    for n in (1, 2):
        monkeypatch.setattr(threads, "cores", lambda n=n: n)
        out = tmp_path / f"out{n}"
        path = write_recipe(tmp_path / f"r{n}", {**recipe, "output": {**recipe["output"], "path": str(out)}})
        assert run_cli(["run", path], capfd).code == 0
        outputs.append(read_tensors(out))
    one, two = outputs
    assert one.keys() == two.keys()
    differ = {k: float((one[k] - two[k]).abs().max()) for k in one if not torch.equal(one[k], two[k])}
    assert not differ, differ


@pytest.mark.parametrize(
    "merge",
    [
        {"method": "ties", "weights": {"x": 0.7, "y": 0.5}, "density": 0.5, "rank": 6},
        {"method": "dare_ties", "weights": {"x": 0.7, "y": 0.5}, "density": 0.5, "rank": 6, "seed": 3},
        {"method": "svd", "weights": {"x": 0.7, "y": -0.5}, "rank": 4},
    ],
    ids=lambda m: m["method"],
)
def test_adapter_merges_do_not_depend_on_the_number_of_cores(zoo, tmp_path, capfd, monkeypatch, merge):
    recipe = adapter_recipe(zoo, {"x": "a", "y": "b"}, merge, tmp_path / "out")
    assert_same_output_on_1_and_2_cores(recipe, tmp_path, capfd, monkeypatch)


def test_extraction_does_not_depend_on_the_number_of_cores(zoo, tmp_path, capfd, monkeypatch):
    tuned = make_finetune(zoo.models["llama"], tmp_path / "tuned", seed=1, noise=0.01)
    sources = {"x": {"extract": {"model": str(tuned), "rank": 4}}}
    recipe = extract_recipe(zoo.models["llama"], sources, tmp_path / "out")
    assert_same_output_on_1_and_2_cores(recipe, tmp_path, capfd, monkeypatch)
