"""The record every trial carries: `TrialRecord` (read), `TrialNotes` (written), and the queries that read them.

What a trial records beyond Optuna's own fields (its seed, full params, per-epoch history, owner, data identity,
failure) is stored as user attributes under the same keys as ever: written by `note`, `note_epoch` and
`trial_queue.queue_trial`, read by `record_of`; a running trial's own few (its first attempt, a champion-phase
run's confirmation_of and repeat) are also read straight from its attributes (trial_queue.py, search/seeds.py,
search/objective.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class TrialRecord:
    """One trial as stored: Optuna's fields first, then ours (user attributes; absent in older trials)."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    values: list[float] | None
    sampled: dict[str, Any]  # Optuna's params: the searched values only
    seconds: float  # how long it ran (0 while running)
    completed_at: datetime | None
    started_at: datetime | None = None
    constraints: dict[str, float] = field(default_factory=dict)  # Optuna's: <= 0 met, > 0 by how much it is missed
    # ---- ours, written as `TrialNotes` ------------------------------------------------------------
    seed: int | None = None
    params: dict[str, Any] | None = None  # the full params it trained with: fixed and searched
    owner: dict[str, Any] | None = None  # {"host", "pid", "boot_id", "started"} of its process, for the stale sweep
    split_hash: str | None = None  # the validation split it was judged on
    dataset_digest: str | None = None  # the pictures themselves
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: HISTORY_KEYS
    best_epoch: int | None = None
    precision: str | None = None
    threads: int | None = None  # float sums depend on it: a replay uses the same
    device: str | None = None
    parameter_count: int | None = None
    flops_per_image: int | None = None
    stop_reason: str | None = None
    fail_reason: str | None = None  # pruned, diverged, oom, interrupted, stale, surplus, disk_full, <exception>
    fail_detail: str | None = None
    traceback: str | None = None
    baseline: bool = False  # queued from the study file's [[baseline]]
    retry_of: int | None = None  # queued again after this trial failed (interrupted, stale)
    retries: int = 0
    first_attempt: int | None = None  # the trial these parameters first ran as: retries keep its seed and checkpoint
    resumed_from_epoch: int = 0  # epochs a retry took over from its first attempt's checkpoint
    confirmation_of: int | None = None  # a champion-phase run (champion.py): this search trial's params again...
    repeat: int = 0  # ...with repeat `repeat`'s seed (0: the search's own trial)
    latency_ms: float | None = None  # CPU latency per image at batch 1 (latency.py), when the study reads it
    latency_threads: int | None = None  # ...measured on this many threads
    prune_reason: dict[str, Any] | None = None  # why it was pruned (pruning.PruneReason)
    # A planned search's rung (search/fidelity.py): {"rung", "images", "epochs", "subset_seed"}; None: the whole
    # training split for the params' epochs (every trial of an unplanned study, and those made before rungs)
    fidelity: dict[str, Any] | None = None
    memory_format: str | None = None  # channels_last or contiguous; None: recorded before it was (train.py's legacy)
    eval_batch_size: int | None = None  # the validation batch; None: recorded before it was (LEGACY_EVAL_BATCH_SIZE)

    @property
    def finished(self) -> bool:
        return self.state in ("COMPLETE", "PRUNED")

    @property
    def first_value(self) -> float:
        """A complete trial's (first) objective value: what trials are ranked by (Optuna stores the values of every
        complete trial; ValueError for one without)."""
        if self.values is None:
            raise ValueError(f"trial {self.number} has no objective values: it is not complete")
        return self.values[0]

    @property
    def feasible(self) -> bool:
        """Within every constraint of the study (a study without constraints: always)."""
        return all(v <= 0 for v in self.constraints.values())


