"""The one door to PEFT LoRA adapters: adapter_config.json plus adapter_model.safetensors (or a weights-only
.bin), read and written.

Reading opens only the config and the tensor headers; tensors are read later by the executor through
TensorReader. Writing builds the config (:func:`adapter_config`) and names the tensors (:func:`factor_names`,
:func:`saved_name`) for every adapter loracook writes: merged adapters, extracted adapters, router adapters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracook.errors import BadInput, Unsupported
from loracook.io.tensors import TensorInfo, TensorReader, read_header
from loracook.safe_regex import RegexError, peft_pattern_value

PREFIX = "base_model.model."
# init_lora_weights values whose saved factors are a plain LoRA on the unchanged base.
_PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal"}
# Config keys of features that change what the saved tensors mean; refused by name when they are set.
_REFUSED = {
    "layer_replication": "layer replication",
    "megatron_config": "Megatron parallel layers",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "trainable_token_indices": "trainable tokens",
    "arrow_config": "Arrow routing",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ΔW = scale · B @ A (transposed when fan_in_fan_out; (B @ A)ᵀ for embeddings)."""

    module: str  # module name in the base model, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" | "embedding"
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool = False
    magnitude: TensorInfo | None = None  # DoRA magnitude vector
    bias: TensorInfo | None = None  # lora_bias: Δb = scale · lora_B.bias

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def delta_shape(self) -> tuple[int, int]:
        """Shape of ΔW as the base stores the weight."""
        out, inp = self.b.shape[0], self.a.shape[1]
        if self.kind == "embedding":
            return (inp, out)  # (num_embeddings, embedding_dim)
        return (inp, out) if self.fan_in_fan_out else (out, inp)


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter: its modules, the full tensors it replaces (modules_to_save), and its config."""

    path: Path
    file: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    full: dict[str, TensorInfo] = field(default_factory=dict)  # base tensor name -> replacement tensor
    base_layer_copies: frozenset[str] = frozenset()  # adapter tensor names of saved embedding base layers
    virtual: bool = False  # stands for an extraction not yet run (headers only, no file)

    @property
    def uses_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())


def adapter_weights_file(folder: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise BadInput(
        "no adapter_model.safetensors or adapter_model.bin in the adapter folder",
        file=folder,
        fix="point the source at a PEFT adapter folder (saved with save_pretrained)",
    )


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not folder.exists():
        raise BadInput("adapter folder not found", file=folder, fix="check the path in the recipe")
    if not folder.is_dir():
        raise BadInput("an adapter source must be a folder holding adapter_config.json", file=folder)
    if not path.is_file():
        raise BadInput(
            "no adapter_config.json in the adapter folder", file=folder, fix="is this a PEFT adapter?"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"adapter_config.json is not valid JSON ({exc})", file=path) from None
    if not isinstance(config, dict):
        raise BadInput("adapter_config.json must hold a JSON object", file=path)
    return config


def open_adapter(folder: str | Path) -> Adapter:
    """Read an adapter's config and tensor headers (no tensor data).

    >>> adapter = open_adapter("tests/data/adapter")  # doctest: +SKIP
    >>> adapter.modules["model.layers.0.self_attn.q_proj"].scale  # doctest: +SKIP
    2.0
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    config_file = folder / "adapter_config.json"
    _check_config(config, config_file)
    file = adapter_weights_file(folder)
    if file.suffix == ".safetensors":
        infos, _ = read_header(file)
    else:
        infos = TensorReader.open(file).infos
    return _assemble(folder, file, config, config_file, infos)


def _check_config(config: dict[str, Any], file: Path) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise Unsupported(f"peft_type {peft_type} is not supported; loracook reads LoRA adapters", file=file)
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise Unsupported(
            f"init_lora_weights={init!r} adapters change the base weights and cannot be merged into the original base",
            file=file,
            fix="save the adapter with path_initial_model_for_weight_conversion to convert it to a plain LoRA",
        )
    if config.get("loftq_config"):
        raise Unsupported(
            "LoftQ adapters are not supported (they are made for a quantized residual base)", file=file
        )
    for key, what in _REFUSED.items():
        if config.get(key):
            raise Unsupported(f"{what} ({key}) is not supported", file=file)
    for key in ("r", "lora_alpha"):
        _positive(config.get(key, 8), key, file)
    for key, whole in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise BadInput(f"adapter_config.json: {key} must be an object of regex -> number", file=file)
        for pattern, value in patterns.items():
            _positive(value, f"{key}[{pattern!r}]", file, whole=whole)


def _positive(value: Any, what: str, file: Path, *, whole: bool = False) -> None:
    """A rank (a positive integer) or an alpha (a positive finite number), never a string, bool or NaN."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0 or (whole and value != int(value)):
        kind = "a positive integer" if whole else "a positive finite number"
        raise BadInput(
            f"adapter_config.json: {what} must be {kind}, got {value!r}",
            file=file,
            fix="fix adapter_config.json (was it edited by hand?)",
        )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any, file: Path) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: regex keys matched as (.*\\.)?(key)$, first match wins (in a
    linear-time regex engine: a key is untrusted input)."""
    try:
        return peft_pattern_value(patterns, module, default)
    except RegexError as exc:
        raise BadInput(
            f"adapter_config.json: {exc}", file=file, fix="fix or remove that pattern key"
        ) from None


