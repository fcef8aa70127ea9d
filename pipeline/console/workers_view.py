"""WORKERS=N: the coordinator's one view of a study its workers run, drawn from the events they send
(search/events.py): the study's trials bar, one bar per worker, each finished trial once; plain lines instead of
bars when the output is not a terminal."""

from __future__ import annotations

import signal
import subprocess
from typing import TYPE_CHECKING, Any

from pipeline.console import lines
from pipeline.console.lines import epoch_line, literal, progress, trial_line, trial_name, values_text
from pipeline.search.events import BatchDone, EpochEnded, Shown, Status, TrialEnded, TrialStarted, Waiting, Warned

if TYPE_CHECKING:
    from pipeline.search.workers import Workers
    from pipeline.spec.studies import StudySpec


class WorkersView:
    """The one view of a study several workers run: the study's trials bar, one line per worker, each
    finished trial once; plain lines instead of bars when the output is not a terminal."""

    def __init__(self, spec: StudySpec, status: Status, pool: Workers):
        self.status = status
        self.live = lines.console.is_terminal
        self.bars = progress(self.live)
        finished, best = status()
        self.trials_task = self.bars.add_task(f"trials | best {values_text(best)}", total=spec.trial_budget,
                                              completed=finished)
        self.tasks = {p.index: self.bars.add_task(f"worker {p.index}: starting", total=None) for p in pool.plans}
        self.waiting: set[int] = set()  # workers waiting for other workers' last trials

    def __enter__(self) -> WorkersView:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def say(self, text: str) -> None:
        self.bars.console.print(text)

    def worker_line(self, index: int, text: str) -> None:
        self.say(f"[dim]worker {index}:[/] {literal(text)}")

    def worker_ended(self, index: int, process: subprocess.Popen, unexpected: bool) -> None:
        code = process.returncode
        if unexpected:
            what = signal.Signals(-code).name if code < 0 else f"exit code {code}"
            self.say(f"[yellow]worker {index} (pid {process.pid}) ended ({what}); "
                     "the others carry on and rerun its trial")
        self.bars.update(self.tasks[index], description=f"worker {index}: ended", total=1, completed=1)

    def show(self, index: int, event: Shown) -> None:
        """Worker `index`'s event, drawn."""
        task = self.tasks[index]
        match event:
            case TrialStarted():
                self.waiting.discard(index)
                self.bars.reset(task, description=f"worker {index}: trial {event.number} epoch 1", total=None)
            case BatchDone():
                self.bars.update(task, completed=event.done, total=event.total)
            case EpochEnded():
                self._epoch_ended(index, event)
            case TrialEnded():
                self._trial_ended(index, event)
            case Waiting():
                if index not in self.waiting:  # told again every second while it waits: drawn once
                    self.waiting.add(index)
                    self.bars.update(task, description=f"worker {index}: waiting for the last trials", total=1,
                                     completed=1)  # its own part is done
            case Warned():
                self.say(f"[yellow]warning (worker {index}):[/] {literal(event.text)}")

    def _epoch_ended(self, index: int, event: EpochEnded) -> None:
        self.bars.reset(self.tasks[index], total=None,
                        description=f"worker {index}: trial {event.number} epoch {event.epoch + 1}")
        if not self.live:
            line = epoch_line(trial_name(event.number), event.epoch, event.val_accuracy, event.val_loss, event.seconds)
            self.say(f"  worker {index}: {line}")

    def _trial_ended(self, index: int, trial: TrialEnded) -> None:
        self.say(literal(trial_line(trial)) + f"  (worker {index})")
        finished, best = self.status()
        self.bars.update(self.trials_task, completed=finished, description=f"trials | best {values_text(best)}")
