"""store/storage.py: one reading of what kind of store a URL names, shared by opening a store, asking whether a
default store holds a study, and naming a store's checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from pipeline import store
from pipeline.spec import paths
from pipeline.store import storage


@pytest.mark.parametrize(("url", "kind", "path"), [
    ("studies/optuna.journal", "journal", Path("studies/optuna.journal")),
    ("journal:///tmp/o.journal", "journal", Path("/tmp/o.journal")),
    ("sqlite:////tmp/o.db?timeout=30", "sqlite", Path("/tmp/o.db")),
    ("sqlite://", "sqlite", None),  # in memory: no file
    ("postgresql://u:pw@db-host/optuna", "server", None),
])
def test_what_kind_of_store_a_url_names(url, kind, path):
    assert storage._store_file(url) == (kind, path)


def test_the_default_stores_keep_their_checkpoint_folders_however_they_are_spelt():
    journal = paths.DEFAULT_JOURNAL
    for url in (paths.DEFAULT_STORAGE, str(journal), f"journal://{journal}",
                str(journal.parent / ".." / journal.parent.name / journal.name)):
        assert store.storage_key(url) is None, url


def test_one_journal_has_one_key_however_it_is_spelt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keys = {store.storage_key(url) for url in ("o.journal", str(tmp_path / "o.journal"), f"journal://{tmp_path}/o.journal")}
    assert len(keys) == 1 and next(iter(keys)).startswith(store.STORE_PREFIX)
    assert store.storage_key(f"sqlite:///{tmp_path}/o.db") not in keys | {None}  # a SQLite file is another store
    assert store.storage_key(f"sqlite:///{tmp_path}/o.db") == store.storage_key(f"sqlite:///{tmp_path}/./o.db")
    server = store.storage_key("postgresql://u:pw@db-host/optuna")
    assert server == store.storage_key("postgresql://u:other@db-host/optuna") and server.startswith(store.STORE_PREFIX)


def test_a_journal_url_opens_and_is_asked_as_the_journal_file_it_names(tmp_path):
    url = f"journal://{tmp_path}/new/o.journal"
    optuna.create_study(storage=store.make_storage(url), study_name="s")
    assert (tmp_path / "new" / "o.journal").is_file()
    assert storage._holds(url, "s") and storage._holds(str(tmp_path / "new" / "o.journal"), "s")
    assert not storage._holds(url, "other") and not storage._holds("postgresql://u:pw@db-host/optuna", "s")


@pytest.fixture
def default_stores(tmp_path, monkeypatch) -> tuple[str, Path]:
    """The default stores moved under tmp_path, STORAGE unset."""
    monkeypatch.delenv("STORAGE", raising=False)
    monkeypatch.setattr(paths, "DEFAULT_STORAGE", f"sqlite:///{tmp_path}/studies/optuna.db")
    monkeypatch.setattr(paths, "DEFAULT_JOURNAL", tmp_path / "studies" / "optuna.journal")
    return paths.DEFAULT_STORAGE, paths.DEFAULT_JOURNAL


def test_open_storages_opens_the_default_stores_that_exist_sqlite_first_and_makes_none(default_stores, tmp_path):
    sqlite_url, journal = default_stores
    assert store.open_storages() == []
    assert not (tmp_path / "studies").exists()
    store.make_storage(str(journal))
    assert [s.url for s in store.open_storages()] == [str(journal)]
    store.make_storage(sqlite_url)
    assert [s.url for s in store.open_storages()] == [sqlite_url, str(journal)]
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    assert [s.url for s in store.open_storages(elsewhere)] == [elsewhere]  # STORAGE's, and only it
