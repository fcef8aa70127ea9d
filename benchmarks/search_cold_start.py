"""Cold start: the shipped cnn study, planned to MINUTES, without its baselines vs a plain Optuna script for the same
MINUTES, one run each.

    make bench-search MINUTES=30      (.venv/bin/python benchmarks/search_cold_start.py --minutes 30)

Ours: `python -m pipeline search --study cnn --no-baselines --minutes MINUTES` (the sampler starts cold, as a user's
own study does), the whole planned run (rungs, champion phase, report) on a fresh journal file with the default
WORKERS=auto, tracking off.

Theirs, the usual script: a CNN of the same family (2-3 blocks of 3x3 convolutions with BatchNorm and max-pooling,
32 or 48 channels doubling, a global-average-pooled head), torchvision's MNIST through a `DataLoader` with
per-sample transforms (RandomRotation(10), ToTensor, Normalize), Adam, 5 epochs a trial, TPE, Optuna's median
pruner on the validation accuracy after every epoch, the same 55,000 / 5,000 split, `study.optimize(timeout=...)`
for the same minutes, on the same threads.

Printed side by side: minutes from the start to the first run (of any rung, or trial) whose best validation accuracy
reached 99.3%, 99.5% and 99.6%, the best value, and the configurations evaluated (ours: at rung 0; theirs: trials
started and finished, pruned or not).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import optuna
import torch
from reference_loop import correct_count, mnist_subsets, train_epoch
from torch.utils.data import DataLoader

from pipeline import store
from pipeline.data import landing, splits
from pipeline.data.arrays import load_arrays
from pipeline.search import champion
from pipeline.training import reproducibility

PROJECT = Path(__file__).resolve().parents[1]
LEVELS = (0.993, 0.995, 0.996)
EPOCHS = 5


def ours(minutes: float) -> tuple[list[tuple[float, float]], int]:
    """(minutes since the run's start, best val_accuracy) of each completed run of any stage, in order; and the
    configurations rung 0 evaluated."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        storage = str(folder / "optuna.journal")  # where a new study of the default settings goes (WORKERS=auto)
        started = datetime.now()
        subprocess.run([sys.executable, "-m", "pipeline", "search", "--study", "cnn", "--minutes", str(minutes),
                        "--storage", storage, "--no-baselines", "--no-tracking", "--reports-dir",
                        str(folder / "reports"), "--exports-dir", str(folder / "exports")], cwd=PROJECT, check=True,
                       stdout=subprocess.DEVNULL)
        backend = store.make_storage(storage)
        study = optuna.load_study(study_name="cnn", storage=backend)
        configurations = len(store.records(study, store.FINISHED))
        records = list(store.records(study, store.FINISHED))
        for suffix in (champion.rung_suffix(1), champion.rung_suffix(2), champion.COMPANION):
            companion = champion.find_companion(backend, "cnn", suffix)
            records += store.records(companion, store.FINISHED) if companion is not None else []
    return sorted(((r.completed_at - started).total_seconds() / 60, max(h["val_accuracy"] for h in r.history))
                  for r in records if r.history), configurations


class PlainCNN(torch.nn.Module):
    def __init__(self, blocks: int, width: int, dropout: float):
        super().__init__()
        layers, channels = [], 1
        for block in range(blocks):
            out = width * 2**block
            layers += [torch.nn.Conv2d(channels, out, 3, padding=1), torch.nn.BatchNorm2d(out), torch.nn.ReLU(),
                       torch.nn.MaxPool2d(2)]
            channels = out
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(channels, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def theirs(minutes: float) -> list[tuple[float, float]]:
    """The plain script, for `minutes` of wall time; the same (minutes, best val_accuracy) per finished trial."""
    split = splits.stratified_split(load_arrays("mnist").train_labels)
    train_set, val_set = mnist_subsets(split.train_indices, split.val_indices, (0.1307,), (0.3081,), rotate=True)
    val_loader = DataLoader(val_set, batch_size=1000)

    def objective(trial: optuna.Trial) -> float:
        model = PlainCNN(trial.suggest_int("blocks", 2, 3), trial.suggest_categorical("width", [32, 48]),
                         trial.suggest_float("dropout", 0.0, 0.4))
        optimizer = torch.optim.Adam(model.parameters(), lr=trial.suggest_float("lr", 1e-4, 1e-2, log=True))
        loader = DataLoader(train_set, batch_size=trial.suggest_categorical("batch_size", [64, 128]), shuffle=True)
        best = 0.0
        for epoch in range(EPOCHS):
            train_epoch(model, optimizer, loader)
            accuracy = correct_count(model, val_loader) / len(val_set)
            best = max(best, accuracy)
            trial.set_user_attr("best", best)
            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.MedianPruner())
    started = datetime.now()
    study.optimize(objective, timeout=minutes * 60)
    return sorted(((t.datetime_complete - started).total_seconds() / 60, t.user_attrs["best"])
                  for t in study.trials if t.datetime_complete is not None and "best" in t.user_attrs)


def summary(finished: list[tuple[float, float]], minutes: float, configurations: int) -> list[str]:
    """The columns: minutes to each level ('-' when not reached), best value, configurations evaluated; and the
    minutes the side took in all (the plain script's last trial, started before its timeout, ends after it)."""
    cells = [next((f"{m:.1f}" for m, v in finished if v >= level), "-") for level in LEVELS]
    ended = max((m for m, _ in finished), default=0.0)
    return [*cells, f"{max((v for _, v in finished), default=0.0):.4f}", str(configurations), f"{ended:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall time of each side")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threads = reproducibility.make_deterministic()
    landing.land("mnist")
    started = time.perf_counter()
    ran, configurations = ours(args.minutes)
    rows = {"ours (cnn study planned, BASELINES=off)": summary(ran, args.minutes, configurations)}
    torch.manual_seed(0)
    found = theirs(args.minutes)
    rows["plain Optuna script"] = summary(found, args.minutes, len(found))
    print(f"cold start, {args.minutes:g} minutes each, {threads} threads ({(time.perf_counter() - started) / 60:.0f} "
          "minutes in all)")
    header = [f"min to {level:.1%}" for level in LEVELS] + ["best val_accuracy", "configurations", "minutes in all"]
    print(f"{'':42}" + "".join(f"{h:>18}" for h in header))
    for name, cells in rows.items():
        print(f"{name:42}" + "".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
