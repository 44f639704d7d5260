"""The engine's front door: recipe in, output folder out. Knows no YAML and no terminal.

recipe → open the base and the sources (headers) → make sources real (extractions) → compile the plan →
execute it into the output kind's sink → side files and reports → evaluate → model card → commit
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from loracook.card import model_card
from loracook.errors import BadInput
from loracook.execute.executor import OnTask, Report, execute
from loracook.execute.sinks import Tee
from loracook.io.checkpoint import Checkpoint
from loracook.io.writer import OutputFolder, check_destination, work_folder
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
    search: object | None = None  # a loracook.search.SearchOutcome when the recipe has a search section


def prepare(recipe, *, read_tensors: bool = False) -> Prepared:
    """Open the base once and every source's headers, and compile the plan (what `validate` and `plan` do).

    ``read_tensors``: the plan will be executed, so a GGUF base is dequantized (once, into the cache); without
    it a GGUF base is read from its header only."""
    base = load_base(recipe.base_spec, dequantize=read_tensors)
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
    recipe_file: Path | None = None,
    resume: bool = False,
    on_search: Callable | None = None,
) -> RunResult:
    """Extract, plan and execute a recipe, writing into a temporary folder renamed into place at the end.

    >>> from loracook.recipe import load_recipe  # doctest: +SKIP
    >>> loaded = load_recipe("recipes/demo.yaml")  # doctest: +SKIP
    >>> run(loaded.recipe, recipe_text=loaded.text).output  # doctest: +SKIP
    """
    target = output_path(recipe, output)
    protect = input_paths(recipe, recipe_file)
    check_destination(target, force=force, protect=protect)  # before any work: never an input, never "."
    section = recipe.evaluate if evaluate else None
    prepared = prepare(recipe, read_tensors=True)
    tasks = check_evaluation(recipe, prepared.base) if section else None
    kind = output_kind(recipe.output.kind)
    with work_folder(target) as work:
        sources = make_real(prepared.sources, Path(work), recipe.merge.seed, on_task)
        ready = all(s.ready for s in prepared.sources.values())
        plan = prepared.plan if ready else compile_plan(recipe, prepared.base, sources)
        search = _search(recipe, plan, sources, target, force, resume, device, on_search)
        recipe = search.recipe if search is not None else recipe  # the merge written: the chosen weights
        with OutputFolder(target, force=force, protect=protect) as out:
            memory = kind.memory_sink(plan) if section else None
            report = _execute(recipe, plan, kind.sink(plan, out, recipe.output), memory, on_task)
            kind.side_files(plan, out, recipe.output)
            _write_reports(out, report, sources)
            evaluation = None
            if section is not None:
                evaluation = _evaluate(recipe, plan, kind, tasks, out.tmp, memory, sources, device, on_eval)
            card = model_card(plan, kind, recipe.name or target.name, recipe_text, report, evaluation)
            if search is not None:
                search.write(out.tmp / "search")
                card = search.card(card)
            out.write_text("README.md", card)
            out.write_text("loracook_recipe.yaml", recipe_text)
            out.commit()
    if search is not None:
        search.cleanup()  # the study now lives in <output>/search/
    extractions = {n: s.report for n, s in sources.items() if s.report is not None}
    return RunResult(target, plan, report, extractions, evaluation, search)


def _search(recipe, plan, sources, target, force, resume, device, on_search):
    """The search step (docs/search.md): the chosen weights, or None for a recipe without `search:`."""
    if recipe.search is None:
        if resume:
            raise BadInput(
                "--resume continues a search, but the recipe has no `search:` section", fix="drop --resume"
            )
        return None
    from loracook.search import run_search

    return run_search(
        recipe, plan, sources, target, force=force, resume=resume, device=device or "cpu", on_event=on_search
    )


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


def input_paths(recipe, recipe_file: Path | None = None) -> list[Path]:
    """Every local path the recipe reads (base, adapters, fine-tunes, data files) and the recipe itself: an
    output may never be, contain or replace one of them, whatever --force says."""
    paths = [recipe.base_spec.path]
    for spec in recipe.sources.values():
        paths.append(spec if isinstance(spec, str) else getattr(spec, "adapter", None))
        paths.append(getattr(getattr(spec, "extract", None), "model", None))
    if recipe.route is not None:
        paths += list(recipe.route.exemplars.values())
    if recipe.search is not None and recipe.search.objective.examples:
        examples = recipe.search.objective.examples  # one JSONL file, or a list of them
        paths += examples if isinstance(examples, list) else [examples]
    found = [Path(p) for p in paths if p and not str(p).startswith("package:") and Path(p).exists()]
    return found + ([Path(recipe_file)] if recipe_file is not None else [])


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
