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

import errno
import json
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from pipeline import data as data_module
from pipeline import models, reproducibility, studies, train
from pipeline.concurrency import open_store
from pipeline.errors import BadInput
from pipeline.studies import StudyError, StudySpec

if TYPE_CHECKING:  # tracking imports MLflow (seconds); it is loaded only when tracking is on
    from pipeline.tracking import StudyRun

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORAGE = f"sqlite:///{PROJECT_ROOT / 'studies' / 'optuna.db'}"
# Several worker processes on one host share Optuna's journal file instead: SQLite's locking is not
# meant for parallel writers (Optuna's advice), the journal file is.
DEFAULT_JOURNAL = PROJECT_ROOT / "studies" / "optuna.journal"
WAIT_SECONDS = 1.0  # how often an idle worker looks again while others run the budget's last trials
# A RUNNING trial whose process stopped beating for GRACE_SECONDS is failed... (the environment variables
# shorten both for the fault tests; a real trial's epochs are far longer).
HEARTBEAT_SECONDS = int(os.environ.get("PIPELINE_HEARTBEAT_SECONDS", 30))
GRACE_SECONDS = int(os.environ.get("PIPELINE_GRACE_SECONDS", 90))
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


class SurplusTrial(Exception):
    """Another worker took the budget's last trial at the same moment as this one."""


SURPLUS = "surplus"


# --------------------------------------------------------------------------------------------------
# Storage, sampler, pruner


def storage_url(override: str | None = None, study: str | None = None, workers: int = 1) -> str:
    """STORAGE when given. Otherwise the default store `study` (a study file name) already lives in:
    studies/optuna.db (SQLite, one worker) or studies/optuna.journal (where several local workers work);
    a new study goes to the journal when it starts with several workers."""
    chosen = override or os.environ.get("STORAGE")
    if chosen:
        return chosen
    if study is None or _holds(DEFAULT_STORAGE, study):
        return DEFAULT_STORAGE
    if workers > 1 or _holds(str(DEFAULT_JOURNAL), study):
        return str(DEFAULT_JOURNAL)
    return DEFAULT_STORAGE


def _holds(url: str, name: str) -> bool:
    """Does the store at `url` (a default file, which may not exist yet) hold any version of study `name`?"""
    if not Path(url.removeprefix("sqlite:///")).is_file():
        return False
    return bool(_versions(make_storage(url), name))


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB URL (sqlite:///..., postgresql://...) with heartbeats, or a `.journal` file for local workers."""
    if url.endswith(".journal"):  # Optuna's journal file: safe for several processes on one host
        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return open_store(lambda: optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        ))
    except Exception as exc:  # bad URL, unreachable server, locked or unwritable file
        raise BadInput(f"Optuna storage {url!r} cannot be opened: {str(exc).splitlines()[0]}; "
                       "check STORAGE (default: sqlite:///studies/optuna.db, or a path ending in .journal)") from None


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
               log: Callable[[str], None] = print,
               on_create: Callable[[optuna.Study], None] = lambda study: None, sampler_salt: str = "") -> optuna.Study:
    """Create or resume the study's current version; FRESH starts the next version.

    Safe when several processes start at once: creating a study is atomic in the storage, the loser
    resumes it, and the creator sets the `fingerprint` attribute last, after queueing the baselines
    and running `on_create` (which opens the MLflow parent run), so whoever sees the fingerprint sees
    a fully set-up study. `sampler_salt` tells parallel workers' samplers apart (the same seed would
    make them suggest the same parameters).
    """
    versions = _versions(storage, spec.name)
    version = (versions[-1] + 1 if fresh else versions[-1]) if versions else 1
    name = study_name(spec.name, version)
    pruner = make_pruner(spec)
    if not versions or fresh:
        try:
            study = optuna.create_study(study_name=name, storage=storage, directions=spec.directions,
                                        sampler=make_sampler(spec, reproducibility.derive_seed(spec.seed, 0)),
                                        pruner=pruner)
        except optuna.exceptions.DuplicatedStudyError:  # another process created it a moment ago: join it
            pass
        else:
            study.set_user_attr("definition", spec.search_definition())
            study.set_user_attr("study_file", spec.name)
            study.set_user_attr("version", version)
            log(f"new study {name!r}" + (f" (FRESH=1: earlier versions kept: {versions})" if fresh else ""))
            _enqueue_new_baselines(spec, study, log)
            on_create(study)
            study.set_user_attr("fingerprint", spec.fingerprint())  # last: the study is ready
            return study
    study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
    recorded = _wait_for_fingerprint(study)
    if recorded is None:  # its creator stopped before finishing the set-up: finish it
        log(f"study {name!r} was left half set up by a process that stopped; completing its set-up")
        study.set_user_attr("definition", spec.search_definition())
        study.set_user_attr("fingerprint", recorded := spec.fingerprint())
    if recorded != spec.fingerprint():
        what = _changes(study.user_attrs.get("definition", {}), spec.search_definition())
        raise StudyError(
            f"studies/{spec.name}.toml changed since study {name!r} started ({what}); "
            f"run again with FRESH=1 to start {study_name(spec.name, version + 1)!r} (the old study is kept), "
            "or undo the change to resume"
        )
    done = finished_count(study)
    # Reseeded from the finished count, so a resumed study does not replay its opening suggestions.
    study.sampler = make_sampler(spec, reproducibility.derive_seed(spec.seed, done, *filter(None, [sampler_salt])))
    log(f"resuming study {name!r}: {done} of {spec.trials} trials finished")
    _enqueue_new_baselines(spec, study, log)
    return study


