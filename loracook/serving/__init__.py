"""Can vLLM or LoRAX serve this adapter? Pure rules, checked before any work (`output.serve`) and reported
in the model card and `loracook inspect`.

Both engines load a plain PEFT folder, but each reads only part of what PEFT can save, and they fail in two
ways: vLLM refuses the adapter at load time (modules_to_save, DoRA, a bias, an unknown target, a rank above
``--max-lora-rank``); LoRAX loads it and logs "unused adapter weights", silently serving a different model.
Both compute one scale, ``lora_alpha / r`` from the top of adapter_config.json, for every module, so
``rank_pattern``/``alpha_pattern`` that change the scale are served wrongly by both. docs/serving.md lists
each rule with the source line it comes from.

The rules look at an :class:`AdapterFacts`, which the planner can build from a plan (before anything is
written) and :func:`facts_from_folder` builds from an adapter on disk (config + safetensors header, no torch).
Each broken rule is a :class:`Problem` with a fix that names what to change in the recipe.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ENGINES",
    "LORAX_TARGETS",
    "VLLM_DEFAULT_MAX_LORA_RANK",
    "VLLM_MAX_LORA_RANKS",
    "VLLM_TARGETS",
    "AdapterFacts",
    "Problem",
    "adapter_facts",
    "check",
    "facts_from_folder",
    "lorax_problems",
    "module_scale",
    "serving_summary",
    "summary_lines",
    "vllm_max_lora_rank",
    "vllm_problems",
]

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


@dataclass(frozen=True)
class AdapterFacts:
    """What the serving rules look at. ``ranks`` and ``scales`` are per module (``model.layers.0.mlp.up_proj``),
    ``scales`` being PEFT's effective scale (alpha/r, or alpha/√r with rsLoRA, after rank/alpha patterns)."""

    r: int
    lora_alpha: float
    ranks: Mapping[str, int]
    scales: Mapping[str, float]
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    saved_tensors: tuple[str, ...] = ()  # full tensors in the file that are not LoRA factors
    embedding_modules: frozenset[str] = frozenset()  # modules with lora_embedding_A/B
    bias_modules: frozenset[str] = frozenset()  # modules with a lora_B bias (lora_bias=True)
    architecture: str | None = None
    num_layers: int | None = None
    method: str | None = None  # the merge method that produces the adapter, for the fix texts
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max([int(self.r), *self.ranks.values()]) if self.ranks or self.r else 0

    @property
    def global_scale(self) -> float:
        """The one scale vLLM and LoRAX apply to every module: from the top-level r and lora_alpha."""
        if not self.r:
            return 0.0
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


# ------------------------------------------------------------------------------------------------ facts


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any | None:
    """PEFT's rank_pattern/alpha_pattern lookup: keys are regexes matched as ``(.*\\.)?(key)$``, first wins."""
    for key, value in patterns.items():
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def module_scale(config: Mapping[str, Any], module: str, rank: int | None = None) -> float:
    """PEFT's effective scale of one module: alpha/r (alpha/√r with use_rslora), with rank_pattern and
    alpha_pattern applied; ``rank`` (the factors' rank) stands in when the config has no r."""
    r = int(config.get("r") or 0)
    module_r = _pattern_value(config.get("rank_pattern") or {}, module) or r or rank or 1
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module) or config.get("lora_alpha") or r or 1
    return float(alpha) / (math.sqrt(module_r) if config.get("use_rslora") else float(module_r))


def adapter_facts(
    config: Mapping[str, Any],
    ranks: Mapping[str, int],
    *,
    architecture: str | None = None,
    num_layers: int | None = None,
    embedding_modules: Iterable[str] = (),
    bias_modules: Iterable[str] = (),
    saved_tensors: Iterable[str] = (),
    method: str | None = None,
) -> AdapterFacts:
    """Facts from an adapter_config dict and the rank of each LoRA module (the planner knows both before it
    writes anything; :func:`facts_from_folder` reads them from disk). Per-module scales follow PEFT."""
    r = int(config.get("r") or 0)
    alpha = float(config.get("lora_alpha") or r or 1)
    rslora = bool(config.get("use_rslora"))
    scales = {module: module_scale(config, module, rank) for module, rank in ranks.items()}
    to_save = config.get("modules_to_save") or ()
    return AdapterFacts(
        r=r,
        lora_alpha=alpha,
        ranks=dict(ranks),
        scales=scales,
        use_rslora=rslora,
        use_dora=bool(config.get("use_dora")),
        bias=str(config.get("bias") or "none"),
        modules_to_save=tuple([to_save] if isinstance(to_save, str) else to_save),
        saved_tensors=tuple(saved_tensors),
        embedding_modules=frozenset(embedding_modules),
        bias_modules=frozenset(bias_modules),
        architecture=architecture,
        num_layers=num_layers,
        method=method,
    )


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor names and shapes from a safetensors header (the first 8 + n bytes), without torch."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _module_of(name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    name = name.removeprefix("base_model.model.")
    for marker in (
        ".lora_A.",
        ".lora_B.",
        ".lora_embedding_A",
        ".lora_embedding_B",
        ".lora_magnitude_vector",
    ):
        if marker in name:
            return name.split(marker)[0]
    return name.rsplit(".", 1)[0]


