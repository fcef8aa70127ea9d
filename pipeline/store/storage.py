"""Where studies live: the storage a command uses (SQLite, a journal file for local workers, PostgreSQL), opened.

One study file gives one Optuna study (`<name>`, or `<name>-v<N>` after FRESH=1) in the storage
(`sqlite:///studies/optuna.db` unless STORAGE is set). A damaged store stops a command with one line naming the
file (BadInput); a journal's torn last line is mended before anything is appended to it (journal.py).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import optuna

from pipeline.infra import sqlitecheck
from pipeline.infra.concurrency import open_store
from pipeline.infra.text import print_to_stderr
from pipeline.infra.urls import error_line, shown
from pipeline.spec import paths
from pipeline.spec.errors import BadInput
from pipeline.store.journal import open_journal
from pipeline.store.versions import versions

# A RUNNING trial whose process stopped beating for GRACE_SECONDS is failed... (the environment variables
# shorten both for the fault tests; a real trial's epochs are far longer).
HEARTBEAT_SECONDS = int(os.environ.get("PIPELINE_HEARTBEAT_SECONDS", 30))
GRACE_SECONDS = int(os.environ.get("PIPELINE_GRACE_SECONDS", 90))
MAX_RETRIES = 2  # ...and retried up to this many times
STORE_PREFIX = "store-"  # checkpoint folders of stores other than the default ones: studies/checkpoints/store-<key>/


def quiet_optuna() -> None:
    """Our own progress output replaces Optuna's log lines. Heartbeats and the stale-trial retry are marked
    experimental; they are the documented way to recover from killed workers, and Optuna's version is pinned."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass(frozen=True)
class Storage:
    url: str  # as the user (or the default) named it; workers are handed the same
    backend: optuna.storages.BaseStorage


def storage_url(override: str | None = None, study: str | None = None, workers: int = 1) -> str:
    """STORAGE when given. Otherwise the default store `study` (a study file name) already lives in:
    studies/optuna.db (SQLite, one worker) or studies/optuna.journal (where several local workers work);
    a new study goes to the journal when it starts with several workers."""
    chosen = _chosen(override)
    if chosen:
        return chosen
    if study is None or _holds(paths.DEFAULT_STORAGE, study):
        return paths.DEFAULT_STORAGE
    if workers > 1 or _holds(str(paths.DEFAULT_JOURNAL), study):
        return str(paths.DEFAULT_JOURNAL)
    return paths.DEFAULT_STORAGE


def open_storage(override: str | None = None, study: str | None = None, workers: int = 1) -> Storage:
    """The storage `storage_url` chooses, opened."""
    url = storage_url(override, study, workers)
    return Storage(url, make_storage(url))


def open_storages(override: str | None = None) -> list[Storage]:
    """Every store a study file's versions may be in, each opened once: STORAGE's when given, else the default
    stores whose file exists (none is made), in the order `storage_url` looks in them."""
    chosen = _chosen(override)
    defaults = (paths.DEFAULT_STORAGE, str(paths.DEFAULT_JOURNAL))
    found = [chosen] if chosen else [url for url in defaults if (path := _store_file(url)[1]) and path.is_file()]
    return [Storage(url, make_storage(url)) for url in found]


def _chosen(override: str | None) -> str | None:
    return override or os.environ.get("STORAGE")


_StoreKind = Literal["journal", "sqlite", "server"]


def _store_file(url: str) -> tuple[_StoreKind, Path | None]:
    """What kind of store `url` names, and its file: a journal (a path ending in .journal, `journal://` before it or
    not), a SQLite file (None for an in-memory one) or a database server (no file)."""
    if url.endswith(".journal"):
        return "journal", Path(url.removeprefix("journal://"))
    if url.startswith("sqlite:"):
        return "sqlite", sqlitecheck.sqlite_path(url)
    return "server", None


def _identity(url: str) -> str:
    """The store at `url` however its path is spelt and whatever its password."""
    kind, path = _store_file(url)
    return shown(url) if path is None else f"{kind}:{path.expanduser().resolve()}"


def storage_key(url: str) -> str | None:
    """A short name for the store at `url`, the same however its path is spelt and whatever its password; None for
    the default stores (studies/optuna.db and studies/optuna.journal), whose checkpoints keep the folders they had
    before stores were told apart."""
    identity = _identity(url)
    if identity in (_identity(paths.DEFAULT_STORAGE), _identity(str(paths.DEFAULT_JOURNAL))):
        return None
    return STORE_PREFIX + hashlib.sha256(identity.encode()).hexdigest()[:12]


def _holds(url: str, name: str) -> bool:
    """Does the store at `url` (a default file, which may not exist yet) hold any version of study `name`?"""
    path = _store_file(url)[1]
    if path is None or not path.is_file():
        return False
    return bool(versions(make_storage(url), name))


def make_storage(url: str, log: Callable[[str], None] = print_to_stderr) -> optuna.storages.BaseStorage:
    """An RDB URL (sqlite:///..., postgresql://...) with heartbeats, or a `.journal` file for local workers.

    A damaged store (a SQLite file cut short or overwritten, a journal with a line that is not an entry) stops
    here with BadInput naming the file; a journal's torn last line is mended (`log` says so: on stderr by default, as
    a worker's stdout carries its events)."""
    quiet_optuna()
    kind, path = _store_file(url)
    if kind == "journal" and path is not None:  # Optuna's journal file: safe for several processes on one host
        path.parent.mkdir(parents=True, exist_ok=True)
        return open_journal(path, log)
    sqlitecheck.prepare(url, "Optuna storage")
    try:
        return open_store(lambda: optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        ))
    except Exception as exc:  # bad URL, unreachable server, locked or unwritable file
        reason = error_line(exc, url)
        raise BadInput(f"Optuna storage {shown(url)!r} cannot be opened: {reason}; "
                       "check STORAGE (default: sqlite:///studies/optuna.db, or a path ending in .journal)") from None


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study lives in (its companions live there too). Optuna keeps it private; it has no public
    accessor."""
    return study._storage