def _wait_for_fingerprint(study: optuna.Study, seconds: float = 30.0) -> str | None:
    """A study another process is still setting up has no fingerprint yet; give it a moment."""
    deadline = time.monotonic() + seconds
    while study.user_attrs.get("fingerprint") is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return study.user_attrs.get("fingerprint")


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
    on_warning: Callable[[str], None] = lambda message: print(message, file=sys.stderr)
    on_wait: Callable[[], None] = lambda: None  # other workers are running the budget's last trials


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
    tracker: StudyRun | None = None
    running: int | None = None  # the number of the trial in progress, for the interrupt handler

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        if _surplus(self.spec, trial):
            trial.set_user_attr("fail_reason", SURPLUS)
            raise SurplusTrial(f"trial {trial.number}: the study's {self.spec.trials} trials are all taken")
        self.running = trial.number
        params = studies.suggest(self.spec, trial)
        seed = reproducibility.derive_seed(self.spec.seed, trial.number)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("params", params)
        trial.set_user_attr("owner", {"host": socket.gethostname(), "pid": os.getpid()})  # for the stale sweep
        trial.set_user_attr("split_hash", self.data.split_hash)  # the validation split it was judged on
        trial.set_user_attr("dataset_digest", self.data.checksum)  # the pictures themselves
        self.events.on_trial_start(trial.number, params)
        if self.tracker is not None:
            try:
                self.tracker.start_trial(trial.number, train.resolve_params(params), seed, self.data,
                                         _parameter_count(params, len(self.data.classes), self.data.input_shape))
            except Exception as exc:
                _record_failure(trial, exc, "MLflow could not open the trial's run")
                raise
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
            if self.tracker is not None:
                self.tracker.log_epoch(trial.number, metrics)
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
            _record_failure(trial, exc)
            raise
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("precision", result.precision)
        trial.set_user_attr("threads", result.threads)  # float sums depend on it: a replay must use the same
        trial.set_user_attr("device", result.device)
        trial.set_user_attr("parameter_count", result.parameter_count)
        trial.set_user_attr("flops_per_image", result.flops_per_image)
        trial.set_user_attr("stop_reason", result.stop_reason)
        values = studies.objective_values(self.spec, result)
        if self.tracker is not None and _beats_best(trial.study, values[0]):
            # Inside the trial, so that a model that cannot be saved (disk full) fails this trial, not the study.
            try:
                self.tracker.log_best_model(trial.number, values[0], result.model, self.data, result.precision)
            except Exception as exc:
                _record_failure(trial, exc, "the best model could not be logged to MLflow")
                raise
        return values[0] if single else values


def _surplus(spec: StudySpec, trial: optuna.Trial) -> bool:
    """Is this new trial one too many? Workers check the budget before asking for a trial, but two may
    ask at the same moment. Trial numbers are handed out in order by the storage, so the trial whose
    earlier-numbered finished or running trials already fill the budget is the surplus one, and exactly
    one of two racing workers finds that. A surplus trial taken from the queue (a baseline, a retry) is
    queued again, so its parameters still run if a running trial fails."""
    others = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    taken = sum(t.state in FINISHED or t.number < trial.number for t in others)
    if taken < spec.trials:
        return False
    frozen = trial.study._storage.get_trial(trial._trial_id)  # its queued parameters, if it came from the queue
    if frozen.params or "fixed_params" in frozen.system_attrs:
        trial.study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
            user_attrs=frozen.user_attrs, system_attrs=frozen.system_attrs))
    return True


