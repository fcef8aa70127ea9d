"""Console output: progress bars, trial lines, tables, the workers' view; plain lines when not on a terminal.

Nothing here decides anything: the use-case modules hand over plain values (events, outcomes,
records) and these functions draw them with rich.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pipeline.infra.text import printable
from pipeline.search.events import Listener, TrialEnded, TrialStarted
from pipeline.spec.stop_reason import StopReason

if TYPE_CHECKING:
    from pipeline.data.landing import Landed
    from pipeline.search.champion import Standings
    from pipeline.search.options import SearchOutcome, Status
    from pipeline.search.workers import Workers
    from pipeline.spec.studies import StudySpec
    from pipeline.store import StudyState
    from pipeline.training.train import EpochMetrics

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def literal(text: str) -> str:
    """`text.printable(text)` (no control characters, no URL's password) inside rich markup: its own markup escaped
    (a class named `[/]` would raise, one named `[link=...]` would become a hyperlink). Where nothing else is
    markup, rich.text.Text(printable(text)) is exact (escape doubles a trailing backslash, for the tag that may
    follow)."""
    return escape(printable(text))


def say(message: str) -> None:
    console.print(literal(message))


def note(message: str) -> None:
    """A warning: yellow, on stderr."""
    err_console.print(f"[yellow]{literal(message)}")


def error(message: str) -> None:
    err_console.print(f"[red]error:[/] {literal(message)}", soft_wrap=True)


def failed(message: str) -> None:
    err_console.print(f"[red]{literal(message)}")


def progress(live: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not live)


def short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def values_text(values: list[float] | None) -> str:
    """Objective values: counts (parameters, FLOPs) as whole numbers, the others to 4 decimals."""
    if not values:
        return "-"
    return ", ".join(f"{v:,.0f}" if math.isfinite(v) and v == int(v) and abs(v) >= 2 else f"{v:.4f}"
                     for v in values)


def trial_name(number: int, confirmation_of: int | None = None, repeat: int = 0, width: int = 0) -> str:
    """`trial 12`, or for a champion-phase run `trial 3 repeat 1` (trial 3's configuration, its repeat 1's seed);
    the number right-aligned in `width` characters."""
    if confirmation_of is None:
        return f"trial {number:>{width}}"
    return f"trial {confirmation_of:>{width}} repeat {repeat}"


def trial_line(trial: TrialEnded) -> str:
    """One line per finished trial: number, state, value, duration, reason and key params."""
    if trial.state == "COMPLETE":
        value = values_text(trial.values)
    else:
        value = trial.fail_reason or ""
        if trial.fail_detail and (trial.state == "FAIL" or trial.fail_reason in ("pruned", "infeasible")):
            value += f": {trial.fail_detail.splitlines()[0][:120]}"  # a prune's reason: the epoch and the values
    shown = ", ".join(f"{k}={short(v)}" for k, v in (trial.sampled or {}).items())
    resumed = f" (resumed from epoch {trial.resumed_from_epoch})" if trial.resumed_from_epoch else ""
    name = trial_name(trial.number, trial.confirmation_of, trial.repeat, width=3)
    if trial.confirmation_of is not None:
        shown = f"champion phase, run {trial.number}"
    return f"{name} {trial.state:<8} {value:<10} {trial.seconds:6.1f} s  {shown}{resumed}"


def epoch_line(name: str, epoch: int, val_accuracy: float, val_loss: float, seconds: float) -> str:
    """`name`: the trial's trial_name."""
    return f"{name} epoch {epoch}: val_accuracy {val_accuracy:.4f} val_loss {val_loss:.4f} ({seconds:.1f} s)"


# --------------------------------------------------------------------------------------------------
# make search


class SearchView(Listener):
    """One process's search on the console: the study's trials bar, the running trial's epoch bar, one line
    per finished trial (and per epoch when not on a terminal)."""

    def __init__(self) -> None:
        self.live = console.is_terminal  # bars on a terminal, plain lines in CI and pipes
        self.bars: Progress | None = None
        self.status: Status = lambda: (0, None)
        self.what = "trials"
        self.names: dict[int, str] = {}  # running trials' names (champion-phase runs are named by their trial)

    def say(self, message: str) -> None:
        say(message)

    def note(self, message: str) -> None:
        err_console.print(f"[yellow]note:[/] {literal(message)}")

    def header(self, text: str) -> None:
        console.print(f"[bold]{literal(text)}")

    @contextmanager
    def running(self, spec: StudySpec, status: Status, total: int | None = None,
                what: str = "trials") -> Iterator[None]:
        self.status, self.bars, self.what = status, progress(self.live), what
        finished, best = status()
        self.trials_task = self.bars.add_task(what, total=spec.trials if total is None else total, completed=finished)
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
        name = trial_name(trial.number, trial.confirmation_of, trial.repeat)
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
            console.print("  " + epoch_line(name, metrics.epoch, metrics.val_accuracy, metrics.val_loss,
                                            metrics.epoch_seconds))

    def trial_ended(self, trial: TrialEnded) -> None:
        self.names.pop(trial.number, None)
        console.print(literal(trial_line(trial)))
        if self.bars is not None:
            self.bars.update(self.trials_task, completed=self.status()[0],
                             description=f"{self.what} | {self._best()}")

    def waiting(self) -> None:  # another search on this study runs the budget's last trials
        if self.bars is not None:
            self.bars.update(self.trials_task,
                             description=f"waiting for other processes' last trials | {self._best()}")

    def warning(self, message: str) -> None:
        err_console.print(literal(message))

    def workers_view(self, spec: StudySpec, status: Status, pool: Workers) -> WorkersView:
        return WorkersView(spec, status, pool)

    def ended(self, spec: StudySpec, outcome: SearchOutcome) -> None:
        if outcome.stop_reason == StopReason.INTERRUPTED:
            signal_name = signal.Signals(outcome.signal_number).name
            many = outcome.workers > 1
            err_console.print(f"[yellow]{signal_name} received: the running trial{'s are' if many else ' is'} "
                              f"recorded as FAIL (interrupted) and queued again; finished trials are saved. "
                              f"Resume with: {outcome.resume_command}")
        elif outcome.stop_reason == StopReason.FAILED:
            err_console.print(f"[red]study stopped:[/] {literal(outcome.failure or '')}")
        else:
            summary(spec, outcome)


def summary(spec: StudySpec, outcome: SearchOutcome) -> None:
    """The end of a search: what ran, the top trials, the best one."""
    phase = f" and {outcome.champion.ran} champion-phase runs" if outcome.champion is not None else ""
    ended = "budget reached" if outcome.stop_reason == StopReason.BUDGET else "time budget spent"
    console.print(f"{outcome.ran} trials{phase} run in {outcome.seconds / 60:.1f} min; "
                  f"{outcome.finished}/{spec.trials} finished ({ended})")
    several = len(spec.objectives) > 1
    if outcome.top:
        title = (f"Pareto front of {outcome.study_name} ({', '.join(spec.metrics)})" if several else
                 f"top trials of {outcome.study_name} ({spec.metrics[0]})")
        table = Table(title=title)
        for column, justify in (("trial", "right"), ("value", "right"), ("time", "right"), ("parameters", "left")):
            table.add_column(column, justify=justify, overflow="fold")
        for record in outcome.top:
            shown = ", ".join(f"{k}={short(v)}" for k, v in record.sampled.items())
            table.add_row(str(record.number), values_text(record.values), f"{record.seconds:.0f} s", literal(shown))
        console.print(table)
    best = outcome.best
    if outcome.decision is not None and outcome.decision.reason:
        console.print(f"champion: {literal(outcome.decision.reason)}")
    elif best is not None:
        console.print(f"best trial {best.number}: {values_text(best.values)} with {literal(str(best.params))}")
    if outcome.champion is not None:
        champion_table(outcome.champion.standings)
        if outcome.champion.stop_reason == StopReason.TIME:
            console.print(f"[yellow]the champion phase's {spec.confirmation.minutes:g} minutes would be exceeded by "
                          f"the next run: {outcome.champion.standings.missing} runs left; `{outcome.resume_command}` "
                          "trains them (or raise [champion] minutes)")


def champion_table(standings: Standings) -> None:
    """The champion phase's candidates: each one's runs, mean, spread and confidence interval; then the choice."""
    table = Table(title=f"champion phase of {standings.study_name}: {standings.metric} over "
                        f"{standings.seeds} seeds per candidate (95% CI: Student t)")
    for column in ("trial", "mean", "std", "95% CI", "min-max", "MFLOPs", "runs (repeat: value; 0 = the search's)"):
        table.add_column(column, justify="left" if column.startswith("runs") else "right", overflow="fold")
    for r in standings.rows():  # in the search's order
        table.add_row(r["trial"], r["mean"], r["std"], r["interval"], f"{r['min']}-{r['max']}", r["mflops"],
                      r["values"], style="bold green" if r["champion"] else None)
    console.print(table)
    console.print(literal(standings.reason))
    if standings.exported is not None:
        from pipeline.search.champion import describe_run

        exported = describe_run(standings.exported, standings.champion.trial.number)
        console.print(f"exported weights: {literal(exported)}, the confirmation run "
                      "closest to the mean")


def search_result(spec: StudySpec, outcome: SearchOutcome) -> None:
    """What tracking said at the end, and what to run next."""
    for line in outcome.messages:
        say(line)
    if outcome.stop_reason in (StopReason.BUDGET, StopReason.TIMEOUT):
        standings = outcome.champion.standings if outcome.champion is not None else None
        if standings is not None and standings.exported is not None:  # what gets exported is worth re-checking
            run = standings.exported
            replay = f"make replay STUDY={spec.name} TRIAL={standings.champion.trial.number} REPEAT={run.repeat}"
            what = "the champion's exported run"
        elif outcome.best is not None:
            replay, what = f"make replay STUDY={spec.name} TRIAL={outcome.best.number}", "the best trial"
        else:
            replay, what = "make studies", "the study's trials"
        console.print(f"next: `{outcome.resume_command}` continues the study (raise TRIALS= / TIMEOUT= for more); "
                      f"`{replay}` re-checks {what} bit for bit")


class WorkersView:
    """The one view of a study several workers run: the study's trials bar, one line per worker, each
    finished trial once; plain lines instead of bars when the output is not a terminal."""

    def __init__(self, spec: StudySpec, status: Status, pool: Workers):
        self.status, self.pool = status, pool
        self.live = console.is_terminal
        self.bars = progress(self.live)
        finished, best = status()
        self.trials_task = self.bars.add_task(f"trials | best {values_text(best)}", total=spec.trials,
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

    def show(self, index: int, event: dict[str, Any]) -> None:
        kind, task = event["event"], self.tasks[index]
        if kind == "trial_start":
            self.waiting.discard(index)
            self.bars.reset(task, description=f"worker {index}: trial {event['number']} epoch 1", total=None)
        elif kind == "batch":
            self.bars.update(task, completed=event["done"], total=event["total"])
        elif kind == "epoch":
            self.bars.reset(task, total=None,
                            description=f"worker {index}: trial {event['number']} epoch {event['epoch'] + 1}")
            if not self.live:
                line = epoch_line(trial_name(event["number"]), event["epoch"], event["val_accuracy"],
                                  event["val_loss"], event["seconds"])
                self.say(f"  worker {index}: {line}")
        elif kind == "trial_end":
            self.say(literal(trial_line(TrialEnded(**{k: v for k, v in event.items() if k != "event"})))
                     + f"  (worker {index})")
            finished, best = self.status()
            self.bars.update(self.trials_task, completed=finished, description=f"trials | best {values_text(best)}")
        elif kind == "waiting" and index not in self.waiting:  # repeated every second while it waits
            self.waiting.add(index)
            self.bars.update(task, description=f"worker {index}: waiting for the last trials", total=1,
                             completed=1)  # its own part is done
        elif kind == "warning":
            self.say(f"[yellow]warning (worker {index}):[/] {literal(event['text'])}")


# --------------------------------------------------------------------------------------------------
# The other commands


class TrainView:
    """`make train`: a header, an epoch bar, one line per epoch, and the history as a table."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=console, transient=True)
        self.task = self.bars.add_task(f"epoch 1/{epochs}", total=None)

    def __enter__(self) -> TrainView:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def header(self, text: str) -> None:
        self.bars.console.print(f"[bold]{literal(text)}")

    def batch_done(self, done: int, total: int) -> None:
        self.bars.update(self.task, completed=done, total=total)

    def epoch_ended(self, m: EpochMetrics) -> None:
        self.bars.console.print(
            f"epoch {m.epoch}: train loss {m.train_loss:.4f} acc {m.train_accuracy:.4f} | "
            f"val loss {m.val_loss:.4f} acc {m.val_accuracy:.4f} | lr {m.lr:.2e} | "
            f"{m.epoch_seconds:.1f} s, {m.images_per_second:,.0f} img/s"
        )
        self.bars.reset(self.task, description=f"epoch {m.epoch + 1}/{self.epochs}", total=None)

    def result(self, result: Any) -> None:
        table = Table(title=f"{result.params['model']}: {result.parameter_count:,} parameters, "
                            f"{result.flops_per_image / 1e6:,.1f} MFLOPs/image, {result.precision}, "
                            f"{result.threads} threads")
        for column in ("epoch", "train loss", "train acc", "val loss", "val acc", "lr", "s", "img/s"):
            table.add_column(column, justify="right")
        for m in result.history:
            style = "bold green" if m.epoch == result.best_epoch else None
            table.add_row(str(m.epoch), f"{m.train_loss:.4f}", f"{m.train_accuracy:.4f}", f"{m.val_loss:.4f}",
                          f"{m.val_accuracy:.4f}", f"{m.lr:.2e}", f"{m.epoch_seconds:.1f}",
                          f"{m.images_per_second:,.0f}", style=style)
        console.print(table)
        console.print(f"best val accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch} "
                      f"({result.stop_reason})")


def landed(datasets: list[Landed]) -> None:
    for d in datasets:
        where = f"{d.decoded}, cached in {d.location}" if d.decoded else f"in {d.location}"
        console.print(f"[green]{d.name}[/]: {d.train_images:,} train + {d.test_images:,} test images {where} "
                      f"({d.details})")


def studies_table(states: list[StudyState]) -> None:
    table = Table(title="studies")
    for column in ("study", "file", "trials done", "best value", "state"):
        table.add_column(column)
    for s in states:
        table.add_row(s.name, s.file, f"{s.done}/{s.trials}", values_text(s.best), s.state)
    console.print(table)


def predictions(export: Any, found: list[Any], errors: list[str]) -> None:
    if found:
        width = len(found[0].top)
        table = Table(title=f"predictions of {literal(str(export))}")
        table.add_column("image", overflow="fold")
        table.add_column("predicted")
        for rank in range(1, width + 1):
            table.add_column(f"top {rank}", justify="right")
        for p in found:
            # Text, not markup: the export's class names are shown exactly as they are, whatever they hold
            table.add_row(Text(printable(str(p.path))), Text(printable(p.top[0][0])),
                          *(Text(f"{printable(name)} {prob:.3f}") for name, prob in p.top))
        console.print(table)
    for line in errors:
        error(line)


def exported(destination: Path, seconds: float) -> None:
    metrics = json.loads((destination / "metrics.json").read_text())
    console.print(
        f"[green]{literal(str(destination))}[/]: test accuracy {metrics['test_accuracy']:.4f} "
        f"({metrics['test_correct']:,}/{metrics['test_images']:,}, verified by a fresh process), validation "
        f"{metrics['val_accuracy']}, {metrics['parameter_count']:,} parameters, "
        f"{metrics['cpu_latency_ms_batch1_median']:.2f} ms/image at batch 1, "
        f"{metrics['cpu_throughput_images_per_s_batch256']:,.0f} images/s at batch 256 ({seconds:.0f} s)")
    console.print(f"next: `make predict EXPORT={_relative(destination)} IMAGES=\"a.png b.png\"`; "
                  f"see {_relative(destination / 'model_card.md')}")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def replay_result(name: str, epochs: int, differences: list[str]) -> None:
    """`name`: what was replayed (views.trial_name)."""
    if differences:
        console.print(f"[red]{name} replay differs[/] ({len(differences)} values):")
        for line in differences:
            console.print(f"  {literal(line)}")
        return
    console.print(f"[green]{name} replayed identically[/]: {epochs} epochs, every recorded "
                  "metric equal bit for bit")

