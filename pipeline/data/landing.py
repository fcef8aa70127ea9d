"""`make data`: land and verify datasets under data/, offline sources first; returns what landed for the view.

Torch-free: landing already-present files answers in well under a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import cifar, datasets, imagecache
from pipeline.spec import sources


@dataclass(frozen=True)
class Landed:
    name: str
    train_images: int
    test_images: int
    location: Path
    details: str  # source, checksum or digest, statistics, time
    decoded: str | None = None  # decoded into the image cache as this ("3x32x32, 10 classes"); None: IDX files


def land(dataset: str, root: Path, source: str, log: Callable[[str], None]) -> list[Landed]:
    """Land `dataset` (`all`: MNIST and Fashion-MNIST; a CIFAR name: its archive's batches, decoded to the cache)."""
    if dataset in sources.CIFAR_DATASETS:
        return [_land_cifar(dataset, root, log)]
    names = sorted(datasets.DATASETS) if dataset == "all" else [dataset]
    return [_land_idx(name, root, source, log) for name in names]


def _land_idx(name: str, root: Path, source: str, log: Callable[[str], None]) -> Landed:
    started = time.perf_counter()
    used = datasets.land(name, root, source, log=log)
    info = datasets.dataset_info(name)
    mean, std = datasets.normalisation_stats(info, root)
    raw = info.raw_dir(root)
    return Landed(name, datasets.idx_shape(raw / datasets.TRAIN_IMAGES)[0],
                  datasets.idx_shape(raw / datasets.TEST_IMAGES)[0], raw,
                  f"source: {used}; checksum {info.checksum}; mean {mean:.4f} std {std:.4f}; "
                  f"{time.perf_counter() - started:.1f} s")


def _land_cifar(name: str, root: Path, log: Callable[[str], None]) -> Landed:
    started = time.perf_counter()
    cached = cifar.land_cifar(name, root, log=log)
    n_test = int((cached.split == imagecache.TEST).sum())
    return Landed(name, len(cached.labels) - n_test, n_test, cached.directory,
                  f"digest {cached.digest}; {time.perf_counter() - started:.1f} s",
                  f"3x32x32, {len(cached.classes)} classes")