def _record_failure(trial: optuna.Trial, exc: BaseException, context: str = "") -> None:
    """fail_reason (`disk_full` for a full disk or file-size limit), the detail and the traceback."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    trial.set_user_attr("fail_reason", "disk_full" if full else type(exc).__name__)
    trial.set_user_attr("fail_detail", (f"{context}: " if context else "") + str(exc)[:1000])
    trial.set_user_attr("traceback", traceback.format_exc()[-8000:])


def _beats_best(study: optuna.Study, value: float) -> bool:
    """Would a trial with this (first) objective value become the study's best? Ties keep the earlier one."""
    best = leading_best(study)
    if best is None:
        return True
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return value > best.values[0] if maximize else value < best.values[0]


def _parameter_count(params: dict[str, Any], num_classes: int, input_shape: tuple[int, int, int]) -> int:
    """Counted before training, so pruned and failed trials are tagged with their size too."""
    try:
        return models.count_parameters(models.build_model(train.resolve_params(params), num_classes, input_shape))
    except Exception:  # bad params or missing weights: fit() reports those properly
        return -1


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
    return data_module.prepare(spec.data, root, device, spec.val_size, train_limit=spec.train_limit,
                               val_limit=spec.val_limit)


def run(spec: StudySpec, study: optuna.Study, prepared: data_module.PreparedData, events: TrialEvents,
        on_trial_end: Callable[[optuna.trial.FrozenTrial], None] = lambda t: None,
        threads: int | None = None, tracker: StudyRun | None = None) -> SearchOutcome:
    """Run trials until the study has `spec.trials` finished ones or the time budget is spent.

    Raises Interrupted (after closing and re-queueing the running trial) and TooManyFailures.
    """
    stop = StopRequest()
    objective = Objective(spec, prepared, events, threads, stop, tracker)
    started = time.monotonic()
    deadline = started + spec.timeout_minutes * 60
    ran, consecutive_failures = 0, 0
    last: list[optuna.trial.FrozenTrial] = []
    with stop.installed():
        while finished_count(study) < spec.trials:
            stop.check()
            for number in fail_dead_owners(study):
                events.on_warning(f"trial {number} was left RUNNING by a process that died: failed and queued again")
            if time.monotonic() >= deadline:
                return SearchOutcome(study, ran, "timeout", time.monotonic() - started)
            if len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))) >= spec.trials:
                # Other workers hold the rest of the budget. Wait: if one of their trials fails, it is redone.
                events.on_wait()
                time.sleep(WAIT_SECONDS)
                optuna.storages.fail_stale_trials(study)  # a dead worker on another host (RDB heartbeat)
                continue
            last.clear()
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,),
                               callbacks=[lambda _study, trial: last.append(trial)])
            except Interrupted:
                if tracker is not None:
                    try:
                        tracker.abort_running("interrupted")
                    except Exception as exc:
                        events.on_warning(f"MLflow could not close the interrupted trial's run ({exc})")
                if objective.running is not None:
                    _requeue(study, study.get_trials(deepcopy=False)[objective.running])
                raise
            objective.running = None
            trial = last[0]
            if trial.user_attrs.get("fail_reason") == SURPLUS:
                continue  # no training happened; the loop sees the budget in flight and waits
            ran += 1
            if tracker is not None:
                try:
                    _track_trial_end(trial, tracker)
                except Exception as exc:  # the trial is safe in Optuna; MLflow is told at the end of the run
                    events.on_warning(f"MLflow could not record the end of trial {trial.number} "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the search goes on")
            on_trial_end(trial)
            consecutive_failures = consecutive_failures + 1 if trial.state == TrialState.FAIL else 0
            if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise TooManyFailures(
                    f"{MAX_CONSECUTIVE_FAILURES} trials failed in a row; last one, trial {trial.number}: "
                    f"{trial.user_attrs.get('fail_reason')}: {trial.user_attrs.get('fail_detail', '')}\n"
                    f"{trial.user_attrs.get('traceback', '')}"
                )
    return SearchOutcome(study, ran, "budget", time.monotonic() - started)


def _track_trial_end(trial: optuna.trial.FrozenTrial, tracker: StudyRun) -> None:
    """Close the trial's child run with its outcome."""
    from pipeline.tracking import TrialOutcome

    attrs = trial.user_attrs
    tracker.end_trial(TrialOutcome(trial.number, trial.state.name, trial.values, attrs.get("fail_reason"),
                                   attrs.get("fail_detail"), attrs.get("traceback")))


def leading_best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial best on the study's first objective (the first completed on ties): the champion.

    For one objective this is Optuna's best trial; for several it picks one point of the Pareto front.
    """
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return None
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    # On ties the first to complete wins, as in _beats_best: with several workers that need not be the lowest number.
    return min(complete, key=lambda t: (sign * t.values[0], t.datetime_complete, t.number))


def fail_dead_owners(study: optuna.Study) -> list[int]:
    """Fail (and queue again) RUNNING trials whose process, on this host, no longer exists.

    The journal storage has no heartbeat, and on an RDB storage this spares the 90 s grace period when
    the dead worker ran here. Another host's trials are left to the heartbeat. Returns the trials failed.
    """
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("owner") or {}
        if owner.get("host") != host or owner.get("pid") in (None, os.getpid()) or _alive(owner["pid"]):
            continue
        storage = study._storage  # Optuna has no public way to fail another process's trial
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", "stale")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue  # another worker swept it first
        retries = trial.user_attrs.get("retries", 0)
        if retries < MAX_RETRIES:
            _requeue(study, trial, retries=retries + 1)
        failed.append(trial.number)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial, **user_attrs: Any) -> None:
    """A failed (interrupted, stale) trial's parameters queued again, so the next free worker runs them first."""
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, **user_attrs})


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    try:
        return study.best_trials
    except ValueError:
        return []


