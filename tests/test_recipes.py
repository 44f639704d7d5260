"""Every shipped recipe carries the schema comment, validates, plans, and the demo runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from loracook.cli import main

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
SCHEMA_COMMENT = "# yaml-language-server: $schema=../schemas/recipe.schema.json"


def test_there_are_recipes():
    assert RECIPES, "recipes/ holds no recipe"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_has_schema_comment(recipe: Path):
    assert recipe.read_text().splitlines()[0] == SCHEMA_COMMENT


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_plans(recipe: Path, capsys):
    assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err
    assert main(["plan", str(recipe)]) == 0, capsys.readouterr().err


def test_validate_many_files_in_one_call(capsys):
    assert main(["validate", "--schema-only", *map(str, RECIPES)]) == 0
    assert capsys.readouterr().out.count("ok") == len(RECIPES)


ADAPTER_RECIPES = [p for p in RECIPES if "kind: adapter" in p.read_text()]


@pytest.mark.parametrize("recipe", ADAPTER_RECIPES, ids=lambda p: p.name)
def test_adapter_recipes_run_and_load_with_peft(recipe: Path, tmp_path: Path, capsys):
    from peft import PeftConfig

    out = tmp_path / "out"
    assert main(["run", str(recipe.resolve()), "--output", str(out)]) == 0, capsys.readouterr().err
    assert PeftConfig.from_pretrained(out).peft_type == "LORA"
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()


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
