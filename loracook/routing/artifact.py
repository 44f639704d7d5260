"""The router folder: what it holds, written once (by the output kind `router`) and checked when read.

router.json           method, settings, source names, embedding layer, base, loracook version
router.safetensors    centroid: center, centroids; gate: mean, std, w1, b1, w2, b2;
                      arrow: arrow.<module>.prototypes [n, in] and arrow.<module>.present [n]
adapters/<source>/    the sources as plain PEFT adapters (adapter_config.json, adapter_model.safetensors)
README.md             the model card, with the recipe
loracook_recipe.yaml  the recipe
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loracook.errors import BadInput

FORMAT = "loracook-router"
FORMAT_VERSION = 1
SPEC_FILE = "router.json"
TENSORS_FILE = "router.safetensors"
ADAPTERS = "adapters"
METHODS = ("centroid", "gate", "arrow")
REBUILD = "rebuild it with `loracook run` on its recipe (loracook_recipe.yaml)"


@dataclass(frozen=True)
class RouterSpec:
    """router.json. ``layer`` is the hidden-state index the exemplar methods embed prompts at (None: arrow)."""

    method: str
    sources: tuple[str, ...]
    top_k: int | None
    temperature: float
    layer: int | None
    base: dict[str, Any]  # path (resolved folder), spec (as the recipe gave it), num_layers, hidden_size
    seed: int = 0
    exemplars: dict[str, int] = field(default_factory=dict)  # exemplar count per source
    stats: dict[str, Any] = field(default_factory=dict)  # e.g. the gate's training accuracy
    loracook_version: str = ""

    def adapter_dir(self, folder: Path, source: str) -> Path:
        return Path(folder) / ADAPTERS / source

    def to_json(self) -> str:
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        data["sources"] = list(self.sources)
        return json.dumps(data, indent=2) + "\n"


def is_router(folder: str | Path) -> bool:
    return (Path(folder) / SPEC_FILE).is_file()


def read_spec(folder: str | Path) -> RouterSpec:
    """router.json of a router folder, after checking that every file the router needs is there."""
    folder = Path(folder)
    if not folder.exists():
        raise BadInput("no such router folder", file=folder, fix="check the path")
    path = folder / SPEC_FILE
    if not path.is_file():
        raise BadInput(
            "not a router folder (no router.json)",
            file=folder,
            fix="give a folder written by a router recipe",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"router.json cannot be read ({exc})", file=path, fix=REBUILD) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BadInput("router.json is not a loracook router description", file=path, fix=REBUILD)
    if data.get("format_version") != FORMAT_VERSION:
        raise BadInput(
            f"router format version {data.get('format_version')!r} is not supported (this loracook reads "
            f"{FORMAT_VERSION})",
            file=path,
            fix=REBUILD,
        )
    try:
        spec = RouterSpec(
            method=str(data["method"]),
            sources=tuple(str(s) for s in data["sources"]),
            top_k=None if data["top_k"] is None else int(data["top_k"]),
            temperature=float(data["temperature"]),
            layer=None if data["layer"] is None else int(data["layer"]),
            base=dict(data["base"]),
            seed=int(data.get("seed", 0)),
            exemplars=dict(data.get("exemplars") or {}),
            stats=dict(data.get("stats") or {}),
            loracook_version=str(data.get("loracook_version", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"router.json is missing or mistypes {exc}", file=path, fix=REBUILD) from None
    if spec.method not in METHODS or not spec.sources or spec.temperature <= 0:
        raise BadInput("router.json holds an unknown method or bad settings", file=path, fix=REBUILD)
    _check_files(folder, spec)
    return spec


def _check_files(folder: Path, spec: RouterSpec) -> None:
    if not (folder / TENSORS_FILE).is_file():
        raise BadInput(f"the router is incomplete: {TENSORS_FILE} is missing", file=folder, fix=REBUILD)
    for source in spec.sources:
        adapter = spec.adapter_dir(folder, source)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (adapter / name).is_file():
                raise BadInput(
                    f"the router is incomplete: {ADAPTERS}/{source}/{name} is missing",
                    file=folder,
                    fix=REBUILD,
                )
