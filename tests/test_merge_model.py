"""Acceptance tests: merging PEFT LoRA adapters into a base model (``output.kind: model``).

Every number is checked against something loracook did not compute: PEFT's own ``merge_and_unload``, or a
dense ``W + Σ w·s·B·A`` written out below from the raw safetensors factors.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import (
    adapter_config,
    peft_merged_state_dict,
    read_tensors,
    run_cli,
    run_cli_subprocess,
    write_recipe,
)

# Adapters a)-f) of the foundation issue, plus plain LoRA on a tied-embedding base.
PEFT_CASES = ["a", "gpt2", "rslora", "dora", "embed", "bias", "tied", "tied_embed"]
# Adapters without parts whose weighting is a matter of definition (DoRA magnitudes, modules_to_save).
DENSE_CASES = ["a", "b", "gpt2", "rslora", "bias", "tied", "tied_embed"]
ATOL = 1e-5


# ------------------------------------------------------------------------------------------------- helpers


def rel(path: Path, start: Path) -> str:
    """A relative path, so every recipe also checks that paths resolve against the recipe's folder."""
    return os.path.relpath(path, start)


def model_recipe(
    folder: Path,
    base: Path,
    sources: dict[str, Path],
    weights: dict,
    *,
    method: str = "linear",
    name: str = "recipe.yaml",
    **output,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {
        "loracook": 1,
        "base": rel(base, folder),
        "sources": {k: rel(v, folder) for k, v in sources.items()},
        "merge": {"method": method, "weights": weights},
        "output": {"kind": "model", "path": "./out", "dtype": "float32", **output},
    }
    return write_recipe(folder, recipe, name)


def run_ok(recipe: Path, capfd, *extra: str) -> None:
    res = run_cli(["run", recipe, *extra], capfd)
    assert res.code == 0, str(res)
    assert "Traceback" not in res.err


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_same_tensors(out: dict, ref: dict, atol: float = ATOL, names: set | None = None) -> None:
    names = set(out) if names is None else names
    assert set(out) == names, f"tensor names differ: extra {set(out) - names}, missing {names - set(out)}"
    worst = {k: max_abs(out[k], ref[k]) for k in names if out[k].shape == ref[k].shape}
    shapes = {k: (tuple(out[k].shape), tuple(ref[k].shape)) for k in names if out[k].shape != ref[k].shape}
    assert not shapes, f"shape mismatches: {shapes}"
    bad = {k: v for k, v in worst.items() if not v <= atol}
    assert not bad, f"max-abs error above {atol}: {bad}"


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a key matches a module name as ``(.*\\.)?(key)$``; the first matching key wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def dense_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW per base tensor name, in float64, straight from the factors: s·B·A with s = alpha/r (alpha/√r for
    rsLoRA), r and alpha per module from rank_pattern / alpha_pattern, transposed for fan_in_fan_out and for
    embeddings (lora_embedding_A is r × vocab); a lora_B bias b adds s·b to the base bias."""
    cfg = adapter_config(adapter)
    factors = read_tensors(adapter)
    deltas = {}
    for key in factors:
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_embedding_A)", key)
        if not match:
            continue
        module, kind = match.groups()
        a = factors[key].double()
        b = factors[key.replace("_A", "_B")].double()
        r = a.shape[0]
        assert r == pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        delta = s * (b @ a)
        transpose = kind == "lora_embedding_A" or cfg.get("fan_in_fan_out")
        deltas[module + ".weight"] = delta.T if transpose else delta
        bias = factors.get(f"base_model.model.{module}.lora_B.bias")
        if bias is not None:
            deltas[module + ".bias"] = s * bias.double()
    assert deltas, f"no LoRA factors in {adapter}"
    return deltas


def layer_of(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def interpolate(anchors: list[float], layer: int, num_layers: int) -> float:
    """Anchors spread evenly from the first layer to the last, linear in between."""
    if len(anchors) == 1:
        return anchors[0]
    pos = layer / (num_layers - 1) * (len(anchors) - 1)
    lo = min(int(math.floor(pos)), len(anchors) - 2)
    frac = pos - lo
    return anchors[lo] * (1 - frac) + anchors[lo + 1] * frac


def dense_merge(base: Path, terms: list[tuple[Path, object]]) -> dict[str, torch.Tensor]:
    """W + Σ w(name)·ΔW; ``w`` is a number or a function of the tensor name."""
    out = {k: v.double() for k, v in read_tensors(base).items()}
    for adapter, weight in terms:
        for name, delta in dense_deltas(adapter).items():
            w = weight(name) if callable(weight) else weight
            out[name] = out[name] + w * delta
    return out


def num_layers(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["num_hidden_layers"]


# ------------------------------------------------------------------------------------------ fixture guards


@pytest.mark.parametrize("name", PEFT_CASES + ["b"])
def test_fixture_adapter_changes_weights(zoo, name):
    """Guard for the fixtures themselves: PEFT loads each adapter and its merge moves the weights."""
    base = read_tensors(zoo.base_of(name))
    merged = peft_merged_state_dict(zoo.base_of(name), zoo.adapters[name])
    assert any(not torch.equal(base[k], merged[k]) for k in base), f"adapter {name} is a no-op"


@pytest.mark.parametrize("name", DENSE_CASES)
def test_dense_reference_matches_peft(zoo, name):
    """Guard for the dense reference: it agrees with PEFT wherever both apply (plain LoRA factors)."""
    ref = peft_merged_state_dict(zoo.base_of(name), zoo.adapters[name])
    dense = dense_merge(zoo.base_of(name), [(zoo.adapters[name], 1.0)])
    assert_same_tensors(dense, ref)


# ------------------------------------------------------------------------------------ one adapter vs PEFT


@pytest.mark.parametrize("name", PEFT_CASES)
def test_single_adapter_equals_peft_merge_and_unload(zoo, tmp_path, capfd, name):
    base, adapter = zoo.base_of(name), zoo.adapters[name]
    recipe = model_recipe(tmp_path, base, {name: adapter}, {name: 1.0})
    # DoRA and lora_bias are merged into models (not refused), so a refusal here is a failure, not a skip.
    res = run_cli(["run", recipe], capfd)
    assert res.code == 0, str(res)

    out = read_tensors(tmp_path / "out")
    base_names = set(read_tensors(base))
    ref = peft_merged_state_dict(base, adapter)
    # exactly the base's tensors (a tied lm_head stays tied: not written), each equal to PEFT's merge
    assert_same_tensors(out, ref, names=base_names)
    assert all(v.dtype == torch.float32 for v in out.values())


@pytest.mark.parametrize("name", DENSE_CASES)
def test_single_adapter_scaled(zoo, tmp_path, capfd, name):
    """A weight other than 1 scales ΔW (and a lora_B bias) linearly."""
    base, adapter = zoo.base_of(name), zoo.adapters[name]
    run_ok(model_recipe(tmp_path, base, {name: adapter}, {name: -0.6}), capfd)
    expected = dense_merge(base, [(adapter, -0.6)])
    assert_same_tensors(read_tensors(tmp_path / "out"), expected, names=set(expected))


@pytest.mark.parametrize("name", ["dora", "embed"])
def test_weighted_dora_and_modules_to_save_are_task_vectors(zoo, tmp_path, capfd, name):
    """Where ΔW is not s·B·A (DoRA's renormalised weight, a modules_to_save replacement), ΔW is PEFT's merged
    weight minus the base weight, and the weight scales it: W + w·(W_peft − W). So w=1 is PEFT's merge, w=0
    the base, and the rule is the same as for plain LoRA."""
    base, adapter = zoo.base_of(name), zoo.adapters[name]
    run_ok(model_recipe(tmp_path, base, {name: adapter}, {name: 0.5}), capfd)
    w = {k: v.double() for k, v in read_tensors(base).items()}
    peft = peft_merged_state_dict(base, adapter)
    expected = {k: w[k] + 0.5 * (peft[k].double() - w[k]) for k in w}
    assert_same_tensors(read_tensors(tmp_path / "out"), expected, names=set(w))


def test_validate_and_plan_write_nothing(zoo, tmp_path, capfd):
    recipe = model_recipe(
        tmp_path, zoo.models["llama"], {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}, {"a": 1}
    )
    for verb in ("validate", "plan"):
        res = run_cli([verb, recipe], capfd)
        assert res.code == 0, str(res)
        assert res.out.strip(), f"{verb} printed nothing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_sharded_base_input(zoo, tmp_path, capfd):
    """A base stored as several shards + index gives the same model as the single-file base."""
    sharded = zoo.models["llama_sharded"]
    assert (sharded / "model.safetensors.index.json").exists()
    recipe = model_recipe(tmp_path, sharded, {"a": zoo.adapters["a"]}, {"a": 1.0})
    run_ok(recipe, capfd)
    ref = peft_merged_state_dict(zoo.models["llama"], zoo.adapters["a"])
    assert_same_tensors(read_tensors(tmp_path / "out"), ref, names=set(read_tensors(sharded)))


def test_weight_zero_gives_the_base(zoo, tmp_path, capfd):
    base = zoo.models["llama"]
    run_ok(model_recipe(tmp_path, base, {"a": zoo.adapters["a"]}, {"a": 0.0}), capfd)
    assert_same_tensors(read_tensors(tmp_path / "out"), read_tensors(base), atol=0.0)


# ------------------------------------------------------------------------------- weighted sums, densely


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_two_adapters_weighted_sum(zoo, tmp_path, capfd, method):
    """W + 0.7·s1·B1A1 − 0.3·s2·B2A2, with no normalisation of the weights and no cross terms."""
    base, a, b = zoo.models["llama"], zoo.adapters["a"], zoo.adapters["b"]
    recipe = model_recipe(tmp_path, base, {"a": a, "b": b}, {"a": 0.7, "b": -0.3}, method=method)
    run_ok(recipe, capfd)
    expected = dense_merge(base, [(a, 0.7), (b, -0.3)])
    assert_same_tensors(read_tensors(tmp_path / "out"), expected, names=set(expected))


def test_defaults_weight_one_and_linear(zoo, tmp_path, capfd):
    """Sources missing from merge.weights get 1.0; without a merge section the method is linear."""
    base, a, b = zoo.models["llama"], zoo.adapters["a"], zoo.adapters["b"]
    run_ok(model_recipe(tmp_path / "partial", base, {"a": a, "b": b}, {"a": 0.5}), capfd)
    expected = dense_merge(base, [(a, 0.5), (b, 1.0)])
    assert_same_tensors(read_tensors(tmp_path / "partial" / "out"), expected, names=set(expected))

    folder = tmp_path / "nomerge"
    recipe = {
        "loracook": 1,
        "base": rel(base, folder),
        "sources": {"a": rel(a, folder), "b": rel(b, folder)},
        "output": {"kind": "model", "path": "./out", "dtype": "float32"},
    }
    run_ok(write_recipe(folder, recipe), capfd)
    expected = dense_merge(base, [(a, 1.0), (b, 1.0)])
    assert_same_tensors(read_tensors(folder / "out"), expected, names=set(expected))


def test_same_adapter_twice(zoo, tmp_path, capfd):
    """Two sources pointing at one folder add up: 0.25 + 0.5 of ΔW."""
    base, a = zoo.models["llama"], zoo.adapters["a"]
    run_ok(model_recipe(tmp_path, base, {"x": a, "y": a}, {"x": 0.25, "y": 0.5}), capfd)
    expected = dense_merge(base, [(a, 0.75)])
    assert_same_tensors(read_tensors(tmp_path / "out"), expected, names=set(expected))


def test_dict_source_form(zoo, tmp_path, capfd):
    """``b: {adapter: path}`` is the same source as ``b: path``."""
    base, a, b = zoo.models["llama"], zoo.adapters["a"], zoo.adapters["b"]
    recipe = {
        "loracook": 1,
        "base": rel(base, tmp_path),
        "sources": {"a": rel(a, tmp_path), "b": {"adapter": rel(b, tmp_path)}},
        "merge": {"method": "linear", "weights": {"a": 0.5, "b": 2.0}},
        "output": {"kind": "model", "path": "./out", "dtype": "float32"},
    }
    run_ok(write_recipe(tmp_path, recipe), capfd)
    expected = dense_merge(base, [(a, 0.5), (b, 2.0)])
    assert_same_tensors(read_tensors(tmp_path / "out"), expected, names=set(expected))


@pytest.mark.parametrize(
    ("model", "adapter", "anchors"),
    [
        ("llama", "a", [0.0, 1.0]),  # 2 layers, 2 anchors: layer 0 gets 0, layer 1 gets 1
        ("llama", "a", [0.8]),  # a one-element list is the same weight everywhere
        ("llama_deep", "deep", [1.0, 0.0]),  # 3 layers, 2 anchors: 1, 0.5, 0
        ("llama_deep", "deep", [0.2, -1.0, 0.6]),  # one anchor per layer
    ],
)
def test_per_layer_weights(zoo, tmp_path, capfd, model, adapter, anchors):
    base, ad = zoo.models[model], zoo.adapters[adapter]
    n = num_layers(base)
    run_ok(model_recipe(tmp_path, base, {"x": ad}, {"x": anchors}), capfd)

    def weight(name: str) -> float:
        return interpolate(anchors, layer_of(name), n)

    expected = dense_merge(base, [(ad, weight)])
    assert_same_tensors(read_tensors(tmp_path / "out"), expected, names=set(expected))


def test_per_layer_weights_three_anchors_interpolated(zoo, tmp_path, capfd):
    """3 anchors on 5 layers: 0, 0.5, 1, 0.5, 0 — the in-between layers are interpolated."""
    base, ad = zoo.models["llama_5"], zoo.adapters["five"]
    run_ok(model_recipe(tmp_path, base, {"x": ad}, {"x": [0.0, 1.0, 0.0]}), capfd)
    per_layer = [0.0, 0.5, 1.0, 0.5, 0.0]
    assert [interpolate([0.0, 1.0, 0.0], i, 5) for i in range(5)] == per_layer  # the reference itself
    expected = dense_merge(base, [(ad, lambda name: per_layer[layer_of(name)])])
    assert_same_tensors(read_tensors(tmp_path / "out"), expected, names=set(expected))


def test_filter_rules(zoo, tmp_path, capfd):
    """First matching rule wins; a rule without a filter is the default."""
    base, a, b = zoo.models["llama"], zoo.adapters["a"], zoo.adapters["b"]
    weights = {
        "a": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}],
        # the first rule shadows the second for layer 1's v_proj; k_proj is not in adapter b at all
        "b": [
            {"filter": r"layers\.1\.self_attn\.v_proj", "value": -2.0},
            {"filter": "v_proj", "value": 3.0},
            {"filter": "self_attn", "value": 0.25},
            {"value": 0.0},
        ],
    }
    run_ok(model_recipe(tmp_path, base, {"a": a, "b": b}, weights), capfd)

    def wa(name: str) -> float:
        return 0.5 if "mlp" in name else 1.0

    def wb(name: str) -> float:
        if "layers.1.self_attn.v_proj" in name:
            return -2.0
        if "v_proj" in name:
            return 3.0
        return 0.25 if "self_attn" in name else 0.0

    expected = dense_merge(base, [(a, wa), (b, wb)])
    assert_same_tensors(read_tensors(tmp_path / "out"), expected, names=set(expected))


# ---------------------------------------------------------------------------------- the written model


@pytest.fixture(scope="module")
def merged_a(zoo, tmp_path_factory):
    """One plain run (adapter a at 1.0 on the tokenizer-carrying tiny llama), shared by the output checks."""
    folder = tmp_path_factory.mktemp("merged_a")
    recipe = model_recipe(folder, zoo.models["llama"], {"a": zoo.adapters["a"]}, {"a": 1.0})
    from loracook.cli import main

    assert main(["run", str(recipe)]) == 0
    return folder


def test_output_loads_and_generates(zoo, merged_a):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merged_a / "out"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello world", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 4)

    # and it is the PEFT-merged model, not just some loadable model
    from peft import PeftModel

    ref = AutoModelForCausalLM.from_pretrained(zoo.models["llama"], dtype=torch.float32)
    ref = PeftModel.from_pretrained(ref, zoo.adapters["a"]).merge_and_unload().eval()
    with torch.no_grad():
        assert max_abs(model(ids).logits, ref(ids).logits) <= 1e-4


def test_output_folder_contents(zoo, merged_a):
    out, base = merged_a / "out", zoo.models["llama"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), f"{name} not copied from the base"
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), f"{name} changed on the way"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2

    card = out / "README.md"
    assert card.is_file() and card.read_text().strip(), "no model card"
    saved = out / "loracook_recipe.yaml"
    assert saved.is_file(), "recipe not saved next to the model"
    assert yaml.safe_load(saved.read_text())["loracook"] == 1

    # nothing but the recipe and the output in the recipe's folder: no temp folder left behind
    assert sorted(p.name for p in merged_a.iterdir()) == ["out", "recipe.yaml"]


def test_run_as_a_shell_command(zoo, tmp_path):
    """`python -m loracook run` from another working directory: the real entry point, end to end."""
    recipe = model_recipe(tmp_path / "r", zoo.models["gpt2"], {"g": zoo.adapters["gpt2"]}, {"g": 1.0})
    (tmp_path / "cwd").mkdir()
    res = run_cli_subprocess(["run", recipe], cwd=tmp_path / "cwd")
    assert res.code == 0 and "Traceback" not in res.err, str(res)
    assert not any((tmp_path / "cwd").iterdir()), "wrote into the working directory"
    ref = peft_merged_state_dict(zoo.models["gpt2"], zoo.adapters["gpt2"])
    out = read_tensors(tmp_path / "r" / "out")
    assert_same_tensors(out, ref, names=set(read_tensors(zoo.models["gpt2"])))


def test_output_override_and_force(zoo, tmp_path, capfd):
    """--output writes elsewhere; an existing output is replaced only with --force, and completely."""
    recipe = model_recipe(tmp_path / "r", zoo.models["llama"], {"a": zoo.adapters["a"]}, {"a": 1.0})
    target = tmp_path / "elsewhere"
    run_ok(recipe, capfd, "--output", str(target))
    assert (target / "config.json").exists() and not (tmp_path / "r" / "out").exists()

    (target / "stale.txt").write_text("from an earlier run")
    run_ok(recipe, capfd, "--output", str(target), "--force")
    assert not (target / "stale.txt").exists(), "--force must replace the folder, not merge into it"
    ref = peft_merged_state_dict(zoo.models["llama"], zoo.adapters["a"])
    assert_same_tensors(read_tensors(target), ref, names=set(read_tensors(zoo.models["llama"])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "r"]


# ------------------------------------------------------------------------------------ sharding and dtype


def test_sharded_output(zoo, tmp_path, capfd):
    base, a = zoo.models["llama"], zoo.adapters["a"]
    run_ok(model_recipe(tmp_path / "one", base, {"a": a}, {"a": 1.0}), capfd)
    run_ok(model_recipe(tmp_path / "many", base, {"a": a}, {"a": 1.0}, shard_size="20KB"), capfd)
    out = tmp_path / "many" / "out"

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2, f"20KB shards of a ~100KB model: got {[p.name for p in shards]}"
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", p.name) for p in shards)
    assert not (out / "model.safetensors").exists()

    tensors = read_tensors(out)
    if "total_size" in index.get("metadata", {}):
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:  # a shard over the limit may only hold one (big) tensor
        held = [k for k, f in index["weight_map"].items() if f == shard.name]
        nbytes = sum(tensors[k].numel() * tensors[k].element_size() for k in held)
        assert nbytes <= 20_000 or len(held) == 1, f"{shard.name}: {nbytes} bytes in {len(held)} tensors"

    assert_same_tensors(tensors, read_tensors(tmp_path / "one" / "out"), atol=0.0)

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    sd = loaded.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_output_dtype_cast(zoo, tmp_path, capfd, dtype):
    """Merge in fp32, cast once at the end: equal to the fp32 result cast to the output dtype."""
    base, a, b = zoo.models["llama"], zoo.adapters["a"], zoo.adapters["b"]
    weights = {"a": 0.7, "b": -0.3}
    run_ok(model_recipe(tmp_path / "fp32", base, {"a": a, "b": b}, weights), capfd)
    run_ok(model_recipe(tmp_path / "low", base, {"a": a, "b": b}, weights, dtype=dtype), capfd)
    target = getattr(torch, dtype)
    full = read_tensors(tmp_path / "fp32" / "out")
    low = read_tensors(tmp_path / "low" / "out")
    assert set(low) == set(full)
    for k, v in low.items():
        assert v.dtype == target, f"{k} is {v.dtype}"
        assert torch.equal(v, full[k].to(target)), f"{k}: not the fp32 result cast to {dtype}"
    config = json.loads((tmp_path / "low" / "out" / "config.json").read_text())
    written = config.get("dtype", config.get("torch_dtype"))
    assert written in (None, dtype), f"config.json says dtype {written!r} for {dtype} weights"


def test_bfloat16_base_auto_dtype(zoo, tmp_path, capfd):
    """A bf16 base with dtype auto: bf16 out, W + ΔW rounded once (to within one bf16 step)."""
    base, a = zoo.models["llama_bf16"], zoo.adapters["a"]
    run_ok(model_recipe(tmp_path, base, {"a": a}, {"a": 1.0}, dtype="auto"), capfd)
    out = read_tensors(tmp_path / "out")
    expected = dense_merge(base, [(a, 1.0)])
    assert set(out) == set(expected)
    for k, v in out.items():
        assert v.dtype == torch.bfloat16, f"{k} is {v.dtype}"
        ulp = 2.0**-7 * expected[k].abs()  # one bf16 step (8 significant bits) at that magnitude
        assert ((v.double() - expected[k]).abs() <= ulp + 1e-30).all(), f"{k}: more than one bf16 step off"


def test_dtype_auto_keeps_base_dtype(zoo, tmp_path, capfd):
    base = zoo.models["llama"]
    run_ok(model_recipe(tmp_path, base, {"a": zoo.adapters["a"]}, {"a": 1.0}, dtype="auto"), capfd)
    assert all(v.dtype == torch.float32 for v in read_tensors(tmp_path / "out").values())