@dataclass(frozen=True, kw_only=True)
class TrialNotes:
    """Fields of a trial's TrialRecord to write: each one given is stored as the user attribute of its name, with
    its value as it is (JSON); one left at None is not written. The fields and types are TrialRecord's own
    (tests/store/test_store.py keeps the two in step)."""

    seed: int | None = None
    params: dict[str, Any] | None = None
    owner: dict[str, Any] | None = None
    split_hash: str | None = None
    dataset_digest: str | None = None
    history: list[dict[str, float]] | None = None
    best_epoch: int | None = None
    precision: str | None = None
    threads: int | None = None
    device: str | None = None
    parameter_count: int | None = None
    flops_per_image: int | None = None
    stop_reason: str | None = None
    fail_reason: str | None = None
    fail_detail: str | None = None
    traceback: str | None = None
    baseline: bool | None = None
    retry_of: int | None = None
    retries: int | None = None
    first_attempt: int | None = None
    resumed_from_epoch: int | None = None
    confirmation_of: int | None = None
    repeat: int | None = None
    latency_ms: float | None = None
    latency_threads: int | None = None
    prune_reason: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    memory_format: str | None = None
    eval_batch_size: int | None = None

    def user_attrs(self) -> dict[str, Any]:
        """The user attributes these notes write: the fields given, under their names."""
        given = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return {name: value for name, value in given if value is not None}


RECORDED = tuple(f.name for f in dataclasses.fields(TrialNotes))  # the user attributes record_of reads


def record_of(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    ours = {k: v for k, v in trial.user_attrs.items() if k in RECORDED}
    epochs = _epoch_records(trial)
    if epochs:  # recorded one epoch at a time (older stores hold the whole list under "history")
        ours["history"] = epochs
    return TrialRecord(number=trial.number, state=trial.state.name, values=trial.values, sampled=dict(trial.params),
                       seconds=trial.duration.total_seconds() if trial.duration else 0.0,
                       completed_at=trial.datetime_complete, started_at=trial.datetime_start,
                       constraints=dict(trial.constraints), **ours)


def note(trial: optuna.Trial, notes: TrialNotes) -> None:
    """Record fields of the running trial's TrialRecord: `note(trial, TrialNotes(seed=3))`."""
    for key, value in notes.user_attrs().items():
        trial.set_user_attr(key, value)


# Each epoch is its own user attribute, written once: rewriting the whole history every epoch made an append-only
# journal grow with the square of the epochs (every worker, `make studies` and the dashboard replay it on open).
# An entry names the trial that wrote it, because Optuna's heartbeat retry copies a failed trial's attributes
# into the new trial, whose own history starts afresh.
EPOCH_PREFIX = "epoch:"


def note_epoch(trial: optuna.Trial, epoch: int, metrics: dict[str, float]) -> None:
    """Record epoch `epoch` (from 1) of the running trial's history."""
    trial.set_user_attr(f"{EPOCH_PREFIX}{epoch:05d}", {"trial": trial.number, **metrics})


def _epoch_records(trial: optuna.trial.FrozenTrial) -> list[dict[str, float]]:
    keys = sorted(k for k, v in trial.user_attrs.items()
                  if k.startswith(EPOCH_PREFIX) and isinstance(v, dict) and v.get("trial") == trial.number)
    return [{k: v for k, v in trial.user_attrs[key].items() if k != "trial"} for key in keys]


def records(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[TrialRecord]:
    return [record_of(t) for t in study.get_trials(deepcopy=False, states=states)]


def record(study: optuna.Study, number: int) -> TrialRecord | None:
    found = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    return record_of(found) if found is not None else None


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def running_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def taken_count(study: optuna.Study) -> int:
    """Finished or running trials: the part of the budget already handed out."""
    return len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))


def leading_best(study: optuna.Study) -> TrialRecord | None:
    """The complete feasible trial (within the study's [constraints]) best on the study's first objective (the
    first completed on ties): the champion of a single-objective study, Optuna's best trial.
    """
    complete = [r for r in records(study, (TrialState.COMPLETE,)) if r.feasible]
    if not complete:
        return None
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    # On ties the first to complete wins: with several workers that need not be the lowest number.
    return min(complete, key=lambda r: (sign * r.first_value, r.completed_at, r.number))


def beats_best(study: optuna.Study, value: float) -> bool:
    """Would a trial with this (first) objective value become the study's best? Ties keep the earlier one."""
    best = leading_best(study)
    if best is None:
        return True
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return value > best.first_value if maximize else value < best.first_value


def best_records(study: optuna.Study) -> list[TrialRecord]:
    """Optuna's best trials: the best one, or the Pareto front for several objectives."""
    try:
        return [record_of(t) for t in study.best_trials]
    except ValueError:
        return []


def best_values(study: optuna.Study) -> list[float] | None:
    """The values of the first of Optuna's best trials, if any."""
    best = best_records(study)
    return best[0].values if best else None

