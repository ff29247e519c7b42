"""A scheduler's request to stop (SIGTERM, or SLURM's early warning SIGUSR1): the run checkpoints and
exits with status 75 (EX_TEMPFAIL), which a job script can requeue on.

Training commands note these signals from the moment the command line starts (`note_early`), before
anything slow (imports, the teacher's build, the data listing): a request during start-up is not the
default kill (status 143, nothing said) but a stop before the first step. `StopSignals` takes over
for the training loop and inherits a request noted earlier. Standard library only: the command line
installs it before importing torch.
"""
from __future__ import annotations

import signal
import threading

from tinymim.core.errors import TinymimError

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, resumable; schedulers may requeue on it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_early: dict = {"received": None, "previous": {}}


class Preempted(TinymimError):
    """The run stopped on a scheduler's signal; what it had saved is kept and the same command resumes."""

    exit_code = PREEMPT_EXIT_CODE


def _note_early(signum, frame) -> None:
    _early["received"] = signum


def note_early() -> None:
    """From now on a stop signal is noted, not fatal (main thread only: signals are delivered there)."""
    if threading.current_thread() is threading.main_thread():
        _early["received"] = None
        for s in SIGNALS:
            _early["previous"].setdefault(s, signal.signal(s, _note_early))


def release_early() -> None:
    """For commands that do not train: the handlers from before `note_early` again, and a request
    noted meanwhile is delivered to them now (the process stops as it would have)."""
    if threading.current_thread() is threading.main_thread():
        for s, handler in _early["previous"].items():
            signal.signal(s, handler)
        _early["previous"] = {}
        received, _early["received"] = _early["received"], None
        if received is not None:
            signal.raise_signal(received)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "a signal"


class StopSignals:
    """SIGTERM and SIGUSR1 ask the run to stop at the end of the current step; the handlers only
    note the request. Installed for the block, in the main thread only; a request noted by
    `note_early` before the block counts as received."""

    def __init__(self):
        self.received: int | None = _early["received"]
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