# --------------------------------------------------------------------------------------------------
# Tracking: the study's parent run, its report, the champion

PARENT_RUN_ATTR = "mlflow_parent_run_id"
PARENT_SETTLE_SECONDS = 1.0
REPORT_EXCLUDED_COLUMNS = ("user_attrs_history", "user_attrs_traceback", "user_attrs_params")


def start_tracking(spec: StudySpec, study: optuna.Study, client: Any, contested: bool = True) -> StudyRun:
    """Open (or reopen) the study's parent run; its id lives in the study so every invocation finds it.

    `contested=False` for the study's creator, whom nobody can have raced yet.
    """
    from pipeline import tracking

    recorded = study.user_attrs.get(PARENT_RUN_ATTR)
    tracker = tracking.StudyRun(client, study.study_name, spec.name, spec.metrics[0], spec.directions[0],
                                recorded, spec.description)
    if tracker.parent_run_id != recorded:
        study.set_user_attr(PARENT_RUN_ATTR, tracker.parent_run_id)
        # The study's creator opens the parent before anyone else can join (see open_study). Otherwise two
        # processes that both found none may have made one each: the last recorded wins, the other steps aside.
        if contested:
            time.sleep(PARENT_SETTLE_SECONDS)
            final = study.user_attrs[PARENT_RUN_ATTR]  # read from the storage, not cached
            if final != tracker.parent_run_id:
                tracker.adopt_parent(final)
    return tracker


def finish_tracking(spec: StudySpec, study: optuna.Study, tracker: StudyRun, status: str = "FINISHED") -> list[str]:
    """End of an invocation: close runs of killed trials, refresh the parent's report, register the best model."""
    from pipeline.tracking import TrialOutcome

    trials = study.get_trials(deepcopy=False)
    messages = []
    # A trial failed by the heartbeat check has no fail_reason of its own: its process was killed.
    ended = {t.number: TrialOutcome(t.number, t.state.name, t.values,
                                    t.user_attrs.get("fail_reason", "stale" if t.state == TrialState.FAIL else None))
             for t in trials if t.state in (*FINISHED, TrialState.FAIL)}
    closed = tracker.close_orphans(ended)
    if closed:
        messages.append(f"{closed} MLflow run(s) left RUNNING (a killed process, or MLflow out of reach) closed "
                        "with their trial's outcome")
    best = leading_best(study)
    counts = {state.name: sum(t.state == state for t in trials) for state in (*FINISHED, TrialState.FAIL)}
    with tempfile.TemporaryDirectory() as tmp:
        skipped = write_report(spec, study, Path(tmp))
        tracker.finish(Path(tmp), best.number if best else None, best.values[0] if best else None, counts, status)
    messages.extend(f"report: {line}" for line in skipped)
    if best is not None:
        messages.append(tracker.register_champion(best.number, best.values[0], evaluation_set(spec)))
    return messages


