"""vLLM and LoRAX serving rules (loracook/serving.py) on real PEFT adapters built here.

Each adapter is made by PEFT (tests/fixtures.make_lora) on a tiny Llama, read back with
``facts_from_folder`` (config + safetensors header), and checked against the rules that docs/serving.md
cites from vLLM's and LoRAX's sources.
"""

from __future__ import annotations

import json

import pytest
from fixtures import make_gpt2, make_llama, make_lora

from loracook.serving import (
    VLLM_MAX_LORA_RANKS,
    adapter_facts,
    check,
    facts_from_folder,
    lorax_problems,
    serving_summary,
    summary_lines,
    vllm_max_lora_rank,
    vllm_problems,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("serving") / "llama", tokenizer=False)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """Build (once per settings) a PEFT adapter on the tiny Llama and return its folder."""
    root = tmp_path_factory.mktemp("adapters")
    made = {}

    def build(name, **kwargs):
        if name not in made:
            kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
            kwargs.setdefault("r", 8)
            kwargs.setdefault("lora_alpha", 16)
            made[name] = make_lora(base, root / name, seed=len(made) + 1, **kwargs)
        return made[name]

    return build


def rules(problems, blocking=True):
    return {p.rule for p in problems if p.blocking == blocking}


def test_max_lora_rank_is_the_smallest_allowed_value_that_fits():
    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    expected = {1: 1, 2: 8, 8: 8, 9: 16, 16: 16, 17: 32, 160: 256, 257: 320, 321: 512, 512: 512, 513: None}
    assert {rank: vllm_max_lora_rank(rank) for rank in expected} == expected


def test_plain_adapter_is_served_by_both(adapter):
    facts = facts_from_folder(adapter("plain"))
    assert facts.architecture == "LlamaForCausalLM" and facts.num_layers == 2  # from the base's config.json
    assert facts.max_rank == 8 and set(facts.scales.values()) == {2.0}
    assert vllm_problems(facts) == [] and lorax_problems(facts) == []
    summary = serving_summary(facts)
    assert summary["vllm"] == {"servable": True, "max_lora_rank": 8, "problems": []}
    assert summary["lorax"]["servable"]
    assert "--max-lora-rank 8" in summary_lines(summary)[0]


def test_modules_to_save_is_refused_with_the_model_output_fix(adapter):
    facts = facts_from_folder(adapter("mts", modules_to_save=["lm_head"]))
    assert facts.modules_to_save == ("lm_head",) and facts.saved_tensors  # the copy is in the file
    for problems in (vllm_problems(facts), lorax_problems(facts)):
        (problem,) = [p for p in problems if p.rule == "modules_to_save"]
        assert problem.blocking and "output.kind: model" in problem.fix
    assert not serving_summary(facts)["vllm"]["servable"]


def test_dora_is_refused(adapter):
    facts = facts_from_folder(adapter("dora", use_dora=True))
    assert facts.use_dora
    assert "dora" in rules(vllm_problems(facts)) and "dora" in rules(lorax_problems(facts))


def test_bias_is_refused(adapter):
    facts = facts_from_folder(adapter("lora_bias", lora_bias=True))
    assert facts.bias_modules  # lora_B.bias tensors found in the header
    assert "bias" in rules(vllm_problems(facts)) and "bias" in rules(lorax_problems(facts))
    config_bias = adapter_facts(
        {"r": 8, "lora_alpha": 8, "bias": "all"}, {"model.layers.0.self_attn.q_proj": 8}
    )
    assert "bias" in rules(vllm_problems(config_bias))


def test_rank_pattern_that_changes_the_scale_is_refused(adapter):
    """Both engines apply lora_alpha/r from the top of adapter_config.json to every module."""
    facts = facts_from_folder(adapter("pattern", rank_pattern={"q_proj": 4}))
    q = "model.layers.0.self_attn.q_proj"
    assert facts.ranks[q] == 4 and facts.scales[q] == 4.0 and facts.global_scale == 2.0
    assert "scale" in rules(vllm_problems(facts)) and "scale" in rules(lorax_problems(facts))


def test_scale_one_adapter_with_mixed_ranks_passes_vllm():
    """loracook's adapter outputs: lora_alpha = r in every module (rank_pattern and alpha_pattern agree)."""
    config = {"r": 16, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 4}}
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 16}
    facts = adapter_facts(config, ranks, architecture="LlamaForCausalLM", num_layers=1)
    assert set(facts.scales.values()) == {1.0}
    assert vllm_problems(facts) == []
    assert lorax_problems(facts) == []  # one rank per module type across the layers


