"""How a search stops: the signals that ask it to (StopRequest, which stops only at safe points), and the
exceptions that end it early (Interrupted, and StudyStopped's kinds: too many failures in a row, a full disk).

Ctrl-C, SIGTERM or SIGHUP fails the running trial with reason `interrupted`, queues it again to run first, and
stops; a second signal stops at once.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.infra.concurrency import quiet_if_hung_up

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill, a terminal or SSH session gone


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP (the terminal or SSH session went away) arrived during the search."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


class OutOfTime(KeyboardInterrupt):
    """A planned search's clock: the trial about to start would not end in the time left (`started` False), or the
    run's deadline came while it trained (`started` True: its last epoch's checkpoint is kept). Either way the trial is
    queued again to run first next time, as an interrupted one is."""

    def __init__(self, started: bool, detail: str):
        super().__init__(detail)
        self.started = started

    @property
    def reason(self) -> str:
        return "deadline" if self.started else "no_time"


class StudyStopped(Exception):
    """The search cannot usefully go on; the message says why and what to do. Every trial is recorded."""


class TooManyFailures(StudyStopped):
    """Three trials in a row failed: something is wrong beyond one bad configuration."""


class DiskFull(StudyStopped):
    """A write failed for lack of space (or a file-size limit): every later trial would fail the same way."""


class SurplusTrial(Exception):
    """Another worker took the budget's last trial at the same moment as this one."""


class StopRequest:
    """SIGINT/SIGTERM/SIGHUP handling that only interrupts at safe points.

    The handler just records the signal; `check()` raises Interrupted where it is safe to stop: after
    any training batch or epoch, and between trials. Raising from inside Optuna's bookkeeping could
    leave a trial half-told. A second signal raises at once, for a user who insists; not the same signal again
    once this process's parent has died: a worker's coordinator killed outright sends it SIGTERM through
    PR_SET_PDEATHSIG once per thread of the coordinator's that exits, which is no user insisting.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self.parent = os.getppid()

    def _handle(self, signal_number: int, _frame: Any) -> None:
        if signal_number == signal.SIGHUP:
            quiet_if_hung_up()
        if self.signal_number is not None:
            if signal_number == self.signal_number and os.getppid() != self.parent:
                return  # the parent's death, told again: stop at the next safe point, as asked the first time
            raise Interrupted(signal_number)
        self.signal_number = signal_number

    def check(self) -> None:
        if self.signal_number is not None:
            raise Interrupted(self.signal_number)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

