"""`make search` in one process on the console: the study's trials bar, the running trial's epoch bar, one line per
finished trial (and per epoch when not on a terminal), and what the search ended with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.progress import Progress

from pipeline.console import lines
from pipeline.console.lines import epoch_line, literal, progress, trial_line, trial_name, values_text
from pipeline.console.tables import summary
from pipeline.console.workers_view import WorkersView
from pipeline.search import events
from pipeline.search.events import Status, TrialEnded, TrialStarted
from pipeline.spec.stop_reason import StopReason

if TYPE_CHECKING:
    from pipeline.search.options import SearchOutcome
    from pipeline.search.workers import Workers
    from pipeline.spec.studies import StudySpec
    from pipeline.training.train import EpochMetrics


class SearchView(events.SearchView):
    """One process's search on the console: the study's trials bar, the running trial's epoch bar, one line
    per finished trial (and per epoch when not on a terminal)."""

    def __init__(self) -> None:
        self.live = lines.console.is_terminal  # bars on a terminal, plain lines in CI and pipes
        self.bars: Progress | None = None
        self.status: Status = lambda: (0, None)
        self.what = "trials"
        self.names: dict[int, str] = {}  # running trials' names (champion-phase runs are named by their trial)

    def say(self, message: str) -> None:
        lines.say(message)

    def note(self, message: str) -> None:
        lines.err_console.print(f"[yellow]note:[/] {literal(message)}")

    def header(self, text: str) -> None:
        lines.console.print(f"[bold]{literal(text)}")

    @contextmanager
    def running(self, spec: StudySpec, status: Status, total: int | None = None,
                what: str = "trials") -> Iterator[None]:
        self.status, self.bars, self.what = status, progress(self.live), what
        finished, best = status()
        total = spec.trial_budget if total is None else total
        self.trials_task = self.bars.add_task(what, total=total, completed=finished)
        self.epoch_task = self.bars.add_task("epoch", total=None)
        try:
            with self.bars:
                yield
        finally:
            self.bars = None

    def _best(self) -> str:
        return "best " + values_text(self.status()[1])

    def _name(self, number: int) -> str:
        return self.names.get(number, f"trial {number}")

    def trial_started(self, trial: TrialStarted) -> None:
        name = trial_name(trial.number, trial.confirmation_of, trial.repeat, rung=trial.rung)
        self.names[trial.number] = name
        if self.bars is not None:
            self.bars.update(self.trials_task, description=f"{name} | {self._best()}")
            # The epoch bar shows the new trial at once, not the previous trial's last epoch.
            self.bars.reset(self.epoch_task, description=f"{name} epoch 1", total=None)

    def batch_done(self, done: int, total: int) -> None:
        if self.bars is not None and self.live:
            self.bars.update(self.epoch_task, completed=done, total=total)

    def epoch_ended(self, number: int, metrics: EpochMetrics) -> None:
        name = self._name(number)
        if self.bars is not None:
            self.bars.reset(self.epoch_task, description=f"{name} epoch {metrics.epoch + 1}", total=None)
        if not self.live:
            lines.console.print("  " + epoch_line(name, metrics.epoch, metrics.val_accuracy, metrics.val_loss,
                                                  metrics.epoch_seconds))

    def trial_ended(self, trial: TrialEnded) -> None:
        self.names.pop(trial.number, None)
        lines.console.print(literal(trial_line(trial)))
        if self.bars is not None:
            self.bars.update(self.trials_task, completed=self.status()[0],
                             description=f"{self.what} | {self._best()}")

    def waiting(self) -> None:  # another search on this study runs the budget's last trials
        if self.bars is not None:
            self.bars.update(self.trials_task,
                             description=f"waiting for other processes' last trials | {self._best()}")

    def warning(self, message: str) -> None:
        lines.err_console.print(literal(message))

    def workers_view(self, spec: StudySpec, status: Status, pool: Workers) -> WorkersView:
        return WorkersView(spec, status, pool)

    def ended(self, spec: StudySpec, outcome: SearchOutcome) -> None:
        if outcome.stop_reason == StopReason.INTERRUPTED:
            running = "the running trials are" if outcome.workers > 1 else "the running trial is"
            lines.err_console.print(f"[yellow]{outcome.stop_signal.name} received: {running} "
                                    f"recorded as FAIL (interrupted) and queued again; finished trials are saved. "
                                    f"Resume with: {outcome.resume_command}")
        elif outcome.stop_reason == StopReason.FAILED:
            lines.err_console.print(f"[red]study stopped:[/] {literal(outcome.failure or '')}")
        else:
            summary(spec, outcome)
