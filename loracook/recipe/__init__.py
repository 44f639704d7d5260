"""Recipe format v1: field types, pydantic models, YAML loading with line numbers, and the JSON schema.

Imports are lazy: the merge methods' modules import :mod:`loracook.recipe.types`, and the recipe model imports
the method registry, so importing this package must not import the model eagerly.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LoadedRecipe", "Recipe", "load_recipe", "load_recipe_text"]


def __getattr__(name: str) -> Any:
    if name in ("LoadedRecipe", "load_recipe", "load_recipe_text"):
        from loracook.recipe import load

        return getattr(load, name)
    if name == "Recipe":
        from loracook.recipe.model import Recipe

        return Recipe
    raise AttributeError(name)