def facts_from_folder(
    folder: str | Path, *, base_config: Mapping[str, Any] | None = None, method: str | None = None
) -> AdapterFacts:
    """Facts of a PEFT adapter on disk: adapter_config.json and the safetensors header (shapes only).

    The architecture and layer count come from ``base_config`` (the base's config.json) when given, else
    from the base folder named by base_model_name_or_path when it is a local folder; the target rule is
    skipped for an unknown architecture. A ``.bin`` adapter gives ranks from the config only.
    """
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    ranks: dict[str, int] = {}
    embeddings: set[str] = set()
    biases: set[str] = set()
    saved: list[str] = []
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        for name, info in _safetensors_header(weights).items():
            module = _module_of(name)
            shape = info.get("shape") or []
            if ".lora_A." in name:
                ranks[module] = int(shape[0])
            elif ".lora_embedding_A" in name:
                ranks[module] = int(shape[0])
                embeddings.add(module)
            elif ".lora_B." in name and name.endswith(".bias"):
                biases.add(module)
            elif ".lora_B." in name or ".lora_embedding_B" in name or "lora_magnitude_vector" in name:
                continue
            elif ".base_layer." in name:
                continue  # PEFT's copy of a base embedding (save_embedding_layers): both engines skip it
            else:
                saved.append(name)
    if base_config is None:
        base_config = _local_base_config(config.get("base_model_name_or_path"), folder)
    arch, layers = _arch_and_layers(base_config)
    return adapter_facts(
        config,
        ranks,
        architecture=arch,
        num_layers=layers,
        embedding_modules=embeddings,
        bias_modules=biases,
        saved_tensors=saved,
        method=method,
    )


def _local_base_config(base: str | None, folder: Path) -> Mapping[str, Any] | None:
    if not base:
        return None
    path = Path(base).expanduser()
    path = path if path.is_absolute() else folder / path
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _arch_and_layers(config: Mapping[str, Any] | None) -> tuple[str | None, int | None]:
    if not config:
        return None, None
    arch = (config.get("architectures") or [None])[0]
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    return arch, int(layers) if layers else None


# ------------------------------------------------------------------------------------------------ rules


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


def check(
    facts: AdapterFacts, engines: str | Sequence[str], *, max_lora_rank: int | None = None
) -> list[Problem]:
    """The problems for each engine named (``output.serve``), blocking ones first."""
    names = [engines] if isinstance(engines, str) else list(engines)
    out: list[Problem] = []
    for name in names:
        if name == "vllm":
            out += vllm_problems(facts, max_lora_rank=max_lora_rank)
        elif name == "lorax":
            out += lorax_problems(facts)
        else:
            raise ValueError(f"unknown serving engine {name!r}; expected one of {', '.join(ENGINES)}")
    return sorted(out, key=lambda p: not p.blocking)


def serving_summary(facts: AdapterFacts) -> dict[str, Any]:
    """For the model card and `loracook inspect`: per engine, whether it serves the adapter and why not.

    ``{"max_rank": 24, "vllm": {"servable": True, "max_lora_rank": 32, "problems": [...]}, "lorax": {...}}``
    """
    vllm = vllm_problems(facts)
    lorax = lorax_problems(facts)
    return {
        "max_rank": facts.max_rank,
        "vllm": {
            "servable": not any(p.blocking for p in vllm),
            "max_lora_rank": vllm_max_lora_rank(facts.max_rank),
            "problems": [p.one_line() for p in vllm],
        },
        "lorax": {
            "servable": not any(p.blocking for p in lorax),
            "problems": [p.one_line() for p in lorax],
        },
    }


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """Markdown bullet lines for a model card's "Serving" section."""
    vllm, lorax = summary["vllm"], summary["lorax"]
    lines = []
    if vllm["servable"]:
        lines.append(
            f"- vLLM: yes, with `--enable-lora --max-lora-rank {vllm['max_lora_rank']}`"
            f" (largest module rank {summary['max_rank']})"
        )
    else:
        lines.append("- vLLM: no")
    lines += [f"  - {p}" for p in vllm["problems"]]
    lines.append("- LoRAX: yes" if lorax["servable"] else "- LoRAX: no")
    lines += [f"  - {p}" for p in lorax["problems"]]
    return lines
