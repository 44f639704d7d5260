"""The rules of vLLM and LoRAX: what each engine reads of a PEFT adapter, each broken rule a :class:`Problem`
with a fix in recipe terms. docs/serving.md lists each rule with the source line it comes from."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from loracook.serving.facts import AdapterFacts, _module_of

ENGINES = ("vllm", "lorax")

# vllm/config/lora.py: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``, default 16.
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16

_LLAMA_LIKE = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_PHI3 = frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"})

# vLLM: every linear layer of a model that implements SupportsLoRA (vllm/lora/utils.py,
# get_supported_lora_modules), plus its `embedding_modules` (embed_tokens, lm_head). HF module suffixes of the
# architectures checked here; None: the architecture has no LoRA support in vLLM.
VLLM_TARGETS: dict[str, frozenset[str] | None] = {
    "LlamaForCausalLM": _LLAMA_LIKE | {"embed_tokens", "lm_head"},
    "MistralForCausalLM": _LLAMA_LIKE | {"embed_tokens", "lm_head"},
    "Qwen2ForCausalLM": _LLAMA_LIKE | {"embed_tokens", "lm_head"},
    "Qwen3ForCausalLM": _LLAMA_LIKE | {"embed_tokens", "lm_head"},
    "GemmaForCausalLM": _LLAMA_LIKE | {"embed_tokens"},
    "Gemma2ForCausalLM": _LLAMA_LIKE | {"embed_tokens"},
    "Phi3ForCausalLM": _PHI3 | {"embed_tokens", "lm_head"},
    "GPT2LMHeadModel": None,  # class GPT2LMHeadModel(nn.Module, SupportsPP): no SupportsLoRA
}

# LoRAX: docs/models/adapters/lora.md, "Here is a list of supported target modules for each architecture";
# other targets are ignored with a warning.
LORAX_TARGETS: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _LLAMA_LIKE | {"lm_head"},
    "MistralForCausalLM": _LLAMA_LIKE | {"lm_head"},
    "MixtralForCausalLM": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"}),
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Phi3ForCausalLM": _PHI3 | {"lm_head"},
    "PhiForCausalLM": frozenset({"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head"}),
    "Qwen2ForCausalLM": _LLAMA_LIKE | {"lm_head"},
    "QWenLMHeadModel": frozenset({"c_attn", "c_proj", "w1", "w2", "lm_head"}),
    "CohereForCausalLM": _LLAMA_LIKE | {"lm_head"},
    "DbrxForCausalLM": frozenset({"Wqkv", "out_proj", "lm_head"}),
    "GPT2LMHeadModel": frozenset({"c_attn", "c_proj", "c_fc"}),
    "BloomForCausalLM": frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"}),
}

# LoRAX's punica kernels (server/lorax_server/utils/sgmv.py): custom SGMV shrink for ranks 16..128, BGMV
# decode up to 128; other ranks take slower paths, and ranks are zero-padded to a multiple of 16.
LORAX_FAST_RANKS = (16, 128)

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Problem:
    """One rule an adapter breaks for one engine. ``blocking``: the engine refuses the adapter or serves
    something else; otherwise it serves it correctly but with a caveat (speed, a server flag)."""

    engine: str
    rule: str  # modules_to_save | dora | bias | target | embedding | rank | scale | layers | architecture
    message: str
    fix: str
    blocking: bool = True

    def one_line(self) -> str:
        return f"{self.engine}: {self.message}; {self.fix}"


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that fits ``rank``; None above 512."""
    return next((choice for choice in VLLM_MAX_LORA_RANKS if choice >= rank), None)


