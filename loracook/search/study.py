"""The Optuna study of a search: its storage, sampler, starting points, and the trial loop of one worker.

Storage: by default an Optuna journal file in ``<output parent>/.<output name>.search/`` (the output folder
itself is written atomically at the end, so the study lives beside it while the search runs and is copied into
``<output>/search/`` at the commit); or an RDB URL (``search.storage``), which workers on other hosts join.

The trial loop itself is in :mod:`loracook.search.trials`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from loracook.errors import BadInput

JOURNAL = "journal.log"
STUDY = "loracook-search"


def study_folder(target: Path) -> Path:
    """Where the study lives while the search runs: a hidden sibling of the output folder."""
    return target.parent / f".{target.name}.search"


@dataclass(frozen=True)
class Place:
    """Where a study is: a journal file in ``folder``, or an RDB ``url``; and its name there."""

    folder: Path  # the sibling folder (the journal, or nothing for RDB)
    url: str | None
    name: str

    @property
    def journal(self) -> Path:
        return self.folder / JOURNAL

    @property
    def shown(self) -> str:
        return _hide_password(self.url) if self.url else str(self.journal)

    def lock_file(self) -> Path:
        if self.url is None:
            return self.folder / "budget.lock"
        digest = hashlib.sha1(f"{self.url}|{self.name}".encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"loracook-search-{digest}.lock"


def place_of(recipe, target: Path) -> Place:
    url = recipe.search.storage
    name = STUDY if url is None else f"loracook:{recipe.name or target.name}"
    return Place(study_folder(target), url, name)


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy reads: show it as given
        return url


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise BadInput(
            "a search needs Optuna", loc=("search",), fix="pip install 'loracook[search]' (optuna)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def journal_backend(path: Path):
    """Optuna's journal file, with SIGTERM/SIGHUP held while a worker holds its lock and appends.

    Optuna's lock is a file created on acquire and renamed away on release; ``Terminated`` raised inside
    ``release`` before the rename makes its own cleanup fail (FileNotFoundError on the ``.rename`` name, which
    hides the signal), and one raised between acquire and release leaves the lock behind (every later worker
    then waits out its 30 s grace period) or half a log line (a journal Optuna can no longer read). Held for the
    few milliseconds of an append, the signal is acted on as soon as the lock is released."""
    from optuna.storages.journal import JournalFileBackend

    from loracook.io.signals import deferred_signals

    class _Journal(JournalFileBackend):
        def append_logs(self, logs: list) -> None:
            with deferred_signals():
                super().append_logs(logs)

    return _Journal(str(path))


def open_storage(place: Place):
    """The Optuna storage; an RDB URL that cannot be opened is BadInput naming it."""
    optuna = import_optuna()
    if place.url is None:
        place.folder.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(journal_backend(place.journal))
    try:
        return optuna.storages.RDBStorage(place.url, heartbeat_interval=30, grace_period=120)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/driver errors of every kind
        raise BadInput(
            f"cannot open the study storage {place.shown}: {_first_line(exc)}",
            loc=("search", "storage"),
            fix="check the URL (e.g. sqlite:////abs/path/study.db, postgresql://user@host/db) and that the "
            "database driver is installed",
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def scalarized(sampler: str, objectives: int) -> bool:
    """Several objectives and a single-objective sampler: the study optimises the ``select`` score itself.

    TPE, CMA-ES and random sampling then spend every trial on the one number the search will choose by (the
    worst or the mean objective), instead of on a Pareto front of which only one point is written; ``nsga2``
    keeps the front. Measured on the demo's three skills: docs/search.md."""
    return objectives > 1 and sampler != "nsga2"


def make_sampler(name: str, seed: int):
    """The Optuna sampler (cmaes only ever sees one objective: several are scalarized for it)."""
    optuna = import_optuna()
    if name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise BadInput("sampler cmaes needs the cmaes package", loc=("search", "sampler"),
                       fix="pip install 'loracook[search]' (or pip install cmaes)")  # fmt: skip
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }
    return samplers[name]()


# ----------------------------------------------------------------------------------------- creating, loading


def create_study(place: Place, storage, directions, sampler, fingerprint: dict, starts, force: bool):
    """A new study with its starting points enqueued; an existing one is refused unless ``force``."""
    optuna = import_optuna()
    existing = _existing(storage, place.name)
    if existing:
        if not force:
            raise BadInput(
                f"a stopped search with {existing} trial(s) exists in {place.shown}",
                loc=("search",),
                fix="continue it with `loracook run RECIPE --resume`, or pass --force to start over",
            )
        optuna.delete_study(study_name=place.name, storage=storage)
    study = optuna.create_study(
        study_name=place.name, storage=storage, directions=list(directions), sampler=sampler
    )
    study.set_user_attr("loracook", fingerprint)
    for label, params in starts:
        study.enqueue_trial(params, user_attrs={"start": label})
    return study


def load_study(place: Place, storage, sampler, fingerprint: dict, *, what: str):
    optuna = import_optuna()
    if not _existing(storage, place.name, count_empty=True):
        raise BadInput(
            f"{what}: no search study in {place.shown}",
            loc=("search",),
            fix="start the search with `loracook run RECIPE` (without --resume)",
        )
    study = optuna.load_study(study_name=place.name, storage=storage, sampler=sampler)
    recorded = study.user_attrs.get("loracook")
    if recorded is not None and recorded != fingerprint:
        changed = sorted(k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k))
        raise BadInput(
            f"{what}: the recipe's search no longer matches the study in {place.shown} (changed: {', '.join(changed)})",
            loc=("search",),
            fix="put the recipe back as it was, or pass --force (without --resume) to start over",
        )
    return study


def _existing(storage, name: str, count_empty: bool = False) -> int:
    """Trials in the named study (1 for an empty study when ``count_empty``), 0 when there is none."""
    optuna = import_optuna()
    for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == name:
            return max(summary.n_trials, 1) if count_empty else summary.n_trials
    return 0


def remove_study(place: Place) -> None:
    if place.url is None:
        shutil.rmtree(place.folder, ignore_errors=True)


def fingerprint(recipe, checked) -> dict:
    """What must not change between a study's start and its resumption (the budget and sampler may)."""
    search = recipe.search
    return json.loads(
        json.dumps(
            {
                "sources": list(recipe.sources),
                "method": recipe.merge.method,
                "space": search.space.model_dump(mode="json"),
                "objectives": list(checked.names),
                "directions": list(checked.directions),
                "study": "select score" if scalarized(search.sampler, len(checked.names)) else "objectives",
                "scored_on": checked.digest(),
                "chat_template": search.objective.chat_template,
                "l1": search.l1,
            }
        )
    )
