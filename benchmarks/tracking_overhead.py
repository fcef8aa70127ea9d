"""What MLflow tracking costs a search: the smoke study with tracking vs without, in one run.

    make bench-tracking     (.venv/bin/python benchmarks/tracking_overhead.py [--cnn-study cnn-v2] [--storage URL])

1. Runs studies/smoke.toml twice on the same data and seed, in fresh temporary stores: once with
   tracking off, once on. Same seed, same trials: the wall-time difference is what tracking costs.
2. Times every tracking call of the second run (trial start, each epoch, trial end, best-model
   logging, the end-of-run report) and prices a recorded `cnn` study with them: its trials'
   durations and epochs come from the Optuna storage, so the ratio is tracking seconds / trial
   seconds on the cnn study's real epochs, without re-running it.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import optuna

from pipeline import store
from pipeline.data.recorded import recorded_data, study_data
from pipeline.search import loop, pareto
from pipeline.search.events import Listener, TrialEnded, TrialStarted
from pipeline.spec import hparams, paths, studies
from pipeline.tracking import connection
from pipeline.tracking.lifecycle import Tracking
from pipeline.training import models, train
from pipeline.training.device import pick_device, pick_precision

TIMED_CALLS = ("trial_started", "epoch_ended", "trial_ended", "new_best")


def run_smoke(spec: studies.StudySpec, prepared, workdir: Path, tracked: bool) -> tuple[float, dict[str, list[float]]]:
    """Wall seconds of the smoke search (trials only) and the seconds of each tracking call."""
    storage = store.make_storage(f"sqlite:///{workdir}/optuna.db")
    study = store.open_study(spec, storage, log=lambda m: None)
    calls: dict[str, list[float]] = defaultdict(list)
    tracker = Tracking.off()
    if tracked:
        tracker = Tracking(connection.connect(f"sqlite:///{workdir}/mlruns/mlflow.db"))
        tracker.start(spec, study, contested=False)
        for name in TIMED_CALLS:
            setattr(tracker.run, name, _timed(getattr(tracker.run, name), calls[name]))
    started = time.perf_counter()
    loop.run(spec, study, prepared, tracker.listener)
    wall = time.perf_counter() - started
    if tracked:
        finish_started = time.perf_counter()
        tracker.finish(spec, study, storage, "FINISHED", pareto.decide(spec, study), warn=print)
        calls["finish"].append(time.perf_counter() - finish_started)
    return wall, calls


def _timed(method, sink: list[float]):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - started)
    return wrapper


def time_cnn_model_logging(study: optuna.Study, run: Listener) -> float:
    """Seconds to log the recorded study's best model (its architecture, the full validation split)."""
    best = store.leading_best(study)
    params = hparams.resolve_params(best.params)
    prepared = recorded_data(store.definition(study), paths.DATA_ROOT, pick_device())
    model = models.build_model(params, num_classes=len(prepared.classes)).to(prepared.val.device)
    number = 10_000 + best.number  # a throw-away child run of the benchmark's own store
    run.trial_started(TrialStarted(number, params, 0, models.count_parameters(model), prepared))
    started = time.perf_counter()
    run.new_best(number, 0.0, train.TrainedModel(model, prepared, pick_precision("auto", prepared.val.device)))
    seconds = time.perf_counter() - started
    run.trial_ended(TrialEnded(number, "COMPLETE", [0.0]))
    return seconds


def price_cnn_study(study: optuna.Study, costs: dict[str, float]) -> None:
    """Tracking seconds a recorded study would have paid, over its trials' own durations."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in store.FINISHED and t.duration]
    trial_seconds = sum(t.duration.total_seconds() for t in trials)
    epochs = sum(len(t.user_attrs.get("history", [])) for t in trials)
    best, improvements = None, 0
    for t in sorted(trials, key=lambda t: t.datetime_complete):
        if t.state == optuna.trial.TrialState.COMPLETE and (best is None or t.value > best):
            best, improvements = t.value, improvements + 1
    per_trial = costs["trial_started"] + costs["trial_ended"]
    tracking_seconds = (len(trials) * per_trial + epochs * costs["epoch_ended"] + improvements * costs["cnn_model"]
                        + costs["first_model_extra"] + costs["finish"])
    print(f"\n{study.study_name}: {len(trials)} finished trials, {epochs} epochs "
          f"({trial_seconds / epochs:.1f} s/epoch), {improvements} new bests, {trial_seconds / 60:.1f} min of trials")
    print(f"  logging one of its best models (full validation split): {costs['cnn_model']:.2f} s")
    print(f"  tracking adds {tracking_seconds:.1f} s = {100 * tracking_seconds / trial_seconds:.2f}% of trial time "
          "(target < 2%)")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]  # only these log a model
    shortest = min(complete, key=lambda t: t.duration)
    worst = per_trial + costs["epoch_ended"] * len(shortest.user_attrs.get("history", [])) + costs["cnn_model"]
    print(f"  worst single trial (the shortest complete one, {shortest.duration.total_seconds():.0f} s, had it been "
          f"a new best): {100 * worst / shortest.duration.total_seconds():.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cnn-study", default="cnn-v2", help="recorded study to price (default: cnn-v2)")
    parser.add_argument("--storage", default=paths.DEFAULT_STORAGE)
    args = parser.parse_args()

    spec = studies.load("smoke")
    device = pick_device()
    prepared = study_data(spec, paths.DATA_ROOT, device)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("warm-up", "off", "on"):
            (Path(tmp) / mode).mkdir()
        # Warm-up, tracked: first-use costs (kernels, MLflow's schema, torch.export) are paid here, once.
        _, warm = run_smoke(spec.model_copy(update={"trials": 1}), prepared, Path(tmp) / "warm-up", tracked=True)
        wall_off, _ = run_smoke(spec, prepared, Path(tmp) / "off", tracked=False)
        wall_on, calls = run_smoke(spec, prepared, Path(tmp) / "on", tracked=True)

        trials = len(calls["trial_started"])
        print(f"smoke study ({trials} trials, {spec.epochs} epoch each, {len(prepared.train):,} images, {device}):")
        print(f"  without tracking {wall_off:6.2f} s | with tracking {wall_on:6.2f} s | "
              f"ratio {wall_on / wall_off:.3f}")
        print("  tracking calls (seconds):")
        for name in (*TIMED_CALLS, "finish"):
            values = calls.get(name, [])
            if values:
                print(f"    {name:<15} n={len(values):<3} median {statistics.median(values):.3f}  "
                      f"max {max(values):.3f}")
        print(f"    first model logged by a process (torch.export start-up): {warm['new_best'][0]:.2f} s")
        try:
            study = optuna.load_study(study_name=args.cnn_study, storage=store.make_storage(args.storage))
        except KeyError:
            print(f"no study {args.cnn_study!r} in {args.storage}: run `make search STUDY=cnn` for the cnn figure")
            return
        tracker = Tracking(connection.connect(f"sqlite:///{tmp}/on/mlruns/mlflow.db"))
        tracker.start(spec, optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp}/on/optuna.db"))
        costs = {
            "trial_started": statistics.median(calls["trial_started"]),
            "trial_ended": statistics.median(calls["trial_ended"]),
            "epoch_ended": statistics.median(calls["epoch_ended"]),
            "first_model_extra": max(0.0, warm["new_best"][0] - statistics.median(calls["new_best"])),
            "finish": calls["finish"][0],
            "cnn_model": time_cnn_model_logging(study, tracker.run),
        }
        price_cnn_study(study, costs)


if __name__ == "__main__":
    main()
