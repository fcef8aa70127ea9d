"""How fast a finished search got where: trials by state, wall time, and time to each target value.

    .venv/bin/python benchmarks/study_timeline.py cnn 0.995 0.996 [--storage sqlite:///studies/optuna.db]

Times are measured from the first trial's start to the completion of the first trial that reached
the target, as recorded in the Optuna storage (the study's own timestamps, no re-run).
"""

from __future__ import annotations

import argparse
from collections import Counter

import optuna

from pipeline import store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="Optuna study name, e.g. cnn or cnn-v2")
    parser.add_argument("targets", nargs="*", type=float, help="objective values to time, e.g. 0.995")
    parser.add_argument("--storage", default=None, help="default: $STORAGE or sqlite:///studies/optuna.db")
    args = parser.parse_args()

    study = optuna.load_study(study_name=args.study, storage=store.make_storage(store.storage_url(args.storage)))
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start]
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials if t.datetime_complete)
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    print(f"{args.study}: {len(trials)} trials run ({dict(states)}), wall {(end - start).total_seconds() / 60:.1f} min")
    for target in args.targets:
        hits = [t for t in trials if t.value is not None and t.value >= target]
        first = min(hits, key=lambda t: t.datetime_complete) if hits else None
        if first is None:
            print(f"time to {target}: never")
            continue
        minutes = (first.datetime_complete - start).total_seconds() / 60
        print(f"time to {target}: {minutes:.1f} min (trial {first.number})")
    best = store.best_records(study)
    if best:
        print(f"best: {best[0].values} (trial {best[0].number})")


if __name__ == "__main__":
    main()
