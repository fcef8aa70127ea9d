"""Optuna's side of a trial: the objective, the failure policy, the budget and the stale-trial rules.

Each trial turns its suggestions into a plain params dict, trains with `train.fit`, reports the
objective every epoch (the pruner may stop it) and records its seed, params and per-epoch history
(store.TrialRecord), so any finished trial can be replayed bit for bit. What happens is told to a
listener (events.py); this module knows neither the console nor MLflow.

Failure policy: a NaN/inf loss or an out-of-memory error prunes the trial with `fail_reason`
`diverged`/`oom`; any other exception fails it (traceback kept) and the study goes on, unless three
trials in a row fail. Ctrl-C, SIGTERM or SIGHUP fails the running trial with reason `interrupted`, queues
it again to run first, and stops.

Each trial checkpoints at every epoch boundary. A trial that is interrupted, or whose process dies, is
queued again with its seed and the number of its first attempt, and the retry resumes that attempt's
checkpoint: it ends exactly as the uninterrupted trial would have. A trial that ends for good (complete,
pruned, failed) removes its checkpoint.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import signal
import socket
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline import store
from pipeline.data.loading import PreparedData
from pipeline.infra.concurrency import process_identity, quiet_if_hung_up, same_process
from pipeline.infra.text import masked_text
from pipeline.search import pareto, pruning
from pipeline.search.events import Listener, TrialEnded, TrialStarted
from pipeline.spec import hparams, space, studies, tables
from pipeline.spec.studies import StudySpec
from pipeline.training import latency, models, train
from pipeline.training.checkpoints import ForeignCheckpoint

WAIT_SECONDS = 1.0  # how often an idle worker looks again while others run the budget's last trials
MAX_CONSECUTIVE_FAILURES = 3
HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")  # not timings
SURPLUS = "surplus"
DISK_FULL = "disk_full"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill, a terminal or SSH session gone


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP (the terminal or SSH session went away) arrived during the search."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


class StudyStopped(Exception):
    """The search cannot usefully go on; the message says why and what to do. Every trial is recorded."""


class TooManyFailures(StudyStopped):
    """Three trials in a row failed: something is wrong beyond one bad configuration."""


class DiskFull(StudyStopped):
    """A write failed for lack of space (or a file-size limit): every later trial would fail the same way."""


class SurplusTrial(Exception):
    """Another worker took the budget's last trial at the same moment as this one."""


