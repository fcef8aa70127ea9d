"""The consoles everything is printed on, and the small pieces of text the views share: masked literal text, a
trial's name, its line once finished, an epoch's line, objective values; plain lines when not on a terminal.

The other console modules print through `lines.console` and `lines.err_console`, looked up when they print (a test
swaps them for one that writes to a string).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.infra.text import printable

if TYPE_CHECKING:
    from pipeline.search.events import TrialEnded

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


def progress(live: bool = True, transient: bool = False) -> Progress:
    """The bars every view draws: a description, the bar, done/total and the time elapsed; `transient`: gone once
    they stop."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not live, transient=transient)


def short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def values_text(values: list[float] | None) -> str:
    """Objective values: counts (parameters, FLOPs) as whole numbers, the others to 4 decimals."""
    if not values:
        return "-"
    return ", ".join(f"{v:,.0f}" if math.isfinite(v) and v == int(v) and abs(v) >= 2 else f"{v:.4f}"
                     for v in values)


def trial_name(number: int, confirmation_of: int | None = None, repeat: int = 0, width: int = 0,
               rung: int | None = None) -> str:
    """`trial 12`, for a champion-phase run `trial 3 repeat 1` (trial 3's configuration, its repeat 1's seed), for a
    planned search's run at a later rung `trial 3 rung 1`; the number right-aligned in `width` characters."""
    if confirmation_of is None:
        return f"trial {number:>{width}}"
    if rung is not None:
        return f"trial {confirmation_of:>{width}} rung {rung}"
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
    name = trial_name(trial.number, trial.confirmation_of, trial.repeat, width=3, rung=trial.rung)
    if trial.rung is not None:
        shown = f"rung {trial.rung}, run {trial.number}"
    elif trial.confirmation_of is not None:
        shown = f"champion phase, run {trial.number}"
    return f"{name} {trial.state:<8} {value:<10} {trial.seconds:6.1f} s  {shown}{resumed}"


def epoch_line(name: str, epoch: int, val_accuracy: float, val_loss: float, seconds: float) -> str:
    """`name`: the trial's trial_name."""
    return f"{name} epoch {epoch}: val_accuracy {val_accuracy:.4f} val_loss {val_loss:.4f} ({seconds:.1f} s)"
