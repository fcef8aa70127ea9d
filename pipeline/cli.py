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
