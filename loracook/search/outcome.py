"""The end of a search: the chosen trial as the recipe to merge, and what goes into ``<output>/search/``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loracook.errors import BadInput
from loracook.search import study as st
from loracook.search.results import (
    Record,
    best_recipe,
    card_section,
    recipe_yaml,
    records,
    reference_for,
    select,
    with_card_section,
    write_files,
)
from loracook.search.scorer import Scorer

if TYPE_CHECKING:
    from loracook.search.session import Context


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


def make_outcome(ctx: Context, study, scorer: Scorer, seconds: float) -> SearchOutcome:
    rows = records(study)
    done = [r for r in rows if r.state == "COMPLETE"]
    signs, rule = ctx.checked.signs, ctx.search.select
    chosen = select(done, signs, rule)
    reference = reference_for(done, signs, rule) if len(ctx.checked.names) > 1 else None
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
        "study": ("the select score, one objective" if ctx.scalar else "the objectives")
        if len(ctx.checked.names) > 1 else "the objective",
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
        "reference": dict(zip(("mean", "worst"), reference, strict=True)) if reference else None,
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
    searched = f"; {ctx.search.sampler} optimised it directly" if ctx.scalar else ""
    if ctx.search.select == "worst":
        return f"select: worst, the trial whose worst objective is best{searched}"
    if ctx.search.select == "improve":
        return (
            "select: improve, the trial that beats the starting points by most on both the mean and the worst "
            f"objective (the smaller of the two gains){searched}"
        )
    return f"select: mean, the trial with the best mean objective{searched}"
