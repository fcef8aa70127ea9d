"""The trial loop's budgets on an in-memory study, without training: when the search and the champion phase run a
trial, wait for other processes' trials, or stop, and why."""

from __future__ import annotations

import time

import optuna

from pipeline import store
from pipeline.search import loop, seeds
from pipeline.spec import studies
from pipeline.spec.stop_reason import StopReason


def later(seconds: float = 60.0) -> float:
    """A deadline `seconds` from now (negative: already past)."""
    return time.monotonic() + seconds


def test_the_search_runs_trials_until_its_budget_is_taken_then_waits_and_stops_on_its_count_or_its_time():
    budget = loop.SearchBudget(studies.with_overrides(studies.load("cnn"), trials=2))
    study = optuna.create_study()
    assert budget.reached(study) is None and budget.next(study, later()) is loop.Next.TRIAL
    first = study.ask()
    assert budget.next(study, later()) is loop.Next.TRIAL  # one of two taken
    second = study.ask()
    assert budget.next(study, later()) is loop.Next.WAIT  # both running: if one fails, it is run again
    assert budget.next(study, later(-1)) is StopReason.TIMEOUT
    study.tell(first, 0.5)
    assert budget.reached(study) is None
    study.tell(second, 0.6)
    assert budget.reached(study) is StopReason.BUDGET


def test_the_phase_runs_its_queue_while_each_run_fits_in_the_time_left_and_is_done_when_nothing_is_left():
    budget = seeds.PhaseBudget({3: 30.0}, minutes=1)  # a run of trial 3's configuration takes 30 s
    study = optuna.create_study()
    assert budget.reached(study) is None  # never on a count: on its queue
    assert budget.next(study, later()) is StopReason.DONE  # nothing queued, nothing running
    store.queue_trial(study, {}, store.TrialNotes(confirmation_of=3, repeat=1, seed=11))
    assert budget.next(study, later(60)) is loop.Next.TRIAL
    assert budget.next(study, later(10)) is StopReason.TIME  # 30 s would exceed the 10 left
    run = study.ask()  # takes the queued run
    assert budget.next(study, later()) is loop.Next.WAIT  # another process may still run it
    study.tell(run, 0.7)
    assert budget.next(study, later()) is StopReason.DONE
