"""The Optuna storage: where studies live, their versions, and the typed record every trial carries.

One study file gives one Optuna study (`<name>`, or `<name>-v<N>` after FRESH=1) in the storage
(`sqlite:///studies/optuna.db` unless STORAGE is set). What a trial records beyond Optuna's own fields
(its seed, full params, per-epoch history, owner, data identity, failure) is a `TrialRecord`, stored as
user attributes under the same keys as ever, written by `note` and read by `records`, nowhere else.

This is the only module that touches Optuna's private API; each use sits behind a small function
with its own test pinned to the Optuna version (tests/test_store.py). A damaged store stops a command with
one line naming the file (BadInput); a journal's last line torn by a full disk or a power loss is cut off
before anything is appended to it (`_JournalLock`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.trial import TrialState

from pipeline.infra import fileio, sqlitecheck, urls
from pipeline.infra.concurrency import open_store
from pipeline.infra.urls import hide_in, shown
from pipeline.spec import paths, space, studies
from pipeline.spec.errors import BadInput
from pipeline.spec.studies import StudyError, StudySpec

# A RUNNING trial whose process stopped beating for GRACE_SECONDS is failed... (the environment variables
# shorten both for the fault tests; a real trial's epochs are far longer).
HEARTBEAT_SECONDS = int(os.environ.get("PIPELINE_HEARTBEAT_SECONDS", 30))
GRACE_SECONDS = int(os.environ.get("PIPELINE_GRACE_SECONDS", 90))
MAX_RETRIES = 2  # ...and retried up to this many times
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PARENT_RUN_ATTR = "mlflow_parent_run_id"
FINGERPRINT_WAIT_SECONDS = 30.0


def quiet_optuna() -> None:
    """Our own progress output replaces Optuna's log lines. Heartbeats and the stale-trial retry are marked
    experimental; they are the documented way to recover from killed workers, and Optuna's version is pinned."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# --------------------------------------------------------------------------------------------------
# Storage


@dataclass(frozen=True)
class Storage:
    url: str  # as the user (or the default) named it; workers are handed the same
    backend: optuna.storages.BaseStorage


def storage_url(override: str | None = None, study: str | None = None, workers: int = 1) -> str:
    """STORAGE when given. Otherwise the default store `study` (a study file name) already lives in:
    studies/optuna.db (SQLite, one worker) or studies/optuna.journal (where several local workers work);
    a new study goes to the journal when it starts with several workers."""
    chosen = override or os.environ.get("STORAGE")
    if chosen:
        return chosen
    if study is None or _holds(paths.DEFAULT_STORAGE, study):
        return paths.DEFAULT_STORAGE
    if workers > 1 or _holds(str(paths.DEFAULT_JOURNAL), study):
        return str(paths.DEFAULT_JOURNAL)
    return paths.DEFAULT_STORAGE


def open_storage(override: str | None = None, study: str | None = None, workers: int = 1) -> Storage:
    """The storage `storage_url` chooses, opened."""
    url = storage_url(override, study, workers)
    return Storage(url, make_storage(url))


STORE_PREFIX = "store-"  # checkpoint folders of stores other than the default ones: studies/checkpoints/store-<key>/


def storage_key(url: str) -> str | None:
    """A short name for the store at `url`, the same however its path is spelt and whatever its password; None for
    the default stores (studies/optuna.db and studies/optuna.journal), whose checkpoints keep the folders they had
    before stores were told apart."""
    path = sqlitecheck.sqlite_path(url) if url.startswith("sqlite:") else None if "://" in url else Path(url)
    if path is not None:
        identity = f"{'sqlite' if url.startswith('sqlite:') else 'journal'}:{path.expanduser().resolve()}"
        defaults = (f"sqlite:{sqlitecheck.sqlite_path(paths.DEFAULT_STORAGE)}", f"journal:{paths.DEFAULT_JOURNAL}")
        if identity in defaults:
            return None
    else:
        identity = urls.shown(url)
    return STORE_PREFIX + hashlib.sha256(identity.encode()).hexdigest()[:12]


