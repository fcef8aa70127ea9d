"""The store: the wrappers around Optuna's private API (pinned to the Optuna version), the TrialRecord as stored
and the TrialNotes that write it, the champion's tie rule and which storage a command uses."""

from __future__ import annotations

import dataclasses
import time

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import store
from pipeline.spec import paths
from pipeline.spec.errors import BadInput
from pipeline.store import storage, trial_records
from pipeline.tracking import connection

# Asking trials by hand on a storage with heartbeats makes Optuna say heartbeats belong to optimize().
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")


def test_optuna_version_is_the_one_the_private_calls_were_checked_against():
    assert optuna.__version__.startswith("5.0."), (
        f"Optuna is {optuna.__version__}: the private calls below were checked against Optuna 5.0; re-check "
        "store.fail_trial, store.requeue_if_queued and store.take_retries_first (and their tests here) and "
        "store/samplers.py's Hyperband rungs (tests/store/test_samplers.py), then update this pin")


@pytest.fixture(params=["sqlite", "journal"])
def url(request, tmp_path) -> str:
    return f"sqlite:///{tmp_path}/o.db" if request.param == "sqlite" else str(tmp_path / "o.journal")


def new_study(url: str, direction: str = "maximize") -> optuna.Study:
    return optuna.create_study(study_name="s", storage=store.make_storage(url), direction=direction)


# --------------------------------------------------------------------------------------------------
# fail_trial: another process's RUNNING trial


def test_fail_trial_fails_another_processes_running_trial_once(url):
    owner = new_study(url)
    running = owner.ask()
    sweeper = optuna.load_study(study_name="s", storage=store.make_storage(url))  # as another process sees it
    assert store.fail_trial(sweeper, running.number, "stale") is True
    (frozen,) = owner.get_trials()
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["fail_reason"] == "stale"
    assert store.record(owner, running.number).fail_reason == "stale"

    assert store.fail_trial(sweeper, running.number, "interrupted") is False  # already finished
    assert owner.get_trials()[0].user_attrs["fail_reason"] == "stale"  # the first reason stands


def test_fail_trial_leaves_a_completed_trial_alone(url):
    study = new_study(url)
    done = study.ask()
    study.tell(done, 0.5)
    assert store.fail_trial(study, done.number, "stale") is False
    (frozen,) = study.get_trials()
    assert frozen.state == TrialState.COMPLETE and frozen.values == [0.5] and "fail_reason" not in frozen.user_attrs


# --------------------------------------------------------------------------------------------------
# requeue_if_queued: called on a new trial before it suggests anything (search._surplus)


def test_a_trial_from_the_queue_is_queued_again_with_its_params(url):
    study = new_study(url)
    study.enqueue_trial({"lr": 0.01, "dropout": 0.2}, user_attrs={"retry_of": 4})
    taken = study.ask()
    assert not study.get_trials(states=(TrialState.WAITING,))  # taken off the queue
    store.requeue_if_queued(taken)
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.number != taken.number and waiting.user_attrs["retry_of"] == 4
    again = study.ask()  # the next worker gets the same parameters
    assert again.number == waiting.number
    assert again.suggest_float("lr", 1e-4, 1e-1, log=True) == 0.01
    assert again.suggest_float("dropout", 0.0, 0.5) == 0.2


def test_a_trial_not_from_the_queue_is_not_queued(url):
    study = new_study(url)
    fresh = study.ask()
    store.requeue_if_queued(fresh)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]


# --------------------------------------------------------------------------------------------------
# take_retries_first: a requeued trial runs before the baselines queued when the study started


def queue_baselines_then_a_retry(study: optuna.Study) -> None:
    """Two baselines queued first (trials 0 and 1), a trial that ran and failed (2), its retry queued (3)."""
    store.queue_trial(study, {"lr": 0.001}, store.TrialNotes(baseline=True))
    store.queue_trial(study, {"lr": 0.002}, store.TrialNotes(baseline=True))
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.FAIL, params={"lr": 0.005}, user_attrs={"seed": 99},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}))
    store.requeue(study, store.record(study, 2))


def test_optuna_takes_the_lowest_numbered_waiting_trial_first(url):
    """What makes take_retries_first necessary: Optuna alone runs the baselines before the retry."""
    study = new_study(url)
    queue_baselines_then_a_retry(study)
    assert [study.ask().number for _ in range(3)] == [0, 1, 3]


def test_with_take_retries_first_a_retry_runs_before_older_queued_trials(url):
    study = new_study(url)
    queue_baselines_then_a_retry(study)
    store.take_retries_first(study)
    retry = study.ask()
    assert retry.number == 3
    assert retry.suggest_float("lr", 1e-4, 1e-1, log=True) == 0.005  # the failed trial's parameters
    assert store.first_attempt(retry) == (2, 99)  # it carries the failed trial's number and seed
    assert [study.ask().number for _ in range(3)] == [0, 1, 4]  # then the queue in order, then new trials


