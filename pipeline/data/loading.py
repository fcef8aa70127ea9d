"""From landed datasets to device-resident batches.

A study names a built-in dataset (`mnist`, `fashion-mnist`: IDX files; `cifar10`, `cifar100`: the
decoded-image cache) or its own folder (`folders.FolderSource`, decoded once into the cache). Either way
the images arrive as uint8 [N, C, H, W]. The whole split lives on the device as uint8 (MNIST's 60,000
images are 47 MB); each batch is a slice of that tensor, converted, augmented (augment.py) and
normalised on the device with batched tensor math. A split too large for the device (or, on the CPU, for
this process's share of the memory the host can still give: `memory.memory_budget`) stays memory-mapped in the
cache and each batch is gathered from it instead.
There is no DataLoader and no per-sample Python. All randomness (epoch permutations, augmentation
parameters) is drawn from one seeded CPU `torch.Generator`, so the same seed gives the same batches bit
for bit on any device; only the small parameter tensors travel to the device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data import datasets, imagecache
from pipeline.data.arrays import Arrays, load_arrays, print_to_stderr
from pipeline.data.augment import Augment, NaturalAugment
from pipeline.data.images import Preprocessing
from pipeline.data.splits import (
    DEFAULT_SPLIT_SEED,
    Split,
    seeded_subset,
    split_hash,
    stratified_split,
    stratified_subset,
    subset_hash,
)
from pipeline.infra import memory
from pipeline.infra.fileio import write_atomic
from pipeline.infra.text import byte_size
from pipeline.spec import sources
from pipeline.spec.errors import DataError
from pipeline.spec.paths import DATA_ROOT
from pipeline.spec.sources import DEFAULT_VAL_SIZE, DatasetRef, FolderSource, dataset_label

DEVICE_MEMORY_SHARE = 0.5  # on a GPU: of its free memory


# --------------------------------------------------------------------------------------------------
# Device-resident batches


def _batches(split: ResidentImages | FeatureSplit, batch_size: int, generator: torch.Generator | None = None,
             augment: Augment | NaturalAugment | None = None,
             drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs, labels) batches; shuffled when a generator is given, in order otherwise."""
    n = len(split)
    order = torch.randperm(n, generator=generator).to(split.device) if generator is not None else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
        yield split.inputs(index, augment, generator), split.labels[index]


