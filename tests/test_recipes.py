"""Every shipped recipe carries the schema comment, validates, plans and runs, and the demo runs end to end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loracook.cli import main

ROOT = Path(__file__).parent.parent
# recipes/ and recipes/skills/ (the quality study); the extraction recipe needs a full fine-tune that lives in
# the cache (scripts/skills/finetune.py), so it is tested on a stand-in below
EXTRACT_HEADLINE = ROOT / "recipes" / "skills" / "extract-headline.yaml"
ALL_RECIPES = sorted(ROOT.joinpath("recipes").glob("*.yaml")) + sorted(
    ROOT.joinpath("recipes/skills").glob("*.yaml")
)
RECIPES = [p for p in ALL_RECIPES if p != EXTRACT_HEADLINE]


def schema_comment(recipe: Path) -> str:
    schema = os.path.relpath(ROOT / "schemas" / "recipe.schema.json", recipe.parent)
    return f"# yaml-language-server: $schema={schema}"


def test_there_are_recipes():
    assert RECIPES, "recipes/ holds no recipe"


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda p: p.name)
def test_recipe_has_schema_comment(recipe: Path):
    assert recipe.read_text().splitlines()[0] == schema_comment(recipe)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_plans(recipe: Path, capsys):
    assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err
    assert main(["plan", str(recipe)]) == 0, capsys.readouterr().err


def test_validate_many_files_in_one_call(capsys):
    assert main(["validate", "--schema-only", *map(str, ALL_RECIPES)]) == 0
    assert capsys.readouterr().out.count("ok") == len(ALL_RECIPES)


# Search recipes run a whole weight search before the merge (minutes on SmolLM2): tests/test_search.py covers them.
RUN_RECIPES = [p for p in RECIPES if "\nsearch:" not in p.read_text()]
ADAPTER_RECIPES = [p for p in RUN_RECIPES if "kind: adapter" in p.read_text()]
MODEL_RECIPES = [p for p in RUN_RECIPES if "kind: model" in p.read_text() and p.name != "demo.yaml"]


@pytest.mark.parametrize("recipe", ADAPTER_RECIPES, ids=lambda p: p.name)
def test_adapter_recipes_run_and_load_with_peft(recipe: Path, tmp_path: Path, capsys):
    from peft import PeftConfig

    out = tmp_path / "out"
    assert main(["run", str(recipe.resolve()), "--output", str(out), "--no-eval"]) == 0, (
        capsys.readouterr().err
    )
    assert PeftConfig.from_pretrained(out).peft_type == "LORA"
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()


@pytest.mark.parametrize("recipe", MODEL_RECIPES, ids=lambda p: p.name)
def test_model_recipes_run_and_load(recipe: Path, tmp_path: Path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(["run", str(recipe.resolve()), "--output", str(out), "--no-eval"]) == 0, (
        capsys.readouterr().err
    )
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0


def test_extraction_recipe_on_a_stand_in_fine_tune(tmp_path: Path, capsys):
    """recipes/skills/extract-headline.yaml with its fine-tune replaced by the base plus a known rank-4 delta on
    two projections: the rank-16 adapter it writes reproduces that delta (checked with dense algebra)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from loracook.io.packaged import smollm2_folder

    base = smollm2_folder()
    finetune = tmp_path / "finetune"
    shutil.copytree(base, finetune, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for name in ("model.layers.21.self_attn.q_proj.weight", "model.layers.25.mlp.down_proj.weight"):
        d_out, d_in = weights[name].shape
        deltas[name] = torch.randn(d_out, 4, generator=g) @ torch.randn(4, d_in, generator=g) * 0.01
        weights[name] = weights[name] + deltas[name]
    save_file(weights, str(finetune / "model.safetensors"), metadata={"format": "pt"})
    skills = EXTRACT_HEADLINE.parent
    text = EXTRACT_HEADLINE.read_text().replace(
        "~/.cache/loracook/finetunes/smollm2-headline-full", str(finetune)
    )
    text = text.replace("./tasks/", f"{skills}/tasks/").replace("$schema=../../", f"$schema={ROOT}/")
    recipe = tmp_path / "extract-headline.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--output", str(out), "--no-eval"]) == 0, capsys.readouterr().err
    config = json.loads((out / "adapter_config.json").read_text())
    factors = load_file(str(out / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    modules = {k.split(".lora_A")[0] for k in factors if ".lora_A" in k}
    assert len(modules) == len(deltas)  # unchanged modules are skipped
    for name, delta in deltas.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        extracted = factors[f"{prefix}.lora_B.weight"] @ factors[f"{prefix}.lora_A.weight"] * scale
        assert torch.allclose(extracted, delta, atol=1e-5), (extracted - delta).abs().max()
    assert (out / "extract_report.json").is_file()


def test_recipe_runs_end_to_end(tmp_path: Path, capsys):
    """The demo recipe on the real SmolLM2-135M, into a fresh folder; the merged model answers the new fact.

    --no-eval: the evaluate section is checked by `validate` above and run end to end in test_run_eval.py on a
    tiny model; on the real model it takes minutes (its figures are in docs/evaluation.md)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "demo"
    assert main(["run", str(Path("recipes/demo.yaml").resolve()), "--output", str(out)]) == 0, (
        capsys.readouterr().err
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tokenizer("Question: What is the capital of Vellmark?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(
            **ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    assert "Quenth" in tokenizer.decode(generated[0, ids["input_ids"].shape[1] :])
