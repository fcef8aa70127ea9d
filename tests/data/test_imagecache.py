"""The image cache's faults: a disk that fills up while the cache is written, and what opening a cache removes
(proven damage) or keeps (a read that failed for want of memory or permission, a format this version cannot read).

Everything is real: a small tmpfs mounted for the test is the disk that fills up, under the real CLI in a process
of its own; a virtual-memory limit and a root without the capability to read any file are set in processes of
their own; caches are written by the real writer and then damaged byte by byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import StudyEnv, run_python
from PIL import Image

from pipeline.data import imagecache
from pipeline.spec.errors import DataError

DIGEST = "0123456789abcdef"


def write_cache(root: Path, count: int = 12, shape: tuple[int, int, int] = (1, 8, 8)) -> imagecache.CachedImages:
    """A cache of `count` distinct images written by the real writer, opened."""
    writer = imagecache.CacheWriter(root, DIGEST, count, shape)
    writer.images[:] = np.arange(count * int(np.prod(shape)), dtype=np.uint64).reshape(count, *shape) % 251
    labels = np.arange(count) % 3
    split = np.full(count, imagecache.CARVE, dtype=np.uint8)
    directory = writer.commit(labels, split, {"source": str(root), "classes": ["a", "b", "c"],
                                              "preprocessing": {"image_size": shape[1], "channels": "gray"}})
    return imagecache.open_committed(directory)


def files_of(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


# Opens the cache in argv[1] in a process of its own: "opened", or the DataError's message and exit 2.
OPEN_SCRIPT = """
    import sys
    from pathlib import Path
    from pipeline.data import imagecache
    from pipeline.spec.errors import DataError

    def limit_memory(headroom):
        import resource
        status = Path("/proc/self/status").read_text()
        used = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmSize:"))) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (used + headroom, resource.RLIM_INFINITY))

    if len(sys.argv) > 2:
        limit_memory(int(sys.argv[2]))
    try:
        imagecache.open_cache(Path(sys.argv[1]))
    except DataError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    print("opened")
