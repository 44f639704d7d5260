"""One search, start to end: check the inputs, open the study, run the workers, choose the trial to write.

:func:`run_search` is the engine's search step (``loracook run`` on a recipe with ``search:``);
:func:`loracook.search.workers.join_search` is ``loracook search-worker``: one more worker on a running study,
which writes nothing.
Both report through ``on_event`` (a :class:`SearchEvent` per finished trial); the terminal is the CLI's business.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loracook.errors import BadInput
from loracook.search import study as st
from loracook.search.objectives import Objectives, check_objective
from loracook.search.outcome import SearchOutcome, make_outcome
from loracook.search.results import (
    RULE_LABELS,
    natural,
    records,
    reference_for,
    select,
    selection_score,
    start_reference,
    study_value,
)
from loracook.search.scorer import Scorer, open_scorer
from loracook.search.space import Space
from loracook.search.trials import StopFlag, counts, run_trials


@dataclass(frozen=True)
class SearchEvent:
    """Progress: ``kind`` is start | trial | stopping | stopped | done; ``done`` counts finished trials."""

    kind: str
    done: int
    budget: int
    best: float | None = None  # the best objective so far (the selection score with several objectives)
    label: str = ""  # what ``best`` is
    where: str = ""  # the study's storage


class SearchStopped(KeyboardInterrupt):
    """Ctrl-C stopped the search after its running trial; the study keeps every finished trial."""

    def __init__(self, done: int, budget: int, where: str) -> None:
        super().__init__(f"search stopped after {done} of {budget} trials; the study is kept in {where}")
        self.done, self.budget, self.where = done, budget, where


@dataclass
class Context:
    """The checked search of one recipe on one plan: objectives, space, study place, fingerprint."""

    recipe: object
    plan: object
    target: Path
    checked: Objectives
    space: Space
    place: st.Place
    fingerprint: dict = field(default_factory=dict)

    @classmethod
    def check(cls, recipe, plan, target: Path) -> Context:
        checked = check_objective(recipe.search.objective)
        space = Space.from_recipe(recipe, plan.num_layers, plan.combine.method)
        st.make_sampler(recipe.search.sampler, recipe.search.seed)  # a missing package fails before any work
        place = st.place_of(recipe, Path(target))
        return cls(recipe, plan, Path(target), checked, space, place, st.fingerprint(recipe, checked))

    @property
    def search(self):
        return self.recipe.search

    @property
    def scalar(self) -> bool:
        """The study optimises the select score of several objectives (see :func:`study.scalarized`)."""
        return st.scalarized(self.search.sampler, len(self.checked.names))

    @property
    def study_directions(self) -> tuple[str, ...]:
        return ("maximize",) if self.scalar else self.checked.directions

    def sampler(self, offset: int):
        return st.make_sampler(self.search.sampler, self.search.seed + offset)

    def evaluator(self, scorer: Scorer) -> Callable:
        from loracook.plan.compile import recipe_values

        fixed = recipe_values(self.recipe, self.plan.base).densities
        signs, l1 = self.checked.signs, self.search.l1

        def evaluate(trial):
            point = self.space.suggest(trial)
            scored = scorer.score(point.values(self.plan.num_layers, fixed))
            penalty = l1 * point.l1_mean
            values = [v - s * penalty for v, s in zip(scored.values, signs, strict=True)]
            attrs = {
                "objectives": dict(zip(self.checked.names, scored.values, strict=True)),
                "l1_penalty": penalty,
                "apply_seconds": scored.apply_seconds,
                "objective_seconds": scored.objective_seconds,
            }
            if self.scalar:  # the study's one value; the objectives stay in the trial's attributes
                attrs["values"] = values
                reference = _live_reference(trial, values, signs) if self.search.select == "improve" else None
                return [study_value(values, signs, self.search.select, reference)], attrs
            return values, attrs

        return evaluate


def _live_reference(trial, values: list[float], signs: tuple[float, ...]):
    """``improve``'s reference when a trial is told: the starting points finished so far, and this trial if it
    is one. The starting points are asked first, so with one worker every later trial sees all of them; a
    trial of another worker told before they finish gets a value against fewer (the written choice is always
    made against all of them)."""
    starts = [r.values for r in records(trial.study) if r.state == "COMPLETE" and r.info.get("start")]
    if trial.user_attrs.get("start"):
        starts.append(values)
    return start_reference([v for v in starts if v], signs)


# ---------------------------------------------------------------------------------------------- the run


def run_search(
    recipe,
    plan,
    sources: dict,
    target: Path,
    *,
    force: bool = False,
    resume: bool = False,
    device: str = "cpu",
    on_event: Callable[[SearchEvent], None] | None = None,
) -> SearchOutcome:
    """Search the merge weights of ``recipe`` (its plan compiled, its sources real) and choose the trial to
    write; raises :class:`SearchStopped` on Ctrl-C (after the running trial) and BadInput for bad input."""
    ctx = Context.check(recipe, plan, target)
    place = ctx.place
    made = _prepare_place(ctx, force=force, resume=resume)
    try:
        storage = st.open_storage(place)
        scorer = open_scorer(plan, sources, ctx.checked, ctx.search.objective.chat_template, device)
        if resume:
            study = st.load_study(place, storage, None, ctx.fingerprint, what="--resume")
        else:
            starts = ctx.space.starting_points(recipe)
            study = st.create_study(
                place, storage, ctx.study_directions, None, ctx.fingerprint, starts, force
            )
    except BaseException:
        if made:
            st.remove_study(place)
        raise
    study.sampler = ctx.sampler(len(study.trials))
    report = reporter(ctx, study, on_event)
    report("start")
    try:
        return _run(ctx, study, storage, scorer, sources, device, report)
    except BaseException as exc:
        if not isinstance(exc, SearchStopped):
            report("aborted")
        raise


def _run(ctx: Context, study, storage, scorer, sources, device, report) -> SearchOutcome:
    from loracook.search.workers import spawn, threads_for  # workers builds on this module

    place, budget, started = ctx.place, ctx.search.budget, time.perf_counter()
    children: list = []
    shared = multiprocessing.get_context("spawn").Event()
    with StopFlag(lambda: report("stopping"), shared) as stop, threads_for(ctx.search.workers):
        try:
            children = spawn(ctx, sources, device, shared)
            while True:
                run_trials(
                    study, storage, place, budget, ctx.evaluator(scorer), stop, lambda t: report("trial")
                )
                _wait(children, study, stop, report, budget)
                now = counts(study)
                if stop.check() or (now.complete >= budget and not now.running):
                    break
                if now.complete + now.running >= budget:  # trials of other hosts still run
                    time.sleep(1.0)
        finally:
            stop.check()
            if stop.requested or any(c.is_alive() for c in children):
                shared.set()
            for child in children:
                child.join()
            scorer.close()
    now = counts(study)
    if stop.requested and now.complete < budget:
        report("stopped")
        raise SearchStopped(now.complete, budget, place.shown)
    outcome = make_outcome(ctx, study, scorer, time.perf_counter() - started)
    report("done")
    return outcome


def _prepare_place(ctx: Context, *, force: bool, resume: bool) -> bool:
    """Check the study's place before any work; True when this call creates the journal folder."""
    place = ctx.place
    if place.url is not None:
        st.open_storage(place)  # an RDB URL that cannot be opened fails here, before the model loads
        return False
    saved = ctx.target / "search" / st.JOURNAL
    if resume:
        if place.journal.is_file():
            return False
        if not saved.is_file():
            raise BadInput(
                f"--resume: no search to resume (looked for {place.journal} and {saved})",
                loc=("search",),
                fix="run without --resume to start the search",
            )
        place.folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(saved, place.journal)
        return True
    if place.folder.exists():
        if place.journal.is_file() and place.journal.stat().st_size and not force:
            raise BadInput(
                f"a stopped search exists in {place.journal}",
                loc=("search",),
                fix="continue it with `loracook run RECIPE --resume`, or pass --force to start over",
            )
        shutil.rmtree(place.folder)
    return True


def reporter(ctx: Context, study, on_event) -> Callable[[str], None]:
    rule, signs = ctx.search.select, ctx.checked.signs
    label = ctx.checked.names[0] if len(ctx.checked.names) == 1 else RULE_LABELS[rule]

    def report(kind: str) -> None:
        if on_event is None:
            return
        done = [r for r in records(study) if r.state == "COMPLETE"]
        best = None
        if done:
            reference = reference_for(done, signs, rule)
            best = natural(selection_score(select(done, signs, rule), signs, rule, reference), signs, rule)
        on_event(SearchEvent(kind, len(done), ctx.search.budget, best, label, ctx.place.shown))

    return report


def _wait(children: list, study, stop: StopFlag, report, budget: int) -> None:
    """Wait for the local workers (they stop at the budget too), reporting their trials as they finish. Once
    the budget is complete and nothing runs, no worker can start a trial: one still starting up is ended."""
    seen = counts(study).complete
    while any(c.is_alive() for c in children):
        now = counts(study)
        if now.complete != seen:
            seen = now.complete
            report("trial")
        if stop.check():
            return
        if now.complete >= budget and not now.running:
            for child in children:
                if child.is_alive():
                    child.terminate()
            return
        time.sleep(0.5)
