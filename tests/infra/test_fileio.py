"""infra/fileio.py's room checks: `reserve` allocates a file's blocks (or writes them where the file system cannot
allocate ahead), and `ensure_room` finds a full disk before a writer that fails badly on one does."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.infra import fileio

PROJECT = Path(__file__).resolve().parents[2]


def test_reserve_grows_a_file_to_its_size_and_keeps_what_it_holds(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"header")
    with open(path, "r+b") as f:
        fileio.reserve(f.fileno(), 3 << 20)
        assert os.fstat(f.fileno()).st_blocks * 512 >= 3 << 20  # allocated, not sparse
    assert path.stat().st_size == 3 << 20 and path.read_bytes()[:6] == b"header"


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EINVAL])
def test_reserve_writes_zeros_where_the_file_system_cannot_allocate_ahead(tmp_path, monkeypatch, refusal):
    def cannot(fd: int, offset: int, length: int) -> None:
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "posix_fallocate", cannot)
    path = tmp_path / "f"
    path.write_bytes(b"header")
    with open(path, "r+b") as f:
        fileio.reserve(f.fileno(), (1 << 20) + 10)
        assert os.fstat(f.fileno()).st_blocks * 512 >= 1 << 20
    data = path.read_bytes()
    assert len(data) == (1 << 20) + 10 and data[:6] == b"header" and data[6:] == bytes(len(data) - 6)


def test_reserve_raises_what_else_the_file_system_says(tmp_path, monkeypatch):
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with open(tmp_path / "f", "wb") as f, pytest.raises(OSError) as raised:
        fileio.reserve(f.fileno(), 1 << 20)
    assert raised.value.errno in fileio.NO_ROOM


def ensure_room_under_a_file_size_limit(tmp_path: Path, limit: int, size: int) -> subprocess.CompletedProcess:
    """ensure_room(size, [tmp_path/a, None, tmp_path/b], copies=2) in a process that may not write files over
    `limit` bytes (Python ignores SIGXFSZ: a write past the limit is EFBIG, as under the fault tests)."""
    script = textwrap.dedent(f"""
        import errno, sys
        from pathlib import Path
        from pipeline.infra import fileio
        try:
            fileio.ensure_room({size}, [Path({str(tmp_path / "a")!r}), None, Path({str(tmp_path / "b")!r})], 2)
        except OSError as exc:
            print(errno.errorcode[exc.errno], exc.errno in fileio.NO_ROOM)
            sys.exit(3)
        print("room")
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(PROJECT)),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


def test_ensure_room_raises_under_a_file_size_limit_and_leaves_no_probe_files(tmp_path):
    refused = ensure_room_under_a_file_size_limit(tmp_path, limit=2 << 20, size=3 << 20)
    assert (refused.returncode, refused.stdout.split()) == (3, ["EFBIG", "True"]), refused.stderr
    assert list((tmp_path / "a").iterdir()) == []  # the probes are gone
    assert not (tmp_path / "b").exists()  # the first folder without room stops it


def test_ensure_room_checks_every_folder_given_and_skips_none(tmp_path):
    fits = ensure_room_under_a_file_size_limit(tmp_path, limit=2 << 20, size=1 << 20)
    assert (fits.returncode, fits.stdout.split()) == (0, ["room"]), fits.stderr
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["a", "b"]  # each made, None skipped
    assert list((tmp_path / "a").iterdir()) == [] and list((tmp_path / "b").iterdir()) == []