class StopRequest:
    """SIGINT/SIGTERM/SIGHUP handling that only interrupts at safe points.

    The handler just records the signal; `check()` raises Interrupted where it is safe to stop: after
    any training batch or epoch, and between trials. Raising from inside Optuna's bookkeeping could
    leave a trial half-told. A second signal raises at once, for a user who insists; not the same signal again
    once this process's parent has died: a worker's coordinator killed outright sends it SIGTERM through
    PR_SET_PDEATHSIG once per thread of the coordinator's that exits, which is no user insisting.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self.parent = os.getppid()

    def _handle(self, signal_number: int, _frame: Any) -> None:
        if signal_number == signal.SIGHUP:
            quiet_if_hung_up()
        if self.signal_number is not None:
            if signal_number == self.signal_number and os.getppid() != self.parent:
                return  # the parent's death, told again: stop at the next safe point, as asked the first time
            raise Interrupted(signal_number)
        self.signal_number = signal_number

    def check(self) -> None:
        if self.signal_number is not None:
            raise Interrupted(self.signal_number)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def history_record(metrics: train.EpochMetrics) -> dict[str, float]:
    return {k: getattr(metrics, k) for k in HISTORY_KEYS}


# --------------------------------------------------------------------------------------------------
# The objective


@dataclass
class Objective:
    """Optuna objective: suggestions -> params -> train.fit -> objective value(s)."""

    spec: StudySpec
    data: PreparedData
    listener: Listener = field(default_factory=Listener)
    threads: int | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    running: int | None = None  # the number of the trial in progress, for the interrupt handler
    checkpoints: Path | None = None  # the study's checkpoint folder; None: trials keep no checkpoints
    confirming: bool = False  # the champion phase's runs (champion.py): queued ones only, no pruning, every model kept

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        surplus = _surplus_confirmation(trial) if self.confirming else _surplus(self.spec, trial)
        if surplus:
            store.note(trial, fail_reason=SURPLUS)
            raise SurplusTrial(f"trial {trial.number}: {surplus}")
        self.running = trial.number
        params = space.suggest(self.spec, trial)
        first, seed = store.first_attempt(trial)  # a retry continues its first attempt: same seed, same checkpoint
        seed = studies.derive_seed(self.spec.seed, trial.number) if seed is None else seed
        # history and resumed_from_epoch start afresh: Optuna's heartbeat retry copies the failed trial's record
        # (on another host, without its checkpoint, this attempt starts over); a resume sets them again.
        store.note(trial, seed=seed, first_attempt=first, params=params,
                   owner={"host": socket.gethostname(), "pid": os.getpid(), **process_identity()},
                   split_hash=self.data.split_hash, dataset_digest=self.data.checksum, history=[],
                   resumed_from_epoch=0)
        checkpoint = checkpoint_path(self.checkpoints, first) if self.checkpoints is not None else None
        if checkpoint is not None:
            _adopt_unkeyed(checkpoint)
        try:
            values = self._run(trial, params, seed, checkpoint)
        except Exception:  # pruned or failed for good: no retry will resume it (an interrupt keeps it)
            _remove(checkpoint)
            raise
        _remove(checkpoint)
        return values

    def _run(self, trial: optuna.Trial, params: dict[str, Any], seed: int,
             checkpoint: Path | None) -> float | list[float]:
        size = _size(params, self.data, flops="flops_per_image" in self.spec.constraints)
        store.note(trial, **size)  # a pruned or failed trial is still tagged with its size
        started = TrialStarted(trial.number, hparams.resolve_params(params), seed, size.get("parameter_count", -1),
                               self.data, trial.user_attrs.get("confirmation_of"), trial.user_attrs.get("repeat", 0))
        _failing_trial(trial, lambda: self.listener.trial_started(started), "the trial could not be started")
        # Size is known before training: a trial already outside a size constraint is not worth training.
        missed = _constrain(trial, self.spec, size)
        if missed:
            store.note(trial, fail_reason="infeasible", fail_detail=missed)
            raise optuna.TrialPruned(f"infeasible before training: {missed}")
        report, resumed = self._reporter(trial)
        try:
            result = self._fit(trial, params, seed, checkpoint, report, resumed)
        except train.Diverged as exc:
            store.note(trial, fail_reason="diverged", fail_detail=str(exc))
            raise optuna.TrialPruned(f"diverged: {exc}") from exc
        except train.OutOfMemory as exc:
            store.note(trial, fail_reason="oom", fail_detail=str(exc))
            raise optuna.TrialPruned(f"oom: batch_size {exc.batch_size}") from exc
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            store.note(trial, fail_reason="interrupted")
            raise
        except Exception as exc:
            _record_failure(trial, exc)
            raise
        store.note(trial, best_epoch=result.best_epoch, precision=result.precision, threads=result.threads,
                   device=result.device, parameter_count=result.parameter_count,
                   flops_per_image=result.flops_per_image, stop_reason=result.stop_reason)
        model = train.TrainedModel(result.model, self.data, result.precision)
        latency_ms = None
        if self.spec.measures_latency:
            latency_ms = latency.trial_latency_ms(model.cpu_copy(), self.data.input_shape)
            store.note(trial, latency_ms=latency_ms, latency_threads=latency.LATENCY_THREADS)
        metrics = trial_metrics(result, latency_ms)
        # Each constraint once (Optuna keeps the first value): what was not known before training.
        missed = _constrain(trial, self.spec, {k: v for k, v in metrics.items() if k not in size})
        values = objective_values(self.spec, metrics)
        # Inside the trial, so that a model that cannot be saved (disk full) fails this trial, not the study.
        if self.confirming:
            _failing_trial(trial, lambda: self.listener.confirmation_model(trial.number, values[0], model),
                           "the model could not be logged to MLflow")
        elif _worth_keeping(trial.study, values, feasible=not missed):
            _failing_trial(trial, lambda: self.listener.new_best(trial.number, values[0], model),
                           "the best model could not be logged to MLflow")
        return values[0] if len(values) == 1 else values

    def _fit(self, trial: optuna.Trial, params: dict[str, Any], seed: int, checkpoint: Path | None, report,
             resumed) -> train.TrainResult:
        def fit() -> train.TrainResult:
            return train.fit(params, self.data, callbacks=[report], seed=seed, checkpoint=checkpoint,
                             threads=self.threads, on_batch=self._on_batch, on_resume=resumed)

        try:
            return fit()
        except ForeignCheckpoint as exc:
            # Left by something else (a damaged file, code that resolves the params differently): the trial's
            # parameters still deserve a run, from the start. Nothing was trained yet: the check comes first.
            self.listener.warning(f"trial {trial.number}: {exc}; it is removed and the trial trains from the start")
            _remove(checkpoint)
            return fit()

    def _on_batch(self, done: int, total: int) -> None:
        self.stop.check()
        self.listener.batch_done(done, total)

    def _reporter(self, trial: optuna.Trial):
        """The per-epoch callback (record the history, tell the listener, report to the pruner), and the
        one that records a resumed checkpoint's epochs the same way, so the record and the pruner see every
        epoch of the trial."""
        history: list[dict[str, float]] = []
        metric = pruning.pruned_metric(self.spec.metrics)
        # Optuna's pruner takes one objective, and only a per-epoch one (a size has no epochs)
        single = len(self.spec.objectives) == 1 and metric in tables.PRUNED_ON
        several_pruned = not single and self.spec.pruner != "none" and not self.confirming

        def record(metrics: train.EpochMetrics) -> None:
            history.append(history_record(metrics))
            store.note_epoch(trial, len(history), history[-1])
            self.listener.epoch_ended(trial.number, metrics)
            if single:
                trial.report(getattr(metrics, self.spec.metrics[0]), step=metrics.epoch)

        def report(metrics: train.EpochMetrics) -> None:
            self.stop.check()
            record(metrics)
            reason = None
            if single and trial.should_prune():
                reason = pruning.explain(trial.study, trial, metrics.epoch, metric) or pruning.PruneReason(
                    metrics.epoch, metric, getattr(metrics, metric), math.nan, self.spec.pruner)
            elif several_pruned:
                maximize = self.spec.directions[self.spec.metrics.index(metric)] == "maximize"
                first = store.first_pruned_epoch(self.spec.epochs)
                reason = pruning.median_from_histories(trial.study, history, metric, maximize, first)
            if reason is not None:
                store.note(trial, fail_reason="pruned", fail_detail=reason.line(), prune_reason=reason.as_dict())
                raise optuna.TrialPruned(f"pruned at {reason.line()}")

        def resumed(done: list[train.EpochMetrics]) -> None:
            store.note(trial, resumed_from_epoch=len(done))
            for metrics in done:
                record(metrics)

        return report, resumed


def checkpoint_folder(studies_dir: Path, storage_url: str, study_name: str) -> Path:
    """Where the trials of study `study_name` in the store at `storage_url` keep their checkpoints.

    Keyed by the store as well as the study: two stores may hold studies of one name (a local file and PostgreSQL,
    a test's store), and each sweeps only its own folder. The default stores keep studies/checkpoints/<study>/."""
    key = store.storage_key(storage_url)
    return studies_dir / "checkpoints" / study_name if key is None else studies_dir / "checkpoints" / key / study_name


def _adopt_unkeyed(checkpoint: Path) -> None:
    """A trial of another store resumes the checkpoint the version before keyed folders left in
    studies/checkpoints/<study>/: a copy, since that folder may be another store's; the fingerprint check refuses
    the copy if another store's trial wrote it (and it is removed, the original kept)."""
    folder = checkpoint.parent
    unkeyed = folder.parent.parent / folder.name / checkpoint.name
    if folder.parent.name.startswith(store.STORE_PREFIX) and not checkpoint.exists() and unkeyed.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(unkeyed, checkpoint)


def checkpoint_path(folder: Path, first_attempt: int) -> Path:
    """Where the trial first run as number `first_attempt` (and each of its retries) keeps its checkpoint."""
    return folder / f"trial-{first_attempt}.pt"


def sweep_checkpoints(study: optuna.Study, folder: Path | None, listener: Listener) -> list[Path]:
    """Remove the checkpoints in `folder` that no trial will resume (the listener is told), and return them.

    A checkpoint is resumed by a RUNNING or WAITING attempt of the trial that wrote it first. An orphan is one
    whose trial is in this study and has neither: a queued run the champion phase no longer wants, a trial
    another host's heartbeat failed for good. Not swept:
    - a trial that failed within the last SWEEP_GRACE: a failed attempt is queued again only after it is marked
      FAIL (by a worker, Optuna's heartbeat, or a Ctrl-C whose MLflow call may take seconds);
    - a number this study has no trial for: the file is not this study's to judge.
    The folder is listed before the trials: a trial writes its checkpoint only while it runs, so one written
    meanwhile is never taken for an orphan.
    """
    try:
        names = os.listdir(folder) if folder is not None else []
    except FileNotFoundError:
        return []
    found = {int(match["first"]): folder / name for name in names if (match := _CHECKPOINT_NAME.fullmatch(name))}
    if not found:
        return []
    now = datetime.now()  # Optuna's stamps are local time in every storage
    live, known = set(), set()
    for trial in study.get_trials(deepcopy=False):
        first, _ = store.first_attempt(trial)
        known.add(first)
        if trial.state in (TrialState.RUNNING, TrialState.WAITING) or (
                trial.state == TrialState.FAIL and now - (trial.datetime_complete or now) < SWEEP_GRACE):
            live.add(first)
    orphans = [path for first, path in sorted(found.items()) if first in known and first not in live]
    for path in orphans:
        _remove(path)
    if orphans:
        listener.warning(f"removed {len(orphans)} checkpoint(s) no trial will resume: "
                         f"{', '.join(path.name for path in orphans)}")
    return orphans


_CHECKPOINT_NAME = re.compile(r"trial-(?P<first>\d+)\.pt")  # checkpoint_path's names
SWEEP_GRACE = timedelta(hours=1)  # a failed trial's checkpoint is kept this long for its retry to be queued


def _remove(checkpoint: Path | None) -> None:
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)


