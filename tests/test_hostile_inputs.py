"""The rest of the hostile trial (issue 16) as tests: broken adapter configs and factors, a GPT-2 adapter with
the wrong fan_in_fan_out flag, overflow caught by the finiteness check on every written tensor, a boolean
format version, and evaluation options that used to crash after the merge. Each is one line, exit 2, nothing
written, and the inputs are byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from fixtures import peft_merged_state_dict, read_tensors, run_cli, write_recipe
from safetensors.torch import load_file, save_file


def checksums(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for f in folders
        for p in sorted(f.rglob("*"))
        if p.is_file()
    }


def copy_adapter(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    data = load_file(src / "adapter_model.safetensors")
    save_file(tensors(data) if tensors else data, str(dst / "adapter_model.safetensors"))
    return dst


def model_recipe(tmp: Path, base: Path, adapter: Path, **merge) -> Path:
    data = {
        "loracook": 1,
        "base": str(base),
        "sources": {"a": str(adapter)},
        "merge": {"method": "linear", **merge},
        "output": {"kind": "model", "path": str(tmp / "out")},
    }
    return write_recipe(tmp, data)


def refused(res, *phrases: str) -> None:
    assert res.code == 2 and len(res.err_lines) == 1 and "Traceback" not in res.err, res
    for phrase in phrases:
        assert phrase in res.err, res.err


BROKEN = {
    "alpha_nan": ({"lora_alpha": math.nan}, None, "lora_alpha must be a positive finite number"),
    "alpha_pattern_word": ({"alpha_pattern": {"q_proj": "sixteen"}}, None, "alpha_pattern"),
    "rank_pattern_string": ({"rank_pattern": {"q_proj": "4"}}, None, "must be a positive integer, got '4'"),
    "rank_pattern_not_regex": ({"rank_pattern": {"q_proj(": 4}}, None, "adapter_config.json"),
    "int64_factors": (
        {},
        lambda d: {k: (v * 100).to(torch.int64) for k, v in d.items()},
        "not floating point",
    ),
    "inf_factor": (
        {},
        lambda d: {k: v.fill_(math.inf) if "lora_B" in k else v for k, v in d.items()},
        "NaN or inf",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_broken_adapters_are_refused(zoo, tmp_path, capfd, case, kind):
    config, tensors, phrase = BROKEN[case]
    adapter = copy_adapter(zoo.adapters["a"], tmp_path / "bad", config, tensors)
    recipe = model_recipe(tmp_path, zoo.models["llama"], adapter)
    if kind == "adapter":
        text = recipe.read_text().replace("kind: model", "kind: adapter")
        recipe.write_text(text)
    before = checksums(adapter, zoo.models["llama"])
    refused(run_cli(["run", recipe], capfd), phrase)
    assert not (tmp_path / "out").exists() and checksums(adapter, zoo.models["llama"]) == before


def test_overflowing_weight_is_blamed_on_the_weight(zoo, tmp_path, capfd):
    recipe = model_recipe(tmp_path, zoo.models["llama"], zoo.adapters["a"], weights={"a": 1e39})
    res = run_cli(["run", recipe], capfd)
    refused(res, "overflowed", "merge weights")
    assert "retrain" not in res.err and not (tmp_path / "out").exists()


def test_gpt2_adapter_with_the_wrong_fan_in_fan_out_flag_is_merged_as_peft_does(zoo, tmp_path, capfd):
    """PEFT warns and sets fan_in_fan_out for Conv1D layers; the merge must equal PEFT's, square modules too."""
    base = zoo.models["gpt2"]
    wrong = copy_adapter(zoo.adapters["gpt2"], tmp_path / "wrong", {"fan_in_fan_out": False})
    assert run_cli(["run", model_recipe(tmp_path, base, wrong)], capfd).code == 0
    expected = peft_merged_state_dict(base, zoo.adapters["gpt2"])  # the adapter with the right flag
    got = read_tensors(tmp_path / "out")
    assert max((got[k] - expected[k]).abs().max().item() for k in got if k in expected) <= 1e-5


def test_boolean_format_version(tmp_path, capfd):
    recipe = write_recipe(tmp_path, "loracook: true\nbase: ./b\nsources: {a: ./a}\n")
    refused(run_cli(["validate", recipe], capfd), ":1:", "loracook: 1")


def test_negative_evaluate_limit_is_refused_before_the_merge(zoo, tmp_path, capfd):
    recipe = model_recipe(tmp_path, zoo.models["llama"], zoo.adapters["a"])
    recipe.write_text(recipe.read_text() + "evaluate: {tasks: [arithmetic], limit: -5}\n")
    refused(run_cli(["validate", recipe], capfd), "evaluate.limit")


def test_eval_options_that_used_to_crash(zoo, tmp_path, capfd):
    refused(run_cli(["eval", str(zoo.models["llama"]), "--tasks", "x", "--limit", "-5"], capfd), "--limit")
    no_tokenizer = tmp_path / "model"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((zoo.models["llama_deep"] / name).read_bytes())
    task = Path(__file__).resolve().parents[1] / "recipes" / "tasks" / "arithmetic.yaml"
    refused(run_cli(["eval", str(no_tokenizer), "--tasks", str(task)], capfd), "no tokenizer files")
