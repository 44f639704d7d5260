"""Load a recipe from YAML, keeping the line and column of every key so errors can point at them."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from loracook import methods
from loracook.errors import BadInput
from loracook.io.safe_yaml import MAX_BYTES, decode_utf8, parse_yaml
from loracook.recipe.model import Recipe

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe, the file it came from, and where each key sits in that file."""

    recipe: Recipe
    file: Path
    text: str
    positions: dict[Loc, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    def locate(self, error: BadInput) -> BadInput:
        """Fill in the file and YAML line of an engine error that carries a recipe location."""
        if error.file is None:
            error.file = str(self.file)
        if error.loc and error.line is None and error.file == str(self.file):
            error.line, error.column = _closest(self.positions, error.loc) or (None, None)
        return error


def load_recipe(path: str | Path, *, seed: int | None = None) -> LoadedRecipe:
    """Read, parse and validate a recipe file. Raises BadInput with file:line:column. ``seed`` overrides
    merge.seed (`loracook run --seed`).

    >>> load_recipe("recipes/does-not-exist.yaml")  # doctest: +SKIP
    """
    file = Path(path)
    text = decode_utf8(_read_recipe_bytes(file), file)
    return load_recipe_text(text, file, seed=seed)


def load_recipe_text(text: str, file: str | Path, *, seed: int | None = None) -> LoadedRecipe:
    file = Path(file)
    data, positions = _parse_yaml(text, file)
    if not isinstance(data, dict):
        raise BadInput(
            "a recipe must be a YAML mapping with keys loracook, base, sources, merge, output", file=file
        )
    if "loracook" not in data:
        error = BadInput(
            "missing `loracook: 1` (the recipe format version)", file=file, fix="add `loracook: 1` at the top"
        )
        error.line = 1
        raise error
    try:
        recipe = Recipe.model_validate(data, context={"root": str(file.parent.resolve())})
    except ValidationError as exc:
        raise _explain(exc, data, positions, file) from None
    if seed is not None:
        recipe = recipe.model_copy(update={"merge": recipe.merge.model_copy(update={"seed": seed})})
    loaded = LoadedRecipe(recipe=recipe, file=file, text=text, positions=positions)
    try:
        check_semantics(recipe)
    except BadInput as error:
        raise loaded.locate(error) from None
    return loaded


def check_semantics(recipe: Recipe) -> None:
    """Cross-field checks that the schema cannot express."""
    known = sorted(recipe.sources)
    named: list[tuple[str, Loc]] = [(n, ("merge", "weights", n)) for n in recipe.merge.weights]
    density = getattr(recipe.merge, "density", None)
    if isinstance(density, dict):
        named += [(n, ("merge", "density", n)) for n in density]
    for name, loc in named:
        if name not in recipe.sources:
            raise BadInput(_unknown_name("source", name, known), loc=loc)
    if isinstance(density, dict):
        missing = [n for n in known if n not in density]
        if missing:
            raise BadInput(
                f"merge.density gives no value for {', '.join(missing)}",
                loc=("merge", "density"),
                fix="give every source a density, or one number for all",
            )
    if recipe.evaluate is not None:
        for index, name in enumerate(recipe.evaluate.baselines):
            if name != "base" and name not in recipe.sources:
                raise BadInput(
                    _unknown_name("baseline", name, ["base", *known]), loc=("evaluate", "baselines", index)
                )
    _check_route(recipe, known)


def _check_route(recipe: Recipe, known: list[str]) -> None:
    """A router recipe has a `route:` section and names exemplars for its own sources only."""
    router = recipe.output.kind == "router"
    if router and recipe.route is None:
        raise BadInput(
            "output.kind router needs a `route:` section", loc=("output", "kind"), fix="add route:"
        )
    if recipe.route is None:
        return
    if not router:
        raise BadInput(
            "a `route:` section makes a router",
            loc=("route",),
            fix="set output.kind: router, or remove route:",
        )
    route = recipe.route
    for name in route.exemplars:
        if name not in recipe.sources:
            raise BadInput(_unknown_name("source", name, known), loc=("route", "exemplars", name))
    if route.method in ("centroid", "gate"):
        missing = [n for n in known if n not in route.exemplars]
        if missing:
            raise BadInput(
                f"route.method {route.method} needs exemplar prompts for every source; none for "
                + ", ".join(missing),
                loc=("route", "exemplars"),
                fix='add a JSONL file of {"prompt": ...} lines per source, or use method: arrow',
            )
    if route.top_k is not None and route.top_k > len(known):
        raise BadInput(
            f"route.top_k {route.top_k} is larger than the number of sources ({len(known)})",
            loc=("route", "top_k"),
            fix=f"use at most {len(known)}",
        )
    if recipe.search is not None:
        raise BadInput("a router has no merge weights to search", loc=("search",), fix="remove search:")


def _unknown_name(kind: str, name: str, choices: list[str]) -> str:
    hint = difflib.get_close_matches(name, choices, n=1)
    text = f"unknown {kind} {name!r}; known: {', '.join(choices)}"
    return text + (f" (did you mean {hint[0]!r}?)" if hint else "")


# -------------------------------------------------------------------------------------------------- YAML


def _read_recipe_bytes(file: Path) -> bytes:
    """The file's bytes; a folder, a device or a FIFO (which could be endless) and oversized files are refused."""
    try:
        if not file.exists():
            raise BadInput("recipe file not found", file=file, fix="check the path")
        if file.is_dir():
            raise BadInput("the recipe path is a folder", file=file, fix="give the recipe's .yaml file")
        if not file.is_file():
            raise BadInput("the recipe is not a regular file", file=file, fix="give the recipe's .yaml file")
        with open(file, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except PermissionError:
        raise BadInput(
            "cannot read the recipe: permission denied", file=file, fix="make it readable"
        ) from None
    except OSError as exc:
        raise BadInput(f"cannot read the recipe: {exc.strerror or exc}", file=file) from None
    if len(raw) > MAX_BYTES:
        raise BadInput(
            f"the recipe is larger than {MAX_BYTES:,} bytes", file=file, fix="is this the right file?"
        )
    return raw


def _parse_yaml(text: str, file: Path) -> tuple[Any, dict[Loc, tuple[int, int]]]:
    """Data and key positions, through the bounded loader (alias bombs, recursion and deep nesting are refused
    with their line; merge keys are not duplicates)."""
    return parse_yaml(text, file)


def _closest(positions: dict[Loc, tuple[int, int]], loc: Loc) -> tuple[int, int] | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in positions:
            return positions[loc[:end]]
    return None


# ------------------------------------------------------------------------------------ validation messages


def _explain(exc: ValidationError, data: Any, positions: dict[Loc, tuple[int, int]], file: Path) -> BadInput:
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = _data_loc(first["loc"], data)
    dotted = ".".join(str(p) for p in loc) or "recipe"
    kind = first["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        allowed = _allowed_keys(first["loc"][:-1])
        hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        message = f"unknown key {dotted!r}"
        fix = (
            f"did you mean {hint[0]!r}?"
            if hint
            else (f"allowed keys: {', '.join(allowed)}" if allowed else None)
        )
    elif kind == "union_tag_invalid" and loc and loc[-1] == "merge":
        given = first.get("input", {}).get("method") if isinstance(first.get("input"), dict) else None
        hint = difflib.get_close_matches(str(given), methods.names(), n=1)
        message = f"unknown merge method {given!r}; the methods are {', '.join(methods.names())}"
        fix = f"did you mean {hint[0]!r}?" if hint else None
    elif kind == "union_tag_not_found" and loc and loc[-1] == "merge":
        message, fix = "merge.method is missing", f"add `method:` ({', '.join(methods.names())})"
    elif kind == "missing":
        message, fix = f"missing required key {dotted!r}", None
    elif kind == "literal_error" and loc == ("loracook",):
        message, fix = (
            f"unsupported recipe format version {first.get('input')!r}",
            "this loracook reads `loracook: 1`",
        )
    else:
        message = f"{dotted}: {first['msg'].removeprefix('Value error, ')}"
        fix = None
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    error = BadInput(message, file=file, loc=loc, fix=fix)
    error.line, error.column = _closest(positions, loc) or (None, None)
    return error


def _data_loc(loc: tuple[Any, ...], data: Any) -> Loc:
    """Drop the union tags pydantic puts in error locations, keeping only the keys of the data."""
    kept: list[str | int] = []
    annotation: Any = Recipe
    for item in loc:
        member = _tagged_member(annotation, item)
        if member is not None:  # a union tag, not a key of the data
            annotation = member
            continue
        kept.append(item)
        annotation = _step(annotation, item) if annotation is not None else None
    return tuple(kept)


def _tagged_member(annotation: Any, item: Any) -> Any:
    """The union member that pydantic names ``item`` in an error location (a Tag or a merge method)."""
    if annotation is None or isinstance(annotation, type) or typing.get_origin(annotation) in (dict, list):
        return None
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _tagged_member(args[0], item)
    for arg in args:
        if typing.get_origin(arg) is typing.Annotated and any(
            type(m).__name__ == "Tag" and m.tag == item for m in typing.get_args(arg)[1:]
        ):
            return typing.get_args(arg)[0]
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "method" in arg.model_fields:
            if typing.get_args(arg.model_fields["method"].annotation) == (item,):
                return arg
    return None


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the recipe model at a pydantic error location (tags included in loc)."""
    current: Any = Recipe
    for item in loc:
        current = _step(current, item)
        if current is None:
            return []
    models = [m for m in _models_in(current)]
    return sorted({name for model in models for name in model.model_fields})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _step(annotation: Any, item: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field_info = annotation.model_fields.get(item) if isinstance(item, str) else None
        return field_info.annotation if field_info else None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        tags = [m for m in args[1:] if type(m).__name__ == "Tag"]
        if tags and tags[0].tag == item:
            return args[0]
        return _step(args[0], item)
    if origin is dict:
        return args[1]
    if origin is list:
        return args[0]
    if args:  # a union: the member named by the tag, or else the first member that has the field
        member = _tagged_member(annotation, item)
        if member is not None:
            return member
        for arg in args:
            found = _step(arg, item)
            if found is not None:
                return found
    return None
