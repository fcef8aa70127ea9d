"""The trial loop: trials one after another until a budget says stop, for the search and the champion phase alike.

`run_trials` is the one loop. Each turn it checks for a stop signal, fails (and queues again) trials whose process
died on this host, asks its `Budget` whether to run the next trial, wait for other processes or stop, then runs one
trial (`next_trial`) and counts failures in a row. What differs between the search (`run`, `SearchBudget`) and the
champion phase (seeds.py) is passed in: the study, the objective (its `Role`, its listener) and the budget.

Failure policy (failures.py): three trials failing in a row stop the study (TooManyFailures), a write that found no
room stops it at once (DiskFull). Ctrl-C, SIGTERM or SIGHUP (stopping.py) fails the running trial with reason
`interrupted`, queues it again to run first, and stops; its retry resumes its checkpoint (trial_files.py).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import optuna
from optuna.trial import TrialState

from pipeline import store
from pipeline.data.loading import PreparedData
from pipeline.infra.concurrency import same_process
from pipeline.infra.urls import error_line
from pipeline.search.events import Listener, TrialEnded
from pipeline.search.failures import DISK_FULL, disk_full, disk_full_message, failures_in_a_row
from pipeline.search.objective import SURPLUS, Objective, SearchTrials
from pipeline.search.stopping import DiskFull, Interrupted, OutOfTime
from pipeline.search.trial_files import checkpoint_path, remove_checkpoint, sweep_checkpoints
from pipeline.spec.stop_reason import StopReason
from pipeline.spec.studies import StudySpec

WAIT_SECONDS = 1.0  # how often an idle worker looks again while others run the budget's last trials


class Next(Enum):
    """What a budget says, short of stopping: run the next trial, or wait for other processes' trials."""

    TRIAL = "trial"
    WAIT = "wait"


class Budget(Protocol):
    """When the loop stops: the search's trials and minutes (SearchBudget), the champion phase's runs and minutes
    (seeds.PhaseBudget)."""

    @property
    def what(self) -> str:
        """A trial's name in messages: "trial", "champion-phase run"."""

    @property
    def seconds(self) -> float:
        """The time budget, from the loop's start (`next` is given the deadline)."""

    def reached(self, study: optuna.Study) -> StopReason | None:
        """Checked first, before each trial: the reason to stop (None: go on)."""

    def next(self, study: optuna.Study, deadline: float) -> Next | StopReason:
        """After the dead owners are swept: run a trial, wait, or stop for this reason."""


@dataclass
class LoopOutcome:
    ran: int  # trials run by this invocation
    stop_reason: StopReason  # BUDGET or TIMEOUT (the search), DONE or TIME (the champion phase)


@dataclass(frozen=True)
class SearchBudget:
    """The search's: the study's `spec.trial_budget` finished trials, within its `spec.timeout_minutes`."""

    spec: StudySpec
    what: str = "trial"

    @property
    def seconds(self) -> float:
        return self.spec.timeout_minutes * 60

    def reached(self, study: optuna.Study) -> StopReason | None:
        return StopReason.BUDGET if store.finished_count(study) >= self.spec.trial_budget else None

    def next(self, study: optuna.Study, deadline: float) -> Next | StopReason:
        if time.monotonic() >= deadline:
            return StopReason.TIMEOUT
        if store.taken_count(study) >= self.spec.trial_budget:
            return Next.WAIT  # other workers hold the rest of the budget: if one of their trials fails, it is redone
        return Next.TRIAL


def run(spec: StudySpec, study: optuna.Study, prepared: PreparedData, listener: Listener,
        threads: int | None = None, checkpoints: Path | None = None) -> LoopOutcome:
    """Run trials until the study has `spec.trial_budget` finished ones or the time budget is spent; each trial
    checkpoints into the folder `checkpoints` (when given).

    Raises Interrupted (after closing and re-queueing the running trial), TooManyFailures and DiskFull.
    """
    objective = Objective(spec, prepared, SearchTrials(spec), listener, threads, checkpoints=checkpoints)
    return run_trials(study, objective, SearchBudget(spec))


