"""CIFAR-10 and CIFAR-100 from torchvision's python archives, landed into the image cache.

Sources, in order: the extracted batches already under `data/cifar-10-batches-py/` (each file checked
against torchvision's own MD5 list), the archive `data/cifar-10-python.tar.gz` (checked by SHA-256 or
torchvision's MD5, then extracted), a download from torchvision's URL (online; a connection silent for
`DOWNLOAD_TIMEOUT` seconds gives up with a line that says where to put the archive). The batches are Python pickles:
they are read only after their checksum matched, and then through an unpickler that can build nothing
but numpy arrays, lists, dicts and strings.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import tarfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import imagecache
from pipeline.data.datasets import sha256_file
from pipeline.infra import fileio
from pipeline.spec.errors import DataError


@dataclass(frozen=True)
class CifarInfo:
    name: str
    folder: str  # the archive's top folder, torchvision's base_folder
    archive: str
    archive_sha256: str | None  # None: only torchvision's MD5 is known
    archive_md5: str
    url: str
    files: dict[str, str]  # member -> MD5 (torchvision's lists)
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes


def _torchvision_info(name: str, cls: Any, label_key: bytes, names_key: bytes,  # cls: torchvision's CIFAR class
                      archive_sha256: str | None) -> CifarInfo:
    files = {f: md5 for f, md5 in cls.train_list + cls.test_list}
    files[cls.meta["filename"]] = cls.meta["md5"]
    return CifarInfo(name, cls.base_folder, cls.filename, archive_sha256, cls.tgz_md5, cls.url, files,
                     tuple(f for f, _ in cls.train_list), tuple(f for f, _ in cls.test_list), cls.meta["filename"],
                     label_key, names_key)


def _infos() -> dict[str, CifarInfo]:
    from torchvision.datasets import CIFAR10, CIFAR100  # here: torchvision imports torch, this module must not

    return {
        "cifar10": _torchvision_info("cifar10", CIFAR10, b"labels", b"label_names",
                                     "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
        "cifar100": _torchvision_info("cifar100", CIFAR100, b"fine_labels", b"fine_label_names", None),
    }


INFOS: dict[str, CifarInfo] = {}  # filled on first use (reading torchvision's lists imports torchvision)


def info(name: str) -> CifarInfo:
    if not INFOS:
        INFOS.update(_infos())
    return INFOS[name]


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays and plain containers; any other class in the pickle is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle's signature)
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def read_batch(payload: bytes, source: str) -> dict:
    try:
        return _ArraysOnly(io.BytesIO(payload), encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"{source}: not a CIFAR batch ({exc}); delete it and land the archive again") from None


def _md5(payload: bytes) -> str:
    return hashlib.md5(payload, usedforsecurity=False).hexdigest()


def _verified_batches(spec: CifarInfo, root: Path) -> dict[str, bytes]:
    """The extracted batch files, each checked against its MD5; DataError names the first bad one."""
    folder = root / spec.folder
    payloads = {}
    for member, md5 in spec.files.items():
        path = folder / member
        if not path.is_file():
            raise DataError(f"{path}: missing from the extracted batches; delete {folder} and land "
                            f"{root / spec.archive} again (download it from {spec.url})")
        payload = path.read_bytes()
        actual = _md5(payload)
        if actual != md5:
            raise DataError(f"{path}: MD5 {actual}, expected {md5} (torchvision's list); delete "
                            f"{folder} and land {spec.archive} again")
        payloads[member] = payload
    return payloads


def _extract(spec: CifarInfo, archive: Path, root: Path) -> None:
    if spec.archive_sha256 is not None:
        actual = sha256_file(archive)
        if actual != spec.archive_sha256:
            raise DataError(f"{archive}: SHA-256 {actual}, expected {spec.archive_sha256}; it is not the original "
                            f"archive, download it again from {spec.url}")
    else:
        actual = _md5(archive.read_bytes())
        if actual != spec.archive_md5:
            raise DataError(f"{archive}: MD5 {actual}, expected {spec.archive_md5}; download it again from {spec.url}")
    # Extracted beside the final folder and renamed into place: an interrupted extraction leaves no half folder.
    for leftover in fileio.dead_leftovers(root, re.compile(rf"^\.{re.escape(spec.folder)}\.partial-(?P<pid>\d+)$")):
        fileio.remove(leftover)  # an extraction killed outright
    partial = root / f".{spec.folder}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # Members are written by their base name only: a crafted path (../, absolute) cannot escape root.
            wanted = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()
                      and Path(m.name).parent.name == spec.folder and Path(m.name).name in spec.files}
            absent = sorted(set(spec.files) - set(wanted))
            if absent:
                raise DataError(f"{archive}: has no {spec.folder}/{absent[0]}; it is not the original archive, "
                                f"download it again from {spec.url}")
            for name, member in wanted.items():
                extracted = tar.extractfile(member)
                assert extracted is not None  # only files were wanted
                (partial / name).write_bytes(extracted.read())
        fileio.rename_durably(partial, root / spec.folder)
    except (OSError, tarfile.TarError, EOFError) as exc:
        if (root / spec.folder).is_dir():  # another process extracted it meanwhile
            return
        raise DataError(f"{archive}: cannot be extracted ({type(exc).__name__}: {exc}); download it again from "
                        f"{spec.url}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


DOWNLOAD_TIMEOUT = 60  # seconds a stalled connection may hang (urllib waits forever unless told)


def _download(spec: CifarInfo, root: Path, log: Callable[[str], None]) -> None:
    """The archive from torchvision's URL to `root / spec.archive` (via a .partial file; verified when extracted).

    Not torchvision's own download: it has no time limit, and its dataset class unpickles the batches freely.
    """
    archive = root / spec.archive
    partial = archive.with_name(archive.name + ".partial")
    root.mkdir(parents=True, exist_ok=True)
    log(f"{spec.name}: not on this machine; downloading {spec.url}")
    try:
        request = urllib.request.Request(spec.url, headers={"User-Agent": "pytorch/vision"})
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except OSError as exc:  # URLError, refused connections and timeouts are all OSError
        partial.unlink(missing_ok=True)
        reason = " ".join(str(getattr(exc, "reason", exc)).split())
        raise DataError(f"{spec.name}: not on this machine and the download failed ({reason}); download {spec.url} "
                        f"on a machine with internet and put it at {archive}") from None
    fileio.rename_durably(partial, archive)


def land_batches(spec: CifarInfo, root: Path, log: Callable[[str], None]) -> dict[str, bytes]:
    """Present batches, then the archive, then a download from torchvision's URL."""
    root = Path(root)
    if (root / spec.folder).is_dir():
        return _verified_batches(spec, root)
    archive = root / spec.archive
    if not archive.is_file():
        _download(spec, root, log)
    log(f"{spec.name}: extracting {archive}")
    _extract(spec, archive, root)
    return _verified_batches(spec, root)


