"""The failure policy: what a trial's failure records, when failures stop the study.

A NaN/inf loss or an out-of-memory error prunes the trial with `fail_reason` `diverged`/`oom` (objective.py);
any other exception fails it (its traceback kept, `record_failure`) and the study goes on, unless three trials in
a row fail (TooManyFailures). A write that found no room (`disk_full`) stops the study (DiskFull): every later
trial would fail the same way.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import optuna

from pipeline import store
from pipeline.infra.fileio import NO_ROOM
from pipeline.infra.text import masked_text
from pipeline.search.events import TrialEnded
from pipeline.search.stopping import TooManyFailures

MAX_CONSECUTIVE_FAILURES = 3
DISK_FULL = "disk_full"
# What SQLite says (through its driver, SQLAlchemy and MLflow) when a write finds no room: SQLITE_FULL for a full
# disk; a disk I/O error for a file-size limit or a failing disk, where going on would not help either.
DISK_FULL_SIGNS = ("database or disk is full", "disk I/O error")


def record_failure(trial: optuna.Trial, exc: BaseException, context: str = "") -> None:
    """fail_reason (`disk_full` for a full disk or file-size limit), the detail and the traceback."""
    full = disk_full(exc)
    # Masked before it is cut: a URL cut short of its "@" would keep its password. Everything shown of a failure
    # (the trial line, the study's stop message, MLflow's tag, trials.csv, the dashboard) is read from here.
    text = masked_text(str(exc))
    detail = text.splitlines()[0][:300] if full else text[:1000]  # a database's error quotes its SQL
    store.note(trial, store.TrialNotes(fail_reason=DISK_FULL if full else type(exc).__name__,
               fail_detail=(f"{context}: " if context else "") + detail,
               traceback=masked_text(traceback.format_exc())[-8000:]))


def failing_trial(trial: optuna.Trial, action: Callable[[], None], context: str) -> None:
    """Run `action`; if it raises, record why on the trial and let the exception fail it."""
    try:
        action()
    except Exception as exc:
        record_failure(trial, exc, context)
        raise


def disk_full(exc: BaseException) -> bool:
    """Is `exc` (or what caused it) a write that found no room?"""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_ROOM:
            return True
        if any(sign in str(seen) for sign in DISK_FULL_SIGNS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_message(what: str) -> str:
    return (f"a disk write failed for lack of space (a full disk, a file-size limit or a failing disk): {what}. "
            "Finished trials are saved; free some space and run the same command again to resume")


def failures_in_a_row(before: int, ended: TrialEnded) -> int:
    """The count of failed trials in a row after `ended`; TooManyFailures when it reaches the limit."""
    count = before + 1 if ended.state == "FAIL" else 0
    if count >= MAX_CONSECUTIVE_FAILURES:
        raise TooManyFailures(f"{MAX_CONSECUTIVE_FAILURES} trials failed in a row; last one, trial {ended.number}: "
                              f"{ended.fail_reason}: {ended.fail_detail or ''}\n{ended.traceback or ''}")
    return count
