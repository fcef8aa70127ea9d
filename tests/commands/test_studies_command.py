"""`make studies` (commands/studies.py): each store opened once, and a missing default store left unmade."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_study import write_study

from pipeline import store
from pipeline.commands import studies as studies_command
from pipeline.spec import paths, studies
from pipeline.store import storage


def test_study_states_opens_each_store_once_and_finds_each_study_where_it_is(tmp_path, monkeypatch):
    monkeypatch.delenv("STORAGE", raising=False)
    folder = tmp_path / "studies"
    monkeypatch.setattr(paths, "DEFAULT_STORAGE", f"sqlite:///{folder}/optuna.db")
    monkeypatch.setattr(paths, "DEFAULT_JOURNAL", folder / "optuna.journal")
    for name in ("a", "b", "c"):
        write_study(folder, name=name, dataset="mnist", trials=2)
    assert [s.state for s in studies_command.study_states(folder)] == ["not started"] * 3
    assert not (folder / "optuna.db").exists()  # asking made no store

    quiet = {"log": lambda line: None}
    store.open_study(studies.load("a", folder), store.make_storage(paths.DEFAULT_STORAGE), **quiet)
    store.open_study(studies.load("b", folder), store.make_storage(str(paths.DEFAULT_JOURNAL)), **quiet)
    opened: list[str] = []
    make_storage = storage.make_storage
    monkeypatch.setattr(storage, "make_storage", lambda url, *a: opened.append(url) or make_storage(url, *a))
    states = studies_command.study_states(folder)
    assert [(s.name, s.done, s.state) for s in states] == [("a", 0, "resumable"), ("b", 0, "resumable"),
                                                          ("c", 0, "not started")]
    assert sorted(opened) == sorted([paths.DEFAULT_STORAGE, str(paths.DEFAULT_JOURNAL)])  # once each


@pytest.mark.parametrize("where", ["sqlite", "journal"])
def test_study_states_reads_the_store_given_only(tmp_path, monkeypatch, where):
    monkeypatch.delenv("STORAGE", raising=False)
    folder = tmp_path / "studies"
    write_study(folder, name="a", dataset="mnist", trials=2)
    url = f"sqlite:///{tmp_path}/given.db" if where == "sqlite" else str(tmp_path / "given.journal")
    store.open_study(studies.load("a", folder), store.make_storage(url), log=lambda line: None)
    assert [s.state for s in studies_command.study_states(folder, url)] == ["resumable"]
    assert [s.state for s in studies_command.study_states(folder, str(Path(tmp_path) / "empty.journal"))] == [
        "not started"]