def _holds(url: str, name: str) -> bool:
    """Does the store at `url` (a default file, which may not exist yet) hold any version of study `name`?"""
    path = sqlitecheck.sqlite_path(url) if url.startswith("sqlite:") else Path(url)  # else the journal file
    if path is None or not path.is_file():
        return False
    return bool(versions(make_storage(url), name))


def _warn(message: str) -> None:
    """Store repairs are reported on stderr: a worker's stdout carries its events."""
    print(message, file=sys.stderr, flush=True)


def make_storage(url: str, log: Callable[[str], None] = _warn) -> optuna.storages.BaseStorage:
    """An RDB URL (sqlite:///..., postgresql://...) with heartbeats, or a `.journal` file for local workers.

    A damaged store (a SQLite file cut short or overwritten, a journal with a line that is not an entry) stops
    here with BadInput naming the file; a journal's torn last line is mended (`log` says so)."""
    quiet_optuna()
    if url.endswith(".journal"):  # Optuna's journal file: safe for several processes on one host
        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return _open_journal(path, log)
    sqlitecheck.prepare(url, "Optuna storage")
    try:
        return open_store(lambda: optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        ))
    except Exception as exc:  # bad URL, unreachable server, locked or unwritable file
        reason = hide_in(str(exc).splitlines()[0], url)  # a driver may quote the URL or its password
        raise BadInput(f"Optuna storage {shown(url)!r} cannot be opened: {reason}; "
                       "check STORAGE (default: sqlite:///studies/optuna.db, or a path ending in .journal)") from None


def _open_journal(path: Path, log: Callable[[str], None]) -> optuna.storages.JournalStorage:
    lock = _JournalLock(path, log)
    backend = optuna.storages.journal.JournalFileBackend(str(path), lock_obj=lock)
    if _torn(path):  # mend it now rather than at the first append, so that the user hears of it at once
        try:
            lock.acquire()
        except OSError as exc:  # no room to copy the file aside: nothing was changed
            raise BadInput(f"Optuna journal {path}: its last line was cut off mid-write and could not be mended "
                           f"({exc}); nothing was changed: free some disk space (or let this user write in "
                           f"{path.parent}) and run again") from None
        lock.release()
    try:
        return optuna.storages.JournalStorage(backend)
    except ValueError:  # Optuna's reader met a line that is not an entry (json.JSONDecodeError is a ValueError)
        raise BadInput(f"Optuna journal {path} is damaged ({_first_bad_line(path)}); nothing was changed: restore it "
                       f"from a backup, or move it aside (mv {path} {path}.damaged) and run again to start a new, "
                       "empty journal") from None


class _JournalLock(optuna.storages.journal.JournalFileSymlinkLock):
    """Optuna's own lock on the journal file (every append takes it), which first cuts off a torn last line.

    A write cut short (a full disk, a power loss, a kill) leaves a last line without its newline. Optuna's reader
    skips it, but the next append would be glued onto it, making a line no reader can parse: every later read of
    the journal would fail, in every process. Only the lock's holder writes, so while it is held a last line
    without its newline is a torn one, never another process's append in progress. The whole file is copied
    aside (`<journal>.torn-<time>`) before the partial line is removed.
    """

    def __init__(self, path: Path, log: Callable[[str], None]):
        super().__init__(str(path))
        self._path, self._log = path, log

    def acquire(self) -> bool:
        super().acquire()
        try:
            if _torn(self._path):  # every append takes this lock: one byte read, the scan only when torn
                _cut_torn_line(self._path, self._log)
        except BaseException:
            self.release()
            raise
        return True


def _torn(path: Path) -> bool:
    """Does the journal end in a line without its newline? (A quick look, without the lock.)"""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        return f.read(1) != b"\n"


