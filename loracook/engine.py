"""The engine's front door: recipe in, output folder out. Knows no YAML and no terminal."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from loracook.card import model_card
from loracook.errors import BadInput
from loracook.executor import OnTask, OnTensor, Report, execute
from loracook.extraction import ExtractReport, extract, plan_extraction
from loracook.io.resolve import resolve_path
from loracook.io.writer import OutputFolder
from loracook.plan import Plan
from loracook.planner import load_base, make_plan
from loracook.recipe.model import ExtractSource, Recipe


@dataclass(frozen=True)
class RunResult:
    output: Path
    plan: Plan
    report: Report
    extractions: dict[str, ExtractReport] = field(default_factory=dict)
    evaluation: object | None = None  # an EvalReport when the recipe has an evaluate section


def run(
    recipe: Recipe,
    *,
    recipe_text: str,
    output: Path | None = None,
    force: bool = False,
    on_task: OnTask | None = None,
    on_tensor: OnTensor | None = None,
    recipe_root: Path | None = None,
    evaluate: bool = True,
    device: str | None = None,
    on_eval: Callable | None = None,
) -> RunResult:
    """Extract, plan and execute a recipe, writing into a temporary folder renamed into place at the end.

    >>> from loracook.recipe import load_recipe  # doctest: +SKIP
    >>> loaded = load_recipe("recipes/demo.yaml")  # doctest: +SKIP
    >>> run(loaded.recipe, recipe_text=loaded.text).output  # doctest: +SKIP
    """
    target = output or (Path(recipe.output.path) if recipe.output.path else None)
    if target is None:
        raise BadInput(
            "no output path", loc=("output",), fix="set output.path in the recipe or pass --output"
        )
    if target.exists() and not force:
        raise BadInput(
            "the output already exists", file=target, loc=("output", "path"), fix="pass --force to replace it"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(
            f"cannot create the output's parent folder: {exc.strerror}", file=target.parent
        ) from None
    section = recipe.evaluate if evaluate else None
    tasks = check_evaluation(recipe, recipe_root or Path.cwd()) if section else None
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.extract-", dir=target.parent) as work:
        extracted, reports = _extract_sources(recipe, Path(work), on_task)
        plan = make_plan(recipe, target, extracted)
        _check_not_overwriting_inputs(plan, recipe)
        merged: dict = {}
        keep = section is not None and plan.kind == "model" and plan.bytes_written <= IN_MEMORY_EVAL_BYTES

        def collect(name, tensor):
            if keep:
                merged[name] = tensor
            if on_tensor:
                on_tensor(name, tensor)

        with OutputFolder(plan.output, force=force) as out:
            report = execute(plan, out, on_task, collect if keep or on_tensor else None)
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
            if reports:
                payload = {name: r.to_json() for name, r in reports.items()}
                out.write_text("extract_report.json", json.dumps(payload, indent=2) + "\n")
            evaluation = None
            if section is not None:
                evaluation = _evaluate(
                    recipe, plan, tasks, out.tmp, merged or None, extracted, device, on_eval
                )
                evaluation.save(out.tmp / "eval_results.json")
                try:
                    evaluation.plot(out.tmp / "eval_results.png")
                except BadInput:
                    pass  # matplotlib is optional: the JSON and the table still carry the numbers
                merged.clear()
            out.write_text("README.md", model_card(plan, recipe.name, recipe_text, report, evaluation))
            out.write_text("loracook_recipe.yaml", recipe_text)
            out.commit()
    return RunResult(output=plan.output, plan=plan, report=report, extractions=reports, evaluation=evaluation)


IN_MEMORY_EVAL_BYTES = 4 * 10**9  # a merged model this small is evaluated from memory, not reloaded from disk


def check_evaluation(recipe: Recipe, root: Path):
    """Resolve and check the evaluate section's tasks (cheap, no model) before any merge work."""
    from loracook.evaluation import check_chat_template, resolve_tasks

    assert recipe.evaluate is not None
    tasks = resolve_tasks(recipe.evaluate.tasks, root)
    if recipe.evaluate.apply_chat_template:
        check_chat_template(load_base(recipe).path)
    return tasks


def merge_name(recipe: Recipe) -> str:
    taken = {"base", *recipe.sources}
    name = recipe.name or "merge"
    while name in taken:
        name += "-merged"
    return name


def _evaluate(recipe, plan, tasks, folder: Path, merged: dict | None, extracted, device, on_eval):
    """Score the requested baselines and the merge with lm-eval, sharing one in-memory base model."""
    from loracook.evaluation import (
        EvalOptions,
        adapter_candidates,
        base_candidate,
        evaluate_candidates,
        folder_candidate,
        load_model,
        model_candidate,
    )

    assert recipe.evaluate is not None
    base = load_model(plan.base.path, device="cpu")
    candidates = []
    for name in recipe.evaluate.baselines:
        if name == "base":
            candidates.append(base_candidate(base))
        else:
            source = recipe.sources[name]
            if isinstance(source, ExtractSource):
                path = extracted[name]
            else:
                path = Path(
                    resolve_path(source if isinstance(source, str) else source.adapter, kind="adapter")
                )
            candidates += adapter_candidates(base, {name: path})
    name = merge_name(recipe)
    if plan.kind == "adapter":
        candidates += adapter_candidates(base, {name: folder})
    elif merged is not None:
        candidates.append(model_candidate(name, merged, base=base))
    else:
        candidates.append(folder_candidate(folder, name=name))
    options = EvalOptions.from_section(recipe.evaluate, device=device, seed=recipe.merge.seed)
    options = replace(options, quiet=on_eval is not None)  # the caller reports progress
    return evaluate_candidates(candidates, tasks, options, on_event=on_eval)


def _extract_sources(recipe: Recipe, work: Path, on_task: OnTask | None):
    """Run each extract source into a PEFT adapter under ``work``; the merge then reads it like any adapter."""
    extracted: dict[str, Path] = {}
    reports: dict[str, ExtractReport] = {}
    jobs = {n: s for n, s in recipe.sources.items() if isinstance(s, ExtractSource)}
    if not jobs:
        return extracted, reports
    base = load_base(recipe)
    for name, source in jobs.items():
        try:
            job = plan_extraction(
                name, source.extract, base, resolve_path(source.extract.model, kind="fine-tune")
            )
        except BadInput as error:
            error.loc = error.loc or ("sources", name)
            raise

        def progress(done: int, total: int, label: str, name: str = name) -> None:
            if on_task:
                on_task(done, total, f"extract {name}: {label}")

        reports[name] = extract(job, work / name, seed=recipe.merge.seed, on_item=progress)
        extracted[name] = work / name
    return extracted, reports


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


def _check_not_overwriting_inputs(plan: Plan, recipe: Recipe) -> None:
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
