"""The model card (README.md) written into every output: what was merged, how, and the recipe itself."""

from __future__ import annotations

from loracook import __version__
from loracook.plan.tasks import Plan


def model_card(plan: Plan, kind, title: str, recipe_text: str, report, evaluation=None) -> str:
    """README.md of an output: front matter the hub understands (base_model, base_model_relation,
    library_name, tags), what was made (from the output kind), scores, and the recipe."""
    base_name = plan.base.config.get("_name_or_path") or plan.base.path.name
    sources = ", ".join(f"`{n}`" for n in plan.sources)
    what, facts, front = kind.card_facts(plan)
    if report.modules:
        summary = report.to_json()
        facts.insert(
            1,
            f"- recompression error (relative Frobenius): max {summary['max_relative_error']:.2e}, "
            f"mean {summary['mean_relative_error']:.2e} (per module in merge_report.json)",
        )
    hub = hub_base(plan)
    lines = [
        "---",
        *([f"base_model: {hub}"] if hub else []),
        *front,
        "tags:",
        "- loracook",
        "- lora",
        "- merge",
        f"- {plan.method}",
        "---",
        "",
        f"# {title}",
        "",
        f"Made with loracook {__version__}: {what}.",
        "",
        f"- base: `{base_name}` ({plan.base.num_layers} layers)",
        f"- sources: {sources}",
        *facts,
        "",
        *(_evaluation_section(evaluation) if evaluation is not None else []),
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


def _evaluation_section(evaluation) -> list[str]:
    return [
        "## Evaluation",
        "",
        "lm-eval-harness scores (± stderr); full results in eval_results.json, chart in eval_results.png.",
        "",
        evaluation.markdown().rstrip(),
        "",
    ]


def hub_base(plan: Plan) -> str | None:
    """The base's hub id where one is known: the base config's `_name_or_path`, else the sources'
    base_model_name_or_path, when it reads as `owner/name` (a local path is no use on the hub)."""
    from loracook.recipe.types import _HUB_ID

    names = [plan.base.config.get("_name_or_path")]
    names += [a.config.get("base_model_name_or_path") for a in plan.sources.values()]
    return next((n for n in names if isinstance(n, str) and _HUB_ID.match(n) and not n.startswith(".")), None)
