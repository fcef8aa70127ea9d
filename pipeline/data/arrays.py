"""A dataset as CPU tensors (`Arrays`): landed if needed (every file verified), read, and its test split known.

IDX datasets are read whole from their files; CIFAR and the user's folders from the memory-mapped image cache,
where a folder without a test/ split has one carved, stratified and seeded, the same for every study of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data import cifar, datasets, folders, imagecache, landing
from pipeline.data.images import Preprocessing
from pipeline.data.splits import stratified_split
from pipeline.infra.text import print_to_stderr
from pipeline.spec import sources
from pipeline.spec.errors import DataError
from pipeline.spec.paths import DATA_ROOT, PROJECT_ROOT
from pipeline.spec.sources import CIFAR_DATASETS, DIGITS, DatasetRef, FolderSource

TEST_SPLIT_SEED = 1000  # carving a folder's test split: fixed, so every study of the folder holds out the same


@dataclass(frozen=True)
class Arrays:
    """A dataset as CPU tensors: images uint8 [N, C, H, W] (memory-mapped for cached sources), labels int64 [N].

    `train_rows` and `test_rows` say which images form the training file and the test split;
    `given_val` lists the training images (positions in `train_rows`) that the source itself assigned to
    validation, or is None when the pipeline carves the validation split.
    """

    images: torch.Tensor
    labels: torch.Tensor
    train_rows: torch.Tensor
    test_rows: torch.Tensor
    classes: tuple[str, ...]
    checksum: str  # the dataset digest recorded with every result
    preprocessing: Preprocessing
    source: str  # where the images came from, for records
    given_val: torch.Tensor | None = None
    memory_mapped: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        channels, height, width = self.images.shape[1:]
        return channels, height, width

    @property
    def train_labels(self) -> torch.Tensor:
        return self.labels[self.train_rows]

    @property
    def train_images(self) -> torch.Tensor:
        return self.images[self.train_rows]


def load_arrays(dataset: DatasetRef, root: Path = DATA_ROOT, log: Callable[[str], None] = print_to_stderr) -> Arrays:
    """Land the dataset if needed (verifying every file) and read it as tensors.

    A missing dataset is fetched from its sources; a corrupt file raises DataError naming it.
    """
    if isinstance(dataset, FolderSource):
        return _from_cache(folders.land_folder(dataset, PROJECT_ROOT, root, log), dataset.test_fraction)
    if dataset in CIFAR_DATASETS:
        return _from_cache(cifar.land_cifar(dataset, root, log))
    return _from_idx(dataset, root)


def _from_idx(name: str, root: Path) -> Arrays:
    info = sources.dataset_info(name)
    landing.land(name, root)
    raw = info.raw_dir(root)

    def tensor(file_name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(datasets.read_idx(raw / file_name).copy()).to(dtype)

    train_images, test_images = tensor(sources.TRAIN_IMAGES, torch.uint8), tensor(sources.TEST_IMAGES, torch.uint8)
    n_train, n_test = len(train_images), len(test_images)
    return Arrays(
        images=torch.cat([train_images, test_images]).unsqueeze(1),
        labels=torch.cat([tensor(sources.TRAIN_LABELS, torch.int64), tensor(sources.TEST_LABELS, torch.int64)]),
        train_rows=torch.arange(n_train),
        test_rows=torch.arange(n_train, n_train + n_test),
        classes=info.classes,
        checksum=info.checksum,
        preprocessing=Preprocessing(28, "gray", name if name in DIGITS else "photo"),
        source=str(raw),
    )


def _from_cache(cached: imagecache.CachedImages, test_fraction: float = 0.1) -> Arrays:
    """Training rows: the given train (+ val) images, or all but the carved test split; test rows likewise."""
    labels = torch.from_numpy(cached.labels)
    split = torch.from_numpy(cached.split.astype(np.int64))
    carve = torch.nonzero(split == imagecache.CARVE).flatten()
    given_val = None
    if len(carve):
        test_size = max(len(torch.unique(labels[carve])), round(test_fraction * len(carve)))
        carved = stratified_split(labels[carve], test_size, TEST_SPLIT_SEED, what="test split")
        train_rows, test_rows = carve[carved.train_indices], carve[carved.val_indices]
    else:
        train_rows = torch.nonzero((split == imagecache.TRAIN) | (split == imagecache.VAL)).flatten()
        test_rows = torch.nonzero(split == imagecache.TEST).flatten()
        given = torch.nonzero(split[train_rows] == imagecache.VAL).flatten()
        given_val = given if len(given) else None
    if len(test_rows) == 0:
        raise DataError(f"{cached.manifest['source']}: the test split is empty; add pictures to test/ "
                        "(or remove test/ to let the pipeline carve one)")
    return Arrays(
        images=torch.from_numpy(cached.images), labels=labels, train_rows=train_rows, test_rows=test_rows,
        classes=cached.classes, checksum=cached.digest, preprocessing=Preprocessing(**cached.manifest["preprocessing"]),
        source=cached.manifest["source"], given_val=given_val, memory_mapped=True,
    )
