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


def _outputs_with_cores(monkeypatch, n: int, run) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(threads, "cores", lambda: n)
    return run(n)


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
    def run(n: int) -> dict[str, torch.Tensor]:
        out = tmp_path / f"out{n}"
        recipe = write_recipe(tmp_path / f"r{n}", adapter_recipe(zoo, {"x": "a", "y": "b"}, merge, out))
        assert run_cli(["run", recipe], capfd).code == 0
        return read_tensors(out)

    one, two = (_outputs_with_cores(monkeypatch, n, run) for n in (1, 2))
    assert one.keys() == two.keys()
    differ = {k: float((one[k] - two[k]).abs().max()) for k in one if not torch.equal(one[k], two[k])}
    assert not differ, differ


def test_extraction_does_not_depend_on_the_number_of_cores(zoo, tmp_path, capfd, monkeypatch):
    tuned = make_finetune(zoo.models["llama"], tmp_path / "tuned", seed=1, noise=0.01)

    def run(n: int) -> dict[str, torch.Tensor]:
        out = tmp_path / f"out{n}"
        sources = {"x": {"extract": {"model": str(tuned), "rank": 4}}}
        recipe = write_recipe(tmp_path / f"r{n}", extract_recipe(zoo.models["llama"], sources, out))
        assert run_cli(["run", recipe], capfd).code == 0
        return read_tensors(out)

    one, two = (_outputs_with_cores(monkeypatch, n, run) for n in (1, 2))
    assert one.keys() == two.keys()
    differ = {k: float((one[k] - two[k]).abs().max()) for k in one if not torch.equal(one[k], two[k])}
    assert not differ, differ