def _cut_torn_line(path: Path, log: Callable[[str], None]) -> None:
    """Remove the journal's last line if it has no newline, after copying the whole file aside (under the lock)."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        whole = _whole_lines_length(f, size)
        if whole == size:
            return
        aside = path.with_name(f"{path.name}.torn-{datetime.now():%Y%m%d-%H%M%S-%f}")
        try:
            shutil.copyfile(path, aside)
            fileio.sync_tree(aside)
        except BaseException:
            aside.unlink(missing_ok=True)
            raise
        f.truncate(whole)
        f.flush()
        os.fsync(f.fileno())
    log(f"{path}: its last line was cut off mid-write ({size - whole} bytes without a newline: a full disk, a power "
        f"loss or a kill); Optuna skips such a line, but the next write would have been glued onto it, so it was "
        f"removed (the whole file was copied to {aside.name} first)")


def _whole_lines_length(f: BinaryIO, size: int, chunk: int = 1 << 16) -> int:
    """The length of the file up to and including its last newline."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        f.seek(start)
        found = f.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _first_bad_line(path: Path) -> str:
    """Which line of a journal Optuna cannot read, and why, for the message."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return f"line {number} has no newline"
            try:
                json.loads(line)
            except ValueError:
                return f"line {number} is not a journal entry: {line[:60]!r}"
    return "Optuna could not read it"


# --------------------------------------------------------------------------------------------------
# The trial record


@dataclass(frozen=True)
class TrialRecord:
    """One trial as stored: Optuna's fields first, then ours (user attributes; absent in older trials)."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    values: list[float] | None
    sampled: dict[str, Any]  # Optuna's params: the searched values only
    seconds: float  # how long it ran (0 while running)
    completed_at: datetime | None
    started_at: datetime | None = None
    constraints: dict[str, float] = field(default_factory=dict)  # Optuna's: <= 0 met, > 0 by how much it is missed
    # ---- ours, written by `note` -------------------------------------------------------------------
    seed: int | None = None
    params: dict[str, Any] | None = None  # the full params it trained with: fixed and searched
    owner: dict[str, Any] | None = None  # {"host", "pid", "boot_id", "started"} of its process, for the stale sweep
    split_hash: str | None = None  # the validation split it was judged on
    dataset_digest: str | None = None  # the pictures themselves
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: HISTORY_KEYS
    best_epoch: int | None = None
    precision: str | None = None
    threads: int | None = None  # float sums depend on it: a replay uses the same
    device: str | None = None
    parameter_count: int | None = None
    flops_per_image: int | None = None
    stop_reason: str | None = None
    fail_reason: str | None = None  # pruned, diverged, oom, interrupted, stale, surplus, disk_full, <exception>
    fail_detail: str | None = None
    traceback: str | None = None
    baseline: bool = False  # queued from the study file's [[baseline]]
    retry_of: int | None = None  # queued again after this trial failed (interrupted, stale)
    retries: int = 0
    first_attempt: int | None = None  # the trial these parameters first ran as: retries keep its seed and checkpoint
    resumed_from_epoch: int = 0  # epochs a retry took over from its first attempt's checkpoint
    confirmation_of: int | None = None  # a champion-phase run (champion.py): this search trial's params again...
    repeat: int = 0  # ...with repeat `repeat`'s seed (0: the search's own trial)
    latency_ms: float | None = None  # CPU latency per image at batch 1 (latency.py), when the study reads it
    latency_threads: int | None = None  # ...measured on this many threads
    prune_reason: dict[str, Any] | None = None  # why it was pruned (pruning.PruneReason)

    @property
    def finished(self) -> bool:
        return self.state in ("COMPLETE", "PRUNED")

    @property
    def feasible(self) -> bool:
        """Within every constraint of the study (a study without constraints: always)."""
        return all(v <= 0 for v in self.constraints.values())


