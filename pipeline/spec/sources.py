"""What a study's `dataset` can name: a built-in dataset (the IDX ones' files and checksums in `DATASETS`), or the
user's own pictures (`FolderSource`).

Kept free of torch and Pillow so that loading a study file stays fast.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.spec.errors import DataError

IDX_DATASETS = ("mnist", "fashion-mnist")  # IDX files (datasets.py)
CIFAR_DATASETS = ("cifar10", "cifar100")  # torchvision's python archives (cifar.py)
DIGITS = IDX_DATASETS  # their default augmentation is the digits affine (never flips)
Channels = Literal["auto", "rgb", "gray"]
AUGMENT_POLICIES = ("auto", "digits", "natural", "none")
DEFAULT_MAX_MEGAPIXELS = 100.0
DEFAULT_VAL_SIZE = 5000  # validation images carved from a built-in dataset's training file (folders: val_fraction)


@dataclass(frozen=True)
class FolderSource:
    """A study's `[dataset]` table: an ImageFolder tree (or a `path,label` CSV) of the user's pictures."""

    path: str  # the folder (`~` expanded; relative paths from the project root)
    image_size: int = 64
    channels: str = "auto"  # auto | rgb | gray
    csv: str | None = None  # a `path,label` file inside (or relative to) `path`
    test_fraction: float = 0.1  # carved when the folder has no test/ split
    val_fraction: float = 0.1  # carved from the training pictures when there is no val/ split
    skip_unreadable: bool = False
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    follow_links: bool = False  # pictures may resolve outside `path` through links (a dataset you trust)

    @property
    def name(self) -> str:
        return Path(self.path).expanduser().name or "images"

    def preprocessing_key(self) -> dict:
        """What, besides the files, decides the decoded pixels (part of the digest)."""
        return {"image_size": self.image_size, "channels": self.channels, "max_megapixels": self.max_megapixels,
                "skip_unreadable": self.skip_unreadable}


DatasetRef = str | FolderSource  # what a study's `dataset` names, as data.prepare takes it
SOURCES = ("auto", "present", "package", "torchvision")  # where `make data` may land a built-in dataset from


def dataset_label(dataset: DatasetRef) -> str:
    """The dataset's name in records: the built-in name, or the folder's name."""
    return dataset if isinstance(dataset, str) else dataset.name


# --------------------------------------------------------------------------------------------------
# The IDX datasets: their files in torchvision's raw layout and the SHA-256 of each (datasets.py lands and reads them)

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    folder: str  # torchvision's class name, which is also its folder under the root
    sha256: dict[str, str]  # uncompressed file name -> SHA-256 of its bytes
    classes: tuple[str, ...]

    def raw_dir(self, root: Path) -> Path:
        return Path(root) / self.folder / "raw"

    @property
    def checksum(self) -> str:
        """One short fingerprint of all four files, recorded with every result."""
        joined = "".join(self.sha256[f] for f in FILES)
        return hashlib.sha256(joined.encode()).hexdigest()[:16]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        folder="MNIST",
        sha256={
            TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        classes=tuple(str(d) for d in range(10)),
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        folder="FashionMNIST",
        sha256={
            TRAIN_IMAGES: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            TRAIN_LABELS: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            TEST_IMAGES: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            TEST_LABELS: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
    ),
}


def builtin_names() -> list[str]:
    """The built-in datasets a study may name: the IDX registry's (which tests and users may add to at run time),
    then CIFAR's."""
    return [*sorted(DATASETS), *CIFAR_DATASETS]


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}: expected one of {', '.join(sorted(DATASETS))}"
        ) from None
