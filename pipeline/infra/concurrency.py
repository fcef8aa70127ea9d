"""Living with other processes: a database another process may be creating, children that die with us, a
terminal that hangs up."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # Linux: a new random id at every boot


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """What tells process `pid` (default: this one) apart from a later process given the same pid: the host's
    boot id and the process's start time. Recorded beside a pid, it lets `same_process` see a reused pid (after a
    reboot, or a container restart, where pids count from 1 again). Empty where /proc cannot tell (not Linux)."""
    pid = os.getpid() if pid is None else pid
    boot, started = _boot_id(), _started(pid)
    return {"boot_id": boot, "started": started} if boot is not None and started is not None else {}


def same_process(pid: int, identity: dict[str, Any]) -> bool:
    """Is the process that had `identity` (`process_identity(pid)` when it ran) still running as `pid` on this host?
    Without an identity (recorded before one was, or where /proc cannot tell) the pid alone decides."""
    if not identity.get("boot_id") or identity.get("started") is None:
        return process_alive(pid)
    return process_identity(pid) == {"boot_id": identity["boot_id"], "started": identity["started"]}


def _boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return None


def _started(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/<pid>/stat field 22); None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name in parentheses, may hold blanks and ")": count the fields after its last ")".
    return int(stat.rsplit(")", 1)[1].split()[22 - 3])


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
