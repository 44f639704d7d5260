"""Gradient-free search of the merge weights (docs/search.md): Optuna proposes weights, a resident base model
scores each candidate exactly without re-merging, and the chosen weights become the merge that is written.

    >>> from loracook.search import run_search                                      # doctest: +SKIP
    >>> outcome = run_search(recipe, plan, sources, Path("out/mix"), on_event=print)  # doctest: +SKIP
    >>> outcome.recipe.merge.weights                                                # doctest: +SKIP

Modules: ``space`` (the searched numbers -> the plan's Values), ``objectives`` (examples or lm-eval tasks),
``scorer`` (the LoRA mixture, or the compiled plan executed into memory), ``study`` (Optuna storage, sampler,
creating and loading a study), ``trials`` (the budgeted trial loop of one worker, Ctrl-C), ``session`` (one
search start to end), ``workers`` (local worker processes, search-worker), ``outcome`` and ``results`` (the
chosen trial, best.yaml, trials.jsonl, summary.json, the card) and ``plot`` (search.png).
"""

from loracook.search.outcome import SearchOutcome
from loracook.search.session import SearchEvent, SearchStopped, run_search
from loracook.search.space import Point, Space
from loracook.search.study import study_folder
from loracook.search.workers import join_search

__all__ = [
    "Point",
    "SearchEvent",
    "SearchOutcome",
    "SearchStopped",
    "Space",
    "join_search",
    "run_search",
    "study_folder",
]
