"""Living with other processes: a database another process may be creating, children that die with us."""

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
