"""Signals as clean exits: SIGTERM/SIGHUP unwind like Ctrl-C, so every ``with OutputFolder`` removes its
temporary folder, and a commit's few renames are never cut in half.

Without this, SIGTERM (what ``kill``, systemd, Slurm and ``timeout`` send) ends Python at once: no ``finally``
runs, the temporary folder beside the output stays behind, and nothing is printed. Here the handler raises
:class:`Terminated` in the main thread instead, the stack unwinds through the cleanups, and the CLI prints one
line and exits 128 + the signal number (143 for SIGTERM, 129 for SIGHUP; SIGINT stays KeyboardInterrupt, 130).

SIGXFSZ is ignored while the CLI runs: by default a write past ``ulimit -f`` kills the process silently; ignored,
the write fails with EFBIG, which the CLI reports as one line with the path and the fix.
"""

from __future__ import annotations

import itertools
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_TERMINATING = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)


class Terminated(BaseException):  # noqa: N818 - named like KeyboardInterrupt, which it mirrors
    """Raised in the main thread by SIGTERM or SIGHUP. A BaseException, so ``except Exception`` lets it pass."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


# ------------------------------------------------------------------------------------------------ cleanups

_cleanups: dict[int, Callable[[], None]] = {}
_tokens = itertools.count()
_lock = threading.Lock()


def register_cleanup(callback: Callable[[], None]) -> int:
    """Run ``callback`` if the process is stopped by a signal before :func:`unregister_cleanup`; returns a token.

    The ``with`` blocks unwind on their own; this is the safety net for a signal that lands while one of them is
    already cleaning up, or for an object that was never used in a ``with``."""
    with _lock:
        token = next(_tokens)
        _cleanups[token] = callback
    return token


def unregister_cleanup(token: int) -> None:
    with _lock:
        _cleanups.pop(token, None)


def run_cleanups() -> None:
    """Run every registered cleanup once (newest first); a failing cleanup does not stop the others."""
    with _lock:
        callbacks = [_cleanups.pop(t) for t in sorted(_cleanups, reverse=True)]
    for callback in callbacks:
        try:
            callback()
        except Exception:  # noqa: BLE001, S112 - best effort while exiting
            continue


# ------------------------------------------------------------------------------------------------- handlers

_deferring = 0  # > 0 inside critical sections: signals are remembered and raised when the section ends
_pending: list[int] = []
_stopping = False  # a signal already started the unwinding: repeats are ignored so cleanups can finish
_stopped_by: int | None = None  # the signal that started it


def _on_signal(signum: int, frame: object) -> None:
    if _deferring:
        _pending.append(signum)
        return
    if _stopping:
        return
    _raise_for(signum)


def stop_in_flight() -> BaseException | None:
    """The KeyboardInterrupt or :class:`Terminated` a signal raised, if one did during this command.

    A library's own cleanup can fail while the signal unwinds through it (Optuna's lock release, for one) and
    replace the signal with an OSError; the CLI asks this to report the stop, not the side effect."""
    if _stopped_by is None:
        return None
    return KeyboardInterrupt() if _stopped_by == signal.SIGINT else Terminated(_stopped_by)


def _raise_for(signum: int) -> None:
    global _stopping, _stopped_by
    _stopping, _stopped_by = True, signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


@contextmanager
def handling_signals() -> Iterator[None]:
    """Install the handlers for the duration of a CLI command; restores the previous ones afterwards.

    Outside the main thread (a library caller running loracook in a worker) nothing is installed: Python only
    delivers signals to the main thread, and the caller owns its process's signal policy."""
    global _stopping, _stopped_by
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, object] = {}
    for signum in (signal.SIGINT, *_TERMINATING):
        previous[signum] = signal.signal(signum, _on_signal)
    if hasattr(signal, "SIGXFSZ"):
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _stopping, _stopped_by = False, None
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        _stopping, _stopped_by = False, None


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends, then act on the first one.

    For the renames of a commit: a signal between "move the old output aside" and "move the new one in" would
    otherwise leave neither in place. Works with threads (unlike ``pthread_sigmask``, which only masks the
    calling thread while the kernel may deliver a process signal to any other): the handler itself defers."""
    global _deferring, _stopping
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            if not _stopping:
                _raise_for(signum)
