"""One search, start to end: check the inputs, open the study, run the workers, choose the trial to write.

:func:`run_search` is the engine's search step (``loracook run`` on a recipe with ``search:``);
:func:`join_search` is ``loracook search-worker``: one more worker on a running study, which writes nothing.
Both report through ``on_event`` (a :class:`SearchEvent` per finished trial); the terminal is the CLI's business.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loracook.errors import BadInput
from loracook.search import study as st
from loracook.search.objectives import Objectives, check_objective
from loracook.search.results import (
    Record,
    best_recipe,
    card_section,
    natural,
    recipe_yaml,
    records,
    select,
    selection_score,
    with_card_section,
    write_files,
)
from loracook.search.scorer import Scorer, open_scorer
from loracook.search.space import Space


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
        st.make_sampler(recipe.search.sampler, recipe.search.seed, len(checked.names))  # cmaes + several
        place = st.place_of(recipe, Path(target))
        return cls(recipe, plan, Path(target), checked, space, place, st.fingerprint(recipe, checked))

    @property
    def search(self):
        return self.recipe.search

    def sampler(self, offset: int):
        return st.make_sampler(self.search.sampler, self.search.seed + offset, len(self.checked.names))

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
            return values, attrs

        return evaluate


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
                place, storage, ctx.checked.directions, None, ctx.fingerprint, starts, force
            )
    except BaseException:
        if made:
            st.remove_study(place)
        raise
    study.sampler = ctx.sampler(len(study.trials))
    report = _reporter(ctx, study, on_event)
    report("start")
    try:
        return _run(ctx, study, storage, scorer, sources, device, report)
    except BaseException as exc:
        if not isinstance(exc, SearchStopped):
            report("aborted")
        raise


def _run(ctx: Context, study, storage, scorer, sources, device, report) -> SearchOutcome:
    place, budget, started = ctx.place, ctx.search.budget, time.perf_counter()
    children: list = []
    shared = multiprocessing.get_context("spawn").Event()
    with st.StopFlag(lambda: report("stopping"), shared) as stop, _threads(ctx.search.workers):
        try:
            children = _spawn(ctx, sources, device, shared)
            while True:
                st.run_trials(
                    study, storage, place, budget, ctx.evaluator(scorer), stop, lambda t: report("trial")
                )
                _wait(children, study, stop, report, budget)
                now = st.counts(study)
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
    now = st.counts(study)
    if stop.requested and now.complete < budget:
        report("stopped")
        raise SearchStopped(now.complete, budget, place.shown)
    outcome = _outcome(ctx, study, scorer, time.perf_counter() - started)
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


def _reporter(ctx: Context, study, on_event) -> Callable[[str], None]:
    label = ctx.checked.names[0] if len(ctx.checked.names) == 1 else f"{ctx.search.select} objective"
    signs = ctx.checked.signs

    def report(kind: str) -> None:
        if on_event is None:
            return
        done = [r for r in records(study) if r.state == "COMPLETE"]
        best = None
        if done:
            chosen = select(done, signs, ctx.search.select)
            best = natural(selection_score(chosen, signs, ctx.search.select), signs)
        on_event(SearchEvent(kind, len(done), ctx.search.budget, best, label, ctx.place.shown))

    return report


def _wait(children: list, study, stop: st.StopFlag, report, budget: int) -> None:
    """Wait for the local workers (they stop at the budget too), reporting their trials as they finish. Once
    the budget is complete and nothing runs, no worker can start a trial: one still starting up is ended."""
    seen = st.counts(study).complete
    while any(c.is_alive() for c in children):
        now = st.counts(study)
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


class _threads:
    """With several local workers, share the cores between them."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        if self.workers > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.workers))
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.before)


# ------------------------------------------------------------------------------------------ local workers


