"""The data a study's trials saw, from its recorded definition: one recipe, so that a search, a replay and an
export all prepare the very same split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.data import loading
from pipeline.data.arrays import Arrays
from pipeline.spec import studies
from pipeline.spec.sources import DEFAULT_VAL_SIZE, DatasetRef
from pipeline.spec.studies import StudySpec


def recorded_data(definition: dict[str, Any], root: Path, device: torch.device | str = "cpu",
                  resident_bytes: int | None = None) -> loading.PreparedData:
    """The data of a study's trials, from its search definition (as recorded, or a study file's).

    Older records lack `val_size`: they were made with the default. A folder's is None (its val_fraction decides).
    """
    dataset, val_size = _recorded_source(definition)
    return loading.prepare(dataset, root, device, val_size=val_size,
                           train_limit=definition.get("train_limit"), val_limit=definition.get("val_limit"),
                           resident_bytes=resident_bytes)


def recorded_test_split(definition: dict[str, Any],
                        root: Path) -> tuple[DatasetRef, loading.ResidentImages, Arrays]:
    """The dataset of a study's trials, its untouched test split on the CPU (normalised with the statistics of the
    training split the trials saw), and the arrays it came from: `loading.test_split`, for exports."""
    dataset, val_size = _recorded_source(definition)
    test, arrays = loading.test_split(dataset, root, "cpu", val_size=val_size)
    return dataset, test, arrays


def _recorded_source(definition: dict[str, Any]) -> tuple[DatasetRef, int | None]:
    """The dataset a search definition names, and the size of the validation split carved from its training split."""
    return studies.dataset_ref(definition["dataset"]), definition.get("val_size", DEFAULT_VAL_SIZE)


def study_data(spec: StudySpec, root: Path, device: torch.device | str) -> loading.PreparedData:
    """The data of the study file's trials (what a search trains on)."""
    return recorded_data(spec.search_definition(), root, device)