def test_rank_above_the_default_needs_the_flag_and_above_the_limit_needs_svd(adapter):
    facts = facts_from_folder(adapter("r40", r=40, lora_alpha=40))
    (note,) = vllm_problems(facts)
    assert note.rule == "rank" and not note.blocking and "--max-lora-rank 64" in note.fix
    cat = facts_from_folder(adapter("r40", r=40, lora_alpha=40), method="cat")
    (problem,) = vllm_problems(cat, max_lora_rank=32)
    assert problem.blocking
    assert (
        "--max-lora-rank 64" in problem.fix
        and "use method svd with rank: 32 for a cat of rank 40" in problem.fix
    )


def test_cat_of_rank_above_512_is_refused_with_the_svd_fix(adapter):
    """The issue's acceptance case, on a real PEFT adapter of rank 520 (q_proj only, tiny)."""
    facts = facts_from_folder(adapter("r520", r=520, lora_alpha=520, target_modules=["q_proj"]), method="cat")
    (problem,) = check(facts, "vllm")
    assert problem.blocking and problem.rule == "rank"
    assert "512" in problem.message and problem.fix == "use method svd with rank: 512 for a cat of rank 520"
    assert "vllm: rank 520" in problem.one_line()
    elementwise = adapter_facts(
        {"r": 600, "lora_alpha": 600}, {"model.layers.0.mlp.up_proj": 600}, method="ties"
    )
    assert vllm_problems(elementwise)[0].fix.startswith("set merge.rank: 512")
    unknown = adapter_facts({"r": 600, "lora_alpha": 600}, {"model.layers.0.mlp.up_proj": 600})
    assert "merge: {method: svd, rank: 512}" in vllm_problems(unknown)[0].fix


def test_lorax_drops_module_types_missing_in_some_layers(adapter):
    facts = facts_from_folder(adapter("layer0", layers_to_transform=[0]))
    assert vllm_problems(facts) == []
    layers = [p for p in lorax_problems(facts) if p.rule == "layers"]
    assert {p.message.split()[0] for p in layers} == {"q_proj", "v_proj"} and all(p.blocking for p in layers)


def test_lorax_ignores_embedding_loras_and_vllm_serves_them(adapter):
    facts = facts_from_folder(adapter("embed", target_modules=["embed_tokens", "q_proj"]))
    assert facts.embedding_modules == {"model.embed_tokens"}
    assert vllm_problems(facts) == []
    assert "embedding" in rules(lorax_problems(facts))


def test_lorax_rank_differing_across_layers(adapter):
    facts = facts_from_folder(
        adapter(
            "mixed",
            r=8,
            lora_alpha=8,
            rank_pattern={"layers.1.self_attn.q_proj": 4},
            alpha_pattern={"layers.1.self_attn.q_proj": 4},
        )
    )
    assert vllm_problems(facts) == []  # scale 1 everywhere
    assert "rank" in rules(lorax_problems(facts))


def test_unsupported_targets_and_architectures(tmp_path):
    facts = adapter_facts(
        {"r": 8, "lora_alpha": 8},
        {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.input_layernorm": 8},
        architecture="LlamaForCausalLM",
    )
    (vllm,) = vllm_problems(facts)
    assert vllm.rule == "target" and "input_layernorm" in vllm.message
    assert "target" in rules(lorax_problems(facts))
    gpt2 = make_gpt2(tmp_path / "gpt2", tokenizer=False)
    ad = make_lora(gpt2, tmp_path / "gpt2-lora", seed=3, r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    facts = facts_from_folder(ad)
    assert facts.architecture == "GPT2LMHeadModel"
    assert rules(vllm_problems(facts)) == {"architecture"}  # vLLM's GPT-2 has no LoRA support
    assert lorax_problems(facts) == []  # LoRAX lists c_attn for GPT2


def test_unknown_architecture_skips_the_target_rule(adapter):
    facts = facts_from_folder(adapter("plain"), base_config={"architectures": ["SomethingNew"]})
    assert vllm_problems(facts) == [] and lorax_problems(facts) == []


def test_check_names_engines_and_orders_blocking_first(adapter):
    facts = facts_from_folder(adapter("mts_r40", modules_to_save=["lm_head"], r=40, lora_alpha=40))
    problems = check(facts, ["vllm", "lorax"])
    assert [p.blocking for p in problems] == sorted((p.blocking for p in problems), reverse=True)
    assert {p.engine for p in problems} == {"vllm", "lorax"}
    with pytest.raises(ValueError, match="unknown serving engine"):
        check(facts, "tgi")


def test_facts_from_a_bin_adapter_use_the_config(adapter, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    config = json.loads((adapter("plain") / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config))
    facts = facts_from_folder(folder)
    assert facts.ranks == {} and facts.max_rank == 8