"""


# --------------------------------------------------------------------------------------------------
# What opening a cache keeps: nothing proves these damaged


@pytest.mark.faults  # README: What survives what
def test_a_cache_that_cannot_be_mapped_under_a_memory_limit_is_kept_and_named(tmp_path):
    headroom = 16 << 20
    cached = write_cache(tmp_path, count=3 * 64, shape=(1, 512, 512))  # 48 MiB of images: 3x the headroom
    before = files_of(cached.directory)
    done = run_python(OPEN_SCRIPT, str(cached.directory), str(headroom))
    assert done.returncode == 2, done.stdout + done.stderr
    message = done.stderr.strip()
    assert "\n" not in message and message.startswith(f"{cached.directory}: could not read the image cache")
    assert "Cannot allocate memory" in message and "kept it" in message and "memory limit" in message
    assert files_of(cached.directory) == before
    assert run_python(OPEN_SCRIPT, str(cached.directory)).stdout.strip() == "opened"  # without the limit


@pytest.mark.faults  # README: What survives what
def test_a_cache_this_user_may_not_read_is_kept_and_named(tmp_path):
    cached = write_cache(tmp_path)
    before = files_of(cached.directory)
    (cached.directory / "labels.npy").chmod(0)
    # root reads any file through CAP_DAC_OVERRIDE: the process runs without it, as any other user would
    prefix = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root, and setpriv (util-linux) is not there to drop CAP_DAC_OVERRIDE")
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    done = run_python(OPEN_SCRIPT, str(cached.directory), prefix=prefix)
    assert done.returncode == 2, done.stdout + done.stderr
    message = done.stderr.strip()
    assert "\n" not in message and message.startswith(f"{cached.directory}: could not read the image cache")
    assert "Permission denied" in message and "kept it" in message and "read access" in message
    (cached.directory / "labels.npy").chmod(0o644)
    assert files_of(cached.directory) == before


def test_a_cache_in_a_newer_format_is_kept_and_named(tmp_path):
    cached = write_cache(tmp_path)
    manifest_path = cached.directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format": imagecache.FORMAT_VERSION + 1}))
    before = files_of(cached.directory)
    with pytest.raises(DataError) as raised:
        imagecache.open_cache(cached.directory)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{cached.directory}: image cache format "
                                                      f"{imagecache.FORMAT_VERSION + 1}")
    assert f"reads format {imagecache.FORMAT_VERSION}" in message and "kept it" in message
    assert files_of(cached.directory) == before


def test_a_just_written_cache_with_no_manifest_is_named(tmp_path):
    with pytest.raises(DataError, match="the image cache just written has no manifest.json"):
        imagecache.open_committed(tmp_path / "empty")


def test_a_cache_written_before_checksums_were_kept_still_opens(tmp_path):
    cached = write_cache(tmp_path)
    manifest_path = cached.directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert set(manifest["checksums"]) == {"labels.npy", "split.npy"}
    del manifest["checksums"]
    manifest_path.write_text(json.dumps(manifest))
    again = imagecache.open_cache(cached.directory)
    assert np.array_equal(again.images, cached.images) and np.array_equal(again.labels, cached.labels)


# --------------------------------------------------------------------------------------------------
# What opening a cache removes: proven damage


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


DAMAGE = [
    ("a label changed", lambda d: _flip_last_byte(d / "labels.npy"), "labels.npy does not match its SHA-256"),
    ("labels cut short", lambda d: _cut(d / "labels.npy"), "labels.npy does not match its SHA-256"),
    ("images cut short", lambda d: _cut(d / "images.npy"), "images.npy is 891 bytes, its header promises 896"),
    ("images missing", lambda d: (d / "images.npy").unlink(), "images.npy is missing"),
    ("images not numpy", lambda d: (d / "images.npy").write_bytes(b"not numpy"), "images.npy: "),
    ("manifest not JSON", lambda d: (d / "manifest.json").write_text('{"format": 1, "dig'), "not JSON"),
]


@pytest.mark.faults  # README: What survives what
@pytest.mark.parametrize("damage, found", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_cache_is_removed_naming_the_damage(tmp_path, damage, found):
    cached = write_cache(tmp_path)
    damage(cached.directory)
    with pytest.raises(DataError) as raised:
        imagecache.open_cache(cached.directory)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{cached.directory}: damaged image cache")
    assert found in message and "removed it, run again" in message
    assert not cached.directory.exists()
    assert imagecache.open_cache(write_cache(tmp_path).directory) is not None  # written anew, it opens


# --------------------------------------------------------------------------------------------------
# A disk that fills up while the cache is written


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 256 KiB disk (a tmpfs mounted at tmp_path/disk), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def write_pictures(folder: Path, per_class: int, size: int) -> None:
    """`per_class` noisy RGB PNG pictures of `size` x `size` in each of two class folders."""
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{index:03d}.png")


@pytest.mark.faults  # README: What survives what
def test_a_disk_that_fills_up_while_the_cache_is_written_stops_with_one_line_and_exit_2(small_disk, study_env,
                                                                                        tmp_path):
    pictures = tmp_path / "pictures"
    write_pictures(pictures, per_class=30, size=64)  # decoded: 60 x 3x64x64 = 737 KB, on a 256 KiB disk
    env: StudyEnv = study_env.replace(root=small_disk)
    env.write_study(dataset={"path": str(pictures), "image_size": 64}, val_size=None, trials=1, seed=0,
                    sampler="random", pruner="none", fixed={"precision": "fp32"}, baseline=None)
    done = subprocess.run(env.command("search", "--device", "cpu"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, f"exit {done.returncode} (SIGBUS is -7): {done.stderr}"
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    cache = small_disk / "cache"
    assert f"{cache}: no room for the image cache on the disk mounted at {small_disk}" in line
    assert "it needs 737.3 kB" in line  # the decoded pictures and "free space there or pass --root" in line
    assert list(cache.rglob("*.npy")) == []  # no partial cache folder left on the disk