OPTUNA_FIELDS = ("number", "state", "values", "sampled", "seconds", "completed_at", "started_at", "constraints")
RECORDED = tuple(f.name for f in dataclasses.fields(TrialRecord) if f.name not in OPTUNA_FIELDS)


def record_of(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    ours = {k: v for k, v in trial.user_attrs.items() if k in RECORDED}
    epochs = _epoch_records(trial)
    if epochs:  # recorded one epoch at a time (older stores hold the whole list under "history")
        ours["history"] = epochs
    return TrialRecord(number=trial.number, state=trial.state.name, values=trial.values, sampled=dict(trial.params),
                       seconds=trial.duration.total_seconds() if trial.duration else 0.0,
                       completed_at=trial.datetime_complete, started_at=trial.datetime_start,
                       constraints=dict(trial.constraints), **ours)


def note(trial: optuna.Trial, **fields: Any) -> None:
    """Record fields of the running trial's TrialRecord (by their names there: `note(trial, seed=3)`)."""
    for key, value in fields.items():
        if key not in RECORDED:
            raise KeyError(f"{key!r} is not a TrialRecord field")
        trial.set_user_attr(key, value)


# Each epoch is its own user attribute, written once: rewriting the whole history every epoch made an append-only
# journal grow with the square of the epochs (every worker, `make studies` and the dashboard replay it on open).
# An entry names the trial that wrote it, because Optuna's heartbeat retry copies a failed trial's attributes
# into the new trial, whose own history starts afresh.
EPOCH_PREFIX = "epoch:"


def note_epoch(trial: optuna.Trial, epoch: int, metrics: dict[str, float]) -> None:
    """Record epoch `epoch` (from 1) of the running trial's history."""
    trial.set_user_attr(f"{EPOCH_PREFIX}{epoch:05d}", {"trial": trial.number, **metrics})


def _epoch_records(trial: optuna.trial.FrozenTrial) -> list[dict[str, float]]:
    keys = sorted(k for k, v in trial.user_attrs.items()
                  if k.startswith(EPOCH_PREFIX) and isinstance(v, dict) and v.get("trial") == trial.number)
    return [{k: v for k, v in trial.user_attrs[key].items() if k != "trial"} for key in keys]


def queue_trial(study: optuna.Study, params: dict[str, Any], **fields: Any) -> None:
    """Queue parameters for the next free worker, with record fields (`baseline`, `retry_of`, `retries`)."""
    unknown = set(fields) - set(RECORDED)
    if unknown:
        raise KeyError(f"{sorted(unknown)} are not TrialRecord fields")
    study.enqueue_trial(params, user_attrs=fields)


def records(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[TrialRecord]:
    return [record_of(t) for t in study.get_trials(deepcopy=False, states=states)]


def record(study: optuna.Study, number: int) -> TrialRecord | None:
    found = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    return record_of(found) if found is not None else None


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def running_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def taken_count(study: optuna.Study) -> int:
    """Finished or running trials: the part of the budget already handed out."""
    return len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))


def leading_best(study: optuna.Study) -> TrialRecord | None:
    """The complete feasible trial (within the study's [constraints]) best on the study's first objective (the
    first completed on ties): the champion of a single-objective study, Optuna's best trial.
    """
    complete = [r for r in records(study, (TrialState.COMPLETE,)) if r.feasible]
    if not complete:
        return None
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    # On ties the first to complete wins: with several workers that need not be the lowest number.
    return min(complete, key=lambda r: (sign * r.values[0], r.completed_at, r.number))


def beats_best(study: optuna.Study, value: float) -> bool:
    """Would a trial with this (first) objective value become the study's best? Ties keep the earlier one."""
    best = leading_best(study)
    if best is None:
        return True
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return value > best.values[0] if maximize else value < best.values[0]


