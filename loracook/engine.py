"""The engine's front door: recipe in, output folder out. Knows no YAML and no terminal.

recipe → open the base and the sources (headers) → make sources real (extractions) → compile the plan →
execute it into the output kind's sink → side files and reports → evaluate → model card → commit
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from loracook.card import model_card
from loracook.errors import BadInput
from loracook.execute.executor import OnTask, Report, execute
from loracook.execute.sinks import Tee
from loracook.io.checkpoint import Checkpoint
from loracook.io.writer import OutputFolder
from loracook.outputs import output_kind
from loracook.plan.compile import compile_plan, load_base, recipe_values
from loracook.plan.tasks import Plan
from loracook.sources import Source, make_real, open_sources


@dataclass(frozen=True)
class Prepared:
    """A recipe opened against its files: the base, the sources (extractions not yet run) and the plan."""

    base: Checkpoint
    sources: dict[str, Source]
    plan: Plan


@dataclass(frozen=True)
class RunResult:
    output: Path
    plan: Plan
    report: Report
    extractions: dict = field(default_factory=dict)  # source name -> ExtractReport
    evaluation: object | None = None  # an EvalReport when the recipe has an evaluate section


def prepare(recipe) -> Prepared:
    """Open the base once and every source's headers, and compile the plan (what `validate` and `plan` do)."""
    base = load_base(recipe.base_spec)
    sources = open_sources(recipe.sources, base, recipe.merge.seed)
    return Prepared(base, sources, compile_plan(recipe, base, sources))


def run(
    recipe,
    *,
    recipe_text: str,
    output: Path | None = None,
    force: bool = False,
    on_task: OnTask | None = None,
    evaluate: bool = True,
    device: str | None = None,
    on_eval: Callable | None = None,
) -> RunResult:
    """Extract, plan and execute a recipe, writing into a temporary folder renamed into place at the end.

    >>> from loracook.recipe import load_recipe  # doctest: +SKIP
    >>> loaded = load_recipe("recipes/demo.yaml")  # doctest: +SKIP
    >>> run(loaded.recipe, recipe_text=loaded.text).output  # doctest: +SKIP
    """
    target = output_path(recipe, output)
    _refuse_existing(target, force)
    section = recipe.evaluate if evaluate else None
    prepared = prepare(recipe)
    tasks = check_evaluation(recipe, prepared.base) if section else None
    _check_not_overwriting_inputs(target, prepared)
    kind = output_kind(recipe.output.kind)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.extract-", dir=target.parent) as work:
        sources = make_real(prepared.sources, Path(work), recipe.merge.seed, on_task)
        ready = all(s.ready for s in prepared.sources.values())
        plan = prepared.plan if ready else compile_plan(recipe, prepared.base, sources)
        with OutputFolder(target, force=force) as out:
            memory = kind.memory_sink(plan) if section else None
            report = _execute(recipe, plan, kind.sink(plan, out), memory, on_task)
            kind.side_files(plan, out)
            _write_reports(out, report, sources)
            evaluation = None
            if section is not None:
                evaluation = _evaluate(recipe, plan, kind, tasks, out.tmp, memory, sources, device, on_eval)
            card = model_card(plan, kind, recipe.name or target.name, recipe_text, report, evaluation)
            out.write_text("README.md", card)
            out.write_text("loracook_recipe.yaml", recipe_text)
            out.commit()
    extractions = {n: s.report for n, s in sources.items() if s.report is not None}
    return RunResult(target, plan, report, extractions, evaluation)


def _execute(recipe, plan: Plan, sink, memory, on_task: OnTask | None) -> Report:
    """Execute with the recipe's own weights, into the output's sink (and memory, to evaluate from)."""
    values = recipe_values(recipe, plan.base)
    return execute(plan, values, Tee(sink, memory) if memory is not None else sink, on_task)


def output_path(recipe, output: Path | None) -> Path:
    target = output or (Path(recipe.output.path) if recipe.output.path else None)
    if target is None:
        raise BadInput(
            "no output path", loc=("output",), fix="set output.path in the recipe or pass --output"
        )
    return target


def _refuse_existing(target: Path, force: bool) -> None:
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


def _write_reports(out: OutputFolder, report: Report, sources: dict[str, Source]) -> None:
    if report.modules:
        out.write_text("merge_report.json", json.dumps(report.to_json(), indent=2) + "\n")
    extracted = {n: s.report.to_json() for n, s in sources.items() if s.report is not None}
    if extracted:
        out.write_text("extract_report.json", json.dumps(extracted, indent=2) + "\n")


def check_evaluation(recipe, base: Checkpoint):
    """Resolve and check the evaluate section's tasks (cheap, no model) before any merge work."""
    from loracook.evaluation import check_chat_template, resolve_tasks

    assert recipe.evaluate is not None
    tasks = resolve_tasks(recipe.evaluate.tasks, Path.cwd())
    if recipe.evaluate.apply_chat_template:
        check_chat_template(base.path)
    return tasks


def merge_name(recipe) -> str:
    taken = {"base", *recipe.sources}
    name = recipe.name or "merge"
    while name in taken:
        name += "-merged"
    return name


def _evaluate(recipe, plan, kind, tasks, folder: Path, memory, sources, device, on_eval):
    """Score the requested baselines and the result with lm-eval, sharing one in-memory base model."""
    from loracook.evaluation import (
        EvalOptions,
        adapter_candidates,
        base_candidate,
        evaluate_candidates,
        load_model,
    )

    assert recipe.evaluate is not None
    base = load_model(plan.base.path, device="cpu")
    candidates = []
    for name in recipe.evaluate.baselines:
        if name == "base":
            candidates.append(base_candidate(base))
        else:
            candidates += adapter_candidates(base, {name: sources[name].adapter.path})
    candidates.append(kind.candidate(merge_name(recipe), plan, folder, memory, base))
    options = EvalOptions.from_section(recipe.evaluate, device=device, seed=recipe.merge.seed)
    options = replace(options, quiet=on_eval is not None)  # the caller reports progress
    evaluation = evaluate_candidates(candidates, tasks, options, on_event=on_eval)
    evaluation.save(folder / "eval_results.json")
    try:
        evaluation.plot(folder / "eval_results.png")
    except BadInput:
        pass  # matplotlib is optional: the JSON and the table still carry the numbers
    return evaluation


def _check_not_overwriting_inputs(target: Path, prepared: Prepared) -> None:
    dest = target.resolve()
    inputs = [prepared.base.path] + [p for s in prepared.sources.values() for p in s.inputs]
    for path in inputs:
        path = Path(path).resolve()
        if dest == path or dest in path.parents:
            raise BadInput(
                "the output folder overlaps an input folder",
                file=target,
                loc=("output", "path"),
                fix="choose another output path",
            )
