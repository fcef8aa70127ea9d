"""Trials per hour with 1 worker vs N workers on one host, in one run.

    make bench-workers      (.venv/bin/python benchmarks/workers_scaling.py [--trials 24] [--workers 2])

A fixed small study (studies/smoke.toml's model and data: a small CNN, 5,000 MNIST training images,
1 epoch a trial; random sampler, no pruner, so every trial does the same amount of work) runs through
the real command, `python -m pipeline search ... --workers W`, once with 1 worker (all cores in one
process) and once with W workers (cores split between them), each on a fresh journal file and a
fresh MLflow store, tracking on. Two rates are printed for each:

- end to end: trials / wall time of the whole command (start-up, data, workers, report included);
- steady: trials / (last trial's end - first trial's start), from the trials' own timestamps.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from pipeline import store

PROJECT = Path(__file__).resolve().parents[1]


def study_file(directory: Path) -> None:
    """smoke.toml with every trial doing the same work: random sampler, no pruner."""
    text = (PROJECT / "studies" / "smoke.toml").read_text()
    text = re.sub(r'^sampler = .*$', 'sampler = "random"', text, flags=re.MULTILINE)
    text = re.sub(r'^pruner = .*$', 'pruner = "none"', text, flags=re.MULTILINE)
    text = re.sub(r'^timeout_minutes = .*$', "timeout_minutes = 60", text, flags=re.MULTILINE)
    (directory / "smoke.toml").write_text(text)


def run(workers: int, trials: int, workdir: Path) -> tuple[float, float]:
    """(end-to-end seconds, steady seconds) of the fixed study with `workers` workers."""
    studies_dir = workdir / "studies"
    studies_dir.mkdir(parents=True)
    study_file(studies_dir)
    journal = workdir / "optuna.journal"
    command = [sys.executable, "-m", "pipeline", "search", "--study", "smoke", "--studies-dir", str(studies_dir),
               "--storage", str(journal), "--trials", str(trials), "--workers", str(workers)]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{workdir}/mlruns/mlflow.db")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=PROJECT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the {workers}-worker search failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name="smoke", storage=store.make_storage(str(journal)))
    finished = [t for t in study.trials if t.state in store.FINISHED]
    assert len(finished) == trials, f"{len(finished)} trials finished, expected {trials}"
    steady = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    return wall, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2, help="compared with 1 worker")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"fixed study: smoke's CNN, 5,000 MNIST images, 1 epoch/trial, {args.trials} trials; {cores} cores")
    results = {}
    for workers in (1, args.workers):
        with tempfile.TemporaryDirectory() as tmp:
            results[workers] = run(workers, args.trials, Path(tmp))
    print(f"{'':<22}{'1 worker':>14}{f'{args.workers} workers':>14}{'ratio':>9}")
    for label, column in (("end to end", 0), ("steady", 1)):
        one, many = (args.trials / results[w][column] * 3600 for w in (1, args.workers))
        print(f"{label + ' trials/hour':<22}{one:>14,.0f}{many:>14,.0f}{many / one:>8.2f}x")
    for workers in (1, args.workers):
        wall, steady = results[workers]
        print(f"  {workers} worker(s): {wall:.1f} s command, {steady:.1f} s from first trial start to last trial end")


if __name__ == "__main__":
    main()