def _failing_trial(trial: optuna.Trial, action, context: str) -> None:
    """Run `action`; if it raises, record why on the trial and let the exception fail it."""
    try:
        action()
    except Exception as exc:
        _record_failure(trial, exc, context)
        raise


def _surplus_confirmation(trial: optuna.Trial) -> str:
    """Why a champion-phase trial must not train (empty: it may). Only queued runs train: an empty queue makes
    Optuna sample a new trial, which has no business there. Two processes finishing the same search at once
    may both queue a missing run: the copy already done, or running since earlier, wins. (Two copies started on
    hosts whose clocks disagree, or one not yet visible when the other checks, may both train: a waste of time,
    not of results, since the table keeps the first that completed.)"""
    key = trial.user_attrs.get("confirmation_of"), trial.user_attrs.get("repeat")
    if key[0] is None:
        return "not a queued champion-phase run"
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        same = other.number != trial.number and (other.user_attrs.get("confirmation_of"),
                                                 other.user_attrs.get("repeat")) == key
        # Of two running copies the one that started first trains (the lower number if at the same moment):
        # each sees the other running, and exactly one of them must stand down.
        if same and (other.state == TrialState.COMPLETE
                     or (other.datetime_start, other.number) < (trial.datetime_start, trial.number)):
            return f"repeat {key[1]} of trial {key[0]} is already trial {other.number}"
    return ""


