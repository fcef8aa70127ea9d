"""Is a SQLite store damaged? Asked before Optuna or MLflow open one, so a truncated or overwritten file stops a
command with one line naming it, instead of a traceback from somewhere inside a later query.

A file cut short (a full disk, a copy that stopped, power loss without a journal) may still open, and even
answer its first queries: SQLite notices only when it reads a missing page. Its header, though, says how many
pages the file has, and SQLite itself reports that count: a file shorter than that is truncated. The check only
reads (`prepare` makes a missing folder for a new file, nothing more); nothing is repaired, moved or deleted.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pipeline.spec.errors import BadInput

BUSY_SECONDS = 5.0  # a writer holds the file this long at most; past it, the store's own open reports the lock


def sqlite_path(url: str) -> Path | None:
    """The file a `sqlite:///...` URL names; None for other URLs and in-memory databases."""
    if not url.startswith("sqlite:"):
        return None
    try:
        database = make_url(url).database
    except ArgumentError:  # not a URL SQLAlchemy reads: opening the store reports it in one line
        return None
    return Path(database) if database and database != ":memory:" else None


def prepare(url: str, what: str) -> None:
    """Before a store at `url` is opened: a SQLite file's folder exists, and a damaged file raises BadInput naming
    it (`what` names the store: "Optuna storage"). Another URL, a missing or empty file (a new store), or one locked
    by a writer pass: the store's own open deals with them."""
    path = sqlite_path(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.stat().st_size == 0:
        return
    problem = _damage(path)
    if problem is not None:
        raise BadInput(f"{what} {path} is damaged ({problem}); nothing was changed: restore it from a backup, or "
                       f"move it aside (mv {path} {path}.damaged) and run again to start a new, empty store")


def _damage(path: Path) -> str | None:
    """What is wrong with the database file, or None."""
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=BUSY_SECONDS,
                                 isolation_level=None)
    try:
        # A read transaction holds SQLite's shared lock: no writer changes the file while it is measured, and a
        # transaction that a killed writer left half done (a hot journal) has been rolled back first.
        connection.execute("BEGIN")
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            return None  # recent pages live in the -wal file: the main file's size says nothing
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        size = path.stat().st_size
        if size < pages * page_size:
            return f"truncated: {size:,} bytes, its header says {pages * page_size:,}"
        return None
    except sqlite3.OperationalError:  # locked, unreadable: not damage, and the real open says what it is
        return None
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        return str(exc)
    finally:
        connection.close()
