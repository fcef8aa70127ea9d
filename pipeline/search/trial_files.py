"""The trials' checkpoint files: where a study's trials keep them, and the sweep of those no trial will resume.

Each trial checkpoints at every epoch boundary. A trial that is interrupted, or whose process dies, is queued again
with its seed and the number of its first attempt, and the retry resumes that attempt's checkpoint: it ends
exactly as the uninterrupted trial would have. A trial that ends for good (complete, pruned, failed) removes its
checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline import store
from pipeline.search.events import Listener

SWEEP_GRACE = timedelta(hours=1)  # a failed trial's checkpoint is kept this long for its retry to be queued
_CHECKPOINT_NAME = re.compile(r"trial-(?P<first>\d+)\.pt")  # checkpoint_path's names



def checkpoint_folder(studies_dir: Path, storage_url: str, study_name: str) -> Path:
    """Where the trials of study `study_name` in the store at `storage_url` keep their checkpoints.

    Keyed by the store as well as the study: two stores may hold studies of one name (a local file and PostgreSQL,
    a test's store), and each sweeps only its own folder. The default stores keep studies/checkpoints/<study>/."""
    key = store.storage_key(storage_url)
    return studies_dir / "checkpoints" / study_name if key is None else studies_dir / "checkpoints" / key / study_name


def adopt_unkeyed(checkpoint: Path) -> None:
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
    if folder is None:
        return []
    try:
        names = os.listdir(folder)
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
        remove_checkpoint(path)
    if orphans:
        listener.warning(f"removed {len(orphans)} checkpoint(s) no trial will resume: "
                         f"{', '.join(path.name for path in orphans)}")
    return orphans


def remove_checkpoint(checkpoint: Path | None) -> None:
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
