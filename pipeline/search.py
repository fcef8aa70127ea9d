"""Optuna: storage, sampler, pruner, the objective adapter, resume, replay and the failure policy.

This is the only module that imports Optuna. One study file gives one Optuna study (`<name>`, or
`<name>-v<N>` after FRESH=1) in the storage (`sqlite:///studies/optuna.db` unless STORAGE is set).
Each trial turns its suggestions into a plain params dict, trains with `train.fit`, reports the
objective every epoch (the pruner may stop it) and records its seed, params and per-epoch history
as user attributes, so any finished trial can be replayed bit for bit.

Failure policy: a NaN/inf loss or an out-of-memory error prunes the trial with `fail_reason`
`diverged`/`oom`; any other exception fails it (traceback kept) and the study goes on, unless three
trials in a row fail. Ctrl-C or SIGTERM fails the running trial with reason `interrupted`, queues
it again for the next run, and stops.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline import data as data_module
from pipeline import reproducibility, studies, train
from pipeline.errors import BadInput
from pipeline.studies import StudyError, StudySpec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORAGE = f"sqlite:///{PROJECT_ROOT / 'studies' / 'optuna.db'}"
HEARTBEAT_SECONDS = 30  # a RUNNING trial whose process stopped beating for GRACE_SECONDS is failed...
GRACE_SECONDS = 90
MAX_RETRIES = 2  # ...and retried up to this many times
MAX_CONSECUTIVE_FAILURES = 3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")  # not timings

optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own progress output replaces Optuna's
# Heartbeats and the stale-trial retry are marked experimental; they are the documented way to recover
# from killed workers, and the Optuna minor version is pinned.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM arrived during the search."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


class TooManyFailures(Exception):
    """Three trials in a row failed: something is wrong beyond one bad configuration."""


# --------------------------------------------------------------------------------------------------
# Storage, sampler, pruner


def storage_url(override: str | None = None) -> str:
    return override or os.environ.get("STORAGE") or DEFAULT_STORAGE


def make_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        )
    except Exception as exc:  # bad URL, unreachable server, locked or unwritable file
        raise BadInput(f"Optuna storage {url!r} cannot be opened: {str(exc).splitlines()[0]}; "
                       "check STORAGE (default: sqlite:///studies/optuna.db)") from None


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    if spec.sampler == "tpe":  # Optuna 5: multivariate + constant liar by default
        return optuna.samplers.TPESampler(seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(seed=seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.epochs, reduction_factor=3)
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


# --------------------------------------------------------------------------------------------------
# Opening a study: versions, fingerprint, baselines, reseeding


def _versions(storage: optuna.storages.BaseStorage, name: str) -> list[int]:
    versions = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == name:
            versions.append(1)
        elif summary.study_name.startswith(f"{name}-v") and summary.study_name[len(name) + 2:].isdigit():
            versions.append(int(summary.study_name[len(name) + 2:]))
    return sorted(versions)


def study_name(name: str, version: int) -> str:
    return name if version == 1 else f"{name}-v{version}"


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
                keys = sorted(set(old[key]) | set(new[key]))
                changed.extend(f"{key}.{k}" for k in keys if old[key].get(k) != new[key].get(k))
            else:
                changed.append(key)
    return ", ".join(changed) or "the search definition"


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def running_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def baseline_params(spec: StudySpec) -> dict[str, Any]:
    """The full params dict of the study's first baseline trial (for `make train STUDY=...`)."""
    if not spec.baseline:
        raise StudyError(f"studies/{spec.name}.toml has no [[baseline]] trial to train")
    return studies.suggest(spec, optuna.trial.FixedTrial(studies.enqueue_form(spec, spec.baseline[0])))


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage, fresh: bool = False,
               log: Callable[[str], None] = print) -> optuna.Study:
    """Create or resume the study's current version; FRESH starts the next version."""
    versions = _versions(storage, spec.name)
    version = (versions[-1] + 1 if fresh else versions[-1]) if versions else 1
    name = study_name(spec.name, version)
    pruner = make_pruner(spec)
    if versions and not fresh:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        recorded = study.user_attrs.get("fingerprint")
        if recorded != spec.fingerprint():
            what = _changes(study.user_attrs.get("definition", {}), spec.search_definition())
            raise StudyError(
                f"studies/{spec.name}.toml changed since study {name!r} started ({what}); "
                f"run again with FRESH=1 to start {study_name(spec.name, version + 1)!r} (the old study is kept), "
                "or undo the change to resume"
            )
        done = finished_count(study)
        # Reseeded from the finished count, so a resumed study does not replay its opening suggestions.
        study.sampler = make_sampler(spec, reproducibility.derive_seed(spec.seed, done))
        log(f"resuming study {name!r}: {done} of {spec.trials} trials finished")
    else:
        study = optuna.create_study(study_name=name, storage=storage, directions=spec.directions,
                                    sampler=make_sampler(spec, reproducibility.derive_seed(spec.seed, 0)),
                                    pruner=pruner)
        study.set_user_attr("fingerprint", spec.fingerprint())
        study.set_user_attr("definition", spec.search_definition())
        study.set_user_attr("study_file", spec.name)
        study.set_user_attr("version", version)
        log(f"new study {name!r}" + (f" (FRESH=1: earlier versions kept: {versions})" if fresh else ""))
    _enqueue_new_baselines(spec, study, log)
    return study


