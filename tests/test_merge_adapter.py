"""Adapter-space merging (output.kind: adapter) and every method into a model, checked against dense
references written here: PEFT's own ΔW after loading, a full SVD, and TIES/magnitude pruning in numpy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import read_tensors, run_cli, ties_reference, write_recipe

LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------ helpers


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW of every adapted module as PEFT computes it after loading the adapter (factor space: out × in)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "scaling", {}):
            delta = module.get_delta_weight("default").detach().float()
            if hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
                delta = delta.T  # factor space (B @ A) is the transpose of the stored embedding delta
            elif getattr(module, "fan_in_fan_out", False):
                delta = delta.T
            deltas[name] = delta
    return deltas


def weighted_sum(parts: list[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for w, deltas in parts:
        for name, delta in deltas.items():
            out[name] = out.get(name, torch.zeros_like(delta)) + w * delta
    return out


def optimal_error(matrix: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(matrix.double())
    return float(torch.sqrt((s[rank:] ** 2).sum()))


def run(zoo_dir: Path, capfd, recipe: dict, *extra: str):
    path = write_recipe(zoo_dir, recipe)
    return run_cli(["run", path, *extra], capfd)


def adapter_recipe(zoo, sources: dict, merge: dict, out: Path, kind: str = "adapter") -> dict:
    first = next(iter(sources.values()))
    return {
        "loracook": 1,
        "base": str(zoo.base_of(first)),
        "sources": {n: str(zoo.adapters[a]) for n, a in sources.items()},
        "merge": merge,
        "output": {"kind": kind, "path": str(out), "dtype": "float32"},
    }


# ------------------------------------------------------------------------------------------- exact methods


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "cat"])
def test_exact_methods_equal_the_dense_weighted_sum(zoo, tmp_path, capfd, method):
    out = tmp_path / "out"
    recipe = adapter_recipe(
        zoo, {"x": "a", "y": "b"}, {"method": method, "weights": {"x": 0.7, "y": -0.3}}, out
    )
    result = run(tmp_path, capfd, recipe)
    assert result.code == 0, result
    base = zoo.models["llama"]
    expected = weighted_sum(
        [(0.7, peft_deltas(base, zoo.adapters["a"])), (-0.3, peft_deltas(base, zoo.adapters["b"]))]
    )
    got = peft_deltas(base, out)
    assert got.keys() == expected.keys()  # the union of target modules
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"]
    # rank Σ r_i where both adapters target the module (8 + 4), 8 where only "a" does
    ranks = {k: v.shape[0] for k, v in read_tensors_adapter(out).items() if k.endswith("lora_A.weight")}
    assert ranks["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == 12
    assert ranks["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] == 8


def read_tensors_adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_mixed_rslora_patterns_and_plain_fold_exactly(zoo, tmp_path, capfd):
    out = tmp_path / "out"
    recipe = adapter_recipe(
        zoo, {"r": "rslora", "a": "a"}, {"method": "linear", "weights": {"r": 0.5, "a": 1.0}}, out
    )
    assert run(tmp_path, capfd, recipe).code == 0
    base = zoo.models["llama"]
    expected = weighted_sum(
        [(0.5, peft_deltas(base, zoo.adapters["rslora"])), (1.0, peft_deltas(base, zoo.adapters["a"]))]
    )
    got = peft_deltas(base, out)
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]


def test_gpt2_and_embedding_adapters_fold_exactly(zoo, tmp_path, capfd):
    for name, weight in (("gpt2", 0.8), ("embed", 0.6)):
        out = tmp_path / f"out_{name}"
        recipe = adapter_recipe(zoo, {"s": name}, {"method": "linear", "weights": {"s": weight}}, out)
        result = run(tmp_path, capfd, recipe)
        assert result.code == 0, result
        base = zoo.base_of(name)
        expected = {k: weight * v for k, v in peft_deltas(base, zoo.adapters[name]).items()}
        got = peft_deltas(base, out)
        assert got.keys() == expected.keys()
        assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5


def test_written_adapter_loads_with_transformers_load_adapter(zoo, tmp_path, capfd):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    recipe = adapter_recipe(zoo, {"x": "a", "y": "b"}, {"method": "linear"}, out)
    assert run(tmp_path, capfd, recipe).code == 0
    base = zoo.models["llama"]
    ids = torch.arange(10).reshape(1, 10)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.load_adapter(str(out))
    with torch.no_grad():
        via_transformers = model(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out)
        via_peft = peft(ids).logits
    assert torch.allclose(via_transformers, via_peft, atol=1e-5)


# ------------------------------------------------------------------------------------ recompressed outputs


@pytest.mark.parametrize("method", ["svd", "linear"])
def test_low_rank_outputs_are_optimal(zoo, tmp_path, capfd, method):
    out = tmp_path / "out"
    merge = {"method": method, "weights": {"x": 0.7, "y": 0.5}, "rank": 6}
    assert run(tmp_path, capfd, adapter_recipe(zoo, {"x": "a", "y": "b"}, merge, out)).code == 0
    base = zoo.models["llama"]
    target = weighted_sum(
        [(0.7, peft_deltas(base, zoo.adapters["a"])), (0.5, peft_deltas(base, zoo.adapters["b"]))]
    )
    got = peft_deltas(base, out)
    for name, matrix in target.items():
        error = float(torch.linalg.norm(got[name] - matrix))
        assert error <= 1.01 * optimal_error(matrix, 6) + 1e-6, name
    report = json.loads((out / "merge_report.json").read_text())
    assert report["modules"] and all(m["rank"] <= 6 for m in report["modules"])


@pytest.mark.parametrize("density", [1.0, 0.4])
def test_ties_adapter_matches_the_dense_reference_within_optimal_rank_error(zoo, tmp_path, capfd, density):
    out = tmp_path / "out"
    merge = {"method": "ties", "weights": {"x": 0.7, "y": 0.5}, "density": density, "rank": 8}
    assert run(tmp_path, capfd, adapter_recipe(zoo, {"x": "a", "y": "b"}, merge, out)).code == 0
    base = zoo.models["llama"]
    da, db = peft_deltas(base, zoo.adapters["a"]), peft_deltas(base, zoo.adapters["b"])
    got = peft_deltas(base, out)
    for name in da:
        parts = [(0.7, da[name])] + ([(0.5, db[name])] if name in db else [])
        reference = ties_reference([d for _, d in parts], [w for w, _ in parts], [density] * len(parts))
        error = float(torch.linalg.norm(got[name] - reference))
        assert error <= 1.01 * optimal_error(reference, 8) + 1e-5, name


# ----------------------------------------------------------------------------------- every method, models


def model_delta(zoo, out: Path) -> dict[str, torch.Tensor]:
    merged, base = read_tensors(out), read_tensors(zoo.models["llama"])
    return {k: merged[k] - base[k] for k in base}


def test_ties_into_a_model_is_exact(zoo, tmp_path, capfd):
    out = tmp_path / "out"
    merge = {"method": "ties", "weights": {"x": 1.0, "y": -0.5}, "density": {"x": 0.5, "y": 0.3}}
    assert run(tmp_path, capfd, adapter_recipe(zoo, {"x": "a", "y": "b"}, merge, out, kind="model")).code == 0
    base = zoo.models["llama"]
    da, db = peft_deltas(base, zoo.adapters["a"]), peft_deltas(base, zoo.adapters["b"])
    delta = model_delta(zoo, out)
    for name in da:
        parts = [(1.0, da[name], 0.5)] + ([(-0.5, db[name], 0.3)] if name in db else [])
        reference = ties_reference(
            [d for _, d, _ in parts], [w for w, _, _ in parts], [p for _, _, p in parts]
        )
        assert (delta[f"{name}.weight"] - reference).abs().max().item() <= 1e-5, name


def test_magnitude_prune_into_a_model_keeps_the_largest_entries(zoo, tmp_path, capfd):
    out = tmp_path / "out"
    merge = {"method": "magnitude_prune", "weights": {"x": 2.0}, "density": 0.25}
    assert run(tmp_path, capfd, adapter_recipe(zoo, {"x": "a"}, merge, out, kind="model")).code == 0
    deltas = peft_deltas(zoo.models["llama"], zoo.adapters["a"])
    delta = model_delta(zoo, out)
    for name, d in deltas.items():
        reference = 2.0 * ties_reference([d], [1.0], [0.25])  # one source: TIES is magnitude pruning
        assert (delta[f"{name}.weight"] - reference).abs().max().item() <= 1e-5


def test_dare_linear_drops_and_rescales_reproducibly(zoo, tmp_path, capfd):
    merge = {"method": "dare_linear", "weights": {"x": 1.0}, "density": 0.5, "seed": 3}
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"out{i}")
        assert run(tmp_path, capfd, adapter_recipe(zoo, {"x": "a"}, merge, outs[-1], kind="model")).code == 0
    first, second = model_delta(zoo, outs[0]), model_delta(zoo, outs[1])
    deltas = peft_deltas(zoo.models["llama"], zoo.adapters["a"])
    kept = total = 0
    for name, d in deltas.items():
        got = first[f"{name}.weight"]
        assert torch.equal(got, second[f"{name}.weight"])  # same seed, same masks
        nonzero = got != 0
        # every entry is either dropped (0) or the original delta divided by the density
        assert torch.allclose(got[nonzero], d[nonzero] / 0.5, atol=1e-5)
        kept += int(nonzero.sum())
        total += got.numel()
    assert 0.45 < kept / total < 0.55


def test_svd_into_a_model_adds_the_best_low_rank_sum(zoo, tmp_path, capfd):
    out = tmp_path / "out"
    merge = {"method": "svd", "weights": {"x": 0.7, "y": 0.5}, "rank": 4}
    assert run(tmp_path, capfd, adapter_recipe(zoo, {"x": "a", "y": "b"}, merge, out, kind="model")).code == 0
    base = zoo.models["llama"]
    target = weighted_sum(
        [(0.7, peft_deltas(base, zoo.adapters["a"])), (0.5, peft_deltas(base, zoo.adapters["b"]))]
    )
    delta = model_delta(zoo, out)
    for name, matrix in target.items():
        error = float(torch.linalg.norm(delta[f"{name}.weight"] - matrix))
        assert error <= 1.01 * optimal_error(matrix, 4) + 1e-5


def test_per_source_dare_preprocessing_into_a_model(zoo, tmp_path, capfd):
    out = tmp_path / "out"
    recipe = adapter_recipe(zoo, {"x": "a"}, {"method": "linear"}, out, kind="model")
    recipe["sources"]["x"] = {"adapter": str(zoo.adapters["a"]), "dare": {"drop": 0.75, "seed": 1}}
    assert run(tmp_path, capfd, recipe).code == 0
    deltas = peft_deltas(zoo.models["llama"], zoo.adapters["a"])
    delta = model_delta(zoo, out)
    kept = sum(int((delta[f"{n}.weight"] != 0).sum()) for n in deltas)
    total = sum(d.numel() for d in deltas.values())
    assert 0.2 < kept / total < 0.3
    for name, d in deltas.items():
        got = delta[f"{name}.weight"]
        assert torch.allclose(got[got != 0], d[got != 0] / 0.25, atol=1e-5)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("sources", "merge", "phrase"),
    [
        ({"x": "a", "y": "wide"}, {"method": "linear"}, "does not fit"),
        ({"x": "a"}, {"method": "svd", "rank": 1000}, "larger than"),
        ({"x": "a"}, {"method": "linear", "weights": {"z": 1.0}}, "unknown source"),
        ({"x": "a"}, {"method": "ties", "density": 0.5}, "merge.rank"),
        ({"x": "dora"}, {"method": "linear"}, "dora"),
        ({"x": "bias"}, {"method": "linear"}, "lora_bias"),
    ],
    ids=["other-base", "rank-too-large", "unknown-source", "ties-needs-rank", "dora", "lora-bias"],
)
def test_adapter_output_refusals(zoo, tmp_path, capfd, sources, merge, phrase):
    out = tmp_path / "out"
    result = run(tmp_path, capfd, adapter_recipe(zoo, sources, merge, out))
    assert result.code == 2, result
    assert len(result.err_lines) == 1 and "Traceback" not in result.err
    assert phrase.lower() in result.err.lower()
    assert not out.exists()
