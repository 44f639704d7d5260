"""Read HF model folders: config, tensor headers (single or sharded safetensors, or weights-only .bin).

Also resolves where a model lives: a local folder, ``package:NAME`` (a model shipped inside a Python package),
a hub id (through huggingface_hub, which honours HF_HUB_OFFLINE), or a GGUF file that is dequantized once into
a cached HF folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracook.errors import BadInput
from loracook.io.tensors import TensorInfo, TensorReader, read_header

# Files copied from the base into a merged model folder (weights excluded).
COPY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to, or None (embeddings, final norm, lm_head)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Checkpoint:
    """A model folder's config and tensor headers; tensors are read through :meth:`reader`."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]  # name -> where it lives
    header_only: bool = False  # names, shapes and config only (a GGUF read without dequantizing): no reader

    @property
    def files(self) -> list[str]:
        return sorted({info.file for info in self.tensors.values()})

    @property
    def num_layers(self) -> int:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = self.config.get(key) or (self.config.get("text_config") or {}).get(key)
            if isinstance(value, int):
                return value
        indices = [i for i in (layer_index(n) for n in self.tensors) if i is not None]
        return max(indices) + 1 if indices else 0

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", True)) and "lm_head.weight" not in self.tensors

    def copy_files(self) -> list[Path]:
        if self.header_only:
            return []
        return [self.path / name for name in COPY_FILES if (self.path / name).is_file()]

    def reader(self, file: str) -> TensorReader:
        if self.header_only:
            raise RuntimeError(
                f"internal error: {self.path} was opened for its headers only (GGUF); dequantize it"
            )
        return (
            TensorReader(file, {n: i for n, i in self.tensors.items() if i.file == file})
            if file.endswith(".safetensors")
            else TensorReader.open(file)
        )


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read a model folder's config and the headers of its weight files.

    >>> ckpt = open_checkpoint("models/smollm2-135m")  # doctest: +SKIP
    >>> ckpt.tensors["model.embed_tokens.weight"].shape  # doctest: +SKIP
    (49152, 576)
    """
    folder = Path(path)
    if not folder.exists():
        raise BadInput("model folder not found", file=folder, fix="check the path in the recipe")
    if not folder.is_dir():
        raise BadInput("a model must be a folder (HF format, with config.json and weights)", file=folder)
    config_file = folder / "config.json"
    if not config_file.exists() and (folder / "adapter_config.json").is_file():
        raise BadInput(
            "this is a PEFT adapter folder, not a model",
            file=folder,
            fix="a model folder holds config.json and the full weights; adapters go under `sources:`",
        )
    config = read_config(config_file) if config_file.exists() else {}
    tensors: dict[str, TensorInfo] = {}
    files, index = _weight_files(folder)
    for file in files:
        if file.suffix == ".safetensors":
            infos, _ = read_header(file)
        else:
            infos = TensorReader.open(file).infos
        for name, info in infos.items():
            if name in tensors:
                raise BadInput(f"tensor {name!r} appears in two weight files", file=file)
            tensors[name] = info
    if index is not None:
        _check_index(index, tensors)
    checkpoint = Checkpoint(path=folder, config=config, tensors=tensors)
    _check_layer_count(checkpoint, config_file)
    return checkpoint


# ------------------------------------------------------------------------------------------- validation
# Files are checked here, once, at the door: past this point config values have the types transformers
# gives them and the index agrees with the shards, so no later code can crash on a hand-edited file.

_CONFIG_FIX = "restore the model's config.json (transformers' save_pretrained writes a valid one)"
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def read_config(config_file: Path) -> dict[str, Any]:
    """A model's config.json as a dict whose keys that loracook reads have the right types; else BadInput."""
    config = _read_json(config_file, "config.json")
    if not isinstance(config, dict):
        raise BadInput(
            f"config.json must be a JSON object, but it holds {_json_kind(config)}",
            file=config_file,
            fix=_CONFIG_FIX,
        )
    expected: dict[str, tuple[type, ...]] = {
        **{key: (int,) for key in _LAYER_KEYS},
        "architectures": (list,),
        "model_type": (str,),
        "text_config": (dict,),
        "tie_word_embeddings": (bool,),
        "num_nextn_predict_layers": (int,),
    }
    for key, types in expected.items():
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise BadInput(
                f"config.json: {key} must be {_type_words(types)}, got {value!r}"[:300],
                file=config_file,
                fix=_CONFIG_FIX,
            )
        if types == (int,) and value < 0:
            raise BadInput(
                f"config.json: {key} must not be negative, got {value}", file=config_file, fix=_CONFIG_FIX
            )
    architectures = config.get("architectures")
    if architectures is not None and not all(isinstance(a, str) for a in architectures):
        raise BadInput(
            "config.json: architectures must be a list of class names", file=config_file, fix=_CONFIG_FIX
        )
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        for key in _LAYER_KEYS:
            value = text_config.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise BadInput(
                    f"config.json: text_config.{key} must be a whole number, got {value!r}"[:300],
                    file=config_file,
                    fix=_CONFIG_FIX,
                )
    return config


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except IsADirectoryError:
        raise BadInput(f"{what} is a folder, not a file", file=path, fix=_CONFIG_FIX) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        raise BadInput(f"{what} is not valid JSON ({reason})", file=path, fix=f"restore {what}") from None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")


def _type_words(types: tuple[type, ...]) -> str:
    return {int: "a whole number", list: "a list", str: "a string", dict: "an object", bool: "true or false"}[
        types[0]
    ]


