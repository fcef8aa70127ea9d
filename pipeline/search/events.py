"""What happens during a search, as events: the search loop tells its listeners, and knows none of them.

Listeners: the console view (console/search_view.py), a worker's event lines to its coordinator (workers.py) and
MLflow (tracking/study_run.py). A listener overrides the events it cares about; the rest do nothing. An exception
raised by `trial_started`, `epoch_ended`, `new_best` or `confirmation_model` fails that trial (it is recorded with the
traceback, the search goes on); `trial_ended` is told after the trial is safe in Optuna, and its
errors only warn. A `SearchView` is the listener that also shows the rest of a search (its header, its notes, its
end).

A worker tells its coordinator what happens as these events too, one line each (`to_line`, read back by
`from_line`): the trial events above and the few below that only a worker sends.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from pipeline.spec.stop_reason import StopReason

if TYPE_CHECKING:  # annotations only: this module imports neither torch nor Optuna
    from contextlib import AbstractContextManager

    from pipeline.data.loading import PreparedData
    from pipeline.search.options import SearchOutcome
    from pipeline.search.workers import Workers, WorkersView
    from pipeline.spec.studies import StudySpec
    from pipeline.store import TrialRecord
    from pipeline.training.train import EpochMetrics, TrainedModel


@dataclass(frozen=True)
class TrialStarted:
    number: int
    params: dict[str, Any]  # resolved: every model and training key
    seed: int
    parameter_count: int  # -1 when the model cannot be built (the trial then fails and says why)
    # The prepared tensors: None in a coordinator (they stay in their worker, whose line sends none).
    data: PreparedData | None
    confirmation_of: int | None = None  # a champion-phase run: it trains this search trial's configuration again
    repeat: int = 0  # ...with the seed of this repeat (champion.py)
    rung: int | None = None  # a planned search's later rung (1, 2...): a run of trial `confirmation_of` there


@dataclass(frozen=True)
class TrialEnded:
    """A trial's outcome once Optuna has recorded it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL
    values: list[float] | None
    seconds: float = 0.0
    sampled: dict[str, Any] | None = None  # the searched parameters
    fail_reason: str | None = None
    fail_detail: str | None = None
    traceback: str | None = None
    resumed_from_epoch: int = 0  # a retry that took over this many epochs from its first attempt's checkpoint
    confirmation_of: int | None = None  # as in TrialStarted
    repeat: int = 0
    prune_reason: dict[str, Any] | None = None  # why it was pruned (pruning.PruneReason.as_dict)
    rung: int | None = None  # as in TrialStarted

    @classmethod
    def of(cls, record: TrialRecord) -> TrialEnded:
        """The event for a finished trial. One failed by the heartbeat check has no fail_reason of its own:
        its process was killed."""
        reason = record.fail_reason or ("stale" if record.state == "FAIL" else None)
        rung = record.fidelity.get("rung") if record.fidelity else None
        return cls(record.number, record.state, record.values, record.seconds, record.sampled, reason,
                   record.fail_detail, record.traceback, record.resumed_from_epoch, record.confirmation_of,
                   record.repeat, record.prune_reason, rung if rung is not None and rung > 0 else None)


class Listener:
    """Does nothing; subclasses override what they listen to."""

    def trial_started(self, trial: TrialStarted) -> None:
        pass

    def batch_done(self, done: int, total: int) -> None:
        pass

    def epoch_ended(self, number: int, metrics: EpochMetrics) -> None:
        pass

    def new_best(self, number: int, value: float, model: TrainedModel) -> None:
        """Trial `number` beats the study's best so far (its model is still in memory)."""

    def confirmation_model(self, number: int, value: float, model: TrainedModel) -> None:
        """Champion-phase run `number` completed (every one keeps its model: the champion's may be exported)."""

    def trial_ended(self, trial: TrialEnded) -> None:
        pass

    def interrupted(self, reason: str) -> None:
        """Ctrl-C, SIGTERM or SIGHUP cut the running trial short."""

    def waiting(self) -> None:
        """Other processes run the budget's last trials; this one waits in case one of them fails."""

    def warning(self, message: str) -> None:
        pass


class Listeners(Listener):
    """Several listeners told in turn, in the order given."""

    def __init__(self, *listeners: Listener):
        self.listeners = listeners

    def trial_started(self, trial: TrialStarted) -> None:
        for listener in self.listeners:
            listener.trial_started(trial)

    def batch_done(self, done: int, total: int) -> None:
        for listener in self.listeners:
            listener.batch_done(done, total)

    def epoch_ended(self, number: int, metrics: EpochMetrics) -> None:
        for listener in self.listeners:
            listener.epoch_ended(number, metrics)

    def new_best(self, number: int, value: float, model: TrainedModel) -> None:
        for listener in self.listeners:
            listener.new_best(number, value, model)

    def confirmation_model(self, number: int, value: float, model: TrainedModel) -> None:
        for listener in self.listeners:
            listener.confirmation_model(number, value, model)

    def trial_ended(self, trial: TrialEnded) -> None:
        for listener in self.listeners:
            listener.trial_ended(trial)

    def interrupted(self, reason: str) -> None:
        for listener in self.listeners:
            listener.interrupted(reason)

    def waiting(self) -> None:
        for listener in self.listeners:
            listener.waiting()

    def warning(self, message: str) -> None:
        for listener in self.listeners:
            listener.warning(message)


