"""The published JSON schema of recipe format v1 (schemas/recipe.schema.json), with a staleness check."""

from __future__ import annotations

import json
from pathlib import Path

from loracook.recipe.model import Recipe

DEFAULT_PATH = Path("schemas/recipe.schema.json")


def schema_text() -> str:
    schema = Recipe.model_json_schema()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return json.dumps(schema, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def write_schema(path: Path = DEFAULT_PATH) -> bool:
    """Write the schema; returns True when the file changed."""
    text = schema_text()
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def schema_is_current(path: Path = DEFAULT_PATH) -> bool:
    return path.is_file() and path.read_text(encoding="utf-8") == schema_text()
