"""The champion phase's runs: the search's best configurations trained again over seeds (champion.py chooses).

The phase trains the `top_k` best distinct configurations again, with seeds derived from (study seed, trial
number, repeat), on the full epoch budget and without pruning, until each has `seeds` runs (the search's own run
counts as one). The runs are trials of a companion Optuna study, `<study>:champion` in the same storage, queued
with their params and seed: they are recorded (params, seed, per-epoch history, provenance), checkpointed, resumed
after a kill and replayed (`make replay STUDY=x TRIAL=n REPEAT=r`) like the search's trials, by the search's own
loop (loop.run_trials) with the phase's rules (`ChampionRuns`) and budget (`PhaseBudget`). Each invocation queues
only the runs that are missing, so an interrupted phase continues, a finished one is not run again, and a larger
`[champion]` only adds runs.

The runs go in rounds, one repeat of every candidate a round: the first round in the search's order, each later
one best mean first. A phase the clock cuts short then leaves the weakest candidate without all its seeds, not the
one its runs so far favour (the champion is chosen among candidates with all their seeds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline import store
from pipeline.data.loading import PreparedData
from pipeline.search import loop
from pipeline.search.champion import (
    Standings,
    candidates,
    champion_table,
    open_companion,
    repeat_seed,
    standings,
)
from pipeline.search.clock import TrialClock
from pipeline.search.events import Listener
from pipeline.search.failures import failing_trial
from pipeline.search.fidelity import Fidelity
from pipeline.search.objective import Objective
from pipeline.spec.stop_reason import StopReason
from pipeline.spec.studies import StudySpec
from pipeline.training import train

UNPLANNED = "unplanned"  # a queued run whose configuration is no longer a candidate: dropped, not trained


@dataclass
class PhaseOutcome:
    ran: int  # runs trained by this invocation
    stop_reason: StopReason  # DONE, or TIME (the phase's minutes would be exceeded: the rest waits for the next run)
    standings: Standings


class ChampionRuns:
    """The champion phase's rules for the objective (objective.Role): only queued runs train, none is pruned, and
    every model is kept (the champion's may be exported)."""

    prunes = False

    def surplus(self, trial: optuna.Trial) -> str:
        return surplus_run(trial)

    def keep_model(self, trial: optuna.Trial, values: list[float], feasible: bool, model: train.TrainedModel,
                   listener: Listener) -> None:
        failing_trial(trial, lambda: listener.confirmation_model(trial.number, values[0], model),
                      "the model could not be logged to MLflow")


@dataclass(frozen=True)
class PhaseBudget:
    """The phase's budget (loop.Budget): the queued runs, in the order Optuna hands them out, within the phase's
    minutes. A run starts only when its configuration's search trial took no longer than the time left."""

    needs: dict[int, float]  # seconds a run of each candidate takes, by its search trial's number
    minutes: float
    what: str = "champion-phase run"

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    def reached(self, study: optuna.Study) -> StopReason | None:
        return None  # the phase ends when its queue is empty (`next`), not on a count

    def next(self, study: optuna.Study, deadline: float) -> loop.Next | StopReason:
        upcoming = store.next_waiting(study)  # the run Optuna will hand out next
        if upcoming is None:
            # Another process runs the last runs (their results join the table), or every run is done.
            return loop.Next.WAIT if store.running_count(study) else StopReason.DONE
        need = self.needs.get(upcoming.confirmation_of, 0.0) if upcoming.confirmation_of is not None else 0.0
        if time.monotonic() + need > deadline:
            return StopReason.TIME
        return loop.Next.TRIAL


@dataclass(frozen=True)
class QueuedRun:
    """A run a companion study wants: repeat `repeat` of search trial `trial`'s configuration, at `fidelity` (a
    planned search's rung or full fidelity; None: the study's own epochs on the whole training split)."""

    trial: store.TrialRecord
    repeat: int
    seed: int
    fidelity: Fidelity | None = None

    @property
    def key(self) -> tuple[int, int]:
        return self.trial.number, self.repeat


def planned(spec: StudySpec, study: optuna.Study, full: Fidelity | None = None) -> list[QueuedRun]:
    """Every run the phase wants: repeat by repeat, so a phase cut short still has every candidate's early repeats.
    A planned search's phase (`full`: its full fidelity) trains every repeat, the first with the trial's own seed."""
    found, table = candidates(spec, study), champion_table(spec, study)
    if full is None:
        return [QueuedRun(trial, repeat, repeat_seed(spec, trial.number, repeat))
                for repeat in range(1, table.seeds) for trial in found]
    return [QueuedRun(trial, repeat, trial.seed if repeat == 0 and trial.seed is not None else
                      repeat_seed(spec, trial.number, repeat), full)
            for repeat in range(table.seeds) for trial in found]


def queue_missing(companion: optuna.Study, wanted: list[QueuedRun], now: list[QueuedRun] | None = None) -> None:
    """Queue the runs of `now` (default: every wanted run) that are neither done nor queued nor running, in that
    order; drop queued runs no longer wanted.

    A run that failed for good (an exception, not a kill) is queued again: this is a new invocation.
    """
    keys = {run.key for run in wanted}
    present = set()
    for record in store.records(companion):
        key = (record.confirmation_of, record.repeat)
        if record.state == "WAITING" and key not in keys:
            store.fail_trial(companion, record.number, UNPLANNED)
        elif record.state in ("COMPLETE", "PRUNED", "RUNNING", "WAITING"):
            present.add(key)
    for run in wanted if now is None else now:
        if run.key not in present:
            fidelity = run.fidelity.as_dict() if run.fidelity is not None else None
            store.queue_trial(companion, run.trial.sampled, store.TrialNotes(
                confirmation_of=run.trial.number, repeat=run.repeat, seed=run.seed, fidelity=fidelity))


class Phase:
    """One invocation's champion phase: what it wants, then `run` to train what is missing, round by round. A planned
    search's (`full` given) trains every run at full fidelity to the run's clock."""

    def __init__(self, spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage,
                 full: Fidelity | None = None):
        self.spec, self.study, self.full = spec, study, full
        self.companion = open_companion(spec, storage, study.study_name)
        self.wanted = planned(spec, study, full)
        queue_missing(self.companion, self.wanted, now=[])  # drops what is no longer wanted; `run` queues rounds

    def announcement(self) -> str:
        to_train = len(self.wanted) - self.status()[0]
        table, configurations = champion_table(self.spec, self.study), len({run.trial.number for run in self.wanted})
        if self.full is not None:
            return (f"champion phase: the {configurations} best configurations of the last rung, {table.seeds} runs "
                    f"each at full fidelity: {to_train} runs to train")
        return (f"champion phase: the {configurations} best configurations, {table.seeds} runs each (the search's "
                f"own counts as one): {to_train} runs to train, {table.minutes:g} min budget")

    def status(self) -> tuple[int, list[float] | None]:
        """Wanted runs done (for the progress bar)."""
        keys = {run.key for run in self.wanted}
        done = {(r.confirmation_of, r.repeat) for r in store.records(self.companion, (TrialState.COMPLETE,))}
        return len(keys & done), None

    def rounds(self) -> list[list[QueuedRun]]:
        """The wanted runs by repeat: one run of every candidate a round."""
        repeats = sorted({run.repeat for run in self.wanted})
        return [[run for run in self.wanted if run.repeat == repeat] for repeat in repeats]

    def best_first(self, runs: list[QueuedRun]) -> list[QueuedRun]:
        """`runs` (of the phase's candidates) in the order of their candidates' means so far, best first; candidates
        without a run yet in the search's order, after those with runs."""
        table = standings(self.spec, self.study, self.companion)
        sign = 1.0 if table.direction == "maximize" else -1.0
        order = {c.trial.number: (c.summary.n == 0, -sign * c.summary.mean if c.summary.n else 0.0, c.rank)
                 for c in table.candidates}
        return sorted(runs, key=lambda run: order[run.trial.number])

    def run(self, prepared: PreparedData, listener: Listener, threads: int | None = None,
            checkpoints: Path | None = None, clock: TrialClock | None = None) -> PhaseOutcome:
        """Train the missing runs within the phase's minutes (a planned search's: by its `clock`), a round at a
        time, and return the standings.

        A run starts only when its configuration's search trial took no longer than the time left (a planned
        search's: when the clock's estimate of it fits). Raises stopping.Interrupted (the running run is queued again
        and resumes its checkpoint next time), TooManyFailures and DiskFull like the search.
        """
        spec, started, ran = self.spec, time.time(), 0
        objective = Objective(spec, prepared, ChampionRuns(), listener, threads, checkpoints=checkpoints,
                              clock=clock)
        if clock is None:
            needs = {run.trial.number: _duration(run.trial, spec.epochs) for run in self.wanted}
            end = started + champion_table(spec).minutes * 60
        else:
            needs = {run.trial.number: clock.estimate(len(prepared.train), spec.epochs, run.trial.flops_per_image)
                     for run in self.wanted}
            end = clock.stage_end
        stop_reason = StopReason.DONE
        for runs in self.rounds():
            queue_missing(self.companion, self.wanted, self.best_first(runs))
            outcome = loop.run_trials(self.companion, objective, PhaseBudget(needs, max(end - time.time(), 0.0) / 60))
            ran, stop_reason = ran + outcome.ran, outcome.stop_reason
            if stop_reason != StopReason.DONE:
                break
        return PhaseOutcome(ran, stop_reason, standings(spec, self.study, self.companion))


def _duration(trial: store.TrialRecord, epochs: int) -> float:
    """How long a run of this configuration takes: its search trial's time, for every epoch (a resumed trial's
    time covers only the epochs it trained itself)."""
    trained = epochs - trial.resumed_from_epoch
    return trial.seconds * epochs / trained if trained > 0 else trial.seconds


def surplus_run(trial: optuna.Trial) -> str:
    """Why a champion-phase trial must not train (empty: it may). Only queued runs train: an empty queue makes
    Optuna sample a new trial, which has no business there. Two processes finishing the same search at once
    may both queue a missing run: the copy already done, or running since earlier, wins. (Two copies started on
    hosts whose clocks disagree, or one not yet visible when the other checks, may both train: a waste of time,
    not of results, since the table keeps the first that completed.)"""
    key = trial.user_attrs.get("confirmation_of"), trial.user_attrs.get("repeat")
    if key[0] is None:
        return "not a queued champion-phase run"
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        same = other.number != trial.number and (other.user_attrs.get("confirmation_of"),
                                                 other.user_attrs.get("repeat")) == key
        # Of two running copies the one that started first trains (the lower number if at the same moment):
        # each sees the other running, and exactly one of them must stand down.
        if same and (other.state == TrialState.COMPLETE
                     or (other.datetime_start, other.number) < (trial.datetime_start, trial.number)):
            return f"repeat {key[1]} of trial {key[0]} is already trial {other.number}"
    return ""
