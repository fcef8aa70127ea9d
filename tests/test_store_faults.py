"""Torn and damaged stores: Optuna journals and SQLite files a real search wrote, then damaged.

Everything is real: journals cut short by a real file-size limit or by truncating what a real search wrote,
SQLite files a real search wrote (`pristine_search`) and then truncated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import optuna
import pytest
from conftest import PristineSearch, StudyEnv, run_python
from ui_process import free_port

from pipeline import store
from pipeline.cli import main
from pipeline.commands import server
from pipeline.spec.errors import BadInput


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(err: str) -> str:
    """The command's error: exactly one line, and no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


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


def stores_copy(pristine_search: PristineSearch, folder: Path, monkeypatch) -> StudyEnv:
    """The searched study with its own copies of both databases, in `folder`."""
    (folder / "mlruns").mkdir(parents=True)
    shutil.copy(pristine_search.pristine / "optuna.db", folder / "optuna.db")
    shutil.copy(pristine_search.pristine / "mlflow.db", folder / "mlruns" / "mlflow.db")
    env = pristine_search.env.replace(storage=f"sqlite:///{folder}/optuna.db", exports=folder / "exports",
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
def test_a_truncated_optuna_db_gives_one_line_and_exit_2_in_every_command(pristine_search, tmp_path, monkeypatch,
                                                                         capsys, cut, never_serve):
    env = stores_copy(pristine_search, tmp_path, monkeypatch)
    path = tmp_path / "optuna.db"
    os.truncate(path, CUTS[cut](path.stat().st_size))
    commands = {"search": ["search"], "replay": ["replay", "--trial", "0"], "export-best": ["export-best"],
                "studies": ["studies"], "ui": ["ui", "--port", str(free_port())]}
    each_refuses_the_damaged_store(env, path, "Optuna storage", commands, capsys)
    assert not (tmp_path / "exports").exists()


@pytest.mark.faults
@pytest.mark.parametrize("cut", CUTS)
def test_a_truncated_mlflow_db_gives_one_line_and_exit_2_in_every_command(pristine_search, tmp_path, monkeypatch,
                                                                         capsys, cut, never_serve):
    env = stores_copy(pristine_search, tmp_path, monkeypatch)
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