Status: TypeAlias = Callable[[], tuple[int, list[float] | None]]  # (finished trials, best values so far)


class SearchView(Listener, ABC):
    """What a search shows: its events (a Listener), and the rest of it below. console/search_view.py draws it on
    the console; a worker's view (workers.EventView) sends it to its coordinator."""

    @abstractmethod
    def say(self, message: str) -> None: ...

    @abstractmethod
    def note(self, message: str) -> None:
        """A warning the user should read."""

    @abstractmethod
    def header(self, text: str) -> None: ...

    @abstractmethod
    def running(self, spec: StudySpec, status: Status, total: int | None = None,
                what: str = "trials") -> AbstractContextManager[None]:
        """Around a loop of `total` trials (spec.trial_budget when None)."""

    @abstractmethod
    def workers_view(self, spec: StudySpec, status: Status, pool: Workers) -> WorkersView: ...

    @abstractmethod
    def ended(self, spec: StudySpec, outcome: SearchOutcome) -> None: ...


# --------------------------------------------------------------------------------------------------
# A worker's events for its coordinator: besides TrialStarted and TrialEnded, what only a worker sends


@dataclass(frozen=True)
class BatchDone:
    """The running trial's epoch has trained `done` of its `total` batches."""

    done: int
    total: int


@dataclass(frozen=True)
class EpochEnded:
    """Trial `number` ended an epoch: what the console shows of its EpochMetrics."""

    number: int
    epoch: int
    val_accuracy: float
    val_loss: float
    seconds: float


@dataclass(frozen=True)
class Waiting:
    """Other processes run the budget's last trials; the worker waits (told again every second while it waits)."""


@dataclass(frozen=True)
class Warned:
    """A warning (or a note) the user should read."""

    text: str


@dataclass(frozen=True)
class StudyFailed:
    """Too many trials failed in a row: the worker stopped the study, the coordinator stops the other workers."""

    failure: str | None


@dataclass(frozen=True)
class WorkerDone:
    """The worker's search ended on its budget or its time (neither interrupted nor failed)."""

    ran: int  # trials it ran
    stop_reason: Literal[StopReason.BUDGET, StopReason.TIMEOUT, StopReason.TIME]  # TIME: a planned rung 0


Shown: TypeAlias = TrialStarted | BatchDone | EpochEnded | TrialEnded | Waiting | Warned  # what the coordinator draws
WorkerEvent: TypeAlias = Shown | StudyFailed | WorkerDone

# Each event's type by its name on the wire.
EVENT_TYPES: dict[str, type[WorkerEvent]] = {
    kind.__name__: kind for kind in (TrialStarted, BatchDone, EpochEnded, TrialEnded, Waiting, Warned, StudyFailed,
                                     WorkerDone)
}

EVENT_PREFIX = "@event "  # marks a worker's event lines; anything else it prints is passed on as text


def to_line(event: WorkerEvent) -> str:
    """`event` as one line of a worker's output (without its newline): EVENT_PREFIX, then its type's name and its
    fields as a JSON object (which holds no line break: JSON escapes those in strings). A field JSON cannot hold
    raises TypeError (a TrialStarted is sent without its data: workers.EventView)."""
    named = {f.name: getattr(event, f.name) for f in fields(event)}
    return EVENT_PREFIX + json.dumps({"event": type(event).__name__, **named})


def from_line(line: str) -> list[WorkerEvent | str]:
    """What one line of a worker's output holds: an event, text, or both (the event first).

    The worker's stderr shares the pipe, so a library's warning may be glued to the end of an event line: the
    event is kept and the rest shown as text. A line that holds no whole event (cut short, garbled) is text too.
    """
    if line.startswith(EVENT_PREFIX):
        try:
            read, end = json.JSONDecoder().raw_decode(line, len(EVENT_PREFIX))
        except json.JSONDecodeError:
            read, end = None, 0
        event = _event(read)
        if event is not None:
            rest = line[end:].strip()
            return [event, rest] if rest else [event]
    return [line] if line.strip() else []


def _event(read: object) -> WorkerEvent | None:
    """The event that an event line's JSON object describes; None when it describes none."""
    if not isinstance(read, dict):
        return None
    name = read.pop("event", None)
    kind = EVENT_TYPES.get(name) if isinstance(name, str) else None
    if kind is None:
        return None
    if kind is WorkerDone:  # its reason, read back as the StopReason it was
        if read.get("stop_reason") not in (StopReason.BUDGET, StopReason.TIMEOUT, StopReason.TIME):
            return None
        read["stop_reason"] = StopReason(read["stop_reason"])
    try:
        return kind(**read)
    except TypeError:  # fields missing or unknown
        return None
