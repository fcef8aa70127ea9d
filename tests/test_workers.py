"""The pieces of scale-out that need no second process: how workers share GPUs and cores, which default
store a study goes to, and the rule that keeps two racing workers inside the trial budget."""

from __future__ import annotations

import os

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import paths, search, store, studies, workers

CORES = len(os.sched_getaffinity(0))


def test_cpu_threads_are_split_so_workers_use_each_core_once():
    plans = workers.plan(2, None, [])
    assert [p.index for p in plans] == [1, 2]
    assert all(p.threads == max(1, CORES // 2) and p.gpu is None for p in plans)
    assert all(p.threads == 1 for p in workers.plan(CORES * 3, None, []))  # never below one thread
    assert all(p.threads == 3 for p in workers.plan(2, 3, []))  # --threads wins


def test_gpus_are_assigned_round_robin():
    plans = workers.plan(5, None, ["2", "5"])
    assert [p.gpu for p in plans] == ["2", "5", "2", "5", "2"]


@pytest.fixture
def default_stores(tmp_path, monkeypatch):
    """The two default stores moved into a temporary folder, and no STORAGE in the environment."""
    sqlite_url = f"sqlite:///{tmp_path}/optuna.db"
    monkeypatch.setattr(paths, "DEFAULT_STORAGE", sqlite_url)
    monkeypatch.setattr(paths, "DEFAULT_JOURNAL", tmp_path / "optuna.journal")
    monkeypatch.delenv("STORAGE", raising=False)
    return sqlite_url, str(tmp_path / "optuna.journal")


def test_a_new_study_with_several_workers_goes_to_the_journal_and_is_found_there_later(default_stores):
    sqlite_url, journal = default_stores
    assert store.storage_url(None, "cnn") == sqlite_url  # one worker: SQLite
    assert store.storage_url(None, "cnn", workers=4) == journal
    optuna.create_study(study_name="cnn", storage=store.make_storage(journal))
    assert store.storage_url(None, "cnn") == journal  # export-best, replay, ui and a later search find it
    assert store.storage_url(None, "mlp") == sqlite_url
    assert store.storage_url("postgresql://db/optuna", "cnn") == "postgresql://db/optuna"  # STORAGE wins


def test_a_study_already_in_sqlite_stays_there_with_several_workers(default_stores):
    sqlite_url, _ = default_stores
    optuna.create_study(study_name="cnn-v2", storage=store.make_storage(sqlite_url))
    assert store.storage_url(None, "cnn", workers=4) == sqlite_url


def budget_of(trials: int) -> studies.StudySpec:
    spec = studies.load("smoke")
    return spec.model_copy(update={"trials": trials})


def test_of_two_trials_started_at_once_for_the_last_slot_the_later_number_is_surplus(tmp_path):
    """Budget 3: one trial finished, then three workers each ask for a trial at the same moment."""
    study = optuna.create_study(storage=store.make_storage(f"sqlite:///{tmp_path}/s.db"))
    spec = budget_of(3)
    first = study.ask()
    study.tell(first, 0.5)
    racing = [study.ask() for _ in range(3)]  # numbers 1, 2, 3: all RUNNING at once
    assert [search._surplus(spec, t) for t in racing] == [False, False, True]


def test_a_queued_trial_found_surplus_goes_back_to_the_queue(tmp_path):
    study = optuna.create_study(storage=store.make_storage(f"sqlite:///{tmp_path}/s.db"))
    spec = budget_of(1)
    study.ask()  # the budget's only trial, running
    study.enqueue_trial({"lr": 0.01}, user_attrs={"retry_of": 0})
    queued = study.ask()  # takes the queued parameters
    assert search._surplus(spec, queued)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == 0
    assert waiting[0].system_attrs["fixed_params"] == {"lr": 0.01}  # still runs if the running trial fails