def _surplus(spec: StudySpec, trial: optuna.Trial) -> str:
    """Why this new trial is one too many (empty: it is not). Workers check the budget before asking for a
    trial, but two may ask at the same moment. Trial numbers are handed out in order by the storage, so the trial whose
    earlier-numbered finished or running trials already fill the budget is the surplus one, and exactly
    one of two racing workers finds that. A surplus trial taken from the queue (a baseline, a retry) is
    queued again, so its parameters still run if a running trial fails."""
    others = trial.study.get_trials(deepcopy=False, states=(*store.FINISHED, TrialState.RUNNING))
    taken = sum(t.state in store.FINISHED or t.number < trial.number for t in others)
    if taken < spec.trials:
        return ""
    store.requeue_if_queued(trial)
    return f"the study's {spec.trials} trials are all taken"


def _record_failure(trial: optuna.Trial, exc: BaseException, context: str = "") -> None:
    """fail_reason (`disk_full` for a full disk or file-size limit), the detail and the traceback."""
    full = disk_full(exc)
    # Masked before it is cut: a URL cut short of its "@" would keep its password. Everything shown of a failure
    # (the trial line, the study's stop message, MLflow's tag, trials.csv, the dashboard) is read from here.
    text = masked_text(str(exc))
    detail = text.splitlines()[0][:300] if full else text[:1000]  # a database's error quotes its SQL
    store.note(trial, fail_reason=DISK_FULL if full else type(exc).__name__,
               fail_detail=(f"{context}: " if context else "") + detail,
               traceback=masked_text(traceback.format_exc())[-8000:])


# What SQLite says (through its driver, SQLAlchemy and MLflow) when a write finds no room: SQLITE_FULL for a full
# disk; a disk I/O error for a file-size limit or a failing disk, where going on would not help either.
DISK_FULL_SIGNS = ("database or disk is full", "disk I/O error")


