"""Session fixtures: a zoo of tiny real models and real PEFT adapters, built once per test session.

    def test_something(zoo, tmp_path, capfd):
        base, adapter = zoo.base_of("a"), zoo.adapters["a"]
        ...

Model names: llama (untied, 2 layers, hidden 32), llama_sharded (same weights, several shards + index),
llama_tied (tied embeddings, like SmolLM2), llama_bias (biased projections), gpt2 (Conv1D, tied),
llama_wide (hidden 48: another base), llama_deep (3 layers: has modules the 2-layer base lacks), llama_5 (5 layers),
llama_bf16 (the weights of llama, stored in bfloat16).
Adapter names: see ADAPTERS below.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch  # torch does not read the HF variables; huggingface_hub (imported lazily) does

# Test modules import helpers as `from fixtures import ...`, whether or not tests/ is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import LLAMA_LINEAR, OFFLINE_ENV, make_gpt2, make_llama, make_lora, reshard  # noqa: E402

# Before anything imports huggingface_hub / transformers (fixtures.py imports them lazily): no network, ever.
os.environ.update(OFFLINE_ENV)

# name -> (builder, kwargs); built in this order, so later entries may depend on earlier ones.
MODELS: dict[str, dict[str, Any]] = {
    "llama": dict(seed=0),
    "llama_tied": dict(seed=4, tie_word_embeddings=True),
    "llama_bias": dict(seed=1, attention_bias=True, mlp_bias=True),
    "llama_wide": dict(seed=3, hidden_size=48, intermediate_size=96),
    "llama_deep": dict(seed=5, num_hidden_layers=3),
    "llama_5": dict(seed=6, num_hidden_layers=5),
    # same weights as "llama" (seed 0), stored in bfloat16
    "llama_bf16": dict(seed=0, dtype=torch.bfloat16),
}

# name -> (base model name, LoraConfig kwargs + seed)
ADAPTERS: dict[str, tuple[str, dict[str, Any]]] = {
    # a) plain LoRA on every linear projection
    "a": ("llama", dict(seed=11, r=8, lora_alpha=16, target_modules=LLAMA_LINEAR)),
    # b) GPT-2 Conv1D layers: factors are for the transposed weight
    "gpt2": (
        "gpt2",
        dict(seed=12, r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    # c) rsLoRA with per-module rank and alpha (regex keys, matched as (.*\.)?(key)$)
    "rslora": (
        "llama",
        dict(
            seed=13,
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=LLAMA_LINEAR,
            rank_pattern={r"layers\.[1]\.self_attn\.v_proj": 4, "o_proj": 2},
            alpha_pattern={"down_proj": 4, r"layers\.0\.self_attn\.q_proj": 32},
        ),
    ),
    # d) DoRA with magnitudes that differ from the weight norms
    "dora": ("llama", dict(seed=14, r=8, lora_alpha=16, use_dora=True, target_modules=LLAMA_LINEAR)),
    # e) embedding LoRA + a fully replaced lm_head (untied base, so the two do not alias)
    "embed": (
        "llama",
        dict(
            seed=15,
            r=8,
            lora_alpha=16,
            target_modules=["embed_tokens", "q_proj", "v_proj"],
            modules_to_save=["lm_head"],
        ),
    ),
    # f) lora_bias: lora_B has a bias that merges into the base layer's bias
    "bias": ("llama_bias", dict(seed=16, r=8, lora_alpha=16, lora_bias=True, target_modules=LLAMA_LINEAR)),
    # g) a second adapter on the same base, other rank/alpha/targets, for weighted sums
    "b": (
        "llama",
        dict(seed=17, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    ),
    # plain LoRA on a base with tied embeddings (the SmolLM2 layout)
    "tied": ("llama_tied", dict(seed=18, r=8, lora_alpha=16, target_modules=LLAMA_LINEAR)),
    # embedding LoRA on a tied base: the merged embedding is also the output head
    "tied_embed": ("llama_tied", dict(seed=22, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    # h) made for another base: every shape differs from "llama"
    "wide": ("llama_wide", dict(seed=19, r=8, lora_alpha=16, target_modules=LLAMA_LINEAR)),
    # targets model.layers.2.*, which the 2-layer "llama" lacks (same shapes otherwise)
    "deep": ("llama_deep", dict(seed=20, r=8, lora_alpha=16, target_modules=LLAMA_LINEAR)),
    # for per-layer weight lists with more layers than anchors
    "five": ("llama_5", dict(seed=21, r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"])),
}


@dataclass(frozen=True)
class Zoo:
    root: Path
    models: dict[str, Path]
    adapters: dict[str, Path]

    def base_of(self, adapter: str) -> Path:
        return self.models[ADAPTERS[adapter][0]]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    root = tmp_path_factory.mktemp("zoo")
    models: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT/transformers chatter about tiny configs
        for name, kwargs in MODELS.items():
            models[name] = make_llama(root / name, **kwargs)
        models["gpt2"] = make_gpt2(root / "gpt2", seed=2)
        models["llama_sharded"] = reshard(models["llama"], root / "llama_sharded", "20KB")
        adapters = {}
        for name, (base, spec) in ADAPTERS.items():
            adapters[name] = make_lora(models[base], root / f"adapter_{name}", **spec)
    return Zoo(root=root, models=models, adapters=adapters)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine can be 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
