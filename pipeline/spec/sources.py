"""What a study's `dataset` can name: a built-in dataset, or the user's own pictures (`FolderSource`).

Kept free of torch and Pillow so that loading a study file stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IDX_DATASETS = ("mnist", "fashion-mnist")  # IDX files (datasets.py)
CIFAR_DATASETS = ("cifar10", "cifar100")  # torchvision's python archives (cifar.py)
BUILTIN = (*IDX_DATASETS, *CIFAR_DATASETS)
DIGITS = IDX_DATASETS  # their default augmentation is the digits affine (never flips)
CHANNELS = ("auto", "rgb", "gray")
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