def disk_full(exc: BaseException) -> bool:
    """Is `exc` (or what caused it) a write that found no room?"""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if any(sign in str(seen) for sign in DISK_FULL_SIGNS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _disk_full_message(what: str) -> str:
    return (f"a disk write failed for lack of space (a full disk, a file-size limit or a failing disk): {what}. "
            "Finished trials are saved; free some space and run the same command again to resume")


def _worth_keeping(study: optuna.Study, values: list[float], feasible: bool) -> bool:
    """Is this trial's model logged? One objective: a feasible new best. Several: a feasible trial that no earlier
    one dominates (every trial of the final Pareto front was such a trial when it ended, so any may be chosen)."""
    if len(values) == 1:
        return feasible and store.beats_best(study, values[0])
    return feasible and pareto.joins_front(study, values)


def _size(params: dict[str, Any], data: PreparedData, flops: bool) -> dict[str, int]:
    """`parameter_count` (and with `flops`, `flops_per_image`: a forward pass to count, so only when a constraint
    needs it before training), so that pruned and failed trials are tagged with their size and a size constraint
    is checked before any training; {} when the params cannot build."""
    try:
        model = models.build_model(hparams.resolve_params(params), len(data.classes), data.input_shape,
                                   imagenet=False)  # counting needs the architecture, not the ImageNet weights
        counted = {"parameter_count": models.count_parameters(model)}
        return counted | ({"flops_per_image": models.flops_per_image(model, data.input_shape)} if flops else {})
    except Exception:  # bad params or missing weights: fit() reports those properly
        return {}


def _constrain(trial: optuna.Trial, spec: StudySpec, metrics: dict[str, float]) -> str:
    """Give Optuna the study's constraints on these metrics; return which are missed ('' when none)."""
    missed = []
    for metric, bound in spec.constraints.items():
        if metric in metrics:
            excess = bound.excess(metrics[metric])
            trial.set_constraint(metric, excess)
            if excess > 0:
                missed.append(f"{metric} {metrics[metric]:g} is not {bound.describe()}")
    return "; ".join(missed)


# --------------------------------------------------------------------------------------------------
# The search loop


@dataclass
class LoopOutcome:
    ran: int  # trials run by this invocation
    stop_reason: str  # "budget", "timeout"


def run(spec: StudySpec, study: optuna.Study, prepared: PreparedData, listener: Listener,
        threads: int | None = None, checkpoints: Path | None = None) -> LoopOutcome:
    """Run trials until the study has `spec.trials` finished ones or the time budget is spent; each trial
    checkpoints into the folder `checkpoints` (when given).

    Raises Interrupted (after closing and re-queueing the running trial), TooManyFailures and DiskFull.
    """
    stop = StopRequest()
    objective = Objective(spec, prepared, listener, threads, stop, checkpoints=checkpoints)
    store.take_retries_first(study)
    sweep_checkpoints(study, checkpoints, listener)
    deadline = time.monotonic() + spec.timeout_minutes * 60
    ran, consecutive_failures = 0, 0
    with stop.installed():
        while store.finished_count(study) < spec.trials:
            stop.check()
            for number in fail_dead_owners(study, checkpoints):
                listener.warning(f"trial {number} was left RUNNING by a process that died: failed and queued again")
            if time.monotonic() >= deadline:
                return LoopOutcome(ran, "timeout")
            if store.taken_count(study) >= spec.trials:
                # Other workers hold the rest of the budget. Wait: if one of their trials fails, it is redone.
                listener.waiting()
                time.sleep(WAIT_SECONDS)
                optuna.storages.fail_stale_trials(study)  # a dead worker on another host (RDB heartbeat)
                continue
            ended = next_trial(study, objective, listener)
            if ended is None:
                continue  # a surplus trial: no training happened; the loop sees the budget in flight and waits
            ran += 1
            consecutive_failures = failures_in_a_row(consecutive_failures, ended)
    return LoopOutcome(ran, "budget")


def next_trial(study: optuna.Study, objective: Objective, listener: Listener) -> TrialEnded | None:
    """`one_trial`, where a write that found no room stops the study (DiskFull): every later trial would fail."""
    try:
        ended = one_trial(study, objective, listener)
    except Exception as exc:  # Optuna's own bookkeeping could not write the trial's end
        if not disk_full(exc):
            raise
        what = f"the Optuna storage could not record a trial ({type(exc).__name__})"
        raise DiskFull(_disk_full_message(what)) from None
    if ended is not None and ended.fail_reason == DISK_FULL:
        raise DiskFull(_disk_full_message(f"trial {ended.number}: {ended.fail_detail}"))
    return ended


def failures_in_a_row(before: int, ended: TrialEnded) -> int:
    """The count of failed trials in a row after `ended`; TooManyFailures when it reaches the limit."""
    count = before + 1 if ended.state == "FAIL" else 0
    if count >= MAX_CONSECUTIVE_FAILURES:
        raise TooManyFailures(f"{MAX_CONSECUTIVE_FAILURES} trials failed in a row; last one, trial {ended.number}: "
                              f"{ended.fail_reason}: {ended.fail_detail or ''}\n{ended.traceback or ''}")
    return count


def one_trial(study: optuna.Study, objective: Objective, listener: Listener) -> TrialEnded | None:
    """Ask Optuna for one trial and run it; tell the listener how it ended (None: it was surplus)."""
    last: list[optuna.trial.FrozenTrial] = []
    try:
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda _study, t: last.append(t)])
    except Interrupted:
        try:
            listener.interrupted("interrupted")
        except Exception as exc:
            listener.warning(f"the interrupted trial's MLflow run could not be closed ({exc})")
        if objective.running is not None:
            store.requeue(study, store.record(study, objective.running))
        raise
    objective.running = None
    record = store.record_of(last[0])
    if record.fail_reason == SURPLUS:
        return None
    ended = trial_ended(record)
    try:
        listener.trial_ended(ended)
    except Exception as exc:  # the trial is safe in Optuna; MLflow is told at the end of the run
        listener.warning(f"the end of trial {ended.number} could not be recorded in MLflow "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the search goes on")
    return ended


def trial_ended(record: store.TrialRecord) -> TrialEnded:
    """The event for a finished trial. One failed by the heartbeat check has no fail_reason of its own:
    its process was killed."""
    reason = record.fail_reason or ("stale" if record.state == "FAIL" else None)
    return TrialEnded(record.number, record.state, record.values, record.seconds, record.sampled, reason,
                      record.fail_detail, record.traceback, record.resumed_from_epoch, record.confirmation_of,
                      record.repeat, record.prune_reason)


def _owner_running(owner: dict[str, Any]) -> bool:
    if "started" not in owner and owner["pid"] == os.getpid():
        return True  # an owner recorded by pid alone: the pid cannot tell this process from an earlier one
    return same_process(owner["pid"], owner)


def fail_dead_owners(study: optuna.Study, checkpoints: Path | None = None) -> list[int]:
    """Fail (and queue again) RUNNING trials whose process, on this host, no longer exists.

    The journal storage has no heartbeat, and on an RDB storage this spares the 90 s grace period when
    the dead worker ran here. Another host's trials are left to the heartbeat. A trial retried too often
    already is not queued again, and its checkpoint (in `checkpoints`) is removed. Returns the trials failed.
    A process is known by its pid, boot id and start time (`process_identity`): after a reboot or a container
    restart a new process, this one included, may have a dead owner's pid. An owner recorded with its pid alone
    (before the rest was) is judged by the pid, and never taken for this process.
    """
    host, failed = socket.gethostname(), []
    for record in store.records(study, (TrialState.RUNNING,)):
        owner = record.owner or {}
        if owner.get("host") != host or owner.get("pid") is None or _owner_running(owner):
            continue
        if not store.fail_trial(study, record.number, "stale"):
            continue  # another worker swept it first
        if record.retries < store.MAX_RETRIES:
            store.requeue(study, record, retries=record.retries + 1)
        elif checkpoints is not None:
            first = record.first_attempt if record.first_attempt is not None else record.number
            _remove(checkpoint_path(checkpoints, first))
        failed.append(record.number)
    return failed


def trial_metrics(result: train.TrainResult, latency_ms: float | None = None) -> dict[str, float]:
    """Every metric a trained trial is judged by (objectives, constraints, the champion's choice): the validation
    ones from its best epoch; latency_ms when it was measured."""
    best = result.history[result.best_epoch - 1]
    found = {"val_accuracy": best.val_accuracy, "val_loss": best.val_loss,
             "parameter_count": float(result.parameter_count), "flops_per_image": float(result.flops_per_image)}
    return found | ({"latency_ms": latency_ms} if latency_ms is not None else {})


def objective_values(spec: StudySpec, metrics: dict[str, float]) -> list[float]:
    return [metrics[metric] for metric in spec.metrics]
