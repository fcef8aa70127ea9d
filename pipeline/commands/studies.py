"""The study files as `make studies` and `make train STUDY=...` see them: where each one stands in its storage,
and the full params of its first baseline trial. Torch-free: `make studies` answers in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from pipeline import store
from pipeline.spec import space, studies
from pipeline.spec.studies import StudyError, StudySpec


def study_states(studies_dir: Path, storage_override: str | None = None) -> list[store.StudyState]:
    """Each study file's current version: its trials done, best values and whether it runs, is done or resumes.
    Each store is opened once, and a default store that does not exist is not made."""
    states = []
    storages = store.open_storages(storage_override)
    for name in studies.available(studies_dir):
        spec = studies.load(name, studies_dir)
        study = next((found for found in (_find(spec, storage) for storage in storages) if found), None)
        if study is None:
            states.append(store.StudyState(name, f"{name}.toml", 0, spec.trial_budget, None, "not started"))
            continue
        done = store.finished_count(study)
        minutes = None
        if spec.minutes is not None:  # planned: done when its minutes are spent (bar the last minute's reserve)
            minutes = (float(study.user_attrs.get(store.SPENT_ATTR, 0.0)), spec.minutes)
            finished = minutes[0] >= spec.minutes - 1
        else:
            finished = done >= spec.trial_budget
        state = "running" if store.running_count(study) else ("done" if finished else "resumable")
        states.append(store.StudyState(study.study_name, f"{name}.toml", done, spec.trial_budget,
                                       store.best_values(study), state, minutes))
    return states


def _find(spec: StudySpec, storage: store.Storage) -> optuna.Study | None:
    """The study file's current version in `storage`, None when it is not there (storage_url's order decides
    between the default stores: SQLite first)."""
    try:
        return store.find_study(spec, storage.backend)
    except StudyError:
        return None


def baseline_params(spec: StudySpec) -> dict[str, Any]:
    """The full params dict of the study's first baseline trial (for `make train STUDY=...`)."""
    if not spec.baseline:
        raise StudyError(f"studies/{spec.name}.toml has no [[baseline]] trial to train")
    return space.suggest(spec, optuna.trial.FixedTrial(space.enqueue_form(spec, spec.baseline[0])))
