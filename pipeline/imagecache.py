"""The decoded-image cache: `data/cache/<digest>/`, written once per dataset version, memory-mapped after.

A cache folder holds

    images.npy      uint8 [N, C, H, W], every image decoded once at the study's size
    labels.npy      int64 [N]
    split.npy       uint8 [N]: the split each image was given by its source (TRAIN, VAL, TEST, or CARVE
                    when the source has no split of its own and the pipeline carves one, seeded)
    manifest.json   classes, the source, its preprocessing, skipped files, per-class counts

It is written under a temporary name and renamed into place (durably: `fileio.rename_durably`), so a reader
sees a whole cache or none, after a kill or a power loss too; what a writer killed outright leaves
(`.<digest>.partial-<pid>`) is removed by the next writer.
`.npy` files load without pickle (`allow_pickle=False`) and map into memory, so a split larger than
RAM can stream from disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import fileio
from pipeline.errors import DataError

TRAIN, VAL, TEST, CARVE = 0, 1, 2, 3
FORMAT_VERSION = 1
PARTIAL_PATTERN = re.compile(r"^\..+\.partial-(?P<pid>\d+)$")  # CacheWriter's temporary folders


@dataclass(frozen=True)
class CachedImages:
    directory: Path
    images: np.ndarray  # uint8 [N, C, H, W], memory-mapped (copy-on-write)
    labels: np.ndarray  # int64 [N]
    split: np.ndarray  # uint8 [N]
    manifest: dict

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest["classes"])

    @property
    def digest(self) -> str:
        return self.manifest["digest"]


def cache_dir(root: Path, digest: str) -> Path:
    return Path(root) / "cache" / digest


def open_cache(directory: Path) -> CachedImages | None:
    """The cache in `directory`, or None when there is none; a damaged one is removed and DataError says so."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {manifest.get('format')}")
        # mode "c": copy-on-write, so torch.from_numpy gets a writable view and the file is never changed.
        images = np.load(directory / "images.npy", mmap_mode="c", allow_pickle=False)
        labels = np.load(directory / "labels.npy", allow_pickle=False)
        split = np.load(directory / "split.npy", allow_pickle=False)
        if images.dtype != np.uint8 or images.ndim != 4 or not len(images) == len(labels) == len(split):
            raise ValueError(f"shapes {images.shape} {labels.shape} {split.shape}")
    except (OSError, ValueError) as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise DataError(f"{directory}: damaged image cache ({exc}); removed it, run again to decode the images anew") \
            from None
    return CachedImages(directory, images, labels.astype(np.int64), split, manifest)


class CacheWriter:
    """Fill a new cache image by image, then `commit()` renames it into place atomically."""

    def __init__(self, root: Path, digest: str, count: int, shape: tuple[int, int, int]):
        self.final = cache_dir(root, digest)
        for leftover in fileio.dead_leftovers(self.final.parent, PARTIAL_PATTERN):
            fileio.remove(leftover)
        self.partial = self.final.parent / f".{digest}.partial-{os.getpid()}"
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self.digest = digest
        self.images = np.lib.format.open_memmap(self.partial / "images.npy", mode="w+", dtype=np.uint8,
                                                shape=(count, *shape))

    def commit(self, labels: np.ndarray, split: np.ndarray, manifest: dict, keep: np.ndarray | None = None) -> Path:
        """Write labels, split and manifest; `keep` (a boolean mask) drops images that were skipped."""
        images = self.images
        if keep is not None and not keep.all():
            kept = np.lib.format.open_memmap(self.partial / "kept.npy", mode="w+", dtype=np.uint8,
                                             shape=(int(keep.sum()), *images.shape[1:]))
            kept[:] = images[keep]
            kept.flush()
            del kept
            labels, split = labels[keep], split[keep]
            os.replace(self.partial / "kept.npy", self.partial / "images.npy")
        else:
            images.flush()
        del self.images, images
        np.save(self.partial / "labels.npy", np.asarray(labels, dtype=np.int64), allow_pickle=False)
        np.save(self.partial / "split.npy", np.asarray(split, dtype=np.uint8), allow_pickle=False)
        manifest = {"format": FORMAT_VERSION, "digest": self.digest, **manifest}
        (self.partial / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        try:
            fileio.rename_durably(self.partial, self.final)
        except OSError:  # another process landed the same digest meanwhile: theirs is identical
            shutil.rmtree(self.partial, ignore_errors=True)
        return self.final

    def abandon(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