def _enqueue_new_baselines(spec: StudySpec, study: optuna.Study, log: Callable[[str], None]) -> None:
    """Enqueue each baseline once per study, even when the file gains baselines between runs."""
    enqueued = list(study.user_attrs.get("enqueued_baselines", []))
    for baseline in spec.baseline:
        key = json.dumps(baseline, sort_keys=True)
        if key not in enqueued:
            study.enqueue_trial(studies.enqueue_form(spec, baseline), user_attrs={"baseline": True})
            enqueued.append(key)
            log(f"baseline trial queued: {key}")
    study.set_user_attr("enqueued_baselines", enqueued)


# --------------------------------------------------------------------------------------------------
# The objective


class StopRequest:
    """SIGINT/SIGTERM handling that only interrupts at safe points.

    The handler just records the signal; `check()` raises Interrupted where it is safe to stop: after
    any training batch or epoch, and between trials. Raising from inside Optuna's bookkeeping could
    leave a trial half-told. A second signal raises at once, for a user who insists.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def _handle(self, signal_number: int, _frame: Any) -> None:
        if self.signal_number is not None:
            raise Interrupted(signal_number)
        self.signal_number = signal_number

    def check(self) -> None:
        if self.signal_number is not None:
            raise Interrupted(self.signal_number)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


@dataclass
class TrialEvents:
    """Hooks for progress output (and, later, tracking); each is optional."""

    on_trial_start: Callable[[int, dict[str, Any]], None] = lambda number, params: None
    on_epoch: Callable[[int, train.EpochMetrics], None] = lambda number, metrics: None
    on_batch: Callable[[int, int], None] | None = None


def history_record(metrics: train.EpochMetrics) -> dict[str, float]:
    return {k: getattr(metrics, k) for k in HISTORY_KEYS}


@dataclass
class Objective:
    """Optuna objective: suggestions -> params -> train.fit -> objective value(s)."""

    spec: StudySpec
    data: data_module.PreparedData
    events: TrialEvents = field(default_factory=TrialEvents)
    threads: int | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    running: int | None = None  # the number of the trial in progress, for the interrupt handler

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self.running = trial.number
        params = studies.suggest(self.spec, trial)
        seed = reproducibility.derive_seed(self.spec.seed, trial.number)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("params", params)
        self.events.on_trial_start(trial.number, params)
        history: list[dict[str, float]] = []
        single = len(self.spec.objectives) == 1

        def on_batch(done: int, total: int) -> None:
            self.stop.check()
            if self.events.on_batch is not None:
                self.events.on_batch(done, total)

        def report(metrics: train.EpochMetrics) -> None:
            self.stop.check()
            history.append(history_record(metrics))
            trial.set_user_attr("history", history)
            self.events.on_epoch(trial.number, metrics)
            if single:
                trial.report(getattr(metrics, self.spec.metrics[0]), step=metrics.epoch)
                if trial.should_prune():
                    trial.set_user_attr("fail_reason", "pruned")
                    raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch}")

        try:
            result = train.fit(params, self.data, callbacks=[report], seed=seed, threads=self.threads,
                               on_batch=on_batch)
        except train.Diverged as exc:
            trial.set_user_attr("fail_reason", "diverged")
            trial.set_user_attr("fail_detail", str(exc))
            raise optuna.TrialPruned(f"diverged: {exc}") from exc
        except train.OutOfMemory as exc:
            trial.set_user_attr("fail_reason", "oom")
            trial.set_user_attr("fail_detail", str(exc))
            raise optuna.TrialPruned(f"oom: batch_size {exc.batch_size}") from exc
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        except Exception as exc:
            trial.set_user_attr("fail_reason", type(exc).__name__)
            trial.set_user_attr("fail_detail", str(exc)[:1000])
            trial.set_user_attr("traceback", traceback.format_exc()[-8000:])
            raise
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("precision", result.precision)
        trial.set_user_attr("parameter_count", result.parameter_count)
        trial.set_user_attr("flops_per_image", result.flops_per_image)
        trial.set_user_attr("stop_reason", result.stop_reason)
        values = studies.objective_values(self.spec, result)
        return values[0] if single else values


# --------------------------------------------------------------------------------------------------
# The search loop


@dataclass
class SearchOutcome:
    study: optuna.Study
    ran: int  # trials run by this invocation
    stop_reason: str  # "budget", "timeout"
    elapsed_seconds: float


def apply_overrides(spec: StudySpec, **overrides: Any) -> StudySpec:
    """The spec with command-line overrides (trials, timeout, epochs, subsets) applied."""
    update = {k: v for k, v in overrides.items() if v is not None}
    return spec.model_copy(update=update) if update else spec


def prepare_data(spec: StudySpec, root: Path, device: Any) -> data_module.PreparedData:
    return data_module.prepare(spec.dataset, root, device, spec.val_size, train_limit=spec.train_limit,
                               val_limit=spec.val_limit)


def run(spec: StudySpec, study: optuna.Study, prepared: data_module.PreparedData, events: TrialEvents,
        on_trial_end: Callable[[optuna.trial.FrozenTrial], None] = lambda t: None,
        threads: int | None = None) -> SearchOutcome:
    """Run trials until the study has `spec.trials` finished ones or the time budget is spent.

    Raises Interrupted (after closing and re-queueing the running trial) and TooManyFailures.
    """
    stop = StopRequest()
    objective = Objective(spec, prepared, events, threads, stop)
    started = time.monotonic()
    deadline = started + spec.timeout_minutes * 60
    ran, consecutive_failures = 0, 0
    last: list[optuna.trial.FrozenTrial] = []
    with stop.installed():
        while finished_count(study) < spec.trials:
            stop.check()
            if time.monotonic() >= deadline:
                return SearchOutcome(study, ran, "timeout", time.monotonic() - started)
            last.clear()
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,),
                               callbacks=[lambda _study, trial: last.append(trial)])
            except Interrupted:
                if objective.running is not None:
                    _requeue(study, objective.running)
                raise
            objective.running = None
            ran += 1
            trial = last[0]
            on_trial_end(trial)
            consecutive_failures = consecutive_failures + 1 if trial.state == TrialState.FAIL else 0
            if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise TooManyFailures(
                    f"{MAX_CONSECUTIVE_FAILURES} trials failed in a row; last one, trial {trial.number}: "
                    f"{trial.user_attrs.get('fail_reason')}: {trial.user_attrs.get('fail_detail', '')}\n"
                    f"{trial.user_attrs.get('traceback', '')}"
                )
    return SearchOutcome(study, ran, "budget", time.monotonic() - started)


def _requeue(study: optuna.Study, number: int) -> None:
    """The interrupted trial is FAIL now; queue its parameters so the next run retries it first."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": number})


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    try:
        return study.best_trials
    except ValueError:
        return []


