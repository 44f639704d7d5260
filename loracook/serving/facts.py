"""What the serving rules look at: :class:`AdapterFacts`, built from a plan's adapter_config and ranks
(:func:`adapter_facts`, before anything is written) or from an adapter on disk (:func:`facts_from_folder`:
config + safetensors header, no torch), with PEFT's effective scale per module (:func:`module_scale`)."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracook.safe_regex import peft_pattern_value


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


def module_scale(config: Mapping[str, Any], module: str, rank: int | None = None) -> float:
    """PEFT's effective scale of one module: alpha/r (alpha/√r with use_rslora), with rank_pattern and
    alpha_pattern applied; ``rank`` (the factors' rank) stands in when the config has no r."""
    r = int(config.get("r") or 0)
    module_r = peft_pattern_value(config.get("rank_pattern") or {}, module, None) or r or rank or 1
    alpha = (
        peft_pattern_value(config.get("alpha_pattern") or {}, module, None)
        or config.get("lora_alpha")
        or r
        or 1
    )
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
