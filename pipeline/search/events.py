"""What happens during a search, as events: the search loop tells its listeners, and knows none of them.

Listeners: the console view (views.py), a worker's event lines to its coordinator (workers.py) and
MLflow (tracking.py). A listener overrides the events it cares about; the rest do nothing. An exception
raised by `trial_started`, `epoch_ended`, `new_best` or `confirmation_model` fails that trial (it is recorded with the
traceback, the search goes on); `trial_ended` is told after the trial is safe in Optuna, and its
errors only warn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: this module imports neither torch nor Optuna
    from pipeline.data.loading import PreparedData
    from pipeline.training.train import EpochMetrics, TrainedModel


@dataclass(frozen=True)
class TrialStarted:
    number: int
    params: dict[str, Any]  # resolved: every model and training key
    seed: int
    parameter_count: int  # -1 when the model cannot be built (the trial then fails and says why)
    data: PreparedData
    confirmation_of: int | None = None  # a champion-phase run: it trains this search trial's configuration again
    repeat: int = 0  # ...with the seed of this repeat (champion.py)


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
