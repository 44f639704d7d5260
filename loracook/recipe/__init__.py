"""Recipe format v1: pydantic models, YAML loading with line numbers, and the JSON schema."""

from loracook.recipe.load import load_recipe, load_recipe_text
from loracook.recipe.model import Recipe

__all__ = ["Recipe", "load_recipe", "load_recipe_text"]