def _batch_arrays(batch: dict, label_key: bytes, classes: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images as uint8 [n, 3, 32, 32] (its rows are the R, G and B planes, row-major) and its labels."""
    try:
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
    except (KeyError, TypeError, IndexError) as exc:
        raise DataError(f"{source}: no {exc} in the batch; delete it and land the archive again") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{source}: data is {data.dtype} {data.shape}, expected uint8 [n, 3072]; delete it and land "
                        "the archive again")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or \
            (len(labels) and not 0 <= labels.min() <= labels.max() < classes):
        raise DataError(f"{source}: {len(labels)} labels for {len(data)} images, or labels outside 0-{classes - 1}; "
                        "delete it and land the archive again")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def land_cifar(name: str, root: Path, log: Callable[[str], None]) -> imagecache.CachedImages:
    """The CIFAR dataset's image cache (train then test images), built from its batches on first use."""
    spec = info(name)
    root = Path(root)
    folder = root / spec.folder
    payloads = land_batches(spec, root, log)
    # Every payload matched its MD5 in spec.files (land_batches verified them), so the key reads those.
    key = name + "-" + hashlib.sha256("".join(spec.files[m] for m in sorted(payloads)).encode()).hexdigest()[:12]
    cached = imagecache.open_cache(imagecache.cache_dir(root, key))
    if cached is not None:
        return cached
    meta_path = str(folder / spec.meta_file)
    meta = read_batch(payloads[spec.meta_file], meta_path)
    try:
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[spec.names_key]]
    except (KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta_path}: no class names under {spec.names_key!r} ({type(exc).__name__}); delete "
                        f"{folder} and land {spec.archive} again") from None
    images, labels, split = [], [], []
    for code, members in ((imagecache.TRAIN, spec.train_files), (imagecache.TEST, spec.test_files)):
        for member in members:
            path = str(folder / member)
            pixels, batch_labels = _batch_arrays(read_batch(payloads[member], path), spec.label_key, len(classes),
                                                 path)
            images.append(pixels)
            labels.append(batch_labels)
            split.append(np.full(len(pixels), code, dtype=np.uint8))
    manifest = {"source": str(folder), "classes": classes,
                "preprocessing": {"image_size": 32, "channels": "rgb", "style": "photo"}}
    writer = imagecache.CacheWriter(root, key, sum(map(len, images)), (3, 32, 32))
    try:
        np.concatenate(images, out=writer.images)  # straight into the cache file, no stacked copy first
        directory = writer.commit(np.concatenate(labels), np.concatenate(split), manifest)
    except BaseException:  # a full disk, say: no half-written cache folder left behind
        writer.abandon()
        raise
    return imagecache.open_committed(directory)
