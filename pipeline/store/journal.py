"""A journal file's repair: a last line torn by a full disk, a power loss or a kill is cut off (after the whole
file is copied aside) before anything is appended to it; a journal with a line that is not an entry stops the
command with one line naming the file (BadInput)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from pipeline.infra import fileio
from pipeline.spec.errors import BadInput


def open_journal(path: Path, log: Callable[[str], None]) -> optuna.storages.JournalStorage:
    """The journal at `path` under `_JournalLock`, its torn last line (if any) mended at once (`log` says so)."""
    lock = _JournalLock(path, log)
    backend = JournalFileBackend(str(path), lock_obj=lock)
    if _torn(path):  # mend it now rather than at the first append, so that the user hears of it at once
        try:
            lock.acquire()
        except OSError as exc:  # no room to copy the file aside: nothing was changed
            raise BadInput(f"Optuna journal {path}: its last line was cut off mid-write and could not be mended "
                           f"({exc}); nothing was changed: free some disk space (or let this user write in "
                           f"{path.parent}) and run again") from None
        lock.release()
    try:
        return optuna.storages.JournalStorage(backend)
    except ValueError:  # Optuna's reader met a line that is not an entry (json.JSONDecodeError is a ValueError)
        raise BadInput(f"Optuna journal {path} is damaged ({_first_bad_line(path)}); nothing was changed: restore it "
                       f"from a backup, or move it aside (mv {path} {path}.damaged) and run again to start a new, "
                       "empty journal") from None


class _JournalLock(JournalFileSymlinkLock):
    """Optuna's own lock on the journal file (every append takes it), which first cuts off a torn last line.

    A write cut short (a full disk, a power loss, a kill) leaves a last line without its newline. Optuna's reader
    skips it, but the next append would be glued onto it, making a line no reader can parse: every later read of
    the journal would fail, in every process. Only the lock's holder writes, so while it is held a last line
    without its newline is a torn one, never another process's append in progress. The whole file is copied
    aside (`<journal>.torn-<time>`) before the partial line is removed.
    """

    def __init__(self, path: Path, log: Callable[[str], None]):
        super().__init__(str(path))
        self._path, self._log = path, log

    def acquire(self) -> bool:
        super().acquire()
        try:
            if _torn(self._path):  # every append takes this lock: one byte read, the scan only when torn
                _cut_torn_line(self._path, self._log)
        except BaseException:
            self.release()
            raise
        return True


def _torn(path: Path) -> bool:
    """Does the journal end in a line without its newline? (A quick look, without the lock.)"""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        return f.read(1) != b"\n"


def _cut_torn_line(path: Path, log: Callable[[str], None]) -> None:
    """Remove the journal's last line if it has no newline, after copying the whole file aside (under the lock)."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        whole = _whole_lines_length(f, size)
        if whole == size:
            return
        aside = path.with_name(f"{path.name}.torn-{datetime.now():%Y%m%d-%H%M%S-%f}")
        try:
            shutil.copyfile(path, aside)
            fileio.sync_tree(aside)
        except BaseException:
            aside.unlink(missing_ok=True)
            raise
        f.truncate(whole)
        f.flush()
        os.fsync(f.fileno())
    log(f"{path}: its last line was cut off mid-write ({size - whole} bytes without a newline: a full disk, a power "
        f"loss or a kill); Optuna skips such a line, but the next write would have been glued onto it, so it was "
        f"removed (the whole file was copied to {aside.name} first)")


def _whole_lines_length(f: BinaryIO, size: int, chunk: int = 1 << 16) -> int:
    """The length of the file up to and including its last newline."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        f.seek(start)
        found = f.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _first_bad_line(path: Path) -> str:
    """Which line of a journal Optuna cannot read, and why, for the message."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return f"line {number} has no newline"
            try:
                json.loads(line)
            except ValueError:
                return f"line {number} is not a journal entry: {line[:60]!r}"
    return "Optuna could not read it"