def best_records(study: optuna.Study) -> list[TrialRecord]:
    """Optuna's best trials: the best one, or the Pareto front for several objectives."""
    try:
        return [record_of(t) for t in study.best_trials]
    except ValueError:
        return []


def best_values(study: optuna.Study) -> list[float] | None:
    """The values of the first of Optuna's best trials, if any."""
    best = best_records(study)
    return best[0].values if best else None


# --------------------------------------------------------------------------------------------------
# Optuna's private API, each use wrapped once (tests/test_store.py pins them to the Optuna version)


RUNG_PREFIX = "completed_rung_"  # the system attribute Optuna's successive halving records a trial's rung value in


def hyperband_bracket(pruner: optuna.pruners.HyperbandPruner, study: optuna.Study,
                      trial: optuna.trial.FrozenTrial) -> int:
    """The Hyperband bracket a trial belongs to (pruning.py explains a prune with the bracket's other trials)."""
    return pruner._get_bracket_id(study, trial)


def hyperband_reduction_factor(pruner: optuna.pruners.HyperbandPruner) -> int:
    return pruner._reduction_factor


def fail_trial(study: optuna.Study, number: int, reason: str) -> bool:
    """Fail a trial this process does not run (another's RUNNING trial, or a WAITING one no one should run any
    more) with `reason`; False when someone else finished or failed it first.

    Optuna has no public way to change a trial that this process is not running.
    """
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    try:
        study._storage.set_trial_user_attr(frozen._trial_id, "fail_reason", reason)
        study._storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False
    return True


def requeue_if_queued(trial: optuna.Trial) -> None:
    """A running trial that came from the queue (a baseline, a retry) given back to the queue.

    Call it before the trial suggests anything: until then only a queued trial has params. The parameters
    a queued trial was given are kept in the storage's copy of it; Optuna has no public way to read them
    from a running trial.
    """
    frozen = trial.study._storage.get_trial(trial._trial_id)
    if frozen.params or "fixed_params" in frozen.system_attrs:
        trial.study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
            user_attrs=frozen.user_attrs, system_attrs=frozen.system_attrs))


def take_retries_first(study: optuna.Study) -> None:
    """Make `study` (this process's handle on it) take queued retries before the rest of the queue.

    Optuna takes the waiting trial with the lowest number first, and a retry is queued with a new, higher
    number than the baselines queued when the study started. Here the waiting trials are tried in the order
    retries first (ours: `retry_of`; Optuna's heartbeat retries: `failed_trial`), then by number; each one is
    claimed exactly as Optuna claims it (WAITING -> RUNNING in the storage, which refuses a trial another
    worker claimed first), so several workers never run the same trial.
    """

    def pop_waiting_trial_id() -> int | None:
        waiting = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
        for trial in _retries_first(waiting):
            try:
                if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                    return trial._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    study._pop_waiting_trial_id = pop_waiting_trial_id


