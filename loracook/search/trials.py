"""The trial loop of one worker: ask while the budget allows, score, tell; stop cleanly on Ctrl-C.

The budget counts finished trials. A worker asks for a trial only while finished + running trials are fewer
than the budget, under a lock shared by the workers of one host, so local workers never overshoot; workers on
other hosts (RDB) re-check after asking, and a trial asked past the budget is recorded as failed, never run.
A RUNNING trial whose worker is gone (a dead pid on this host, a stale RDB heartbeat) is marked failed, so it
does not hold a place in the budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loracook.errors import BadInput
from loracook.io.signals import deferred_signals
from loracook.io.writer import pid_alive
from loracook.search.study import Place

# RDB: a RUNNING trial with no worker tag this old was orphaned between ask and tag
STALE_UNTAGGED_SECONDS = 600
MAX_FAILURES_IN_A_ROW = 10


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


def fail_stale(study, storage, *, untagged_is_orphan: bool) -> None:
    """Mark as failed the RUNNING trials whose worker is gone: on this host, a dead pid; elsewhere, a stale RDB
    heartbeat (Optuna's own rule).

    A trial is asked and tagged with its worker under the budget lock, signals deferred. A trial still untagged
    is one whose worker died between the two (SIGKILL). ``untagged_is_orphan``: the caller holds the lock that
    every worker of the study asks under (a journal file: all workers on this host), so such a trial is failed
    at once; with an RDB, workers on other hosts ask under their own lock, and it is failed only when old."""
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
            stale = untagged_is_orphan or now - started > STALE_UNTAGGED_SECONDS
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

    failures = 0
    while not stop.check():
        if failures >= MAX_FAILURES_IN_A_ROW:
            raise BadInput(
                f"{failures} trials in a row gave a non-finite objective (NaN or infinity)",
                loc=("search", "space", "weights"),
                fix="narrow the weight bounds",
            )
        trial = None
        try:  # a stop or an error anywhere between the ask and the tell fails the trial: none is left RUNNING
            with budget_lock(place.lock_file()):
                fail_stale(study, storage, untagged_is_orphan=place.url is None)
                now = counts(study)
                if now.complete + now.running >= budget:
                    return
                # two storage writes: a SIGTERM between them would leave a trial that no worker owns
                with deferred_signals():
                    trial = study.ask()
                    trial.set_user_attr("worker", worker_tag())
            done = _run_one(study, trial, storage, place, budget, evaluate)
        except BaseException:
            if trial is not None:
                _fail(study, trial)
            raise
        if done is None:
            return
        values, seconds = done
        failures = 0 if values is not None else failures + 1
        if on_trial is not None:
            on_trial(Trial(trial.number, values, seconds))


def _run_one(study, trial, storage, place, budget: int, evaluate: Callable):
    """Score and tell one asked trial: (its values, or None when not finite; seconds), or None when it was
    asked past the budget (another host asked at the same moment)."""
    from optuna.trial import TrialState

    if place.url is not None and _past_budget(study, trial.number, budget):
        study.tell(trial, state=TrialState.FAIL)
        return None
    start = time.perf_counter()
    with heartbeat(storage, trial):
        values, attrs = evaluate(trial)
    seconds = time.perf_counter() - start
    trial.set_user_attr("info", {**attrs, "seconds": seconds})  # one journal write
    if values is None or not all(math.isfinite(v) for v in values):
        study.tell(trial, state=TrialState.FAIL)
        return None, seconds
    study.tell(trial, values if len(values) > 1 else values[0])
    return values, seconds


def _fail(study, trial) -> None:
    """Record an asked trial as failed; a trial already told stays as it is."""
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):
        study.tell(trial, state=TrialState.FAIL)


def _past_budget(study, number: int, budget: int) -> bool:
    """Another host asked at the same moment: count the finished and running trials numbered before this one."""
    from optuna.trial import TrialState

    before = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        if t.number < number
    ]
    return len(before) >= budget
