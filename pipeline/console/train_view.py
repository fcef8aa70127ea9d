"""`make train` on the console: a header, an epoch bar, one line per epoch, and the history as a table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table

from pipeline.console import lines
from pipeline.console.lines import literal

if TYPE_CHECKING:
    from pipeline.training.train import EpochMetrics


class TrainView:
    """`make train`: a header, an epoch bar, one line per epoch, and the history as a table."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.bars = lines.progress(transient=True)
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
        lines.console.print(table)
        lines.console.print(f"best val accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch} "
                            f"({result.stop_reason})")
