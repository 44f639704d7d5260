"""LoRA extraction from full fine-tunes (sources.X.extract), against full SVDs and PEFT's merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import read_tensors, run_cli, ties_reference, write_recipe
from safetensors.torch import load_file, save_file

TRUE_RANK = 3


def make_finetune(
    base: Path, out: Path, *, seed: int, noise: float, skip: tuple[str, ...] = (), extra=None
) -> Path:
    """base + a known rank-3 delta + full-rank noise on every linear weight; everything else unchanged."""
    shutil.copytree(base, out)
    tensors = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name, value in tensors.items():
        if value.dim() == 2 and "proj" in name and not any(s in name for s in skip):
            m, n = value.shape
            low = torch.randn(m, TRUE_RANK, generator=gen) @ torch.randn(TRUE_RANK, n, generator=gen) * 0.05
            tensors[name] = value + low + noise * torch.randn(m, n, generator=gen)
    if extra:
        extra(tensors, gen)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tuned(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetunes")
    base = zoo.models["llama"]

    def touch_norm_and_embedding(tensors, gen):
        tensors["model.norm.weight"] = tensors["model.norm.weight"] + 0.1
        emb = tensors["model.embed_tokens.weight"]
        tensors["model.embed_tokens.weight"] = emb + 0.02 * torch.randn(
            emb.shape[0], 2, generator=gen
        ) @ torch.randn(2, emb.shape[1], generator=gen)

    return {
        "noisy": make_finetune(base, root / "noisy", seed=1, noise=0.01),
        "exact": make_finetune(base, root / "exact", seed=2, noise=0.0, skip=("k_proj",)),
        "other": make_finetune(base, root / "other", seed=3, noise=0.01),
        "norm": make_finetune(base, root / "norm", seed=4, noise=0.0, extra=touch_norm_and_embedding),
    }


def extract_recipe(base: Path, sources: dict, out: Path, merge=None, kind: str = "adapter") -> dict:
    recipe = {
        "loracook": 1,
        "base": str(base),
        "sources": sources,
        "output": {"kind": kind, "path": str(out)},
    }
    if merge:
        recipe["merge"] = merge
    return recipe


def factor_deltas(adapter: Path, base: Path) -> dict[str, torch.Tensor]:
    """ΔW per module from PEFT after loading (scale included), in the base's storage orientation."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    return {
        name: module.get_delta_weight("default").detach().float()
        for name, module in model.base_model.model.named_modules()
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "scaling", {})
    }


def svd_truncate(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :k] * s[:k] @ vh[:k]).float(), float(torch.sqrt((s[k:] ** 2).sum()))


@pytest.mark.parametrize(
    "method, check", [("randomized", "estimate"), ("randomized", "exact"), ("exact", "estimate")]
)
def test_extracted_error_is_within_one_percent_of_optimal(zoo, tuned, tmp_path, capfd, method, check):
    base = zoo.models["llama"]
    out = tmp_path / "out"
    spec = {"extract": {"model": str(tuned["noisy"]), "rank": 4, "method": method, "check": check}}
    result = run_cli(["run", write_recipe(tmp_path, extract_recipe(base, {"ft": spec}, out))], capfd)
    assert result.code == 0, result
    base_t, ft_t = read_tensors(base), read_tensors(tuned["noisy"])
    got = factor_deltas(out, base)
    assert len(got) == 14  # 7 projections × 2 layers
    for module, delta in got.items():
        target = ft_t[f"{module}.weight"] - base_t[f"{module}.weight"]
        _, optimal = svd_truncate(target, 4)
        error = float(torch.linalg.norm(delta - target))
        assert error <= 1.01 * optimal + 1e-6, module
    report = json.loads((out / "extract_report.json").read_text())["ft"]
    assert report["lora_modules"] == 14
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4


def test_true_low_rank_delta_is_recovered_to_rounding_and_round_trips(zoo, tuned, tmp_path, capfd):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = zoo.models["llama"]
    out = tmp_path / "out"
    spec = {"extract": {"model": str(tuned["exact"]), "rank": 4}}
    assert run_cli(["run", write_recipe(tmp_path, extract_recipe(base, {"ft": spec}, out))], capfd).code == 0
    base_t, ft_t = read_tensors(base), read_tensors(tuned["exact"])
    deltas = factor_deltas(out, base)
    assert not any("k_proj" in m for m in deltas)  # unchanged modules are skipped
    for module, delta in deltas.items():
        target = ft_t[f"{module}.weight"] - base_t[f"{module}.weight"]
        assert float(torch.linalg.norm(delta - target)) <= 1e-5 * float(torch.linalg.norm(target)) + 1e-7
    merged = (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
        .merge_and_unload()
        .state_dict()
    )
    for name, value in ft_t.items():
        assert (merged[name] - value).abs().max().item() <= 1e-5, name
    # unchanged embeddings and norms are not shipped
    assert all("lora_" in k for k in load_file(out / "adapter_model.safetensors"))