def next_waiting(study: optuna.Study) -> TrialRecord | None:
    """The queued trial a process with `take_retries_first` takes next, if any."""
    waiting = _retries_first(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    return record_of(waiting[0]) if waiting else None


def _retries_first(waiting: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return sorted(waiting, key=lambda t: (not _is_retry(t), t.number))


def _is_retry(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.user_attrs.get("retry_of") is not None or "failed_trial" in trial.system_attrs


def requeue(study: optuna.Study, failed: TrialRecord, **fields: Any) -> None:
    """A failed (interrupted, stale) trial's parameters queued again, so the next free worker runs them first
    (`take_retries_first`). The retry carries the first attempt's number and seed: it trains with that seed
    and resumes that attempt's checkpoint, so it ends as the uninterrupted trial would have."""
    carried: dict[str, Any] = {"first_attempt": failed.first_attempt if failed.first_attempt is not None
                               else failed.number}
    if failed.seed is not None:
        carried["seed"] = failed.seed
    if failed.confirmation_of is not None:  # a champion-phase run stays the same repeat of the same trial
        carried |= {"confirmation_of": failed.confirmation_of, "repeat": failed.repeat}
    queue_trial(study, failed.sampled, retry_of=failed.number, **carried, **fields)


def first_attempt(trial: optuna.Trial | optuna.trial.FrozenTrial) -> tuple[int, int | None]:
    """(number, seed) of the trial whose parameters `trial` runs: a retry's first attempt, as `requeue` (or
    Optuna's heartbeat retry, which copies the failed trial's record) queued it; else `trial` itself, no seed yet."""
    queued = trial.user_attrs
    return queued.get("first_attempt", trial.number), queued.get("seed")


# --------------------------------------------------------------------------------------------------
# Study versions and opening


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


def first_pruned_epoch(epochs: int) -> int:
    """The first epoch at which a pruner may stop a trial of `epochs` epochs: half-way through.

    Before it, the learning-rate schedule has not yet annealed (onecycle peaks at 30% of training) and one epoch's
    accuracy ranks close configurations at random: over the four 5-epoch champion-phase runs of cnn's two best
    configurations, epochs 1-3 ranked them against their final accuracy with Spearman -0.6, -0.3 and -0.2, and
    Hyperband's old first rung (epoch 1, keep a third) pruned a near-copy of cnn's best trial.
    """
    return max(1, math.ceil(epochs / 2))


class QuorumHyperband(optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband, except that a rung prunes nothing until `quorum` trials of the bracket have reached it.

    Optuna's rung keeps the best len // reduction_factor of the trials that reached it (at least one), so its
    second and third arrivals go on only if they beat every one before them. In a study that opens with strong
    [[baseline]] trials that pruned every sampled trial: in a 30-minute cnn run a sampled configuration that
    ends at 99.56% elsewhere stood third at its rung, 0.46 points behind the baselines at epoch 3, and stopped.
    With a quorum of 2 x reduction factor a rung halves only once it holds two halves.
    """

    def __init__(self, min_resource: int, max_resource: int, reduction_factor: int):
        super().__init__(min_resource=min_resource, max_resource=max_resource, reduction_factor=reduction_factor)
        self.quorum = 2 * reduction_factor

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if not super().prune(study, trial):  # Optuna's rule; it also records the trial's value at its rung
            return False
        trials = study.get_trials(deepcopy=False)
        judged = last_rung(self, study, trials, next(t for t in trials if t.number == trial.number))
        return judged is not None and len(judged.values) >= self.quorum


@dataclass(frozen=True)
class Rung:
    """The last Hyperband rung a trial was judged at: its number, the trial's bracket, and the values of the
    bracket's trials that reached it (the trial's own among them)."""

    number: int
    bracket: int
    values: list[float]


def last_rung(pruner: optuna.pruners.HyperbandPruner, study: optuna.Study, trials: list[optuna.trial.FrozenTrial],
              trial: optuna.trial.FrozenTrial) -> Rung | None:
    """The last rung `trial` (as stored now) was judged at; None when it reached none."""
    rungs = [int(k.removeprefix(RUNG_PREFIX)) for k in trial.system_attrs if k.startswith(RUNG_PREFIX)]
    if not rungs:
        return None
    key, bracket = f"{RUNG_PREFIX}{max(rungs)}", hyperband_bracket(pruner, study, trial)
    values = [t.system_attrs[key] for t in trials
              if key in t.system_attrs and hyperband_bracket(pruner, study, t) == bracket]
    return Rung(max(rungs), bracket, values)


MEDIAN_STARTUP_TRIALS = 2  # complete trials before the median rule prunes anything (here and in pruning.py)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Hyperband: successive halving (keep the better half, reduction factor 2) from half-way through training,
    each rung judging once 4 trials reached it (`QuorumHyperband`): a 5-epoch study has one rung, at epoch 3, and
    a 20-epoch one two brackets with rungs at 10. Halving rather than keeping a third because a study of
    minutes-long trials has few trials per rung. Median: the median rule from the same epoch, once two trials are
    complete."""
    first = first_pruned_epoch(spec.epochs)
    if spec.pruner == "hyperband":
        return QuorumHyperband(min_resource=first, max_resource=spec.epochs, reduction_factor=2)
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=first)
    return optuna.pruners.NopPruner()


def versions(storage: optuna.storages.BaseStorage, name: str) -> list[int]:
    found = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == name:
            found.append(1)
        elif summary.study_name.startswith(f"{name}-v") and summary.study_name[len(name) + 2:].isdigit():
            found.append(int(summary.study_name[len(name) + 2:]))
    return sorted(found)


def study_name(name: str, version: int) -> str:
    return name if version == 1 else f"{name}-v{version}"


def find_study(spec: StudySpec, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """The study file's current (latest) version; StudyError when it was never run."""
    found = versions(storage, spec.name)
    if not found:
        raise StudyError(f"study {spec.name!r} has not been run yet; run `make search STUDY={spec.name}` first")
    return optuna.load_study(study_name=study_name(spec.name, found[-1]), storage=storage)


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """Study `name` (any version, e.g. cnn-v2); StudyError when the storage does not hold it."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(f"study {name!r} is not in the Optuna storage; check STORAGE") from None


def definition(study: optuna.Study) -> dict[str, Any]:
    """The search definition the study was started with (dataset, val_size, limits, space...)."""
    return study.user_attrs.get("definition", {})


def parent_run_id(study: optuna.Study) -> str | None:
    """The study's MLflow parent run, as recorded by the first process that tracked it (read from the storage)."""
    return study.user_attrs.get(PARENT_RUN_ATTR)


def record_parent_run_id(study: optuna.Study, run_id: str) -> None:
    study.set_user_attr(PARENT_RUN_ATTR, run_id)


REPLAYS_ATTR = "replays"


def record_replay(study: optuna.Study, name: str, matched: bool, epochs: int, differences: list[str]) -> None:
    """What `make replay` of trial `name` ("3", or "3/repeat 1") found, kept with the study for its report."""
    replays = dict(study.user_attrs.get(REPLAYS_ATTR, {}))
    replays[name] = {"matched": matched, "epochs": epochs, "differences": differences[:5],
                     "when": datetime.now(UTC).isoformat(timespec="seconds")}
    study.set_user_attr(REPLAYS_ATTR, replays)


def replays(study: optuna.Study) -> dict[str, dict[str, Any]]:
    return study.user_attrs.get(REPLAYS_ATTR, {})


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage, fresh: bool = False,
               log: Callable[[str], None] = print, on_create: Callable[[optuna.Study], None] = lambda study: None,
               sampler_salt: str = "") -> optuna.Study:
    """Create or resume the study's current version; FRESH starts the next version.

    Safe when several processes start at once: creating a study is atomic in the storage, the loser
    resumes it, and the creator sets the `fingerprint` attribute last, after queueing the baselines
    and running `on_create` (which opens the MLflow parent run), so whoever sees the fingerprint sees
    a fully set-up study. A resumed study's sampler is reseeded from the finished count, so it does not
    replay its opening suggestions; `sampler_salt` tells parallel workers' samplers apart (the same seed
    would make them suggest the same parameters).
    """
    found = versions(storage, spec.name)
    version = (found[-1] + 1 if fresh else found[-1]) if found else 1
    name = study_name(spec.name, version)
    if not found or fresh:
        try:
            study = optuna.create_study(study_name=name, storage=storage, directions=spec.directions,
                                        sampler=make_sampler(spec, studies.derive_seed(spec.seed, 0)),
                                        pruner=make_pruner(spec))
        except optuna.exceptions.DuplicatedStudyError:  # another process created it a moment ago: join it
            pass
        else:
            study.set_user_attr("definition", spec.search_definition())
            study.set_user_attr("study_file", spec.name)
            study.set_user_attr("version", version)
            log(f"new study {name!r}" + (f" (FRESH=1: earlier versions kept: {found})" if fresh else ""))
            _enqueue_new_baselines(spec, study, log)
            on_create(study)
            study.set_user_attr("fingerprint", spec.fingerprint())  # last: the study is ready
            return study
    study = optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(spec))
    _check_fingerprint(spec, study, version, log)
    done = finished_count(study)
    study.sampler = make_sampler(spec, studies.derive_seed(spec.seed, done, *filter(None, [sampler_salt])))
    log(f"resuming study {name!r}: {done} of {spec.trials} trials finished")
    _enqueue_new_baselines(spec, study, log)
    return study


def _check_fingerprint(spec: StudySpec, study: optuna.Study, version: int, log: Callable[[str], None]) -> None:
    """The study file must still define the search the study started with."""
    recorded = _wait_for_fingerprint(study)
    if recorded is None:  # its creator stopped before finishing the set-up: finish it
        log(f"study {study.study_name!r} was left half set up by a process that stopped; completing its set-up")
        study.set_user_attr("definition", spec.search_definition())
        study.set_user_attr("fingerprint", recorded := spec.fingerprint())
    if recorded != spec.fingerprint():
        what = _changes(definition(study), spec.search_definition())
        raise StudyError(
            f"studies/{spec.name}.toml changed since study {study.study_name!r} started ({what}); "
            f"run again with FRESH=1 to start {study_name(spec.name, version + 1)!r} (the old study is kept), "
            "or undo the change to resume"
        )


def _wait_for_fingerprint(study: optuna.Study, seconds: float = FINGERPRINT_WAIT_SECONDS) -> str | None:
    """A study another process is still setting up has no fingerprint yet; give it a moment."""
    deadline = time.monotonic() + seconds
    while study.user_attrs.get("fingerprint") is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return study.user_attrs.get("fingerprint")


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


def _enqueue_new_baselines(spec: StudySpec, study: optuna.Study, log: Callable[[str], None]) -> None:
    """Enqueue each baseline once per study, even when the file gains baselines between runs."""
    enqueued = list(study.user_attrs.get("enqueued_baselines", []))
    for baseline in spec.baseline:
        key = json.dumps(baseline, sort_keys=True)
        if key not in enqueued:
            queue_trial(study, space.enqueue_form(spec, baseline), baseline=True)
            enqueued.append(key)
            log(f"baseline trial queued: {key}")
    study.set_user_attr("enqueued_baselines", enqueued)


def baseline_params(spec: StudySpec) -> dict[str, Any]:
    """The full params dict of the study's first baseline trial (for `make train STUDY=...`)."""
    if not spec.baseline:
        raise StudyError(f"studies/{spec.name}.toml has no [[baseline]] trial to train")
    return space.suggest(spec, optuna.trial.FixedTrial(space.enqueue_form(spec, spec.baseline[0])))


@dataclass(frozen=True)
class StudyState:
    """One study file's standing, for `make studies`."""

    name: str  # its current version's name (the file's name when not started)
    file: str
    done: int
    trials: int
    best: list[float] | None
    state: str  # not started, running, done, resumable


def study_states(studies_dir: Path, storage_override: str | None = None) -> list[StudyState]:
    states = []
    for name in studies.available(studies_dir):
        spec = studies.load(name, studies_dir)
        try:
            study = find_study(spec, open_storage(storage_override, name).backend)
        except StudyError:
            states.append(StudyState(name, f"{name}.toml", 0, spec.trials, None, "not started"))
            continue
        done = finished_count(study)
        state = "running" if running_count(study) else ("done" if done >= spec.trials else "resumable")
        states.append(StudyState(study.study_name, f"{name}.toml", done, spec.trials, best_values(study), state))
    return states
