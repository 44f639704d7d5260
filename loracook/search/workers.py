"""More workers on one study: local processes (``workers: N``) and ``loracook search-worker`` on other hosts.

A local worker is a spawned process that runs :func:`join_search` on the recipe with its sources as the PEFT
folders they now are; it shares the study (journal file or RDB) and the budget lock with the main process.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from loracook.errors import BadInput
from loracook.io.signals import Terminated, handling_signals
from loracook.search import study as st
from loracook.search.scorer import open_scorer
from loracook.search.session import Context, SearchEvent, reporter
from loracook.search.trials import StopFlag, run_trials


class threads_for:
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


def spawn(ctx: Context, sources: dict, device: str, shared) -> list:
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
        # SIGTERM to the process group (timeout, Slurm): the running trial is failed, the journal left whole
        with handling_signals():
            join_search(payload["recipe"], Path(payload["target"]), device=payload["device"],
                        offset=payload["index"], shared=shared)  # fmt: skip
    except BadInput as error:
        print(f"error: search worker {payload['index']}: {error.one_line()}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Terminated as stop:
        raise SystemExit(stop.exit_code) from None


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
        report = reporter(ctx, study, on_event)
        with StopFlag(shared=shared) as stop:
            try:
                run_trials(study, storage, ctx.place, ctx.search.budget, ctx.evaluator(scorer), stop,
                              lambda t: (mine.append(t), report("trial")))  # fmt: skip
            finally:
                scorer.close()
        return len(mine)


def _recompile(recipe, prepared, sources):
    from loracook.plan.compile import compile_plan

    return compile_plan(recipe, prepared.base, sources)
