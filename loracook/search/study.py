"""The Optuna study of a search: its storage, sampler, starting points, and the trial loop of one worker.

Storage: by default an Optuna journal file in ``<output parent>/.<output name>.search/`` (the output folder
itself is written atomically at the end, so the study lives beside it while the search runs and is copied into
``<output>/search/`` at the commit); or an RDB URL (``search.storage``), which workers on other hosts join.

The budget counts finished trials. A worker asks for a trial only while finished + running trials are fewer
than the budget, under a lock shared by the workers of one host, so local workers never overshoot; workers on
other hosts (RDB) re-check after asking, and a trial asked past the budget is recorded as failed, never run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loracook.errors import BadInput
from loracook.io.writer import pid_alive

JOURNAL = "journal.log"
STUDY = "loracook-search"
STALE_UNTAGGED_SECONDS = 600
MAX_FAILURES_IN_A_ROW = 10  # a RUNNING trial with no worker tag this old was orphaned between ask and tag


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
        raise BadInput("a search needs Optuna", loc=("search",), fix="pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_storage(place: Place):
    """The Optuna storage; an RDB URL that cannot be opened is BadInput naming it."""
    optuna = import_optuna()
    if place.url is None:
        from optuna.storages.journal import JournalFileBackend

        place.folder.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(place.journal)))
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


def make_sampler(name: str, seed: int, objectives: int):
    optuna = import_optuna()
    if name == "cmaes" and objectives > 1:
        raise BadInput(
            f"sampler cmaes optimises one objective; this search has {objectives}",
            loc=("search", "sampler"),
            fix="use nsga2 or tpe for several objectives",
        )
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


# ------------------------------------------------------------------------------------------- one worker


class StopFlag:
    """SIGINT (Ctrl-C) asks to stop after the running trial; a second one stops at once. ``shared`` (a
    multiprocessing Event) carries the request between the local workers.

    The signal handler only sets a flag: it runs between two bytecodes of whatever the main thread is doing,
    possibly inside the storage's own lock, so anything more (telling the other workers, reporting) happens in
    :meth:`check`, called by the trial loop."""

    def __init__(self, on_request: Callable[[], None] | None = None, shared=None) -> None:
        self._signalled = self._told = False
        self.on_request = on_request
        self.shared = shared
        self._previous = None

    @property
    def requested(self) -> bool:
        return self._signalled or (self.shared is not None and self.shared.is_set())

    def check(self) -> bool:
        """True when a stop was asked (here or by another local worker); passes a local request on once."""
        if self._signalled and not self._told:
            self._told = True
            if self.shared is not None:
                self.shared.set()
            if self.on_request is not None:
                self.on_request()
        return self.requested

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self._signalled:
            raise KeyboardInterrupt
        self._signalled = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class Counts:
    complete: int
    running: int
    failed: int


def counts(study) -> Counts:
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    return Counts(
        states.count(TrialState.COMPLETE), states.count(TrialState.RUNNING), states.count(TrialState.FAIL)
    )


def worker_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_stale(study, storage) -> None:
    """Mark as failed the RUNNING trials whose worker is gone: on this host, a dead pid; elsewhere, a stale RDB
    heartbeat (Optuna's own rule)."""
    import optuna
    from optuna.trial import TrialState

    if hasattr(storage, "is_heartbeat_enabled") and storage.is_heartbeat_enabled():
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tag = trial.user_attrs.get("worker")
        if tag is None:
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            stale = now - started > STALE_UNTAGGED_SECONDS
        else:
            tag_host, _, pid = tag.rpartition(":")
            stale = tag_host == host and pid.isdigit() and not pid_alive(int(pid))
        if stale:
            with contextlib.suppress(Exception):  # another worker may have done it first
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


@contextlib.contextmanager
def budget_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def heartbeat(storage, trial) -> Iterator[None]:
    """Keep an RDB trial's heartbeat fresh while it runs, so other hosts do not fail it as stale."""
    if not (hasattr(storage, "is_heartbeat_enabled") and storage.is_heartbeat_enabled()):
        yield
        return
    done = threading.Event()

    def beat() -> None:
        while not done.is_set():
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial._trial_id)
            done.wait(storage.get_heartbeat_interval() or 30)

    thread = threading.Thread(target=beat, name="loracook-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)


@dataclass(frozen=True)
class Trial:
    """What a finished trial reports to the progress callback."""

    number: int
    values: list[float] | None
    seconds: float


def run_trials(
    study,
    storage,
    place: Place,
    budget: int,
    evaluate: Callable,
    stop: StopFlag,
    on_trial: Callable[[Trial], None] | None = None,
) -> None:
    """Ask, evaluate and tell trials until the budget is reached (finished + running) or a stop is asked.

    ``evaluate(trial) -> (values, user_attrs)``; values None or not finite records the trial as failed."""
    from optuna.trial import TrialState

    failures = 0
    while not stop.check():
        if failures >= MAX_FAILURES_IN_A_ROW:
            raise BadInput(
                f"{failures} trials in a row gave a non-finite objective (NaN or infinity)",
                loc=("search", "space", "weights"),
                fix="narrow the weight bounds",
            )
        with budget_lock(place.lock_file()):
            fail_stale(study, storage)
            now = counts(study)
            if now.complete + now.running >= budget:
                return
            trial = study.ask()
            trial.set_user_attr("worker", worker_tag())
        if place.url is not None and _past_budget(study, trial.number, budget):
            study.tell(trial, state=TrialState.FAIL)
            return
        start = time.perf_counter()
        try:
            with heartbeat(storage, trial):
                values, attrs = evaluate(trial)
        except BaseException:
            with contextlib.suppress(Exception):
                study.tell(trial, state=TrialState.FAIL)
            raise
        seconds = time.perf_counter() - start
        trial.set_user_attr("info", {**attrs, "seconds": seconds})  # one journal write
        finite = values is not None and all(math.isfinite(v) for v in values)
        failures = 0 if finite else failures + 1
        if finite:
            study.tell(trial, values if len(values) > 1 else values[0])
        else:
            study.tell(trial, state=TrialState.FAIL)
        if on_trial is not None:
            on_trial(Trial(trial.number, values if finite else None, seconds))


def _past_budget(study, number: int, budget: int) -> bool:
    """Another host asked at the same moment: count the finished and running trials numbered before this one."""
    from optuna.trial import TrialState

    before = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        if t.number < number
    ]
    return len(before) >= budget


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
                "l1": search.l1,
            }
        )
    )
