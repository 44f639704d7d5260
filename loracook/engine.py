"""The engine's front door: recipe in, output folder out. Knows no YAML and no terminal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loracook.card import model_card
from loracook.errors import BadInput
from loracook.executor import OnTask, execute
from loracook.io.writer import OutputFolder
from loracook.plan import Plan, make_plan
from loracook.recipe.model import Recipe


@dataclass(frozen=True)
class RunResult:
    output: Path
    plan: Plan


def run(
    recipe: Recipe,
    *,
    recipe_text: str,
    output: Path | None = None,
    force: bool = False,
    on_task: OnTask | None = None,
    plan: Plan | None = None,
) -> RunResult:
    """Plan and execute a recipe, writing into a temporary folder that is renamed into place at the end.

    >>> from loracook.recipe import load_recipe  # doctest: +SKIP
    >>> loaded = load_recipe("recipes/merge-into-model.yaml")  # doctest: +SKIP
    >>> run(loaded.recipe, recipe_text=loaded.text).output  # doctest: +SKIP
    """
    target = output or (Path(recipe.output.path) if recipe.output.path else None)
    if target is not None and target.exists() and not force:
        raise BadInput(
            "the output already exists", file=target, loc=("output", "path"), fix="pass --force to replace it"
        )
    plan = plan or make_plan(recipe, output)
    _check_not_overwriting_inputs(plan)
    with OutputFolder(plan.output, force=force) as out:
        execute(plan, out, on_task)
        for path in plan.copy_files:
            out.copy(path)
        out.write_text("README.md", model_card(plan, recipe.name, recipe_text, recipe.merge.method))
        out.write_text("loracook_recipe.yaml", recipe_text)
        out.commit()
    return RunResult(output=plan.output, plan=plan)


def _check_not_overwriting_inputs(plan: Plan) -> None:
    dest = plan.output.resolve()
    inputs = [plan.base.path] + [a.path for a in plan.sources.values()]
    for path in inputs:
        path = path.resolve()
        if dest == path or dest in path.parents:
            raise BadInput(
                "the output folder overlaps an input folder",
                file=plan.output,
                loc=("output", "path"),
                fix="choose another output path",
            )
