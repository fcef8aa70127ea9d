"""The trial queue, through Optuna's private API: queueing parameters with their notes, queueing a failed trial
again (retries first), failing another process's trial, and what a queued trial carries.

Optuna has no public way to do these; each use of its private API sits behind one small function here, with its
own test pinned to the Optuna version (tests/store/test_store.py).
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline.store.trial_records import TrialNotes, TrialRecord, record_of


def queue_trial(study: optuna.Study, params: dict[str, Any], notes: TrialNotes) -> None:
    """Queue parameters for the next free worker, with the notes its record starts with (`baseline`, `retry_of`...)."""
    study.enqueue_trial(params, user_attrs=notes.user_attrs())


def fail_trial(study: optuna.Study, number: int, reason: str) -> bool:
    """Fail a trial this process does not run (another's RUNNING trial, or a WAITING one no one should run any
    more) with `reason`; False when someone else finished or failed it first.

    Optuna has no public way to change a trial that this process is not running.
    """
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    try:
        study._storage.set_trial_user_attr(frozen._trial_id, "fail_reason", reason)
        study._storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False
    return True


def requeue_if_queued(trial: optuna.Trial) -> None:
    """A running trial that came from the queue (a baseline, a retry) given back to the queue.

    Call it before the trial suggests anything: until then only a queued trial has params. The parameters
    a queued trial was given are kept in the storage's copy of it; Optuna has no public way to read them
    from a running trial.
    """
    frozen = trial.study._storage.get_trial(trial._trial_id)
    if frozen.params or "fixed_params" in frozen.system_attrs:
        trial.study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
            user_attrs=frozen.user_attrs, system_attrs=frozen.system_attrs))


def take_retries_first(study: optuna.Study) -> None:
    """Make `study` (this process's handle on it) take queued retries before the rest of the queue.

    Optuna takes the waiting trial with the lowest number first, and a retry is queued with a new, higher
    number than the baselines queued when the study started. Here the waiting trials are tried in the order
    retries first (ours: `retry_of`; Optuna's heartbeat retries: `failed_trial`), then by number; each one is
    claimed exactly as Optuna claims it (WAITING -> RUNNING in the storage, which refuses a trial another
    worker claimed first), so several workers never run the same trial.
    """

    def pop_waiting_trial_id() -> int | None:
        waiting = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
        for trial in _retries_first(waiting):
            try:
                if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                    return trial._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    study._pop_waiting_trial_id = pop_waiting_trial_id  # type: ignore[method-assign]  # this handle's own order


def next_waiting(study: optuna.Study) -> TrialRecord | None:
    """The queued trial a process with `take_retries_first` takes next, if any."""
    waiting = _retries_first(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    return record_of(waiting[0]) if waiting else None


def _retries_first(waiting: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return sorted(waiting, key=lambda t: (not _is_retry(t), t.number))


def _is_retry(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.user_attrs.get("retry_of") is not None or "failed_trial" in trial.system_attrs


def requeue(study: optuna.Study, failed: TrialRecord, retries: int | None = None) -> None:
    """A failed (interrupted, stale) trial's parameters queued again, so the next free worker runs them first
    (`take_retries_first`), noted as its `retries`-th retry when given. The retry carries the first attempt's number
    and seed: it trains with that seed and resumes that attempt's checkpoint, so it ends as the uninterrupted trial
    would have. A champion-phase run stays the same repeat of the same trial."""
    first = failed.first_attempt if failed.first_attempt is not None else failed.number
    repeat = failed.repeat if failed.confirmation_of is not None else None
    queue_trial(study, failed.sampled, TrialNotes(retry_of=failed.number, first_attempt=first, seed=failed.seed,
                                                  confirmation_of=failed.confirmation_of, repeat=repeat,
                                                  retries=retries, fidelity=failed.fidelity))


def first_attempt(trial: optuna.Trial | optuna.trial.FrozenTrial) -> tuple[int, int | None]:
    """(number, seed) of the trial whose parameters `trial` runs: a retry's first attempt, as `requeue` (or
    Optuna's heartbeat retry, which copies the failed trial's record) queued it; else `trial` itself, no seed yet."""
    queued = trial.user_attrs
    return queued.get("first_attempt", trial.number), queued.get("seed")
