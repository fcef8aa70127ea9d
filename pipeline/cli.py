"""`python -m pipeline <command>`: argument parsing, rich output and exit codes; no logic of its own.

Exit codes: 0 done, 2 bad input (a one-line message says what and how to fix it), 1 our bug.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console

from pipeline.errors import BadInput

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _cmd_data(args: argparse.Namespace) -> int:
    from pipeline import datasets  # not pipeline.data: importing torch would cost a second here

    names = sorted(datasets.DATASETS) if args.dataset == "all" else [args.dataset]
    for name in names:
        started = time.perf_counter()
        source = datasets.land(name, args.root, args.source, log=lambda m: err_console.print(f"[yellow]{m}"))
        info = datasets.dataset_info(name)
        mean, std = datasets.normalisation_stats(info, args.root)
        n_train = datasets.idx_shape(info.raw_dir(args.root) / datasets.TRAIN_IMAGES)[0]
        n_test = datasets.idx_shape(info.raw_dir(args.root) / datasets.TEST_IMAGES)[0]
        console.print(
            f"[green]{name}[/]: {n_train:,} train + {n_test:,} test images "
            f"in {info.raw_dir(args.root)} (source: {source}; checksum {info.checksum}; "
            f"mean {mean:.4f} std {std:.4f}; {time.perf_counter() - started:.1f} s)"
        )
    return 0


def parse_assignment(text: str) -> tuple[str, object]:
    """`key=value` with the value read as a TOML literal (`3`, `1e-3`, `true`, `[32, 64]`), else a string."""
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--set {text!r}: expected key=value, e.g. --set lr=0.01 or --set cnn_channels=[32,64]")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _cmd_train(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from pipeline import data, models, train

    params = dict(models.CLASSIC[args.model])
    params.update(parse_assignment(item) for item in args.set)
    resolved = train.resolve_params(params)  # bad parameters stop here, before the data is loaded
    device = train.pick_device(args.device)
    prepared = data.prepare(args.dataset, args.root, device, val_size=args.val_size, train_limit=args.train_limit,
                            val_limit=args.val_limit)
    console.print(
        f"[bold]{args.model}[/] on {args.dataset} ({len(prepared.train):,} train / {len(prepared.val):,} val, "
        f"split {prepared.split_hash}), {device}, precision {train.pick_precision(resolved['precision'], device)}, "
        f"seed {args.seed}"
    )
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    task = progress.add_task(f"epoch 1/{resolved['epochs']}", total=None)

    def on_batch(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    def on_epoch(m: train.EpochMetrics) -> None:
        progress.console.print(
            f"epoch {m.epoch}: train loss {m.train_loss:.4f} acc {m.train_accuracy:.4f} | "
            f"val loss {m.val_loss:.4f} acc {m.val_accuracy:.4f} | lr {m.lr:.2e} | "
            f"{m.epoch_seconds:.1f} s, {m.images_per_second:,.0f} img/s"
        )
        progress.reset(task, description=f"epoch {m.epoch + 1}/{resolved['epochs']}", total=None)

    with progress:
        result = train.fit(params, prepared, device, callbacks=[on_epoch], seed=args.seed,
                           checkpoint=args.checkpoint, threads=args.threads, on_batch=on_batch)

    table = Table(title=f"{args.model}: {result.parameter_count:,} parameters, "
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pipeline import datasets

    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("data", help="land and verify datasets under data/ (offline sources first)")
    p.add_argument("--dataset", default="all", choices=["all", *sorted(datasets.DATASETS)])
    p.add_argument("--source", default="auto", choices=datasets.SOURCES,
                   help="auto: present files, then the offline package, then torchvision's download")
    p.add_argument("--root", type=Path, default=datasets.DEFAULT_ROOT, help="data folder (default: data/)")
    p.set_defaults(run=_cmd_data)

    p = commands.add_parser("train", help="one training run of a model family's baseline (+ --set overrides)")
    p.add_argument("--model", default="cnn", choices=["mlp", "cnn", "resnet18"])
    p.add_argument("--dataset", default="mnist", choices=sorted(datasets.DATASETS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set lr=0.01 --set cnn_channels=[32,64] (repeatable)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--val-size", type=int, default=5000, help="validation images carved from the training file")
    p.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset of this many images")
    p.add_argument("--val-limit", type=int, default=None, help="validate on a seeded subset of this many images")
    p.add_argument("--checkpoint", type=Path, default=None, help="save every epoch here; resume if it exists")
    p.add_argument("--root", type=Path, default=datasets.DEFAULT_ROOT, help="data folder (default: data/)")
    p.set_defaults(run=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BadInput as exc:
        err_console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