def evaluation_set(spec: StudySpec) -> str:
    """What a validation score was measured on: scores of different sets are not compared for the champion."""
    where = spec.dataset if isinstance(spec.dataset, str) else f"{spec.dataset.path}@{spec.dataset.image_size}"
    return f"{where}/val_size={spec.val_size}/val_limit={spec.val_limit}"


def write_report(spec: StudySpec, study: optuna.Study, directory: Path) -> list[str]:
    """trials.csv, best_params.json and Optuna's plots as PNG; returns why any plot was left out."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    from pipeline import plots  # noqa: F401  (selects the headless matplotlib backend)

    frame = study.trials_dataframe(multi_index=False)
    frame.drop(columns=[c for c in REPORT_EXCLUDED_COLUMNS if c in frame.columns]).to_csv(
        directory / "trials.csv", index=False)
    best = leading_best(study)
    if best is not None:
        summary = {"study": study.study_name, "trial": best.number, "objectives": spec.metrics,
                   "values": best.values, "seed": best.user_attrs.get("seed"),
                   "params": best.user_attrs.get("params", best.params)}
        (directory / "best_params.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    metric = spec.metrics[0]
    target = (lambda t: t.values[0]) if len(spec.objectives) > 1 else None
    # A custom target is read as "lower is better" by the importance evaluator: flip a maximised one.
    flip = -1.0 if spec.directions[0] == "maximize" else 1.0
    importance_target = (lambda t: flip * t.values[0]) if target is not None else None
    figures = {
        "optimization_history.png": lambda: optuna_plots.plot_optimization_history(study, target=target,
                                                                                   target_name=metric),
        "param_importances.png": lambda: optuna_plots.plot_param_importances(study, target=importance_target,
                                                                             target_name=metric),
        "parallel_coordinate.png": lambda: optuna_plots.plot_parallel_coordinate(study, target=target,
                                                                                 target_name=metric),
        "intermediate_values.png": lambda: optuna_plots.plot_intermediate_values(study),
    }
    skipped = []
    for name, draw in figures.items():
        try:
            with warnings.catch_warnings():  # small studies draw degenerate axes; the figure is still right
                warnings.simplefilter("ignore")
                axes = draw()
        except Exception as exc:  # e.g. importances need two complete trials that differ
            skipped.append(f"{name} left out: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.savefig(directory / name, dpi=100, bbox_inches="tight")
        plt.close(figure)
    return skipped


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


def load_trial(storage: optuna.storages.BaseStorage, name: str, number: int) -> tuple[optuna.trial.FrozenTrial, dict]:
    """Trial `number` of study `name` (any version) and that study's recorded search definition."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(f"study {name!r} is not in the Optuna storage; check STORAGE") from None
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None or trial.state != TrialState.COMPLETE:
        raise StudyError(f"trial {number} of study {name!r} is not a complete trial")
    return trial, study.user_attrs.get("definition", {})


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
    data_module.require_digest(trials[0].user_attrs.get("dataset_digest"), prepared.checksum, trial_number,
                               prepared.dataset, "restore the pictures it was trained on to replay it")
    replayed: list[dict[str, float]] = []

    def collect(metrics: train.EpochMetrics) -> bool:
        replayed.append(history_record(metrics))
        return len(replayed) >= len(recorded)  # a pruned trial stopped early: stop at the same epoch

    # Float sums depend on the thread count: by default, use the one the trial ran with.
    train.fit(params, prepared, callbacks=[collect], seed=seed, threads=threads or trials[0].user_attrs.get("threads"))
    differences = []
    for epoch, (old, new) in enumerate(zip(recorded, replayed, strict=False), start=1):
        for key in HISTORY_KEYS:
            if old.get(key) != new.get(key):
                differences.append(f"epoch {epoch} {key}: recorded {old.get(key)!r}, replayed {new.get(key)!r}")
    if len(recorded) != len(replayed):
        differences.append(f"epochs: recorded {len(recorded)}, replayed {len(replayed)}")
    return ReplayOutcome(trial_number, len(replayed), differences)
