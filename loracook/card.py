"""The model card (README.md) written into every output: what was merged, how, and the recipe itself."""

from __future__ import annotations

from loracook import __version__
from loracook.plan import LoraTerm, Plan


def model_card(plan: Plan, recipe_name: str | None, recipe_text: str, method: str) -> str:
    base_name = plan.base.config.get("_name_or_path") or plan.base.path.name
    adapted = sum(1 for t in plan.tasks if any(isinstance(x, LoraTerm) for x in t.terms))
    title = recipe_name or plan.output.name
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- loracook",
        "- merge",
        "- lora",
        "---",
        "",
        f"# {title}",
        "",
        f"Made with [loracook](https://pypi.org/project/loracook/) {__version__}: the base model merged with "
        f"{len(plan.sources)} LoRA adapter{'s' if len(plan.sources) != 1 else ''} by `{method}`.",
        "",
        f"- base: `{base_name}` ({plan.base.num_layers} layers)",
        f"- sources: {', '.join(f'`{n}`' for n in plan.sources)}",
        f"- tensors changed: {adapted} of {len(plan.tasks)}",
        "",
        "## Recipe",
        "",
        "Relative paths in the recipe are relative to the folder the recipe was in, not to this folder.",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
