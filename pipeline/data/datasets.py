"""Dataset files on disk: how they are verified, read, and landed, and their normalisation statistics.

Each IDX dataset is landed in torchvision's raw layout (``<root>/MNIST/raw/train-images-idx3-ubyte`` ...)
so ``torchvision.datasets.MNIST(root, download=False)`` reads the same files we do. Every file is
verified by the SHA-256 of its uncompressed bytes (`sources.DATASETS`): archives get recompressed by packagers
(Debian's Fashion-MNIST ``.gz`` files are), contents do not. Where the files come from: landing.py and offline.py.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from pipeline.infra.fileio import write_atomic
from pipeline.spec.errors import DataError
from pipeline.spec.paths import DATA_ROOT
from pipeline.spec.sources import FILES, TRAIN_IMAGES, DatasetInfo


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# IDX format (the original MNIST container): big-endian magic (0, 0, dtype 0x08=uint8, ndim), dims.


def encode_idx(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def decode_idx(data: bytes, source: str) -> np.ndarray:
    """Parse IDX bytes into a uint8 array; `source` names the file in error messages."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{source}: not an IDX uint8 file (bad magic number); delete it and run `make data`")
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{source}: IDX header truncated; delete it and run `make data`")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = header_len + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DataError(
            f"{source}: IDX size is {len(data)} bytes, header promises {expected} for shape {shape}; "
            "delete it and run `make data`"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def idx_shape(path: Path) -> tuple[int, ...]:
    """The shape an IDX file declares, read from its header alone."""
    with open(path, "rb") as f:
        head = f.read(4)
        return struct.unpack(f">{head[3]}I", f.read(4 * head[3]))


def read_idx(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file missing; run `make data` to land it")
    return decode_idx(path.read_bytes(), str(path))


# --------------------------------------------------------------------------------------------------
# Verification and atomic landing


def verify_file(path: Path, expected: str, dataset: str) -> None:
    if not path.is_file():
        raise DataError(f"{path}: missing; run `make data` (or `python -m pipeline data --dataset {dataset}`)")
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"{path}: SHA-256 mismatch, expected {expected}, got {actual}; "
            "delete the file and run `make data` to land it again"
        )


def verify(info: DatasetInfo, root: Path) -> None:
    """Raise DataError naming the first missing or corrupt file; return quietly when all match."""
    for file_name, expected in info.sha256.items():
        verify_file(info.raw_dir(root) / file_name, expected, info.name)


def land_files(info: DatasetInfo, root: Path, files: dict[str, bytes], source: str) -> None:
    """Check every file against its constant before writing any of them."""
    for file_name, expected in info.sha256.items():
        if file_name not in files:
            raise DataError(f"{source}: has no {file_name} for {info.name}")
        actual = sha256_bytes(files[file_name])
        if actual != expected:
            raise DataError(
                f"{source}: {file_name} has SHA-256 {actual}, expected {expected}; "
                "the source is not the original dataset, remove it or pick another --source"
            )
    for file_name in FILES:
        write_atomic(info.raw_dir(root) / file_name, files[file_name])


# --------------------------------------------------------------------------------------------------
# Normalisation statistics


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and population std of pixel/255 over all pixels, exact via a histogram of the 256 levels."""
    return histogram_stats(np.bincount(np.asarray(images, dtype=np.uint8).ravel(), minlength=256))


def histogram_stats(counts: np.ndarray) -> tuple[float, float]:
    """Mean and population std of pixel/255 from the count of each of the 256 levels."""
    counts = np.asarray(counts, dtype=np.float64)
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum()
    mean = float((counts * levels).sum() / total)
    std = float(np.sqrt((counts * (levels - mean) ** 2).sum() / total))
    return mean, std


def normalisation_stats(info: DatasetInfo, root: Path = DATA_ROOT) -> tuple[float, float]:
    """Mean/std of the training file, computed once and cached beside it (keyed by its checksum).

    Computed over the whole original training file (train + validation split): only two numbers
    leak, and every split and trial then shares the same input scaling. The test file is never read.
    """
    cache = info.raw_dir(root).parent / "stats.json"
    key = info.sha256[TRAIN_IMAGES]
    try:
        cached = json.loads(cache.read_text())
        if cached["train_images_sha256"] == key:
            return cached["mean"], cached["std"]
    except (OSError, ValueError, KeyError):
        pass  # no cache yet, or a damaged one: recompute
    mean, std = pixel_stats(read_idx(info.raw_dir(root) / TRAIN_IMAGES))
    payload = {"train_images_sha256": key, "mean": mean, "std": std}
    write_atomic(cache, json.dumps(payload, indent=2).encode())
    return mean, std