def _spawn(ctx: Context, sources: dict, device: str, shared) -> list:
    if ctx.search.workers <= 1:
        return []
    real = real_recipe(ctx.recipe, sources)
    threads = max(1, (os.cpu_count() or 1) // ctx.search.workers)
    spawn = multiprocessing.get_context("spawn")
    children = []
    for index in range(1, ctx.search.workers):
        payload = {"recipe": real, "target": str(ctx.target), "device": device, "index": index}
        child = spawn.Process(target=_child, args=(payload, shared, threads), name=f"loracook-search-{index}")
        child.start()
        children.append(child)
    return children


def real_recipe(recipe, sources: dict):
    """The recipe with every source as the PEFT folder it now is (extractions already run)."""
    from loracook.recipe.model import AdapterSource

    real = {}
    for name, source in sources.items():
        dare = getattr(recipe.sources[name], "dare", None)
        real[name] = AdapterSource(adapter=str(source.adapter.path), dare=dare)
    return recipe.model_copy(update={"sources": real})


def _child(payload: dict, shared, threads: int) -> None:
    """A local worker process: the same recipe on the same study, until the budget or a stop."""
    import sys

    import torch

    torch.set_num_threads(threads)
    try:
        join_search(payload["recipe"], Path(payload["target"]), device=payload["device"],
                    offset=payload["index"], shared=shared)  # fmt: skip
    except BadInput as error:
        print(f"error: search worker {payload['index']}: {error.one_line()}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def join_search(
    recipe,
    target: Path,
    *,
    device: str = "cpu",
    offset: int = 0,
    shared=None,
    on_event: Callable[[SearchEvent], None] | None = None,
) -> int:
    """Work on the running study of ``recipe`` until it has its budget (``loracook search-worker``); returns the
    number of trials this worker finished. Writes nothing but trials."""
    from loracook.engine import prepare
    from loracook.sources import make_real

    prepared = prepare(recipe, read_tensors=True)
    with tempfile.TemporaryDirectory(prefix="loracook-search-worker-") as work:
        sources = make_real(prepared.sources, Path(work), recipe.merge.seed)
        ready = all(s.ready for s in prepared.sources.values())
        plan = prepared.plan if ready else _recompile(recipe, prepared, sources)
        ctx = Context.check(recipe, plan, Path(target))
        if ctx.place.url is None and not ctx.place.journal.is_file():
            raise BadInput(
                f"search-worker: no running search study at {ctx.place.journal}",
                loc=("search",),
                fix="start the search with `loracook run RECIPE` first (several hosts need an RDB "
                "search.storage URL; see docs/search.md)",
            )
        storage = st.open_storage(ctx.place)
        study = st.load_study(ctx.place, storage, None, ctx.fingerprint, what="search-worker")
        study.sampler = ctx.sampler(7919 * (offset or os.getpid()) + len(study.trials))
        scorer = open_scorer(plan, sources, ctx.checked, ctx.search.objective.chat_template, device)
        mine = []
        report = _reporter(ctx, study, on_event)
        with st.StopFlag(shared=shared) as stop:
            try:
                st.run_trials(study, storage, ctx.place, ctx.search.budget, ctx.evaluator(scorer), stop,
                              lambda t: (mine.append(t), report("trial")))  # fmt: skip
            finally:
                scorer.close()
        return len(mine)


def _recompile(recipe, prepared, sources):
    from loracook.plan.compile import compile_plan

    return compile_plan(recipe, prepared.base, sources)


# -------------------------------------------------------------------------------------------- the outcome


@dataclass
class SearchOutcome:
    """The chosen trial as a recipe to merge, and what goes into ``<output>/search/``."""

    recipe: object  # the recipe with the chosen weights: the merge that is written
    summary: dict
    rows: list[Record]
    best_text: str
    place: st.Place
    names: tuple[str, ...]
    signs: tuple[float, ...]

    def write(self, folder: Path) -> None:
        """best.yaml, trials.jsonl, summary.json, the journal, and search.png when matplotlib is there."""
        journal = self.place.journal if self.place.url is None else None
        write_files(folder, self.rows, self.summary, self.best_text, journal)
        done = [r for r in self.rows if r.state == "COMPLETE"]
        try:
            from loracook.search.plot import plot_search

            plot_search(folder / "search.png", done, self.names, self.signs, self.summary["select"],
                        self.summary["chosen"]["number"])  # fmt: skip
        except BadInput:
            pass  # matplotlib is optional: trials.jsonl carries the numbers

    def card(self, card: str) -> str:
        return with_card_section(card, card_section(self.summary))

    def cleanup(self) -> None:
        """After the commit: the study now lives in <output>/search/ (journal storage)."""
        st.remove_study(self.place)


def _outcome(ctx: Context, study, scorer: Scorer, seconds: float) -> SearchOutcome:
    rows = records(study)
    done = [r for r in rows if r.state == "COMPLETE"]
    signs, rule = ctx.checked.signs, ctx.search.select
    chosen = select(done, signs, rule)
    point = ctx.space.point(chosen.params)
    recipe = best_recipe(ctx.recipe, point.weights, point.densities, ctx.target)
    start = next((r for r in done if r.info.get("start") == "all weights 1"), None)
    summary = {
        "sampler": ctx.search.sampler,
        "seed": ctx.search.seed,
        "budget": ctx.search.budget,
        "finished": len(done),
        "failed": sum(r.state == "FAIL" for r in rows),
        "workers": ctx.search.workers,
        "objective": _describe(ctx),
        "objectives": list(ctx.checked.names),
        "directions": list(ctx.checked.directions),
        "l1": ctx.search.l1,
        "select": rule,
        "rule": _rule(ctx),
        "scorer": "the LoRA mixture (exact, nothing merged)" if scorer.how == "mixture"
        else f"executing the compiled plan in memory ({scorer.reason})",
        "chosen": {"number": chosen.number, "values": chosen.values, "objectives": chosen.info.get("objectives"),
                   "params": chosen.params},
        "weights": dict(point.weights),
        "densities": dict(point.densities),
        "start": {"label": "all weights 1", "number": start.number, "objectives": start.info.get("objectives")}
        if start else None,
        "seconds": seconds,
        "seconds_per_trial": sum(r.info.get("seconds", 0.0) for r in done) / len(done),
        "apply_seconds_mean": sum(r.info.get("apply_seconds", 0.0) for r in done) / len(done),
        "objective_seconds_mean": sum(r.info.get("objective_seconds", 0.0) for r in done) / len(done),
        "storage": ctx.place.shown,
    }  # fmt: skip
    header = (
        f"The best weights found by the search in recipe {ctx.recipe.name or ctx.target.name!r}: trial "
        f"{chosen.number} of {len(done)} ({summary['rule']}).\nA plain recipe: `loracook run best.yaml` "
        "writes the same merge (the search's own files aside)."
    )
    return SearchOutcome(
        recipe, summary, rows, recipe_yaml(recipe, header), ctx.place, ctx.checked.names, signs
    )


def _describe(ctx: Context) -> str:
    objective = ctx.search.objective
    if ctx.checked.examples:
        count = sum(len(rows) for _, rows in ctx.checked.examples)
        return f"the mean cross-entropy of the output tokens of {count} examples + {ctx.search.l1}·mean|w|"
    return f"lm-eval tasks on split {objective.split!r} ({', '.join(ctx.checked.names)}) ∓ {ctx.search.l1}·mean|w|"


def _rule(ctx: Context) -> str:
    names = ctx.checked.names
    if len(names) == 1:
        best = "lowest" if ctx.checked.directions[0] == "minimize" else "highest"
        return f"the {best} {names[0]} (with the L1 term)"
    if ctx.search.select == "worst":
        return "select: worst, the trial whose worst objective is best"
    return "select: mean, the trial with the best mean objective"
