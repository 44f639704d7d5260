"""The engine's front door: recipe in, output folder out. Knows no YAML and no terminal."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loracook.card import model_card
from loracook.errors import BadInput
from loracook.executor import OnTask, OnTensor, Report, execute
from loracook.io.writer import OutputFolder
from loracook.plan import Plan
from loracook.planner import make_plan
from loracook.recipe.model import Recipe


@dataclass(frozen=True)
class RunResult:
    output: Path
    plan: Plan
    report: Report


def run(
    recipe: Recipe,
    *,
    recipe_text: str,
    output: Path | None = None,
    force: bool = False,
    on_task: OnTask | None = None,
    on_tensor: OnTensor | None = None,
    plan: Plan | None = None,
) -> RunResult:
    """Plan and execute a recipe, writing into a temporary folder that is renamed into place at the end.

    >>> from loracook.recipe import load_recipe  # doctest: +SKIP
    >>> loaded = load_recipe("recipes/demo.yaml")  # doctest: +SKIP
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
        report = execute(plan, out, on_task, on_tensor)
        if plan.kind == "model":
            for path in plan.copy_files:
                if path.name == "config.json":
                    out.write_text("config.json", _config_with_dtype(path, plan))
                else:
                    out.copy(path)
        else:
            out.write_text("adapter_config.json", json.dumps(plan.adapter_config, indent=2) + "\n")
        if report.modules:
            out.write_text("merge_report.json", json.dumps(report.to_json(), indent=2) + "\n")
        out.write_text("README.md", model_card(plan, recipe.name, recipe_text, report))
        out.write_text("loracook_recipe.yaml", recipe_text)
        out.commit()
    return RunResult(output=plan.output, plan=plan, report=report)


def _config_with_dtype(path: Path, plan: Plan) -> str:
    """The base's config.json, with its dtype entry naming the dtype the weights were written in."""
    config = json.loads(path.read_text(encoding="utf-8"))
    dtypes = {t.dtype for t in plan.tasks if t.dtype.is_floating_point}
    if len(dtypes) == 1:
        name = str(dtypes.pop()).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


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
