"""Opening a database that another process may be creating at the same moment."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# What SQLite/SQLAlchemy/alembic say when two processes create the same schema at once.
SCHEMA_RACE_SIGNS = ("already exists", "UNIQUE constraint failed: alembic_version", "database is locked")


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
