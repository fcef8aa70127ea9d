"""File writers killed outright: what a checkpoint write killed mid-write leaves, and the next write that
tidies it; moves that never merge folders."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import run_python

from pipeline.infra import fileio


@pytest.mark.faults
def test_a_writer_killed_mid_write_leaves_a_temporary_file_the_next_write_in_that_folder_removes(tmp_path):
    folder = tmp_path / "checkpoints"
    killed = run_python("""
        import os, signal, sys
        from pathlib import Path
        from pipeline.infra import fileio
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed with the bytes written, not yet renamed
        fileio.write_atomic(Path(sys.argv[1]) / "trial-3.ckpt", b"x" * 1_000_000)
    """, str(folder))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (dead,) = folder.iterdir()
    assert dead.name.startswith(".trial-3.ckpt.") and dead.stat().st_size == 1_000_000
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live writer's file
    try:
        live = folder / f".trial-5.ckpt.{writer.pid}.abcd1234.tmp"
        live.write_bytes(b"in progress")
        fileio.write_atomic(folder / "trial-4.ckpt", b"weights")
        assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, "trial-4.ckpt"])
    finally:
        writer.kill()
        writer.wait()


def test_rename_durably_moves_files_and_folders_and_never_merges_folders(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("1")
    fileio.rename_durably(tmp_path / "new", tmp_path / "final")
    assert (tmp_path / "final" / "a").read_text() == "1" and not (tmp_path / "new").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b").write_text("2")
    with pytest.raises(OSError):
        fileio.rename_durably(tmp_path / "other", tmp_path / "final")  # a folder is never replaced or merged
    (tmp_path / "file.tmp").write_text("3")
    fileio.rename_durably(tmp_path / "file.tmp", tmp_path / "final" / "a")  # a file replaces a file
    assert (tmp_path / "final" / "a").read_text() == "3"