def test_optunas_heartbeat_retry_is_taken_first_too(url):
    study = new_study(url)
    store.queue_trial(study, {"lr": 0.001}, store.TrialNotes(baseline=True))
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={"failed_trial": 7}))
    store.take_retries_first(study)
    assert study.ask().number == 1


def test_two_workers_taking_retries_first_never_take_the_same_trial(url):
    study = new_study(url)
    queue_baselines_then_a_retry(study)
    workers = [optuna.load_study(study_name="s", storage=store.make_storage(url)) for _ in range(2)]
    for worker in workers:
        store.take_retries_first(worker)
    taken = [worker.ask().number for worker in workers * 2]
    assert taken == [3, 0, 1, 4]
    assert len({t.number for t in study.get_trials(states=(TrialState.RUNNING,))}) == 4


# --------------------------------------------------------------------------------------------------
# The TrialRecord as stored


def test_note_then_record_of_round_trips(tmp_path):
    study = new_study(f"sqlite:///{tmp_path}/o.db")
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    params = {"model": "cnn", "lr": trial.params["lr"], "cnn_channels": [8, 16]}
    history = [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.75}]
    store.note(trial, store.TrialNotes(seed=3, params=params, history=history, baseline=True, retries=1))
    study.tell(trial, 0.75)
    record = store.record_of(study.get_trials()[0])
    assert (record.seed, record.params, record.history, record.baseline, record.retries) == (3, params, history,
                                                                                             True, 1)
    assert record.number == 0 and record.state == "COMPLETE" and record.values == [0.75]
    assert record.sampled == {"lr": params["lr"]} and record.finished and record.completed_at is not None


def test_epochs_noted_one_at_a_time_read_as_the_history_and_a_copied_trials_epochs_are_not_its_own(url):
    study = new_study(url)
    first = study.ask()
    for epoch in (1, 2, 3):
        store.note_epoch(first, epoch, {"epoch": epoch, "val_accuracy": epoch / 10})
    assert store.record_of(study.get_trials()[0]).history == [{"epoch": e, "val_accuracy": e / 10} for e in (1, 2, 3)]
    retry = study.ask()  # Optuna's heartbeat retry copies the failed trial's attributes into the new trial
    for key, value in study.get_trials()[0].user_attrs.items():
        retry.set_user_attr(key, value)
    store.note_epoch(retry, 1, {"epoch": 1, "val_accuracy": 0.5})
    assert store.record_of(study.get_trials()[1]).history == [{"epoch": 1, "val_accuracy": 0.5}]


def test_trial_notes_are_the_records_own_fields_each_of_the_same_type_or_none():
    record_types = {f.name: f.type for f in dataclasses.fields(store.TrialRecord)}
    notes = dataclasses.fields(store.TrialNotes)
    assert {f.name for f in notes} <= set(record_types)
    # Optuna's fields first, then ours: every field after Optuna's is one a note writes and record_of reads back.
    assert [*record_types][-len(notes):] == [f.name for f in notes] == [*trial_records.RECORDED]
    for f in notes:
        assert f.type in (record_types[f.name], f"{record_types[f.name]} | None"), f.name
        assert f.default is None, f.name
    with pytest.raises(TypeError, match="nonsense"):
        store.TrialNotes(nonsense=1)  # type: ignore[call-arg]


def test_notes_write_only_the_fields_given_under_their_names_as_before(tmp_path):
    """The user attributes and JSON values the previous version's `note(trial, **fields)` wrote, and no others:
    a value given as 0, False or [] is written; a field left at None is not."""
    study = new_study(f"sqlite:///{tmp_path}/o.db")
    trial = study.ask()
    prune = {"epoch": 3, "metric": "val_accuracy", "value": 0.5}
    store.note(trial, store.TrialNotes(fail_reason="pruned", fail_detail="at epoch 3", prune_reason=prune,
                                       history=[], resumed_from_epoch=0, baseline=False))
    assert study.get_trials()[0].user_attrs == {"history": [], "fail_reason": "pruned", "fail_detail": "at epoch 3",
                                                "baseline": False, "resumed_from_epoch": 0, "prune_reason": prune}
    store.queue_trial(study, {}, store.TrialNotes(confirmation_of=3, repeat=0, seed=7))
    assert study.get_trials()[1].user_attrs == {"seed": 7, "confirmation_of": 3, "repeat": 0}


def test_a_requeued_trial_carries_its_first_attempt_seed_and_repeat(url):
    study = new_study(url)
    lr = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for attrs in ({"seed": 99, "confirmation_of": 1, "repeat": 2},  # a champion-phase run, failed
                  {"seed": 5, "retry_of": 7, "first_attempt": 7}):  # a retry of trial 7, failed too
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"lr": 0.005}, distributions=lr,
                                                  user_attrs=attrs))
    store.requeue(study, store.record(study, 0), retries=1)
    store.requeue(study, store.record(study, 1))
    run, retry = study.get_trials()[2:]
    assert run.user_attrs == {"seed": 99, "retry_of": 0, "retries": 1, "first_attempt": 0, "confirmation_of": 1,
                              "repeat": 2}
    assert retry.user_attrs == {"seed": 5, "retry_of": 1, "first_attempt": 7}
    assert retry.system_attrs["fixed_params"] == {"lr": 0.005}  # a queued trial's params, until it runs


