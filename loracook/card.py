"""The model card (README.md) written into every output: what was merged, how, and the recipe itself."""

from __future__ import annotations

from loracook import __version__
from loracook.plan import ModuleTask, Plan, TensorTask


def model_card(plan: Plan, recipe_name: str | None, recipe_text: str, report, evaluation=None) -> str:
    base_name = plan.base.config.get("_name_or_path") or plan.base.path.name
    title = recipe_name or plan.output.name
    sources = ", ".join(f"`{n}`" for n in plan.sources)
    if plan.kind == "model":
        changed = sum(1 for t in plan.tasks if isinstance(t, TensorTask) and t.terms)
        what = f"the base model merged with {len(plan.sources)} LoRA adapter(s) by `{plan.method}`"
        facts = [f"- tensors changed: {changed} of {len(plan.tasks)}"]
        front = ["library_name: transformers"]
    else:
        modules = [t for t in plan.tasks if isinstance(t, ModuleTask)]
        ranks = sorted({t.rank for t in modules})
        what = f"a PEFT LoRA adapter combining {len(plan.sources)} adapter(s) by `{plan.method}`"
        facts = [f"- modules: {len(modules)}, ranks {', '.join(map(str, ranks))}"]
        front = ["library_name: peft", f"base_model: {base_name}"]
    if report.modules:
        summary = report.to_json()
        facts.append(
            f"- recompression error (relative Frobenius): max {summary['max_relative_error']:.2e}, "
            f"mean {summary['mean_relative_error']:.2e} (per module in merge_report.json)"
        )
    lines = [
        "---",
        *front,
        "tags:",
        "- loracook",
        "- merge",
        "- lora",
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