def _check_index(index: _Index, tensors: dict[str, TensorInfo]) -> None:
    """Every tensor the index lists is in the shard it names (a stale index would mix up weights)."""
    for name, shard in index.weight_map.items():
        info = tensors.get(name)
        if info is None or Path(info.file).name != shard:
            where = "in no shard" if info is None else f"in {Path(info.file).name}"
            raise BadInput(
                f"the index puts tensor {name!r} in {shard}, but it is {where}",
                file=index.path,
                fix="re-save the model (the index does not match its shards)",
            )


def _check_layer_count(checkpoint: Checkpoint, config_file: Path) -> None:
    """The config's layer count agrees with the layers the weights hold (per-layer weights depend on it).

    Checked for plain decoder configs only: the count at the top level, no sub-configs, not encoder-decoder.
    Extra layers are allowed where the config announces them (multi-token-prediction layers)."""
    config = checkpoint.config
    declared = next((config[k] for k in _LAYER_KEYS if isinstance(config.get(k), int)), None)
    nested = any(
        k.endswith("_config") and isinstance(v, dict) for k, v in config.items() if k != "quantization_config"
    )
    if declared is None or config.get("is_encoder_decoder") or nested:
        return
    indices = {i for i in (layer_index(n) for n in checkpoint.tensors) if i is not None}
    if not indices:
        return
    found = max(indices) + 1
    extra = config.get("num_nextn_predict_layers") or 0
    if not declared <= found <= declared + extra:
        raise BadInput(
            f"config.json says the model has {declared} layers, but its weights hold {found} "
            f"(layers 0-{found - 1})",
            file=config_file,
            fix="set num_hidden_layers to the number of layers in the weights, or use the matching config",
        )


@dataclass(frozen=True)
class _Index:
    path: Path
    weight_map: dict[str, str]


def _weight_files(folder: Path) -> tuple[list[Path], _Index | None]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = folder / index_name
        if index_file.exists():
            index = _read_index(index_file)
            files = sorted({folder / f for f in index.weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise BadInput(
                    f"shard {missing[0]} listed in the index is missing",
                    file=index_file,
                    fix="download the missing shard, or re-save the model",
                )
            return files, index
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name], None
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return loose, None
    raise BadInput(
        "no weights in the model folder (model.safetensors, a shard index, or pytorch_model.bin)", file=folder
    )


def _read_index(path: Path) -> _Index:
    """A shard index: ``weight_map`` maps tensor names to shard file names in the same folder (never a path
    that leaves it: an index is data, and must not make loracook read files elsewhere)."""
    data = _read_json(path, path.name)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    fix = "re-save the model, or delete the index if there is one weights file"
    if not isinstance(weight_map, dict) or not weight_map:
        got = "no weight_map" if weight_map is None else f"weight_map is {_json_kind(weight_map)}"
        raise BadInput(
            f"broken shard index: {got} (expected an object: tensor name -> shard file)", file=path, fix=fix
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise BadInput(
                f"broken shard index: tensor {name!r} maps to {shard!r}, not a file name in the model folder"[
                    :300
                ],
                file=path,
                fix=fix,
            )
    return _Index(path, weight_map)


# ------------------------------------------------------------------------------------------------- GGUF


def gguf_header_checkpoint(source: Path) -> Checkpoint:
    """A GGUF model's config, tensor names and shapes, read from the GGUF header only: nothing is dequantized
    and nothing is written (``validate`` and ``plan`` promise to read headers only).

    The names and shapes are those of the fp32 HF folder that :func:`loracook.io.resolve.gguf_to_folder` would
    write: transformers reads the config from the GGUF metadata (as ``from_pretrained(..., gguf_file=)`` does),
    the model is built on the meta device (shapes, no memory), and tied weights are dropped as
    ``save_pretrained`` drops them. The view has no tensor data: :meth:`Checkpoint.reader` refuses."""
    import torch

    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - a dependency
        raise BadInput(
            f"reading GGUF needs transformers ({exc})", fix="pip install transformers gguf"
        ) from None
    if not source.is_file():
        raise BadInput("GGUF file not found", file=source, fix="check base.path and base.gguf_file")
    try:
        config = _gguf_config(source, AutoConfig)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ImportError as exc:
        raise BadInput(f"reading GGUF needs the gguf package ({exc})", fix="pip install gguf") from None
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise BadInput(
            f"cannot read the GGUF header: {reason}",
            file=source,
            fix="check that the file is a complete GGUF model",
        ) from None
    tensors = {
        name: TensorInfo(str(source), name, torch.float32, shape, None)
        for name, shape in _saved_shapes(model).items()
    }
    config_dict = config.to_dict()
    config_dict["architectures"] = [type(model).__name__]
    config_dict.pop("quantization_config", None)
    return Checkpoint(path=source.parent, config=config_dict, tensors=tensors, header_only=True)


def _saved_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Name -> shape of what ``save_pretrained`` writes: the state dict without tied duplicates (the first
    name of a shared tensor is kept, as transformers keeps the input embedding and drops lm_head)."""
    seen: set[int] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        shapes[name] = tuple(tensor.shape)
    return shapes


def _gguf_config(source: Path, auto_config: Any) -> Any:
    """The config transformers derives from the GGUF metadata, parsing the file once (``AutoConfig`` with
    ``gguf_file=`` would parse it again, and parsing a tokenizer's 100k strings is most of the cost)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config_dict = load_gguf_checkpoint(str(source), return_tensors=False)["config"]
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    except (ImportError, KeyError):  # pragma: no cover - a transformers without the mapping: the slow way
        return auto_config.from_pretrained(source.parent, gguf_file=source.name)
