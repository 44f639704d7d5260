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
        return [self.path / name for name in COPY_FILES if (self.path / name).is_file()]

    def reader(self, file: str) -> TensorReader:
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
    config: dict[str, Any] = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadInput(f"config.json is not valid JSON ({exc})", file=config_file) from None
    tensors: dict[str, TensorInfo] = {}
    for file in _weight_files(folder):
        if file.suffix == ".safetensors":
            infos, _ = read_header(file)
        else:
            infos = TensorReader.open(file).infos
        for name, info in infos.items():
            if name in tensors:
                raise BadInput(f"tensor {name!r} appears in two weight files", file=file)
            tensors[name] = info
    return Checkpoint(path=folder, config=config, tensors=tensors)


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise BadInput("broken shard index (no weight_map)", file=index) from None
            files = sorted({folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise BadInput(f"shard {missing[0]} listed in the index is missing", file=index)
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return loose
    raise BadInput(
        "no weights in the model folder (model.safetensors, a shard index, or pytorch_model.bin)", file=folder
    )
