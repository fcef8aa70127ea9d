"""Retrain a recorded trial from its params and seed: `make replay` compares every recorded metric, and
export retrains a champion that has no registered model.

The data its trials saw comes from data/recorded.py, the same recipe a search and an export use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from pipeline import store
from pipeline.data import loading
from pipeline.data.recorded import study_data
from pipeline.search import champion, fidelity
from pipeline.search.objective import HISTORY_KEYS, history_record
from pipeline.spec import hparams
from pipeline.spec.studies import StudyError, StudySpec
from pipeline.training import train
from pipeline.training.device import legacy_memory_format, pick_device


@dataclass
class ReplayOutcome:
    trial_number: int
    epochs: int
    differences: list[str]
    repeat: int | None = None  # the champion-phase run replayed, if one was


def replay_trial(spec: StudySpec, storage_override: str | None, trial_number: int, root: Path,
                 device: str = "auto", threads: int | None = None, repeat: int | None = None,
                 rung: int | None = None) -> ReplayOutcome:
    """`make replay`: retrain trial `trial_number` of the study's current version (with `repeat`, that champion-phase
    run of its configuration; with `rung`, a planned search's run of it at that rung); list every metric that
    differs. A run of a planned search trains on its rung's subset of the training split, as it did."""
    storage = store.open_storage(storage_override, spec.name)
    study = store.find_study(spec, storage.backend)
    if repeat == 0 and not champion.planned_rungs(study):
        repeat = None  # an unplanned study's repeat 0 is the search's own trial
    if repeat is not None:
        record, what = _companion_run(storage, study, trial_number, repeat, champion.COMPANION), f"/repeat {repeat}"
    elif rung:
        record, what = _companion_run(storage, study, trial_number, 0, champion.rung_suffix(rung)), f"/rung {rung}"
    else:
        record, what = _finished_trial(study, trial_number), ""
    prepared = study_data(spec, root, pick_device(device))
    loading.require_digest(record.dataset_digest, prepared.checksum, trial_number, prepared.dataset,
                        "restore the pictures it was trained on to replay it")
    outcome = compare(record, prepared, threads)
    outcome.repeat = repeat
    store.record_replay(study, f"{trial_number}{what}", not outcome.differences, outcome.epochs, outcome.differences)
    return outcome


def _finished_trial(study: optuna.Study, number: int) -> store.TrialRecord:
    record = store.record(study, number)
    if record is None or not record.finished or not record.history:
        finished = [r.number for r in store.records(study, store.FINISHED)]
        raise StudyError(f"trial {number} of study {study.study_name!r} is not a finished trial with "
                         f"recorded metrics; finished trials: {finished or 'none'}")
    return record


def _companion_run(storage: store.Storage, study: optuna.Study, number: int, repeat: int,
                   suffix: str) -> store.TrialRecord:
    """The completed run `repeat` of trial `number`'s configuration in the companion study `suffix` names: the
    champion phase's, or a planned search's rung's."""
    companion = champion.find_companion(storage.backend, study.study_name, suffix)
    runs = store.records(companion, (optuna.trial.TrialState.COMPLETE,)) if companion is not None else []
    found = next((r for r in runs if (r.confirmation_of, r.repeat) == (number, repeat)), None)
    if found is None:
        if suffix == champion.COMPANION:
            done = sorted(f"TRIAL={r.confirmation_of} REPEAT={r.repeat}" for r in runs)
            what = f"champion-phase run REPEAT={repeat}"
        else:
            done = sorted(f"TRIAL={r.confirmation_of} RUNG={suffix.removeprefix(':rung')}" for r in runs)
            what = f"run at RUNG={suffix.removeprefix(':rung')}"
        raise StudyError(f"study {study.study_name!r} has no completed {what} of trial {number}; completed ones: "
                         f"{', '.join(done) or 'none'}")
    return found


def compare(record: store.TrialRecord, prepared: loading.PreparedData, threads: int | None = None) -> ReplayOutcome:
    """Retrain the trial and compare its per-epoch history with the recorded one, value by value."""
    recorded = record.history
    replayed: list[dict[str, float]] = []

    def collect(metrics: train.EpochMetrics) -> bool:
        replayed.append(history_record(metrics))
        return len(replayed) >= len(recorded)  # a pruned trial stopped early: stop at the same epoch

    # Float sums depend on the thread count: by default, use the one the trial ran with.
    params, seed = as_trained(record)
    train.fit(params, trained_on(record, prepared), callbacks=[collect], seed=seed, threads=threads or record.threads,
              memory_format=layout_of(record))
    differences = []
    for epoch, (old, new) in enumerate(zip(recorded, replayed, strict=False), start=1):
        for key in HISTORY_KEYS:
            if old.get(key) != new.get(key):
                differences.append(f"epoch {epoch} {key}: recorded {old.get(key)!r}, replayed {new.get(key)!r}")
    if len(recorded) != len(replayed):
        differences.append(f"epochs: recorded {len(recorded)}, replayed {len(replayed)}")
    return ReplayOutcome(record.number, len(replayed), differences)


def retrain(record: store.TrialRecord, prepared: loading.PreparedData,
            on_epoch: Any = lambda metrics: None) -> train.TrainResult:
    """Train the trial's model again from its recorded params and seed (on the thread count it ran with)."""
    params, seed = as_trained(record)
    return train.fit(params, trained_on(record, prepared), callbacks=[on_epoch], seed=seed, threads=record.threads,
                     memory_format=layout_of(record))


def layout_of(record: store.TrialRecord) -> str | None:
    """The memory layout the run trained in: as recorded, else the one runs had before it was (bf16 and CUDA in
    channels_last, fp32 on a CPU in NCHW), so that an older run still replays bit for bit. None: nothing recorded at
    all (the trainer's own choice)."""
    if record.memory_format is not None:
        return record.memory_format
    if record.precision is None or record.device is None:
        return None
    return legacy_memory_format(record.precision, record.device)


def trained_on(record: store.TrialRecord, prepared: loading.PreparedData) -> loading.PreparedData:
    """The data the run trained on: a planned search's rung's subset of the training split, else all of it."""
    return fidelity.recorded_data(record.fidelity, record.split_hash, prepared, f"trial {record.number}")


def as_trained(record: store.TrialRecord) -> tuple[dict[str, Any], int]:
    """The trial's params with the precision it trained in ("auto" may mean another one on this machine, or under
    PIPELINE_PRECISION, and bf16 and fp32 round differently) and the batch it evaluated at, and its seed."""
    if record.params is None or record.seed is None:  # every trained trial records both before training
        raise StudyError(f"trial {record.number} has no recorded params and seed: it cannot be trained again")
    params = record.params | {"precision": record.precision} if record.precision else record.params
    if "eval_batch_size" not in params:  # the default then, which the record keeps since it was recorded
        params = params | {"eval_batch_size": record.eval_batch_size or hparams.LEGACY_EVAL_BATCH_SIZE}
    return params, record.seed
