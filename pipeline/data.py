"""From landed dataset files to device-resident batches.

The whole split lives on the device as uint8 (MNIST's 60,000 images are 47 MB); each batch is a slice
of that tensor, converted, augmented and normalised on the device with batched tensor math. There is
no DataLoader and no per-sample Python. All randomness (epoch permutations, augmentation parameters)
is drawn from one seeded CPU `torch.Generator`, so the same seed gives the same batches bit for bit
on any device; only the small parameter tensors travel to the device.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import datasets
from pipeline.datasets import DEFAULT_ROOT
from pipeline.errors import DataError

DEFAULT_VAL_SIZE = 5000
DEFAULT_SPLIT_SEED = 0


@dataclass(frozen=True)
class Arrays:
    """The four files of a dataset as CPU tensors: images uint8 [N, 28, 28], labels int64 [N]."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_arrays(name: str, root: Path = DEFAULT_ROOT) -> Arrays:
    """Land the dataset if needed (verifying every file's checksum) and read it as tensors.

    A missing dataset is fetched from its sources; a corrupt file raises DataError naming it.
    """
    info = datasets.dataset_info(name)
    datasets.land(name, root)
    raw = info.raw_dir(root)

    def tensor(file_name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(datasets.read_idx(raw / file_name).copy()).to(dtype)

    return Arrays(
        train_images=tensor(datasets.TRAIN_IMAGES, torch.uint8),
        train_labels=tensor(datasets.TRAIN_LABELS, torch.int64),
        test_images=tensor(datasets.TEST_IMAGES, torch.uint8),
        test_labels=tensor(datasets.TEST_LABELS, torch.int64),
    )


# --------------------------------------------------------------------------------------------------
# Stratified, seeded train/validation split


@dataclass(frozen=True)
class Split:
    train_indices: torch.Tensor  # sorted int64 indices into the training file
    val_indices: torch.Tensor
    hash: str  # stable fingerprint of both index lists, recorded with every result


def split_hash(train_indices: torch.Tensor, val_indices: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(train_indices.to(torch.int64).numpy().astype("<i8").tobytes())
    digest.update(b"|")
    digest.update(val_indices.to(torch.int64).numpy().astype("<i8").tobytes())
    return digest.hexdigest()[:16]


def stratified_split(labels: torch.Tensor, val_size: int = DEFAULT_VAL_SIZE, seed: int = DEFAULT_SPLIT_SEED) -> Split:
    """Carve `val_size` validation indices with each class in proportion to its share of `labels`.

    Per-class quotas use largest remainders so they add up to exactly `val_size`.
    """
    n = len(labels)
    if not 0 < val_size < n:
        raise DataError(f"validation size {val_size} must be between 1 and {n - 1} (the training set has {n})")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.to(torch.float64) * val_size / n
    quotas = exact.floor().to(torch.int64)
    remainder = val_size - int(quotas.sum())
    # Stable sort: ties in the fractional part go to the lower class, deterministically.
    order = torch.sort(exact - quotas, descending=True, stable=True).indices
    quotas[order[:remainder]] += 1

    generator = torch.Generator().manual_seed(seed)
    val_parts = []
    for cls, quota in zip(classes.tolist(), quotas.tolist(), strict=True):
        members = torch.nonzero(labels == cls).flatten()
        shuffled = members[torch.randperm(len(members), generator=generator)]
        val_parts.append(shuffled[:quota])
    val_indices = torch.sort(torch.cat(val_parts)).values
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val_indices] = True
    train_indices = torch.nonzero(~is_val).flatten()
    return Split(train_indices, val_indices, split_hash(train_indices, val_indices))


def seeded_subset(indices: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """A sorted random subset of `indices` (all of them when size is None or too large)."""
    if size is None or size >= len(indices):
        return indices
    generator = torch.Generator().manual_seed(seed)
    return torch.sort(indices[torch.randperm(len(indices), generator=generator)[:size]]).values


# --------------------------------------------------------------------------------------------------
# Augmentation: a per-sample random affine (rotation, translation, scale), batched


@dataclass(frozen=True)
class Augment:
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    translate: float = 0.1  # fraction of the image size, per axis
    scale: float = 0.1  # zoom uniform in [1 - scale, 1 + scale]

    @classmethod
    def from_strength(cls, strength: float) -> Augment | None:
        """One knob for searches: 1.0 is the classic (10 degrees, 10% shift, 10% zoom); 0 is off."""
        if strength < 0:
            raise DataError(f"augmentation strength {strength} must be >= 0 (0 turns it off)")
        if strength == 0:
            return None
        return cls(rotation=10.0 * strength, translate=0.1 * strength, scale=0.1 * strength)

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Warp float images [B, C, H, W] in [0, 1]; out-of-image pixels become background 0."""
        batch = images.shape[0]
        u = torch.rand(batch, 4, generator=generator, dtype=torch.float32) * 2 - 1  # uniform in [-1, 1]
        angle = u[:, 0] * math.radians(self.rotation)
        zoom = 1 + u[:, 1] * self.scale
        # affine_grid maps output coordinates to input coordinates in [-1, 1], hence 1/zoom and 2*shift.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos, -sin, u[:, 2] * 2 * self.translate], dim=1),
                torch.stack([sin, cos, u[:, 3] * 2 * self.translate], dim=1),
            ],
            dim=1,
        ).to(images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return warped.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Device-resident batches


class ResidentImages:
    """One split resident on a device as uint8, served as normalised float batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float,
                 device: torch.device | str = "cpu"):
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise DataError(f"images must be uint8 [N, H, W], got {images.dtype} {tuple(images.shape)}")
        self.device = torch.device(device)
        self.images = images.unsqueeze(1).to(self.device)  # [N, 1, H, W], still uint8
        self.labels = labels.to(self.device)
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return self.images.shape[0]

    def to_float(self, images_uint8: torch.Tensor, augment: Augment | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        x = images_uint8.to(torch.float32).div_(255.0)
        if augment is not None:
            x = augment.apply(x, generator)
        return x.sub_(self.mean).div_(self.std)

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                augment: Augment | None = None, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) batches; shuffled when a generator is given, in order otherwise."""
        n = len(self)
        if generator is not None:
            order = torch.randperm(n, generator=generator).to(self.device)
        else:
            order = None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            if order is None:
                images, labels = self.images[start:start + batch_size], self.labels[start:start + batch_size]
            else:
                index = order[start:start + batch_size]
                images, labels = self.images[index], self.labels[index]
            yield self.to_float(images, augment, generator), labels


@dataclass
class PreparedData:
    """Everything a trainer needs from a dataset, plus the provenance recorded with results."""

    dataset: str
    classes: tuple[str, ...]
    train: ResidentImages
    val: ResidentImages
    mean: float
    std: float
    checksum: str
    split_hash: str


def prepare(name: str, root: Path = DEFAULT_ROOT, device: torch.device | str = "cpu",
            val_size: int = DEFAULT_VAL_SIZE, split_seed: int = DEFAULT_SPLIT_SEED,
            train_limit: int | None = None, val_limit: int | None = None) -> PreparedData:
    """Verify, load, split and place a dataset on `device`; limits take seeded subsets for quick runs."""
    info = datasets.dataset_info(name)
    arrays = load_arrays(name, root)
    mean, std = datasets.normalisation_stats(info, root)
    split = stratified_split(arrays.train_labels, val_size, split_seed)
    train_idx = seeded_subset(split.train_indices, train_limit, split_seed + 1)
    val_idx = seeded_subset(split.val_indices, val_limit, split_seed + 2)
    return PreparedData(
        dataset=name,
        classes=info.classes,
        train=ResidentImages(arrays.train_images[train_idx], arrays.train_labels[train_idx], mean, std, device),
        val=ResidentImages(arrays.train_images[val_idx], arrays.train_labels[val_idx], mean, std, device),
        mean=mean,
        std=std,
        checksum=info.checksum,
        # Subsets change what was trained on, so they change the recorded hash too.
        split_hash=split.hash if (train_limit, val_limit) == (None, None) else split_hash(train_idx, val_idx),
    )


def test_split(name: str, root: Path = DEFAULT_ROOT, device: torch.device | str = "cpu") -> ResidentImages:
    """The untouched test split, normalised with the training split's statistics (read only by exports)."""
    info = datasets.dataset_info(name)
    arrays = load_arrays(name, root)
    mean, std = datasets.normalisation_stats(info, root)
    return ResidentImages(arrays.test_images, arrays.test_labels, mean, std, device)
