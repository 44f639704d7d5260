"""`loracook inspect`: spectra and similarities from the factors, checked against dense computations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import run_cli
from safetensors.torch import load_file, save_file

from loracook.inspection import compare_adapters, summarize_adapter


def dense_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """s·B@A per module from the raw files (plain adapters: scale = alpha / r)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            out[module] = config["lora_alpha"] / config["r"] * b.double() @ a.double()
    return out


def negated(adapter: Path, dest: Path) -> Path:
    shutil.copytree(adapter, dest)
    tensors = load_file(dest / "adapter_model.safetensors")
    tensors = {k: -v if "lora_B" in k else v for k, v in tensors.items()}
    save_file(tensors, dest / "adapter_model.safetensors")
    return dest


def test_spectrum_norm_and_effective_rank_match_a_dense_svd(zoo):
    adapter = zoo.adapters["b"]
    summary = summarize_adapter(adapter)
    dense = dense_deltas(adapter)
    assert {m.module for m in summary.modules} == set(dense)
    for m in summary.modules:
        s = torch.linalg.svdvals(dense[m.module])
        assert m.norm == pytest.approx(float(torch.linalg.norm(dense[m.module])), rel=1e-5)
        assert torch.allclose(
            torch.tensor(m.spectrum, dtype=torch.float64), s[: m.rank], rtol=1e-4, atol=1e-7
        )
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        assert m.rank90 == int((energy < 0.90 - 1e-12).sum()) + 1
        assert m.rank99 == int((energy < 0.99 - 1e-12).sum()) + 1


def test_similarity_matches_dense_and_self_and_negation(zoo, tmp_path):
    a, b = zoo.adapters["a"], zoo.adapters["b"]
    neg = negated(a, tmp_path / "neg")
    sim = compare_adapters([a, b, neg], ["a", "b", "neg"])
    da, db = dense_deltas(a), dense_deltas(b)
    shared = sorted(set(da) & set(db))
    inner = sum(float((da[m] * db[m]).sum()) for m in shared)
    norm_a = sum(float((da[m] ** 2).sum()) for m in shared) ** 0.5
    norm_b = sum(float((db[m] ** 2).sum()) for m in shared) ** 0.5
    assert sim.shared_modules == len(shared)
    assert sim.cosine[0][1] == pytest.approx(inner / (norm_a * norm_b), rel=1e-4, abs=1e-6)
    assert sim.cosine[0][0] == pytest.approx(1.0, abs=1e-6)
    assert sim.cosine[0][2] == pytest.approx(-1.0, abs=1e-6)
    assert sim.subspace[0][2] == pytest.approx(1.0, abs=1e-5)  # negation spans the same subspace
    # subspace similarity of one module against a dense SVD
    module = shared[0]
    ua = torch.linalg.svd(da[module])[0][:, :8]
    ub = torch.linalg.svd(db[module])[0][:, :4]
    phi = float((ua.T @ ub).pow(2).sum()) / 4
    per_module = []
    for m in shared:
        u1 = torch.linalg.svd(da[m])[0][:, :8]
        u2 = torch.linalg.svd(db[m])[0][:, :4]
        per_module.append(float((u1.T @ u2).pow(2).sum()) / 4)
    assert sim.subspace[0][1] == pytest.approx(sum(per_module) / len(per_module), rel=1e-4)
    assert 0.0 <= phi <= 1.0


def test_cli_tables_json_and_plot(zoo, tmp_path, capfd):
    plot = tmp_path / "sim.png"
    result = run_cli(["inspect", zoo.adapters["a"], zoo.adapters["b"], "--plot", plot], capfd)
    assert result.code == 0, result
    assert "cosine similarity" in result.out and "subspace similarity" in result.out
    assert plot.is_file() and plot.stat().st_size > 10_000
    result = run_cli(["inspect", zoo.adapters["a"], "--json"], capfd)
    payload = json.loads(result.out)
    assert payload["adapters"][0]["modules"][0]["rank"] == 8
    result = run_cli(["inspect", zoo.models["llama"]], capfd)
    assert result.code == 0 and "LlamaForCausalLM" in result.out


@pytest.mark.parametrize("case", ["missing", "other-base"])
def test_inspect_bad_inputs(zoo, tmp_path, capfd, case):
    paths = [tmp_path / "nope"] if case == "missing" else [zoo.adapters["a"], zoo.adapters["wide"]]
    result = run_cli(["inspect", *paths], capfd)
    assert result.code == 2, result
    assert len(result.err_lines) == 1 and "Traceback" not in result.err
