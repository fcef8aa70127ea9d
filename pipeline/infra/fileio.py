"""Files that survive kills and power loss: atomic writes, durable renames, and what killed writers leave behind.

A writer builds its file or folder under a temporary name that carries its process id, then renames it into
place; a reader sees the old version or the new one, never half of one. After a power loss the rename holds
only if the new content reached the disk first and the folder's entry after it: `rename_durably` does both.
A writer killed before its rename leaves the temporary name behind; whoever writes in that folder next removes
the ones whose process is gone (`dead_leftovers`). Process ids are this host's: every host works in its own
clone of the project.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from pipeline.infra.concurrency import process_alive

# write_atomic's temporary names: .<name>.<pid>.<8 random characters from mkstemp>.tmp
TEMP_PATTERN = re.compile(r"^\..+\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write that found no room: a full disk, a quota, a size limit


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temporary name in the same folder, then rename it over `path` durably (flushed first). The file
    gets `mode`, not the owner-only mode of a temporary file: what it holds (data, checkpoints, reports) is no
    secret."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in dead_leftovers(path.parent, TEMP_PATTERN):
        remove(leftover)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
        rename_durably(Path(tmp), path)  # fsyncs the content before the rename, the folder after it
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rename_durably(source: Path, target: Path) -> None:
    """Rename a finished file or folder to `target` so that a power loss leaves either the old state or all of
    the new: `source`'s content is flushed to disk before the rename, the folder's entry after it.

    Like os.rename: a file replaces a file; a folder replaces nothing but an empty folder (OSError otherwise).
    """
    sync_tree(source)
    os.rename(source, target)
    fsync_dir(Path(target).parent)


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (renames, new and removed names in it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system that cannot sync folders
            raise
    finally:
        os.close(fd)


def sync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a folder."""
    if not Path(path).is_dir():
        _fsync_file(path)
        return
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dead_leftovers(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Entries of `folder` whose name matches `pattern` (its group `pid`: the process that wrote it) and whose
    process is gone. This process's own are never included: one of its threads may be writing them."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(names):
        match = pattern.match(name)
        if match and int(match["pid"]) != os.getpid() and not process_alive(int(match["pid"])):
            found.append(Path(folder) / name)
    return found


def remove(path: Path) -> None:
    """Delete a file or a folder tree; already gone is fine (another process may tidy the same leftovers)."""
    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


def reserve(fd: int, size: int) -> None:
    """Allocate the disk blocks of the first `size` bytes of the open file `fd` (growing it to `size`), so that a
    full disk, a quota or a file-size limit is an OSError (NO_ROOM) here, not a crash later: a write through a
    memory map that finds no room kills the process (SIGBUS), and some writers abort. A file system that cannot
    allocate ahead (EOPNOTSUPP, EINVAL) gets zeros written after the file's end instead, flushed to disk."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        zeros = memoryview(bytes(1 << 20))
        offset = os.fstat(fd).st_size
        while offset < size:
            offset += os.pwrite(fd, zeros[:size - offset], offset)
        os.fsync(fd)


def ensure_room(size: int, directories: list[Path | None], copies: int = 1) -> None:
    """Raise OSError (NO_ROOM) now if `copies` files of `size` bytes cannot be held at once in each folder (None: a
    folder on another machine's disk, skipped), for writers that fail badly on a full disk: probe files, reserved
    (`reserve`) and removed, fail cleanly instead."""
    for directory in directories:
        if directory is None:
            continue
        directory.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as probes:
            for _ in range(copies):
                reserve(probes.enter_context(tempfile.TemporaryFile(dir=directory)).fileno(), size)
