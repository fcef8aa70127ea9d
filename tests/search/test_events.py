"""The search loop's events, recorded by a listener and checked against what Optuna stored (no console text)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import RecordingListener
from tiny_study import write_study

from pipeline import store
from pipeline.data.recorded import study_data
from pipeline.search import events, loop, pareto, workers
from pipeline.search.events import BatchDone, EpochEnded, TrialEnded, TrialStarted, Waiting, Warned, WorkerDone
from pipeline.spec import studies
from pipeline.spec.stop_reason import StopReason
from pipeline.tracking.lifecycle import Tracking

pytestmark = pytest.mark.trained_values  # make test-portable runs these as a CPU without AVX-512 would

# A good trial first, then one that barely moves its weights: it cannot beat the first, so the
# "no new best" case is always exercised.
EVENTS_STUDY = {
    "sampler": "random", "pruner": "none",
    "fixed": {"head": "flatten", "batch_size": 25, "augment": 0.0, "schedule": "none"},
    "space": {"lr": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True}, "dropout": None},
    "baseline": [{"lr": 3e-3}, {"lr": 1e-6}],
}


def setup(tmp_path: Path, root: Path, trials: int = 3, epochs: int = 2):
    """(spec, study, prepared) for a tiny study in tmp_path."""
    spec = studies.load(write_study(tmp_path, trials=trials, epochs=epochs, **EVENTS_STUDY))
    study = store.open_study(spec, store.make_storage(f"sqlite:///{tmp_path}/optuna.db"), log=lambda m: None)
    return spec, study, study_data(spec, root, "cpu")


def test_each_trial_is_told_in_order_and_new_best_only_when_it_improves(tiny_dataset, tmp_path):
    spec, study, prepared = setup(tmp_path, tiny_dataset[1])
    listener = RecordingListener()
    outcome = loop.run(spec, study, prepared, listener, threads=1)
    assert outcome.ran == 3 and outcome.stop_reason == "budget"

    recorded = {r.number: r for r in store.records(study)}
    assert sorted(recorded) == [0, 1, 2] and all(r.state == "COMPLETE" for r in recorded.values())
    # Each trial's events are contiguous: started, its epochs in order, [new best], ended.
    expected_best, best_so_far = set(), None
    expected: list[tuple] = []
    for number in sorted(recorded):
        r = recorded[number]
        expected.append(("trial_started", number))
        expected.extend(("epoch_ended", number, epoch) for epoch in range(1, spec.epochs + 1))
        if best_so_far is None or r.values[0] > best_so_far:  # maximize; a tie keeps the earlier trial
            best_so_far = r.values[0]
            expected_best.add(number)
            expected.append(("new_best", number, r.values[0]))
        expected.append(("trial_ended", number, r.state, r.values, r.fail_reason))
    assert listener.events == expected
    assert 0 in expected_best and 1 not in expected_best  # by design of the baselines: both cases occur
    assert [h["epoch"] for h in recorded[0].history] == list(range(1, spec.epochs + 1))


def test_a_listener_failing_at_trial_start_fails_only_that_trial(tiny_dataset, tmp_path):
    spec, study, prepared = setup(tmp_path, tiny_dataset[1], trials=2, epochs=1)

    class FailsFirstStart(RecordingListener):
        def trial_started(self, trial):
            super().trial_started(trial)
            if trial.number == 0:
                raise RuntimeError("the MLflow run could not be opened")

    listener = FailsFirstStart()
    outcome = loop.run(spec, study, prepared, listener, threads=1)
    assert outcome.ran == 3  # the failed trial, then the two the budget asks for
    failed, *rest = store.records(study)
    assert failed.number == 0 and failed.state == "FAIL" and failed.fail_reason == "RuntimeError"
    assert "the MLflow run could not be opened" in failed.fail_detail
    assert "Traceback" in failed.traceback and "RuntimeError" in failed.traceback
    assert [(r.number, r.state) for r in rest] == [(1, "COMPLETE"), (2, "COMPLETE")]
    assert ("epoch_ended", 0, 1) not in listener.events  # it never trained
    assert ("trial_ended", 0, "FAIL", None, "RuntimeError") in listener.events


def test_a_listener_failing_at_trial_end_only_warns(tiny_dataset, tmp_path):
    spec, study, prepared = setup(tmp_path, tiny_dataset[1], trials=1, epochs=1)

    class FailsAtEnd(RecordingListener):
        def trial_ended(self, trial):
            super().trial_ended(trial)
            raise ConnectionError("MLflow is out of reach\nsecond line")

    listener = FailsAtEnd()
    outcome = loop.run(spec, study, prepared, listener, threads=1)
    assert outcome.ran == 1 and outcome.stop_reason == "budget"
    (only,) = store.records(study, store.FINISHED)  # the second baseline is still queued
    assert only.state == "COMPLETE" and only.fail_reason is None
    warnings = [e[1] for e in listener.events if e[0] == "warning"]
    assert len(warnings) == 1
    assert "trial 0" in warnings[0] and "ConnectionError: MLflow is out of reach" in warnings[0]
    assert "second line" not in warnings[0]
    assert listener.events[-2:] == [("trial_ended", 0, "COMPLETE", only.values, None), ("warning", warnings[0])]


def test_tracking_off_gives_a_listener_that_does_nothing(tmp_path):
    tracking = Tracking.off()
    listener = tracking.listener
    assert type(listener) is events.Listener  # the base class: every event is a no-op
    assert type(tracking.confirmations) is events.Listener
    ended = events.TrialEnded(0, "COMPLETE", [0.5])
    for call in (lambda: listener.trial_started(None), lambda: listener.batch_done(1, 2),
                 lambda: listener.epoch_ended(0, None), lambda: listener.new_best(0, 0.5, None),
                 lambda: listener.confirmation_model(0, 0.5, None), lambda: listener.trial_ended(ended),
                 lambda: listener.interrupted("x"), listener.waiting, lambda: listener.warning("x")):
        assert call() is None
    spec = studies.load("smoke")
    storage = store.make_storage(f"sqlite:///{tmp_path}/o.db")
    study = store.open_study(spec, storage, log=lambda m: None)
    tracking.start(spec, study)
    assert tracking.run is None and store.parent_run_id(study) is None  # nothing reached MLflow
    assert tracking.finish(spec, study, storage, "FINISHED", pareto.decide(spec, study), warn=pytest.fail) == []


# --------------------------------------------------------------------------------------------------
# The event lines: written by events.to_line in a worker, read by events.from_line in its coordinator

EVERY_EVENT = [
    TrialStarted(3, {"model": "cnn", "lr": 0.001}, seed=7, parameter_count=1234, data=None, confirmation_of=1,
                 repeat=2),
    BatchDone(3, 10),
    EpochEnded(3, epoch=2, val_accuracy=0.75, val_loss=0.625, seconds=1.5),
    TrialEnded(3, "PRUNED", None, 2.0, {"lr": 0.5}, fail_reason="pruned", fail_detail="epoch 2: 0.1 < 0.5",
               prune_reason={"epoch": 2, "kind": "median"}),
    Waiting(),
    Warned("MLflow is slow:\nsecond line"),
    events.StudyFailed("3 trials failed in a row"),
    WorkerDone(4, StopReason.TIMEOUT),
]


def test_every_kind_of_event_is_tried_on_the_wire():
    assert {type(e) for e in EVERY_EVENT} == set(events.EVENT_TYPES.values())


@pytest.mark.parametrize("event", EVERY_EVENT, ids=lambda e: type(e).__name__)
def test_each_event_comes_back_as_it_was_sent_from_one_line(event):
    line = events.to_line(event)
    assert "\n" not in line and line.startswith(events.EVENT_PREFIX)
    assert events.from_line(line) == [event]
    assert events.from_line(line + " glued text ") == [event, "glued text"]


def test_a_worker_sends_a_started_trial_without_its_data(capsys):
    workers.EventView().trial_started(TrialStarted(3, {"lr": 0.001}, seed=7, parameter_count=1234,
                                                   data=object()))  # stands for the tensors
    (line,) = capsys.readouterr().out.splitlines()
    assert events.from_line(line) == [TrialStarted(3, {"lr": 0.001}, seed=7, parameter_count=1234, data=None)]


def test_a_field_no_event_line_can_hold_is_an_error_not_its_text():
    with pytest.raises(TypeError, match="not JSON serializable"):
        events.to_line(TrialStarted(3, {"lr": 0.001}, seed=7, parameter_count=1234, data=object()))


@pytest.mark.parametrize("line", [
    events.EVENT_PREFIX + '{"event": "BatchDone", "done": 1}',  # a field missing
    events.EVENT_PREFIX + '{"event": "BatchDone", "done": 1, "total": 2, "more": 3}',  # a field unknown
    events.EVENT_PREFIX + '{"event": "Nothing"}',  # no such event
    events.EVENT_PREFIX + '{"event": ["BatchDone"]}',
    events.EVENT_PREFIX + '["BatchDone"]',
    events.EVENT_PREFIX + '{"event": "BatchDone", "do',  # cut short
    events.EVENT_PREFIX + '{"event": "WorkerDone", "ran": 1, "stop_reason": "failed"}',  # not how a worker ends
    "a worker's own line, not an event",
])
def test_a_line_that_holds_no_whole_event_is_text(line):
    assert events.from_line(line) == [line]


def test_an_empty_line_holds_nothing():
    assert events.from_line("") == [] and events.from_line("  ") == []
