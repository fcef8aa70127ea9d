"""The decoded-image cache: `data/cache/<digest>/`, written once per dataset version, memory-mapped after.

A cache folder holds

    images.npy      uint8 [N, C, H, W], every image decoded once at the study's size
    labels.npy      int64 [N]
    split.npy       uint8 [N]: the split each image was given by its source (TRAIN, VAL, TEST, or CARVE
                    when the source has no split of its own and the pipeline carves one, seeded)
    manifest.json   classes, the source, its preprocessing, skipped files, per-class counts, the SHA-256 of
                    labels.npy and split.npy (caches written before they were kept have none)

It is written under a temporary name and renamed into place (durably: `fileio.rename_durably`), so a reader
sees a whole cache or none, after a kill or a power loss too; what a writer killed outright leaves
(`.<digest>.partial-<pid>`) is removed by the next writer.
`.npy` files load without pickle (`allow_pickle=False`) and map into memory, so a split larger than
RAM can stream from disk.

Every version writes `manifest.json` as a JSON object whose "format" names its version. A cache is removed only
on proof of damage: a manifest that is not JSON, or files that break what their known format version promises
(a .npy header, a size, a checksum). A cache this version cannot read (a newer format) and a read that fails for
want of memory, permission or a working disk are reported in one line and the files kept.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.infra import fileio
from pipeline.infra.text import byte_size
from pipeline.spec.errors import DataError

TRAIN, VAL, TEST, CARVE = 0, 1, 2, 3
FORMAT_VERSION = 1
PARTIAL_PATTERN = re.compile(r"^\..+\.partial-(?P<pid>\d+)$")  # CacheWriter's temporary folders
MANIFEST_KEYS = ("digest", "classes", "source", "preprocessing")  # every format-1 manifest has them
CHECKSUMMED = ("labels.npy", "split.npy")  # small enough to hash on every open; images.npy gets its size checked
COPY_BYTES = 64 << 20  # images read into memory at a time when the skipped ones are dropped from the cache


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
    """The cache in `directory`, or None when there is none. A damaged one is removed and DataError says so; one
    that cannot be read now (memory, permission, disk errors, a newer format) is kept and DataError says why."""
    try:
        if not (directory / "manifest.json").is_file():
            return None
        return _open(directory)
    except _Damaged as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise DataError(f"{directory}: damaged image cache ({exc}); removed it, run again to decode the images anew") \
            from None
    except (OSError, MemoryError) as exc:
        raise _unreadable(directory, exc) from None


def open_committed(directory: Path) -> CachedImages:
    """The cache `CacheWriter.commit` just wrote in `directory` (its manifest is there: never None)."""
    cached = open_cache(directory)
    if cached is None:
        raise DataError(f"{directory}: the image cache just written has no manifest.json (removed meanwhile?); "
                        "run again to decode the images anew")
    return cached


class _Damaged(Exception):
    """What proves a cache damaged: it breaks a promise of its (known) format version."""


def _open(directory: Path) -> CachedImages:
    try:
        manifest = json.loads((directory / "manifest.json").read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Damaged(f"manifest.json is not JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise _Damaged("manifest.json holds no JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{directory}: image cache format {manifest.get('format')!r}, which this version of the "
                        f"pipeline cannot read (it reads format {FORMAT_VERSION}); kept it: use the newer pipeline "
                        "that wrote it, or delete the folder to decode the images anew")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise _Damaged(f"manifest.json lacks {', '.join(missing)}")
    checksums = manifest.get("checksums", {})  # caches written before checksums were kept have none to check
    if not isinstance(checksums, dict):
        raise _Damaged("manifest.json: checksums is no JSON object")
    arrays = {}
    for name in CHECKSUMMED:
        payload = _read_member(directory / name)  # hashed and parsed from the same bytes
        expected = checksums.get(name)
        if expected is not None and hashlib.sha256(payload).hexdigest() != expected:
            raise _Damaged(f"{name} does not match its SHA-256 in manifest.json")
        shape, dtype = _npy_layout(io.BytesIO(payload), len(payload), name)
        if len(shape) != 1 or dtype.kind not in "iu":
            raise _Damaged(f"{name} holds {dtype} {shape}, not integers [N]")
        arrays[name] = np.load(io.BytesIO(payload), allow_pickle=False)
    images_path = directory / "images.npy"
    if not images_path.is_file():
        raise _Damaged("images.npy is missing")
    with open(images_path, "rb") as f:
        shape, dtype = _npy_layout(f, os.fstat(f.fileno()).st_size, "images.npy")
    labels, split = arrays["labels.npy"], arrays["split.npy"]
    if dtype != np.uint8 or len(shape) != 4 or not shape[0] == len(labels) == len(split):
        raise _Damaged(f"shapes {dtype} {shape}, labels {labels.shape}, split {split.shape}")
    # mode "c": copy-on-write, so torch.from_numpy gets a writable view and the file is never changed.
    images = np.load(images_path, mmap_mode="c", allow_pickle=False)
    return CachedImages(directory, images, labels.astype(np.int64), split.astype(np.uint8), manifest)


def _read_member(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:  # the folder was renamed into place whole: a file gone from it is damage
        raise _Damaged(f"{path.name} is missing") from None


def _npy_layout(f, size: int, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an .npy header, checked against the file's size (a file cut short shows there)."""
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):  # numpy writes 1.0 (2.0 for huge headers) for plain arrays
            raise ValueError(f"npy version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    except ValueError as exc:  # numpy's word for a header it cannot parse
        raise _Damaged(f"{name}: {exc}") from None
    expected = f.tell() + math.prod(shape) * dtype.itemsize
    if dtype.hasobject or size != expected:
        raise _Damaged(f"{name} is {size:,} bytes, its header promises {expected:,} of {dtype} {shape}")
    return shape, dtype


def _unreadable(directory: Path, exc: OSError | MemoryError) -> DataError:
    """A cache that could not be read now, though nothing shows it damaged: the files stay, the fix is named."""
    if isinstance(exc, MemoryError) or exc.errno == errno.ENOMEM:
        fix = "free memory or raise the memory limit (ulimit -v), then run again"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = "give this user read access to it, then run again"
    else:
        fix = "check the disk, then run again (or delete the folder to decode the images anew)"
    return DataError(f"{directory}: could not read the image cache ({str(exc) or type(exc).__name__}); kept it: "
                     f"{fix}")


class CacheWriter:
    """Fill a new cache image by image, then `commit()` renames it into place atomically.

    A disk without room for it (a quota, a file-size limit) raises DataError naming the disk, here or in
    `commit()`, and leaves no partial folder."""

    def __init__(self, root: Path, digest: str, count: int, shape: tuple[int, int, int]):
        self.final = cache_dir(root, digest)
        for leftover in fileio.dead_leftovers(self.final.parent, PARTIAL_PATTERN):
            fileio.remove(leftover)
        self.partial = self.final.parent / f".{digest}.partial-{os.getpid()}"
        self.digest = digest
        self.size = count * math.prod(shape)  # what the images need on the disk
        self.needed = self.size  # what the cache needs on the disk at its fullest, as far as is known yet
        shutil.rmtree(self.partial, ignore_errors=True)
        try:
            with self._room():
                self.partial.mkdir(parents=True)
                self.images = _reserved_memmap(self.partial / "images.npy", (count, *shape))
        except BaseException:  # the callers clean up only once they hold a writer
            self.abandon()
            raise

    def commit(self, labels: np.ndarray, split: np.ndarray, manifest: dict, keep: np.ndarray | None = None) -> Path:
        """Write labels, split and manifest; `keep` (a boolean mask) drops images that were skipped."""
        with self._room():
            self._write(labels, split, manifest, keep)
            try:
                fileio.rename_durably(self.partial, self.final)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # another process landed the same digest meanwhile: theirs is identical
                shutil.rmtree(self.partial, ignore_errors=True)
        return self.final

    def _write(self, labels: np.ndarray, split: np.ndarray, manifest: dict, keep: np.ndarray | None) -> None:
        images = self.images
        if keep is not None and not keep.all():
            # The images and their copy without the skipped ones are both on the disk until the copy replaces them.
            self.needed = self.size + int(keep.sum()) * math.prod(images.shape[1:])
            kept = _reserved_memmap(self.partial / "kept.npy", (int(keep.sum()), *images.shape[1:]))
            _copy_kept(images, keep, kept)
            kept.flush()
            del kept
            labels, split = labels[keep], split[keep]
            os.replace(self.partial / "kept.npy", self.partial / "images.npy")
        else:
            images.flush()
        del self.images, images
        checksums = {}
        for name, array in (("labels.npy", np.asarray(labels, dtype=np.int64)),
                            ("split.npy", np.asarray(split, dtype=np.uint8))):
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            (self.partial / name).write_bytes(buffer.getvalue())
            checksums[name] = hashlib.sha256(buffer.getvalue()).hexdigest()
        manifest = {"format": FORMAT_VERSION, "digest": self.digest, **manifest, "checksums": checksums}
        (self.partial / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")

    @contextlib.contextmanager
    def _room(self) -> Iterator[None]:
        """A full disk (ENOSPC, a quota, a file-size limit) as one line that names the disk and the fix."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in fileio.NO_ROOM:
                raise
            self.abandon()
            folder = self.final.parent
            free = shutil.disk_usage(_existing(folder)).free
            raise DataError(f"{folder}: no room for the image cache on the disk mounted at {_mount_point(folder)} "
                            f"({exc.strerror}): it needs {byte_size(self.needed)}, {byte_size(free)} are free; "
                            "free space there or pass --root to keep the data on a disk with room, then run "
                            "again") from None

    def abandon(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def _copy_kept(images: np.ndarray, keep: np.ndarray, kept: np.ndarray) -> None:
    """`images[keep]` into `kept`, COPY_BYTES of `images` at a time: a cache larger than RAM never is in memory."""
    rows = max(1, COPY_BYTES // max(1, math.prod(images.shape[1:])))
    at = 0
    for start in range(0, len(images), rows):
        chunk = images[start:start + rows][keep[start:start + rows]]
        kept[at:at + len(chunk)] = chunk
        at += len(chunk)


def _reserved_memmap(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new uint8 .npy file of `shape`, its disk blocks allocated before it is mapped for writing.

    numpy would make the file sparse, its blocks allocated only as the map is written; on a full disk such a write
    cannot fail with an error, the kernel kills the process (SIGBUS). Allocated first, a full disk is ENOSPC here.
    """
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        f.flush()
        fileio.reserve(f.fileno(), f.tell() + math.prod(shape))
    return np.lib.format.open_memmap(path, mode="r+")


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    path = _existing(path).resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path
