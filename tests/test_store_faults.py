"""Torn and damaged stores, damaged downloads, and what processes killed outright leave behind.

Everything is real: journals cut short by a real file-size limit or by truncating what a real search wrote,
SQLite files a real search wrote and then truncated, processes killed with SIGKILL. Where the kill has to land
between two renames microseconds apart, the process kills itself right after the rename in question (its
os.rename wrapped in that process only): what is left on disk is exactly what a kill at that point leaves.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from conftest import StudyEnv, wait_until, write_tiny_dataset
from ui_process import free_port

from pipeline import datasets, fileio, server, store
from pipeline.cli import main
from pipeline.errors import BadInput

PROJECT = Path(__file__).resolve().parents[1]


def run_python(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A Python script in a process of its own, importing this checkout's `pipeline`."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(PROJECT)))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(err: str) -> str:
    """The command's error: exactly one line, and no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# A study searched once, tracked: both stores as a real search writes them


@dataclass
class Searched:
    env: StudyEnv  # a tracked search of the tiny study, one finished trial
    info: datasets.DatasetInfo
    pristine: Path  # optuna.db and mlflow.db as the search left them


@pytest.fixture(scope="module")
def searched(tmp_path_factory, empty_mlflow_store) -> Searched:
    base = tmp_path_factory.mktemp("searched")
    (base / "mlruns").mkdir()
    shutil.copy(empty_mlflow_store, base / "mlruns" / "mlflow.db")
    env = StudyEnv.under(base, base / "data", tracking_uri=f"sqlite:///{base}/mlruns/mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        info = write_tiny_dataset(env.root)
        patch.setitem(datasets.DATASETS, info.name, info)
        patch.setenv("MLFLOW_TRACKING_URI", env.tracking_uri)
        env.write_study(trials=1, sampler="random", pruner="none", fixed={"precision": "fp32"})
        assert env.run("search") == 0
    pristine = base / "pristine"
    pristine.mkdir()
    shutil.copy(base / "optuna.db", pristine / "optuna.db")
    shutil.copy(base / "mlruns" / "mlflow.db", pristine / "mlflow.db")
    return Searched(env, info, pristine)


@pytest.fixture
def use(searched, monkeypatch) -> Searched:
    monkeypatch.setitem(datasets.DATASETS, searched.info.name, searched.info)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", searched.env.tracking_uri)
    return searched


# --------------------------------------------------------------------------------------------------
# export-best killed outright


def old_export(out: Path) -> Path:
    """An export already in place (its content is all the tidying looks at: a marker)."""
    destination = out / "tiny"
    destination.mkdir(parents=True)
    (destination / "marker").write_text("old")
    return destination


@pytest.mark.faults
def test_an_export_killed_while_writing_leaves_a_partial_folder_the_next_export_removes(use, tmp_path, capsys):
    env = use.env.replace(exports=tmp_path / "exports", tracking_uri=None)  # the champion retrained: no MLflow
    destination = old_export(env.exports)
    process = subprocess.Popen(env.command("export-best", "--force"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    partial = env.exports / f".tiny.partial-{process.pid}"
    wait_until(lambda: (partial / "config.json").is_file() or process.poll() is not None, "the export being written")
    os.killpg(process.pid, signal.SIGKILL)  # it, and a verifying child if it got that far
    process.wait()
    assert partial.is_dir() and (destination / "marker").read_text() == "old"  # as the kill left them

    assert env.run("export-best") == 2  # the export in place is kept (no --force)...
    err = " ".join("".join(capsys.readouterr()).split())
    assert f"removed {partial}, left by a killed export-best (pid {process.pid})" in err
    assert "already exists" in err
    assert sorted(p.name for p in env.exports.iterdir()) == ["tiny"]  # ...and the leftover is gone
    assert (destination / "marker").read_text() == "old"


KILL_AFTER = {"the previous export moved aside": r"\.tiny\.replaced-\d+", "the new export moved in": "tiny"}


@pytest.mark.faults
@pytest.mark.parametrize("point", KILL_AFTER)
def test_an_export_killed_mid_swap_is_finished_by_the_next_export(use, tmp_path, capsys, point):
    """`--force` over an existing export swaps by two renames; a kill after either one leaves the new export
    (verified before the swap starts) and the old one beside it. The next export-best puts the new one in place."""
    env = use.env.replace(exports=tmp_path / "exports", tracking_uri=None)
    destination = old_export(env.exports)
    killed = run_python("""
        import os, re, signal, sys
        from pathlib import Path
        from pipeline import export
        destination, kill_after = Path(sys.argv[1]), sys.argv[2]
        partial = destination.parent / f".tiny.partial-{os.getpid()}"  # written and verified
        partial.mkdir()
        (partial / "marker").write_text("new")
        rename = os.rename

        def rename_then_die(source, target):
            rename(source, target)
            if re.fullmatch(kill_after, Path(target).name):
                os.kill(os.getpid(), signal.SIGKILL)

        os.rename = rename_then_die
        export._move_into_place(partial, destination, force=True)
    """, str(destination), KILL_AFTER[point])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(p.name for p in env.exports.iterdir())
    assert any(".replaced-" in name for name in left)  # the state the kill left

    assert env.run("export-best") == 2  # an export is in place: not replaced without --force
    err = " ".join("".join(capsys.readouterr()).split())
    assert "left by a killed export-best" in err and "already exists" in err
    assert sorted(p.name for p in env.exports.iterdir()) == ["tiny"]
    assert (destination / "marker").read_text() == "new"


# --------------------------------------------------------------------------------------------------
# Checkpoint writers killed outright


@pytest.mark.faults
def test_a_writer_killed_mid_write_leaves_a_temporary_file_the_next_write_in_that_folder_removes(tmp_path):
    folder = tmp_path / "checkpoints"
    killed = run_python("""
        import os, signal, sys
        from pathlib import Path
        from pipeline import fileio
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
