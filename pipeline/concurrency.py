"""Living with other processes: a database another process may be creating, children that die with us, a
terminal that hangs up."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# What SQLite/SQLAlchemy/alembic say when two processes create the same schema at once.
SCHEMA_RACE_SIGNS = ("already exists", "UNIQUE constraint failed: alembic_version", "database is locked")


def available_cores() -> int:
    """The cores this process may use (a container's or taskset's share, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_alive(pid: int) -> bool:
    """Is process `pid` running on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def open_store(open_: Callable[[], T], attempts: int = 3, pause_seconds: float = 1.0) -> T:
    """Call `open_`; when it fails the way a concurrent schema creation makes it fail, wait and try again."""
    for attempt in range(1, attempts + 1):
        try:
            return open_()
        except Exception as exc:
            if attempt == attempts or not any(sign in str(exc) for sign in SCHEMA_RACE_SIGNS):
                raise
            time.sleep(pause_seconds)
    raise AssertionError("unreachable")


def stop_with_parent() -> None:
    """In a child process before exec: SIGTERM it when its parent dies (prctl PR_SET_PDEATHSIG, Linux only),
    so a server or worker never outlives a parent that was killed outright."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def stop_signals_interrupt() -> None:
    """SIGTERM and SIGHUP (a closed terminal) raise KeyboardInterrupt in the main thread, as Ctrl-C does, so a
    server that serves until interrupted stops the same way whichever arrives."""
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, _raise_keyboard_interrupt)


def _raise_keyboard_interrupt(signal_number: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal_number)


def quiet_if_hung_up() -> None:
    """After SIGHUP: if the terminal is gone (an SSH session dropped), stdout and stderr go to /dev/null from now on.

    Every write to a hung-up terminal fails (EIO), so the first progress line would end the process before it
    has closed its trials and recorded the end of the run. An empty write tells a hung-up terminal (EIO) from a
    live one, a pipe or a file (which take it); those are left as they are.
    """
    for fd in (1, 2):
        try:
            os.write(fd, b"")
        except OSError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