OLD_ATTRS = {  # user attributes as the previous version wrote them, before TrialRecord existed
    "seed": 1234, "params": {"model": "mlp", "lr": 0.01}, "history": [{"epoch": 1, "val_accuracy": 0.9}],
    "fail_reason": "oom", "owner": {"host": "box", "pid": 42}, "threads": 2, "split_hash": "abc123",
    "dataset_digest": "d1g3st",
}


def test_a_trial_stored_by_the_previous_version_reads_into_the_same_fields(tmp_path):
    study = new_study(f"sqlite:///{tmp_path}/o.db")
    trial = study.ask()
    for key, value in OLD_ATTRS.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("mlflow_note", "an attribute the record does not know")  # ignored, not an error
    study.tell(trial, state=TrialState.PRUNED)
    record = store.record_of(study.get_trials()[0])
    assert {key: getattr(record, key) for key in OLD_ATTRS} == OLD_ATTRS
    assert record.state == "PRUNED" and record.values is None


def test_missing_attributes_give_the_record_defaults(tmp_path):
    study = new_study(f"sqlite:///{tmp_path}/o.db")
    study.ask()
    record = store.record_of(study.get_trials()[0])
    assert record.state == "RUNNING" and not record.finished and record.seconds == 0.0
    assert record.seed is None and record.params is None and record.owner is None and record.history == []
    assert record.fail_reason is None and record.baseline is False and record.retries == 0
    assert record.retry_of is None and record.threads is None


# --------------------------------------------------------------------------------------------------
# The champion: best first objective, the first to complete on ties


def test_leading_best_on_ties_is_the_first_completed_not_the_lowest_number(tmp_path):
    study = new_study(f"sqlite:///{tmp_path}/o.db")
    assert store.leading_best(study) is None and store.beats_best(study, 0.0)
    early, late = study.ask(), study.ask()  # numbers 0 and 1; 1 finishes first
    study.tell(late, 0.8)
    time.sleep(0.01)
    study.tell(early, 0.8)
    assert store.leading_best(study).number == late.number
    assert not store.beats_best(study, 0.8) and store.beats_best(study, 0.81)
    better = study.ask()
    study.tell(better, 0.9)
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    assert store.leading_best(study).number == better.number


def test_leading_best_follows_the_direction(tmp_path):
    study = new_study(f"sqlite:///{tmp_path}/o.db", direction="minimize")
    for value in (0.5, 0.2, 0.2, 0.7):
        trial = study.ask()
        study.tell(trial, value)
        time.sleep(0.01)
    assert store.leading_best(study).number == 1
    assert store.beats_best(study, 0.1) and not store.beats_best(study, 0.2)


# --------------------------------------------------------------------------------------------------
# Which storage (the default stores' choice between SQLite and the journal: tests/search/test_workers.py)


def test_storage_url_override_then_storage_variable_then_default(monkeypatch):
    monkeypatch.delenv("STORAGE", raising=False)
    assert store.storage_url() == paths.DEFAULT_STORAGE
    monkeypatch.setenv("STORAGE", "sqlite:////elsewhere/optuna.db")
    assert store.storage_url(None, "cnn", workers=4) == "sqlite:////elsewhere/optuna.db"  # not the journal
    assert store.storage_url("postgresql://db/optuna", "cnn") == "postgresql://db/optuna"


def test_a_sqlite_url_with_options_opens_its_file_in_a_folder_made_for_it(tmp_path):
    """The file of a `sqlite:///` URL is read the way SQLAlchemy reads it: query options are not part of its path."""
    url = f"sqlite:///{tmp_path}/new/optuna.db?timeout=30"
    optuna.create_study(storage=store.make_storage(url), study_name="opts")
    assert (tmp_path / "new" / "optuna.db").is_file() and not list((tmp_path / "new").glob("*timeout*"))
    assert storage._holds(url, "opts") and not storage._holds(url, "other")
    runs = tmp_path / "runs"
    assert connection.artifact_root(f"sqlite:///{runs}/mlflow.db?timeout=30") == runs / "artifacts"
    assert connection.artifact_root("sqlite://") == paths.DEFAULT_ARTIFACT_ROOT  # in memory: no file to sit beside
    # A URL SQLAlchemy cannot read is the store's to refuse, in one line.
    assert connection.artifact_root("sqlite:/x.db") == paths.DEFAULT_ARTIFACT_ROOT
    with pytest.raises(BadInput, match="Optuna storage"):
        store.make_storage("sqlite:/x.db")
