"""A study file's versions in the storage: finding, loading and opening them (FRESH=1 starts the next), the
fingerprint that refuses a changed study file, the baselines queued once per study, and what a study records of
itself (its search definition, MLflow parent run and replays)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import optuna

from pipeline.spec import space, studies
from pipeline.spec.studies import StudyError, StudySpec
from pipeline.store.samplers import make_pruner, make_sampler
from pipeline.store.trial_queue import queue_trial
from pipeline.store.trial_records import TrialNotes, finished_count

PARENT_RUN_ATTR = "mlflow_parent_run_id"
REPLAYS_ATTR = "replays"
PLAN_ATTR = "plan"  # a planned search's plan (search/plan.py's Plan.as_dict)
SPENT_ATTR = "minutes_spent"  # ...and the minutes its invocations have spent so far
FINGERPRINT_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class StudyState:
    """One study file's standing, for `make studies`."""

    name: str  # its current version's name (the file's name when not started)
    file: str
    done: int
    trials: int
    best: list[float] | None
    state: str  # not started, running, done, resumable
    minutes: tuple[float, float] | None = None  # a planned study's (spent, planned)

    @property
    def progress(self) -> str:
        """`12/20` trials, or a planned study's `69 configs, 29.6/30 min`."""
        if self.minutes is None:
            return f"{self.done}/{self.trials}"
        return f"{self.done} configs, {self.minutes[0]:.1f}/{self.minutes[1]:g} min"


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
    """Create or resume the study's current version, with the study file's sampler and pruner (samplers.py);
    FRESH starts the next version.

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
    log(f"resuming study {name!r}: {done} of {spec.trial_budget} trials finished")
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
    changed: list[str] = []
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
            queue_trial(study, space.enqueue_form(spec, baseline), TrialNotes(baseline=True))
            enqueued.append(key)
            log(f"baseline trial queued: {key}")
    study.set_user_attr("enqueued_baselines", enqueued)