def run_trials(study: optuna.Study, objective: Objective, budget: Budget) -> LoopOutcome:
    """Run `objective`'s trials of `study` until `budget` says stop (the reason is returned). Checkpoints (in the
    objective's folder) no trial will resume are swept first, retries run first. Raises Interrupted,
    TooManyFailures and DiskFull."""
    listener, stop, checkpoints = objective.listener, objective.stop, objective.checkpoints
    store.take_retries_first(study)
    sweep_checkpoints(study, checkpoints, listener)
    deadline = time.monotonic() + budget.seconds
    ran, consecutive_failures = 0, 0
    with stop.installed():
        while (reached := budget.reached(study)) is None:
            stop.check()
            for number in fail_dead_owners(study, checkpoints):
                listener.warning(f"{budget.what} {number} was left RUNNING by a process that died: failed and "
                                 "queued again")
            step = budget.next(study, deadline)
            if step is Next.WAIT:
                listener.waiting()  # another process runs the last trials: their results count
                time.sleep(WAIT_SECONDS)
                optuna.storages.fail_stale_trials(study)  # a dead worker on another host (RDB heartbeat)
                continue
            if isinstance(step, StopReason):
                return LoopOutcome(ran, step)
            try:
                ended = next_trial(study, objective)
            except OutOfTime as exc:  # queued again: the next run starts (or resumes) it first
                listener.warning(f"{exc}: queued again")
                return LoopOutcome(ran + exc.started, StopReason.TIME)
            if ended is None:
                continue  # a surplus trial: no training happened; the loop sees the budget in flight and waits
            ran += 1
            consecutive_failures = failures_in_a_row(consecutive_failures, ended)
    return LoopOutcome(ran, reached)


def next_trial(study: optuna.Study, objective: Objective) -> TrialEnded | None:
    """`one_trial`, where a write that found no room stops the study (DiskFull): every later trial would fail."""
    try:
        ended = one_trial(study, objective)
    except Exception as exc:  # Optuna's own bookkeeping could not write the trial's end
        if not disk_full(exc):
            raise
        what = f"the Optuna storage could not record a trial ({type(exc).__name__})"
        raise DiskFull(disk_full_message(what)) from None
    if ended is not None and ended.fail_reason == DISK_FULL:
        raise DiskFull(disk_full_message(f"trial {ended.number}: {ended.fail_detail}"))
    return ended


def one_trial(study: optuna.Study, objective: Objective) -> TrialEnded | None:
    """Ask Optuna for one trial and run it; tell the objective's listener how it ended (None: it was surplus)."""
    listener, last = objective.listener, list[optuna.trial.FrozenTrial]()
    try:
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda _study, t: last.append(t)])
    except (Interrupted, OutOfTime) as exc:
        try:
            listener.interrupted(exc.reason if isinstance(exc, OutOfTime) else "interrupted")
        except Exception as exc:
            listener.warning(f"the interrupted trial's MLflow run could not be closed ({exc})")
        running = store.record(study, objective.running) if objective.running is not None else None
        if running is not None:
            store.requeue(study, running)
        raise
    objective.running = None
    record = store.record_of(last[0])
    if record.fail_reason == SURPLUS:
        return None
    ended = TrialEnded.of(record)
    try:
        listener.trial_ended(ended)
    except Exception as exc:  # the trial is safe in Optuna; MLflow is told at the end of the run
        listener.warning(f"the end of trial {ended.number} could not be recorded in MLflow "
                         f"({type(exc).__name__}: {error_line(exc, limit=200)}); the search goes on")
    return ended


def fail_dead_owners(study: optuna.Study, checkpoints: Path | None = None) -> list[int]:
    """Fail (and queue again) RUNNING trials whose process, on this host, no longer exists.

    The journal storage has no heartbeat, and on an RDB storage this spares the 90 s grace period when
    the dead worker ran here. Another host's trials are left to the heartbeat. A trial retried too often
    already is not queued again, and its checkpoint (in `checkpoints`) is removed. Returns the trials failed.
    A process is known by its pid, boot id and start time (`process_identity`): after a reboot or a container
    restart a new process, this one included, may have a dead owner's pid. An owner recorded with its pid alone
    (before the rest was) is judged by the pid alone: one still alive (this process included) is running.
    """
    host, failed = socket.gethostname(), []
    for record in store.records(study, (TrialState.RUNNING,)):
        owner = record.owner or {}
        if owner.get("host") != host or owner.get("pid") is None or same_process(owner["pid"], owner):
            continue
        if not store.fail_trial(study, record.number, "stale"):
            continue  # another worker swept it first
        if record.retries < store.MAX_RETRIES:
            store.requeue(study, record, retries=record.retries + 1)
        elif checkpoints is not None:
            first = record.first_attempt if record.first_attempt is not None else record.number
            remove_checkpoint(checkpoint_path(checkpoints, first))
        failed.append(record.number)
    return failed

