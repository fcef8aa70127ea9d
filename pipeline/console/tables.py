"""What the commands print when they end: a search's summary, the champion phase's table and what to run next;
the datasets landed, the studies, predictions, an export and a replay's verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import JustifyMethod
from rich.table import Table
from rich.text import Text

from pipeline.console import lines
from pipeline.console.lines import error, literal, say, short, values_text
from pipeline.infra.text import printable
from pipeline.spec.stop_reason import StopReason

if TYPE_CHECKING:
    from pipeline.data.landing import Landed
    from pipeline.search.champion import Standings
    from pipeline.search.options import SearchOutcome
    from pipeline.spec.studies import StudySpec
    from pipeline.store import StudyState

SUMMARY_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("trial", "right"), ("value", "right"), ("time", "right"), ("parameters", "left"))


def summary(spec: StudySpec, outcome: SearchOutcome) -> None:
    """The end of a search: what ran, the top trials, the best one."""
    phase = f" and {outcome.champion.ran} champion-phase runs" if outcome.champion is not None else ""
    ended = "budget reached" if outcome.stop_reason == StopReason.BUDGET else "time budget spent"
    if spec.planned:
        lines.console.print(f"{outcome.ran} runs in {outcome.seconds / 60:.1f} min; {outcome.finished} "
                            f"configurations at rung 0 in all")
    else:
        lines.console.print(f"{outcome.ran} trials{phase} run in {outcome.seconds / 60:.1f} min; "
                            f"{outcome.finished}/{spec.trial_budget} finished ({ended})")
    several = len(spec.objectives) > 1
    if outcome.top:
        title = (f"Pareto front of {outcome.study_name} ({', '.join(spec.metrics)})" if several else
                 f"top trials of {outcome.study_name} ({spec.metrics[0]})")
        table = Table(title=title)
        for column, justify in SUMMARY_COLUMNS:
            table.add_column(column, justify=justify, overflow="fold")
        for record in outcome.top:
            shown = ", ".join(f"{k}={short(v)}" for k, v in record.sampled.items())
            table.add_row(str(record.number), values_text(record.values), f"{record.seconds:.0f} s", literal(shown))
        lines.console.print(table)
    best = outcome.best
    if outcome.decision is not None and outcome.decision.reason:
        lines.console.print(f"champion: {literal(outcome.decision.reason)}")
    elif best is not None:
        lines.console.print(f"best trial {best.number}: {values_text(best.values)} with {literal(str(best.params))}")
    if outcome.champion is not None:
        champion_table(outcome.champion.standings)
        planned_out = spec.planned and outcome.champion.standings.missing
        if outcome.champion.stop_reason == StopReason.TIME and spec.confirmation is not None and not planned_out:
            lines.console.print(f"[yellow]the champion phase's {spec.confirmation.minutes:g} minutes would be "
                                f"exceeded by the next run: {outcome.champion.standings.missing} runs left; "
                                f"`{literal(outcome.resume_command)}` trains them (or raise \\[champion] minutes)")


def champion_table(standings: Standings) -> None:
    """The champion phase's candidates: each one's runs, mean, spread and confidence interval; then the choice."""
    table = Table(title=f"champion phase of {standings.study_name}: {standings.metric} over "
                        f"{standings.seeds} seeds per candidate (95% CI: Student t)")
    for column in ("trial", "mean", "std", "95% CI", "min-max", "MFLOPs", "runs (repeat: value)"):
        table.add_column(column, justify="left" if column.startswith("runs") else "right", overflow="fold")
    for r in standings.rows():  # in the search's order
        table.add_row(r["trial"], r["mean"], r["std"], r["interval"], f"{r['min']}-{r['max']}", r["mflops"],
                      r["values"], style="bold green" if r["champion"] else None)
    lines.console.print(table)
    lines.console.print(literal(standings.reason))
    if standings.exported is not None and standings.champion is not None:  # an exported run has its champion
        from pipeline.search.champion import describe_run

        exported = describe_run(standings.exported, standings.champion.trial.number)
        lines.console.print(f"exported weights: {literal(exported)}, the confirmation run "
                            "closest to the mean")


def search_result(spec: StudySpec, outcome: SearchOutcome) -> None:
    """What tracking said at the end, and what to run next."""
    for line in outcome.messages:
        say(line)
    if outcome.stop_reason in (StopReason.BUDGET, StopReason.TIMEOUT):
        standings = outcome.champion.standings if outcome.champion is not None else None
        # what gets exported is worth re-checking (an exported run has its champion)
        if standings is not None and standings.exported is not None and standings.champion is not None:
            run = standings.exported
            replay = f"make replay STUDY={spec.name} TRIAL={standings.champion.trial.number} REPEAT={run.repeat}"
            what = "the champion's exported run"
        elif outcome.best is not None:
            replay, what = f"make replay STUDY={spec.name} TRIAL={outcome.best.number}", "the best trial"
        else:
            replay, what = "make studies", "the study's trials"
        more = "raise MINUTES= for more" if spec.planned else "raise TRIALS= / TIMEOUT= for more"
        lines.console.print(f"next: `{literal(outcome.resume_command)}` continues the study ({more}); `{replay}` "
                            f"re-checks {what} bit for bit")
    if spec.planned and outcome.time_left is not None:
        lines.console.print(outcome.time_left)


def landed(datasets: list[Landed]) -> None:
    for d in datasets:
        where = f"{d.decoded}, cached in {d.location}" if d.decoded else f"in {d.location}"
        lines.console.print(f"[green]{d.name}[/]: {d.train_images:,} train + {d.test_images:,} test images {where} "
                            f"({d.details})")


def studies_table(states: list[StudyState]) -> None:
    table = Table(title="studies")
    for column in ("study", "file", "done", "best value", "state"):
        table.add_column(column)
    for s in states:
        table.add_row(s.name, s.file, s.progress, values_text(s.best), s.state)
    lines.console.print(table)


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
        lines.console.print(table)
    for line in errors:
        error(line)


def exported(destination: Path, seconds: float) -> None:
    metrics = json.loads((destination / "metrics.json").read_text())
    lines.console.print(
        f"[green]{literal(str(destination))}[/]: test accuracy {metrics['test_accuracy']:.4f} "
        f"({metrics['test_correct']:,}/{metrics['test_images']:,}, verified by a fresh process), validation "
        f"{metrics['val_accuracy']:.4f}, {metrics['parameter_count']:,} parameters, "
        f"{metrics['cpu_latency_ms_batch1_median']:.2f} ms/image at batch 1, "
        f"{metrics['cpu_throughput_images_per_s_batch256']:,.0f} images/s at batch 256 ({seconds:.0f} s)")
    lines.console.print(f"next: `make predict EXPORT={_relative(destination)} IMAGES=\"a.png b.png\"`; "
                        f"see {_relative(destination / 'model_card.md')}")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def replay_result(name: str, epochs: int, differences: list[str]) -> None:
    """`name`: what was replayed (lines.trial_name)."""
    if differences:
        lines.console.print(f"[red]{name} replay differs[/] ({len(differences)} values):")
        for line in differences:
            lines.console.print(f"  {literal(line)}")
        return
    lines.console.print(f"[green]{name} replayed identically[/]: {epochs} epochs, every recorded "
                        "metric equal bit for bit")