# --------------------------------------------------------------------------------------------------
# Replay


@dataclass
class ReplayOutcome:
    trial_number: int
    epochs: int
    differences: list[str]


def find_study(spec: StudySpec, storage: optuna.storages.BaseStorage) -> optuna.Study:
    versions = _versions(storage, spec.name)
    if not versions:
        raise StudyError(f"study {spec.name!r} has not been run yet; run `make search STUDY={spec.name}` first")
    return optuna.load_study(study_name=study_name(spec.name, versions[-1]), storage=storage)


def replay(spec: StudySpec, storage: optuna.storages.BaseStorage, trial_number: int, prepared: data_module.PreparedData,
           threads: int | None = None) -> ReplayOutcome:
    """Retrain one finished trial from its recorded params and seed; list every metric that differs."""
    study = find_study(spec, storage)
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
    if not trials or trials[0].state not in FINISHED or "history" not in trials[0].user_attrs:
        finished = [t.number for t in study.get_trials(deepcopy=False, states=FINISHED)]
        raise StudyError(f"trial {trial_number} of study {study.study_name!r} is not a finished trial with "
                         f"recorded metrics; finished trials: {finished or 'none'}")
    recorded = trials[0].user_attrs["history"]
    params, seed = trials[0].user_attrs["params"], trials[0].user_attrs["seed"]
    replayed: list[dict[str, float]] = []

    def collect(metrics: train.EpochMetrics) -> bool:
        replayed.append(history_record(metrics))
        return len(replayed) >= len(recorded)  # a pruned trial stopped early: stop at the same epoch

    train.fit(params, prepared, callbacks=[collect], seed=seed, threads=threads)
    differences = []
    for epoch, (old, new) in enumerate(zip(recorded, replayed, strict=False), start=1):
        for key in HISTORY_KEYS:
            if old.get(key) != new.get(key):
                differences.append(f"epoch {epoch} {key}: recorded {old.get(key)!r}, replayed {new.get(key)!r}")
    if len(recorded) != len(replayed):
        differences.append(f"epochs: recorded {len(recorded)}, replayed {len(replayed)}")
    return ReplayOutcome(trial_number, len(replayed), differences)