def _assemble(
    folder: Path, file: Path, config: dict[str, Any], config_file: Path, infos: dict[str, TensorInfo]
) -> Adapter:
    parts: dict[str, dict[str, TensorInfo]] = {}
    full: dict[str, TensorInfo] = {}
    copies: set[str] = set()
    suffixes = (
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora_B.bias",
        ".lora_embedding_A",
        ".lora_embedding_B",
        ".lora_magnitude_vector",
        ".lora_magnitude_vector.weight",
    )
    for key, info in infos.items():
        name = key.removeprefix(PREFIX)
        for suffix in suffixes:
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[suffix] = info
                break
        else:
            if ".lora_" in name:
                raise Unsupported(
                    f"adapter tensor {key!r} is of a LoRA variant loracook does not know", file=file
                )
            # modules_to_save, trained biases, or an embedding saved with save_embedding_layers: full tensors
            full[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = info
            if ".base_layer." in name:
                copies.add(key)
    use_rslora = bool(config.get("use_rslora", False))
    r_default = config.get("r", 8)
    alpha_default = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for module, found in sorted(parts.items()):
        embedding = ".lora_embedding_A" in found or ".lora_embedding_B" in found
        a = found.get(".lora_embedding_A" if embedding else ".lora_A.weight")
        b = found.get(".lora_embedding_B" if embedding else ".lora_B.weight")
        if a is None or b is None:
            raise BadInput(f"module {module!r} has only one of its LoRA factors", file=file)
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise Unsupported(
                f"module {module!r} has {len(a.shape)}-D LoRA factors (convolutions are not supported)",
                file=file,
            )
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise BadInput(
                f"module {module!r}: lora_A has rank {rank} but lora_B has {b.shape[1]}", file=file
            )
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise BadInput(
                f"module {module!r}: LoRA factors are {a.dtype}/{b.dtype}, not floating point",
                file=file,
                fix="re-save the adapter with float factors",
            )
        config_rank = _pattern_value(rank_pattern, module, r_default, config_file)
        if config_rank != rank:
            raise BadInput(
                f"module {module!r}: the tensors have rank {rank} but adapter_config.json says {config_rank}",
                file=config_file,
            )
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default, config_file))
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        magnitude = found.get(".lora_magnitude_vector", found.get(".lora_magnitude_vector.weight"))
        if magnitude is not None and embedding:
            raise Unsupported(f"DoRA on the embedding module {module!r} is not supported", file=file)
        modules[module] = LoraModule(
            module=module,
            kind="embedding" if embedding else "linear",
            a=a,
            b=b,
            rank=rank,
            alpha=alpha,
            scale=scale,
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)) and not embedding,
            magnitude=magnitude,
            bias=found.get(".lora_B.bias"),
        )
    if not modules and not full:
        raise BadInput("the adapter holds no LoRA tensors", file=file)
    return Adapter(folder, file, config, modules, full, frozenset(copies))


# ------------------------------------------------------------------------------------------------- writing


def factor_names(module: str, embedding: bool = False) -> tuple[str, str]:
    """The adapter file's names of a module's A and B factors.

    >>> factor_names("model.layers.0.mlp.up_proj")
    ('base_model.model.model.layers.0.mlp.up_proj.lora_A.weight', 'base_model.model.model.layers.0.mlp.up_proj.lora_B.weight')
    """
    prefix = f"{PREFIX}{module}."
    if embedding:
        return prefix + "lora_embedding_A", prefix + "lora_embedding_B"
    return prefix + "lora_A.weight", prefix + "lora_B.weight"


def saved_name(tensor: str) -> str:
    """The adapter file's name of a tensor saved in full (modules_to_save)."""
    return PREFIX + tensor


def exact_pattern(module: str) -> str:
    """A rank_pattern key that PEFT's `(.*\\.)?(key)$` lookup matches for this module only."""
    return module.replace(".", r"\.")


def adapter_config(
    ranks: dict[str, int],
    *,
    target_modules: list[str] | None,
    modules_to_save: list[str] | None,
    base_model: str | None,
    fan_in_fan_out: bool = False,
    task_type: str = "CAUSAL_LM",
    default_rank: int = 8,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """adapter_config.json for factors written at scale 1: lora_alpha = r for every module (through the
    patterns), so that B @ A is the module's ΔW. ``r`` is the most common rank (the larger on a tie).

    >>> cfg = adapter_config({"a.q": 8, "a.k": 4}, target_modules=["q", "k"], modules_to_save=None,
    ...                      base_model=None)
    >>> cfg["r"], cfg["rank_pattern"], cfg["lora_alpha"]
    (8, {'a\\\\.k': 4}, 8)
    """
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k)) if counts else default_rank
    pattern = {exact_pattern(m): k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": target_modules,
        "modules_to_save": modules_to_save,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    config.update(extra or {})
    return config


def config_text(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2) + "\n"


def save_adapter(folder: Path, tensors: dict[str, Any], config: dict[str, Any]) -> None:
    """Write adapter_model.safetensors and adapter_config.json into ``folder`` (which must exist)."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(config_text(config), encoding="utf-8")


def read_factors(read, lora) -> tuple[Any, Any]:
    """A and s·B of a LoRA module (a :class:`LoraModule` or a plan term: anything with ``a``, ``b`` and
    ``scale``) in fp32; ``read`` reads a TensorInfo (``Readers.read``)."""
    import torch

    a = read(lora.a).to(torch.float32)
    b = read(lora.b).to(torch.float32) * lora.scale
    return a, b