def test_energy_picks_smaller_ranks_as_rank_pattern(zoo, tuned, tmp_path, capfd):
    base = zoo.models["llama"]
    out = tmp_path / "out"
    spec = {"extract": {"model": str(tuned["exact"]), "rank": 8, "energy": 0.999}}
    assert run_cli(["run", write_recipe(tmp_path, extract_recipe(base, {"ft": spec}, out))], capfd).code == 0
    tensors = load_file(out / "adapter_model.safetensors")
    ranks = {k: v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    assert set(ranks.values()) == {TRUE_RANK}  # a rank-3 delta keeps 99.9% of its energy at rank 3
    report = json.loads((out / "extract_report.json").read_text())["ft"]
    assert all(m["energy"] >= 0.999 for m in report["modules"] if m["kind"] == "lora")


def test_changed_norm_and_embedding(zoo, tuned, tmp_path, capfd):
    base = zoo.models["llama"]
    for embeddings, expect in (
        ("lora", "lora_embedding_A"),
        ("full", "base_model.model.model.embed_tokens.weight"),
    ):
        out = tmp_path / f"out_{embeddings}"
        spec = {"extract": {"model": str(tuned["norm"]), "rank": 4, "embeddings": embeddings}}
        recipe = write_recipe(tmp_path, extract_recipe(base, {"ft": spec}, out))
        assert run_cli(["run", recipe], capfd).code == 0
        keys = set(load_file(out / "adapter_model.safetensors"))
        assert any(expect in k for k in keys)
        assert "base_model.model.model.norm.weight" in keys
        config = json.loads((out / "adapter_config.json").read_text())
        assert "model.norm" in config["modules_to_save"]
        # PEFT reproduces the fine-tune's norm and (to rank 2 < 4: exactly) its embedding
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).merge_and_unload()
        state, ft_t = merged.state_dict(), read_tensors(tuned["norm"])
        for name in ("model.norm.weight", "model.embed_tokens.weight"):
            assert (state[name] - ft_t[name]).abs().max().item() <= 1e-5
    out = tmp_path / "out_error"
    spec = {"extract": {"model": str(tuned["norm"]), "rank": 4, "vectors": "error"}}
    result = run_cli(["run", write_recipe(tmp_path, extract_recipe(base, {"ft": spec}, out))], capfd)
    assert result.code == 2 and "model.norm.weight" in result.err and not out.exists()


def test_two_extractions_merged_with_ties_match_the_dense_steps(zoo, tuned, tmp_path, capfd):
    base = zoo.models["llama"]
    out = tmp_path / "out"
    sources = {
        "x": {"extract": {"model": str(tuned["noisy"]), "rank": 4, "method": "exact"}},
        "y": {"extract": {"model": str(tuned["other"]), "rank": 4, "method": "exact"}},
    }
    merge = {"method": "ties", "weights": {"x": 1.0, "y": 0.5}, "density": 0.5}
    recipe = write_recipe(tmp_path, extract_recipe(base, sources, out, merge, kind="model"))
    result = run_cli(["run", recipe], capfd)
    assert result.code == 0, result
    base_t, x_t, y_t, got = (read_tensors(p) for p in (base, tuned["noisy"], tuned["other"], out))
    for name, w in base_t.items():
        if w.dim() != 2 or "proj" not in name:
            assert torch.equal(got[name], w)
            continue
        dx, _ = svd_truncate(x_t[name] - w, 4)
        dy, _ = svd_truncate(y_t[name] - w, 4)
        reference = w + ties_reference([dx, dy], [1.0, 0.5], [0.5, 0.5])
        assert (got[name] - reference).abs().max().item() <= 2e-5, name


@pytest.mark.parametrize(
    ("case", "phrase"),
    [("architecture", "gpt2"), ("missing", "missing"), ("rank0", "greater than 0"), ("energy", "energy")],
)
def test_extraction_bad_inputs(zoo, tuned, tmp_path, capfd, case, phrase):
    base = zoo.models["llama"]
    out = tmp_path / "out"
    spec = {"model": str(tuned["noisy"]), "rank": 4}
    if case == "architecture":
        spec["model"] = str(zoo.models["gpt2"])
    elif case == "missing":
        broken = shutil.copytree(tuned["noisy"], tmp_path / "broken")
        tensors = load_file(broken / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
        spec["model"] = str(broken)
    elif case == "rank0":
        spec["rank"] = 0
    else:
        spec["energy"] = 1.5
    recipe = write_recipe(tmp_path, extract_recipe(base, {"ft": {"extract": spec}}, out))
    for command in (["validate", recipe], ["run", recipe]):
        result = run_cli(command, capfd)
        assert result.code == 2, result
        assert len(result.err_lines) == 1 and "Traceback" not in result.err
        assert phrase.lower() in result.err.lower(), result.err
    assert not out.exists()


def test_plan_shows_the_extraction_estimate(zoo, tuned, tmp_path, capfd):
    base = zoo.models["llama"]
    spec = {"extract": {"model": str(tuned["noisy"]), "rank": 4}}
    recipe = write_recipe(tmp_path, extract_recipe(base, {"ft": spec}, tmp_path / "out"))
    result = run_cli(["plan", recipe], capfd)
    assert result.code == 0, result
    assert "extract ft" in result.out and "GFLOP" in result.out