def _suffix(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _rank_fix(facts: AdapterFacts, limit: int) -> str:
    """How to bring the adapter's rank to ``limit`` or less, in recipe terms."""
    rank = facts.max_rank
    if facts.method in ("cat", "linear", "task_arithmetic"):
        return f"use method svd with rank: {limit} for a {facts.method} of rank {rank}"
    if facts.method is not None:
        return f"set merge.rank: {limit} (the {facts.method} output has rank {rank})"
    return (
        f"recompress it to rank {limit}: a recipe with this adapter as its only source and"
        f" merge: {{method: svd, rank: {limit}}}"
    )


def _common_problems(engine: str, facts: AdapterFacts, *, silently: bool) -> list[Problem]:
    """Rules both engines share. ``silently``: the engine ignores the weights instead of refusing them."""
    out: list[Problem] = []
    effect = "ignores them and serves a different model" if silently else "refuses the adapter"
    if facts.modules_to_save or facts.saved_tensors:
        which = ", ".join(facts.modules_to_save or sorted({_module_of(n) for n in facts.saved_tensors})[:4])
        out.append(
            Problem(
                engine,
                "modules_to_save",
                f"the adapter saves whole modules ({which}); {engine} {effect}",
                "merge modules_to_save into a model output instead (output.kind: model), or leave those"
                " sources out (extract with embeddings: lora and vectors: skip)",
            )
        )
    if facts.use_dora:
        out.append(
            Problem(
                engine,
                "dora",
                f"DoRA (use_dora) is not served by {engine}; it {effect}",
                "merge the DoRA source into a model output instead (output.kind: model)",
            )
        )
    if facts.bias != "none" or facts.bias_modules:
        what = f"bias: {facts.bias}" if facts.bias != "none" else "LoRA biases (lora_bias)"
        out.append(
            Problem(
                engine,
                "bias",
                f"the adapter trains biases ({what}); {engine} {effect}",
                "merge it into a model output instead (output.kind: model)",
            )
        )
    odd = sorted(m for m, s in facts.scales.items() if not math.isclose(s, facts.global_scale, rel_tol=1e-6))
    if odd:
        out.append(
            Problem(
                engine,
                "scale",
                f"{len(odd)} module(s) (e.g. {odd[0]}) have a scale other than lora_alpha/r ="
                f" {facts.global_scale:g}; {engine} applies that one scale to every module and ignores"
                " rank_pattern/alpha_pattern",
                "write it as a loracook adapter output (scale 1 in every module: lora_alpha = r), e.g. a"
                " recipe with this adapter as its only source and merge.method: linear",
            )
        )
    return out


def vllm_problems(facts: AdapterFacts, *, max_lora_rank: int | None = None) -> list[Problem]:
    """vLLM's rules (vllm/lora/peft_helper.py ``validate_legal``, vllm/config/lora.py, vllm/lora/utils.py).

    ``max_lora_rank``: the server's ``--max-lora-rank`` when the recipe states it; without it the needed
    value is reported (non-blocking when above vLLM's default of 16)."""
    out = _common_problems("vllm", facts, silently=False)
    targets = VLLM_TARGETS.get(facts.architecture or "", ...)
    if targets is None:
        out.append(
            Problem(
                "vllm",
                "architecture",
                f"vLLM has no LoRA support for {facts.architecture}",
                "merge into a model output instead (output.kind: model) and serve the merged model",
            )
        )
    elif targets is not ...:
        bad = sorted({_suffix(m) for m in facts.ranks} - targets)
        if bad:
            out.append(
                Problem(
                    "vllm",
                    "target",
                    f"target modules {', '.join(bad)} are not LoRA layers of {facts.architecture} in vLLM",
                    f"keep targets among {', '.join(sorted(targets))} (sources.X.extract.include), or merge into"
                    " a model output",
                )
            )
    rank = facts.max_rank
    needed = vllm_max_lora_rank(rank)
    if needed is None:
        out.append(
            Problem(
                "vllm",
                "rank",
                f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})",
                _rank_fix(facts, VLLM_MAX_LORA_RANKS[-1]),
            )
        )
    elif max_lora_rank is not None and rank > max_lora_rank:
        out.append(
            Problem(
                "vllm",
                "rank",
                f"rank {rank} is above --max-lora-rank {max_lora_rank}",
                f"start vLLM with --max-lora-rank {needed}, or {_rank_fix(facts, max_lora_rank)}",
            )
        )
    elif max_lora_rank is None and needed > VLLM_DEFAULT_MAX_LORA_RANK:
        out.append(
            Problem(
                "vllm",
                "rank",
                f"rank {rank} is above vLLM's default --max-lora-rank ({VLLM_DEFAULT_MAX_LORA_RANK})",
                f"start vLLM with --max-lora-rank {needed}",
                blocking=False,
            )
        )
    return out


def lorax_problems(facts: AdapterFacts) -> list[Problem]:
    """LoRAX's rules (server/lorax_server/adapters/lora.py and utils/sgmv.py, docs/models/adapters/lora.md).

    LoRAX reads only ``lora_A``/``lora_B`` weights, per layer type across all layers: a type missing in some
    layer is dropped whole, and the ranks of one type are stacked, so they must agree."""
    out = _common_problems("lorax", facts, silently=True)
    if facts.embedding_modules:
        out.append(
            Problem(
                "lorax",
                "embedding",
                f"embedding LoRAs ({', '.join(sorted(facts.embedding_modules))}) are ignored by LoRAX",
                "extract with embeddings: skip, or merge into a model output (output.kind: model)",
            )
        )
    targets = LORAX_TARGETS.get(facts.architecture or "")
    linear = {m: r for m, r in facts.ranks.items() if m not in facts.embedding_modules}
    if targets is not None:
        bad = sorted({_suffix(m) for m in linear} - targets)
        if bad:
            out.append(
                Problem(
                    "lorax",
                    "target",
                    f"LoRAX ignores target modules {', '.join(bad)} on {facts.architecture}",
                    f"keep targets among {', '.join(sorted(targets))}, or merge into a model output",
                )
            )
    by_type: dict[str, dict[int, int]] = {}
    for module, rank in linear.items():
        match = _LAYER.search(f".{module}.")
        if match:
            by_type.setdefault(_suffix(module), {})[int(match.group(1))] = rank
    for kind, layers in sorted(by_type.items()):
        if facts.num_layers and len(layers) < facts.num_layers:
            out.append(
                Problem(
                    "lorax",
                    "layers",
                    f"{kind} has LoRA weights in {len(layers)} of {facts.num_layers} layers; LoRAX loads a"
                    " module type only when every layer has it, and drops it otherwise",
                    "target every layer (no layers_to_transform), or merge into a model output",
                )
            )
        if len(set(layers.values())) > 1:
            out.append(
                Problem(
                    "lorax",
                    "rank",
                    f"{kind} has different ranks across layers ({min(layers.values())}..{max(layers.values())});"
                    " LoRAX stacks one module type's layers and needs one rank",
                    f"use method svd with rank: {max(layers.values())} (one rank for every module)",
                )
            )
    low, high = LORAX_FAST_RANKS
    if facts.max_rank > high:
        out.append(
            Problem(
                "lorax",
                "rank",
                f"rank {facts.max_rank} is above {high}, where LoRAX's fast SGMV/BGMV kernels stop",
                _rank_fix(facts, high),
                blocking=False,
            )
        )
    return out