class FeatureSplit:
    """A split whose images were replaced by fixed features [N, D] (a frozen backbone's), batched the same way."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels, self.device = features, labels, features.device

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, index: torch.Tensor | slice, augment: Augment | NaturalAugment | None,
               generator: torch.Generator | None) -> torch.Tensor:
        return self.features[index]  # fixed features: never augmented

    batches = _batches


class ResidentImages:
    """One split as uint8 [N, C, H, W], served as normalised float batches.

    Resident (the default): the split is copied to the device once and batches are slices of it.
    Streamed (`rows` given): `images` is the whole memory-mapped cache on the CPU; each batch gathers its
    rows from it and moves them to the device. Either way the arithmetic is the same batched tensor math.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float | tuple[float, ...],
                 std: float | tuple[float, ...], device: torch.device | str = "cpu", rows: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.dim() not in (3, 4):
            raise DataError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.dim() == 3:
            images = images.unsqueeze(1)  # [N, H, W]: one channel
        self.device = torch.device(device)
        self.rows = rows
        self.images = images if rows is not None else images.to(self.device)
        self.labels = labels.to(self.device)
        self.mean = tuple(mean) if isinstance(mean, tuple | list) else (float(mean),)
        self.std = tuple(std) if isinstance(std, tuple | list) else (float(std),)
        if len(self.mean) != images.shape[1] or len(self.std) != images.shape[1]:
            raise DataError(f"{images.shape[1]} channel(s) but mean/std for {len(self.mean)}")
        # One channel keeps plain float arithmetic (as results recorded before per-channel statistics);
        # several use a [1, C, 1, 1] tensor.
        self._mean = self.mean[0] if len(self.mean) == 1 else torch.tensor(self.mean).view(1, -1, 1, 1).to(self.device)
        self._std = self.std[0] if len(self.std) == 1 else torch.tensor(self.std).view(1, -1, 1, 1).to(self.device)

    @property
    def streamed(self) -> bool:
        return self.rows is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        channels, height, width = self.images.shape[1:]
        return channels, height, width

    def __len__(self) -> int:
        return len(self.labels)

    def uint8(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The split's uint8 images at `index` (positions in this split), on the device."""
        if self.rows is None:
            return self.images[index]
        rows = self.rows[index.cpu() if isinstance(index, torch.Tensor) else index]
        return self.images[rows].to(self.device, non_blocking=True)

    def to_float(self, images_uint8: torch.Tensor, augment: Augment | NaturalAugment | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        x = images_uint8.to(torch.float32).div_(255.0)
        if augment is not None:
            x = augment.apply(x, generator)
        return x.sub_(self._mean).div_(self._std)

    def inputs(self, index: torch.Tensor | slice, augment: Augment | NaturalAugment | None,
               generator: torch.Generator | None) -> torch.Tensor:
        return self.to_float(self.uint8(index), augment, generator)

    def subset(self, positions: torch.Tensor) -> ResidentImages:
        """The images at `positions` of this split, placed as this split is (resident or streamed)."""
        if self.rows is not None:
            return ResidentImages(self.images, self.labels.cpu()[positions], self.mean, self.std, self.device,
                                  rows=self.rows[positions])
        index = positions.to(self.device)
        return ResidentImages(self.images[index], self.labels[index], self.mean, self.std, self.device)

    batches = _batches


@dataclass
class PreparedData:
    """Everything a trainer needs from a dataset, plus the provenance recorded with results."""

    dataset: str
    classes: tuple[str, ...]
    train: ResidentImages
    val: ResidentImages
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checksum: str  # the dataset digest
    split_hash: str
    preprocessing: Preprocessing  # how a picture becomes an image of this dataset (predict does the same)
    default_augment_policy: str  # what augment_policy = "auto" means here
    source: str  # where the images came from, for records
    test_count: int  # images in the test split (never read here)
    placement_reason: str = ""  # why the splits are resident or streamed ("" when the caller chose)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.shape

    @property
    def mode(self) -> str:
        return "streamed from the memory-mapped cache" if self.train.streamed else "resident"

    @property
    def placement(self) -> str:
        """`mode` and why: "streamed from the memory-mapped cache (the split's 300.0 MB exceeds ...)"."""
        return f"{self.mode} ({self.placement_reason})" if self.placement_reason else self.mode

    def augment_policy(self, requested: str) -> str:
        return self.default_augment_policy if requested == "auto" else requested

    def training_subset(self, size: int | None, seed: int) -> PreparedData:
        """The same data with `size` of its training images (stratified, seeded: `splits.stratified_subset`) and
        the subset's hash as its split hash; itself when `size` is None or covers the training split."""
        if size is None or size >= len(self.train):
            return self
        positions = stratified_subset(self.train.labels, size, seed)
        return dataclasses.replace(self, train=self.train.subset(positions),
                                   split_hash=subset_hash(self.split_hash, positions))


def channel_stats(images: torch.Tensor, rows: torch.Tensor,
                  chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of pixel/255 over `images[rows]`, exact (histograms of the 256
    levels), read in chunks so a memory-mapped dataset is never loaded whole."""
    channels = images.shape[1]
    counts = np.zeros((channels, 256), dtype=np.float64)
    for start in range(0, len(rows), chunk):
        block = images[rows[start:start + chunk]].numpy()
        for c in range(channels):
            counts[c] += np.bincount(block[:, c].ravel(), minlength=256)
    means, stds = zip(*(datasets.histogram_stats(counts[c]) for c in range(channels)), strict=True)
    return tuple(means), tuple(stds)


def _cached_stats(arrays: Arrays, rows: torch.Tensor, root: Path,
                  key: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Training-split statistics of a cached dataset, kept beside the cache (keyed by the split)."""
    path = imagecache.cache_dir(root, arrays.checksum) / f"stats-{key}.json"
    try:
        cached = json.loads(path.read_text())
        return tuple(cached["mean"]), tuple(cached["std"])
    except (OSError, ValueError, KeyError):
        pass
    mean, std = channel_stats(arrays.images, rows)
    write_atomic(path, json.dumps({"mean": mean, "std": std}).encode())
    return mean, std


def _placement(nbytes: int, device: torch.device, resident_bytes: int | None, processes: int) -> tuple[bool, str]:
    """Whether a split of `nbytes` stays resident on `device`, and why (shown; empty when the caller chose)."""
    if resident_bytes is not None:
        return nbytes <= resident_bytes, ""
    if device.type == "cuda":
        free, sharing = torch.cuda.mem_get_info(device)[0], memory.gpu_workers()
        budget = int(free * DEVICE_MEMORY_SHARE / sharing)  # workers on one GPU start together: each its part
        why = f"{DEVICE_MEMORY_SHARE:.0%} of the GPU's {byte_size(free)} free" + (
            f", split among the {sharing} workers on it" if sharing > 1 else "")
    else:
        host = memory.memory_budget(processes)
        budget, why = host.bytes, str(host)
    fits = nbytes <= budget
    return fits, f"the split's {byte_size(nbytes)} {'fits in' if fits else 'exceeds'} {byte_size(budget)}: {why}"


def prepare(dataset: DatasetRef, root: Path = DATA_ROOT, device: torch.device | str = "cpu",
            val_size: int | None = DEFAULT_VAL_SIZE, split_seed: int = DEFAULT_SPLIT_SEED,
            train_limit: int | None = None, val_limit: int | None = None, resident_bytes: int | None = None,
            log: Callable[[str], None] = print_to_stderr, processes: int | None = None) -> PreparedData:
    """Verify, load, split and place a dataset on `device`; limits take seeded subsets for quick runs.

    `val_size` None: a folder's `val_fraction`. The training and validation splits stay resident while
    together they fit in `resident_bytes` (default: on a CPU `memory.memory_budget(processes)`, RAM_SHARE of the
    memory still available split among the host's `processes` workers; half the free memory on a GPU); beyond
    that batches stream from the memory-mapped cache. `processes` None: as many as the coordinator started
    (memory.HOST_WORKERS_ENV); a worker then logs where its data went, which its coordinator shows.
    """
    worker = processes is None and memory.HOST_WORKERS_ENV in os.environ
    processes = memory.host_workers() if processes is None else processes
    prepared = _prepare(load_arrays(dataset, root, log), dataset, root, torch.device(device), val_size, split_seed,
                        train_limit, val_limit, resident_bytes, processes)
    if worker:
        log(f"data {prepared.placement}")
    return prepared


def _prepare(arrays: Arrays, dataset: DatasetRef, root: Path, device: torch.device, val_size: int | None,
             split_seed: int, train_limit: int | None, val_limit: int | None,
             resident_bytes: int | None, processes: int = 1) -> PreparedData:
    train_labels = arrays.train_labels
    if arrays.given_val is not None:  # the source's own validation split (folder val/)
        is_val = torch.zeros(len(train_labels), dtype=torch.bool)
        is_val[arrays.given_val] = True
        given_train = torch.nonzero(~is_val).flatten()
        split = Split(given_train, arrays.given_val, split_hash(given_train, arrays.given_val))
    else:
        if val_size is None:
            fraction = dataset.val_fraction if isinstance(dataset, FolderSource) else 0.1
            val_size = max(len(arrays.classes), round(fraction * len(train_labels)))
        split = stratified_split(train_labels, val_size, split_seed)
    train_idx = seeded_subset(split.train_indices, train_limit, split_seed + 1)
    val_idx = seeded_subset(split.val_indices, val_limit, split_seed + 2)
    idx = isinstance(dataset, str) and dataset in sources.DATASETS
    mean: tuple[float, ...]
    std: tuple[float, ...]
    if isinstance(dataset, str) and idx:
        # The IDX datasets' statistics cover the whole training file, as they always have (recorded results).
        file_mean, file_std = datasets.normalisation_stats(sources.dataset_info(dataset), root)
        mean, std = (file_mean,), (file_std,)
    else:
        mean, std = _cached_stats(arrays, arrays.train_rows[split.train_indices], root, split.hash)
    train_rows, val_rows = arrays.train_rows[train_idx], arrays.train_rows[val_idx]
    image_bytes = math.prod(arrays.shape)
    # Decided after the dataset is loaded (an IDX file is read whole), so what it took is no longer available.
    resident, why = _placement((len(train_rows) + len(val_rows)) * image_bytes, device, resident_bytes, processes)

    def place(rows: torch.Tensor) -> ResidentImages:
        if resident:
            return ResidentImages(arrays.images[rows], arrays.labels[rows], mean, std, device)
        return ResidentImages(arrays.images, arrays.labels[rows], mean, std, device, rows=rows)

    label = dataset_label(dataset)
    return PreparedData(
        dataset=label,
        classes=arrays.classes,
        train=place(train_rows),
        val=place(val_rows),
        mean=mean,
        std=std,
        checksum=arrays.checksum,
        # Subsets change what was trained on, so they change the recorded hash too.
        split_hash=split.hash if (train_limit, val_limit) == (None, None) else split_hash(train_idx, val_idx),
        preprocessing=arrays.preprocessing,
        # IDX files hold digit-like images (MNIST, Fashion-MNIST, the tests' own): the affine that never flips.
        default_augment_policy="digits" if idx else "natural",
        source=arrays.source,
        test_count=len(arrays.test_rows),
        placement_reason=why,
    )


def require_digest(recorded: str | None, actual: str, trial_number: int, dataset: str, fix: str) -> None:
    """A trial trained on other pictures than the data now holds cannot be replayed or exported faithfully.

    `recorded` is the trial's `dataset_digest` (None for trials from before it was recorded: not checked).
    """
    if recorded is not None and recorded != actual:
        raise DataError(f"trial {trial_number} was trained on {dataset} with digest {recorded}, but the data now has "
                        f"digest {actual} (pictures were added, removed or changed since); {fix}")


def test_split(dataset: DatasetRef, root: Path = DATA_ROOT, device: torch.device | str = "cpu",
               val_size: int | None = DEFAULT_VAL_SIZE, split_seed: int = DEFAULT_SPLIT_SEED,
               log: Callable[[str], None] = print_to_stderr) -> tuple[ResidentImages, Arrays]:
    """The untouched test split, normalised with the training split's statistics (read only by exports),
    and the arrays it came from (their `test_rows` say which cache rows it holds)."""
    arrays = load_arrays(dataset, root, log)
    # Streamed (resident_bytes=1): only the training split's statistics are wanted from it.
    prepared = _prepare(arrays, dataset, root, torch.device("cpu"), val_size, split_seed, None, None, 1)
    rows = arrays.test_rows
    return ResidentImages(arrays.images[rows], arrays.labels[rows], prepared.mean, prepared.std, device), arrays
