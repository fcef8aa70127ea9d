"""The user's own pictures: landing a folder (or a CSV list) into the image cache, and the bad input users bring.

Every picture is a real file written with Pillow; every landing decodes them for real. The CLI tests run
`search` in-process on a study file written here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import StudyEnv, refusal
from PIL import Image

from pipeline.data import folders, imagecache, loading
from pipeline.data.arrays import load_arrays
from pipeline.data.augment import NaturalAugment
from pipeline.data.images import Preprocessing, open_picture
from pipeline.infra.concurrency import available_cores
from pipeline.infra.text import byte_size
from pipeline.spec.sources import FolderSource

SIZE = 16  # every test lands at 16x16
COLOURS = {"cat": (200, 60, 40), "dog": (40, 90, 200), "bird": (230, 220, 60), "fish": (30, 160, 90)}


@dataclass
class Pictures:
    """A folder of pictures under construction, the data root its caches go to, and what landing logged."""

    folder: Path
    data_root: Path
    lines: list[str] = field(default_factory=list)
    written: int = 0  # pictures written so far: each gets its own noise, so no two files are alike

    def add(self, label: str, count: int, colour: tuple[int, int, int] | None = None, under: str = "",
            mode: str = "RGB", suffix: str = ".png", size: tuple[int, int] = (24, 20)) -> list[Path]:
        """`count` pictures of class `label` (in split folder `under`, if given): its colour plus noise."""
        directory = self.folder / under / label
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for _ in range(count):
            rng = np.random.default_rng(self.written)
            base = np.array(colour or COLOURS.get(label, (128, 128, 128)), dtype=np.int16)
            pixels = np.clip(base + rng.integers(-25, 26, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels).convert(mode)
            path = directory / f"{self.written:03d}{suffix}"
            image.save(path)
            paths.append(path)
            self.written += 1
        return paths

    def source(self, **options) -> FolderSource:
        return FolderSource(str(self.folder), image_size=SIZE, **options)

    def land(self, data_root: Path | None = None, **options) -> imagecache.CachedImages:
        return folders.land_folder(self.source(**options), self.folder.parent, data_root or self.data_root,
                                   self.lines.append)

    def prepare(self, resident_bytes: int | None = None, split_seed: int = 0, **options) -> loading.PreparedData:
        return loading.prepare(self.source(**options), self.data_root, "cpu", val_size=None, split_seed=split_seed,
                            resident_bytes=resident_bytes, log=self.lines.append)

    def caches(self) -> set[str]:
        root = self.data_root / "cache"
        return {p.name for p in root.iterdir() if p.is_dir() and p.name != "index"} if root.is_dir() else set()

    def logged(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


@pytest.fixture
def pictures(tmp_path) -> Pictures:
    """An empty picture folder `pics/` and a data root `data/` in a temporary directory."""
    (tmp_path / "pics").mkdir()
    return Pictures(tmp_path / "pics", tmp_path / "data")


def decoded(path: Path, channels: str = "rgb") -> np.ndarray:
    return open_picture(path, Preprocessing(SIZE, channels))


# --------------------------------------------------------------------------------------------------
# A. Landing


def test_classes_and_counts_come_from_the_folder_names(pictures):
    pictures.add("dog", 7)
    pictures.add("cat", 5)
    pictures.add("bird", 3)
    cached = pictures.land()
    assert cached.classes == ("bird", "cat", "dog")
    assert np.bincount(cached.labels).tolist() == [3, 5, 7]
    assert cached.images.shape == (15, 3, SIZE, SIZE) and cached.images.dtype == np.uint8
    assert set(cached.split.tolist()) == {imagecache.CARVE}
    assert pictures.logged("15 pictures in 3 classes: bird 3, cat 5, dog 7")
    for relative, label, image in zip(cached.manifest["files"], cached.labels, cached.images, strict=True):
        assert cached.classes[label] == relative.split("/")[0]
        assert np.array_equal(image, decoded(pictures.folder / relative))


def test_digest_is_stable_and_a_changed_picture_gets_a_new_cache(pictures, tmp_path):
    pictures.add("cat", 4)
    changed_file = pictures.add("dog", 4)[1]
    first = pictures.land()
    elsewhere = pictures.land(data_root=tmp_path / "other-data")  # no index there: every file hashed anew
    assert elsewhere.digest == first.digest

    Image.new("RGB", (24, 20), (0, 255, 0)).save(changed_file)  # one picture's bytes change
    changed = pictures.land()
    assert changed.digest != first.digest
    assert pictures.caches() == {first.digest, changed.digest}  # the old cache is kept
    row = changed.manifest["files"].index(changed_file.relative_to(pictures.folder).as_posix())
    assert changed.images[row].reshape(3, -1).T.tolist() == [[0, 255, 0]] * SIZE * SIZE

    pictures.add("dog", 1)  # a picture added: a new digest again
    assert pictures.land().digest not in {first.digest, changed.digest}
    assert imagecache.open_cache(imagecache.cache_dir(pictures.data_root, first.digest)) is not None


def test_second_landing_reads_the_cache_without_decoding(pictures):
    pictures.add("cat", 6)
    pictures.add("dog", 6)
    first = pictures.land()
    assert len(pictures.logged("decoded 12 pictures")) == 1
    stamp = (first.directory / "images.npy").stat().st_mtime_ns
    pictures.lines.clear()

    second = pictures.land()
    assert second.digest == first.digest and pictures.caches() == {first.digest}
    assert not pictures.logged("decoded") and not pictures.logged("pictures in")
    assert (second.directory / "images.npy").stat().st_mtime_ns == stamp
    assert np.array_equal(np.asarray(second.images), np.asarray(first.images))


def test_unchanged_files_are_not_hashed_again(pictures, monkeypatch):
    """The index beside the caches: a file is hashed again only when its size or modification time changed."""
    pictures.add("cat", 3)
    dogs = pictures.add("dog", 3)
    first = pictures.land()
    hashed = []

    def counting(path):
        hashed.append(path.name)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    monkeypatch.setattr(folders, "sha256_file", counting)
    assert pictures.land().digest == first.digest and hashed == []
    os.utime(dogs[0], ns=(1, 1))  # touched: the same bytes, another modification time
    assert pictures.land().digest == first.digest and hashed == [dogs[0].name]


def test_a_damaged_cache_is_removed_and_decoded_anew(pictures):
    pictures.add("cat", 3)
    pictures.add("dog", 3)
    first = pictures.land()
    images = np.array(first.images)
    (first.directory / "labels.npy").write_bytes(b"not numpy")
    message = refusal(pictures.land)
    assert message.startswith(f"{first.directory}: damaged image cache") and "run again" in message
    assert not first.directory.exists()
    again = pictures.land()
    assert again.digest == first.digest and np.array_equal(again.images, images)


def test_given_train_val_test_folders_are_used_as_given(pictures):
    for label in ("cat", "dog"):
        pictures.add(label, 6, under="train")
        pictures.add(label, 2, under="val", colour=(250, 250, 250))  # white: told apart from the training ones
        pictures.add(label, 3, under="test", colour=(5, 5, 5))
    prepared = pictures.prepare()
    assert (len(prepared.train), len(prepared.val), prepared.test_count) == (12, 4, 6)
    assert prepared.mode == "resident"
    val_files = sorted((pictures.folder / "val").rglob("*.png"))
    expected = sorted(decoded(p).tobytes() for p in val_files)
    assert sorted(image.numpy().tobytes() for image in prepared.val.images) == expected
    assert sorted(prepared.val.labels.tolist()) == [0, 0, 1, 1]
    assert all(image.float().mean() < 200 for image in prepared.train.images)  # none of the white val pictures


def test_without_val_folder_validation_is_carved_from_train(pictures):
    for label in ("cat", "dog"):
        pictures.add(label, 8, under="train")
        pictures.add(label, 2, under="test")
    prepared = pictures.prepare(val_fraction=0.25)
    assert (len(prepared.train), len(prepared.val), prepared.test_count) == (12, 4, 4)
    assert sorted(prepared.val.labels.tolist()) == [0, 0, 1, 1]  # stratified: two of each


def test_train_and_val_folders_without_test_are_refused(pictures):
    """Not two classes named "train" and "val": the layout is named and the fix given."""
    for label in ("cat", "dog"):
        pictures.add(label, 3, under="train")
        pictures.add(label, 1, under="val")
    message = refusal(pictures.land)
    assert str(pictures.folder) in message and "no test/" in message and "train/ and test/" in message


def test_carved_splits_are_stratified_disjoint_and_seeded(pictures):
    for label in ("bird", "cat", "dog"):
        pictures.add(label, 10)
    options = {"test_fraction": 0.2, "val_fraction": 0.25}
    prepared = pictures.prepare(resident_bytes=1, **options)  # streamed: the split rows are visible
    arrays = load_arrays(pictures.source(**options), pictures.data_root, pictures.lines.append)
    train, val, test = prepared.train.rows, prepared.val.rows, arrays.test_rows
    assert (len(train), len(val), len(test)) == (18, 6, 6)
    assert torch.bincount(arrays.labels[test]).tolist() == [2, 2, 2]
    assert torch.bincount(arrays.labels[val]).tolist() == [2, 2, 2]
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(30))

    again = pictures.prepare(resident_bytes=1, **options)
    assert again.split_hash == prepared.split_hash and torch.equal(again.val.rows, val)
    other = pictures.prepare(resident_bytes=1, split_seed=1, **options)
    assert other.split_hash != prepared.split_hash and not torch.equal(other.val.rows, val)
    assert torch.equal(load_arrays(pictures.source(**options), pictures.data_root).test_rows, test)


def test_each_test_fraction_gets_its_own_test_split(pictures):
    """The carved test split follows test_fraction, also when the pictures were landed before with another."""
    pictures.add("cat", 10)
    pictures.add("dog", 10)
    assert pictures.prepare(test_fraction=0.2).test_count == 4
    assert pictures.prepare(test_fraction=0.5).test_count == 10
    assert pictures.prepare(test_fraction=0.2).test_count == 4


def test_csv_source_labels_pictures_by_its_rows(pictures):
    zebras = pictures.add("img", 5, colour=(250, 250, 250))  # all in one folder; the CSV says what they are
    horses = pictures.add("img", 4, colour=(120, 70, 20))
    (pictures.folder / "img" / "notes.txt").write_text("taken at the zoo")
    rows = [f"img/{p.name},zebra" for p in zebras] + [f"img/{p.name},horse" for p in horses] + ["img/notes.txt,zebra"]
    (pictures.folder / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    cached = pictures.land(csv="labels.csv")
    assert cached.classes == ("horse", "zebra")
    assert np.bincount(cached.labels).tolist() == [4, 5]
    for image, label in zip(cached.images, cached.labels, strict=True):
        assert (image.mean() > 200) == (cached.classes[label] == "zebra")
    assert pictures.logged("1 non-image file(s) skipped (notes.txt)")


def test_csv_rows_naming_missing_files_or_no_label_are_refused(pictures):
    pictures.add("img", 4)
    table = pictures.folder / "labels.csv"
    table.write_text("path,label\nimg/000.png,a\nimg/001.png,b\nimg/999.png,a\n")
    message = refusal(lambda: pictures.land(csv="labels.csv"))
    assert str(table) in message and "'img/999.png'" in message and "does not exist" in message
    table.write_text("path,label\nimg/000.png,a\nimg/001.png,b\nimg/002.png,\n")
    message = refusal(lambda: pictures.land(csv="labels.csv"))
    assert "line 4" in message and "label" in message
    table.write_text("file,class\nimg/000.png,a\n")
    assert "`path` and `label` columns" in refusal(lambda: pictures.land(csv="labels.csv"))


def test_channels_auto_gray_only_when_every_picture_is_gray(pictures):
    pictures.add("cat", 4, mode="L")
    pictures.add("dog", 4, mode="L")
    gray = pictures.land()
    assert gray.images.shape[1] == 1 and gray.manifest["preprocessing"]["channels"] == "gray"
    assert pictures.land(channels="rgb").images.shape[1] == 3
    assert pictures.land(channels="gray").images.shape[1] == 1

    pictures.add("dog", 1)  # one colour picture among the gray ones
    colour = pictures.land()
    assert colour.images.shape[1] == 3 and colour.manifest["preprocessing"]["channels"] == "rgb"
    forced = pictures.land(channels="gray")
    assert forced.images.shape[1] == 1
    row = forced.manifest["files"].index("dog/008.png")
    assert np.array_equal(forced.images[row], decoded(pictures.folder / "dog" / "008.png", "gray"))


def test_streamed_batches_equal_resident_ones_bit_for_bit(pictures):
    for label in ("cat", "dog", "bird"):
        pictures.add(label, 14)
    resident = pictures.prepare()
    streamed = pictures.prepare(resident_bytes=1)
    assert resident.mode == "resident" and streamed.mode == "streamed from the memory-mapped cache"
    assert not resident.train.streamed and streamed.train.streamed
    assert resident.split_hash == streamed.split_hash and resident.mean == streamed.mean

    augment = NaturalAugment.from_strength(1.0, SIZE)
    for seed in (0, 5):
        runs = []
        for prepared in (resident, streamed):
            generator = torch.Generator().manual_seed(seed)
            runs.append([(x, y) for _ in range(2) for x, y in prepared.train.batches(8, generator, augment)])
        assert len(runs[0]) == len(runs[1]) == 2 * 5
        for (x1, y1), (x2, y2) in zip(*runs, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for (x1, y1), (x2, y2) in zip(resident.val.batches(4), streamed.val.batches(4), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_mean_and_std_are_numpys_over_the_training_split(pictures):
    pictures.add("cat", 9)
    pictures.add("dog", 9, colour=(10, 250, 120))
    pictures.add("bird", 9, mode="L", colour=(90, 90, 90))
    prepared = pictures.prepare()
    pixels = prepared.train.images.numpy().astype(np.float64) / 255.0  # exactly the training split, resident
    assert len(pixels) == len(prepared.train) and pixels.shape[1] == 3
    np.testing.assert_allclose(prepared.mean, pixels.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(prepared.std, pixels.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    val = prepared.val.images.numpy().astype(np.float64) / 255.0
    assert not np.allclose(prepared.mean, np.concatenate([pixels, val]).mean(axis=(0, 2, 3)), rtol=0, atol=1e-9)


@pytest.mark.skipif(available_cores() < 2, reason="decoding in worker processes needs two cores")
def test_decoding_in_worker_processes_gives_each_file_its_own_picture(pictures):
    pictures.add("cat", 70)
    pictures.add("dog", 60)  # 130 pictures: three chunks of at most 64
    cached = pictures.land()
    assert pictures.logged("decoded 130 pictures") and pictures.logged("2 processes")
    for relative, image in zip(cached.manifest["files"], cached.images, strict=True):
        assert np.array_equal(image, decoded(pictures.folder / relative))


# --------------------------------------------------------------------------------------------------
# B. Bad input: one line that names the file or key and says the fix


def test_a_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    message = refusal(lambda: folders.land_folder(FolderSource(str(missing)), tmp_path, tmp_path / "data"))
    assert message.startswith(f"dataset.path: {missing} does not exist") and "subfolder per class" in message


def test_a_folder_of_loose_pictures_has_no_class_subfolders(pictures):
    for path in pictures.add("cat", 3):
        path.rename(pictures.folder / path.name)
    (pictures.folder / "cat").rmdir()
    message = refusal(pictures.land)
    assert f"{pictures.folder} has no class subfolders" in message and "flowers/daisy/1.jpg" in message


def test_a_single_class_is_refused(pictures):
    pictures.add("cat", 3)
    assert "has a single class 'cat'" in refusal(pictures.land)


def test_an_empty_class_is_refused(pictures):
    pictures.add("cat", 3)
    pictures.add("dog", 3)
    (pictures.folder / "fish").mkdir()
    (pictures.folder / "fish" / "notes.txt").write_text("to do")
    message = refusal(pictures.land)
    assert f"class folder {pictures.folder / 'fish'} has no pictures" in message and "remove the folder" in message


def test_non_image_files_are_skipped_and_counted(pictures):
    pictures.add("cat", 3)
    pictures.add("dog", 3)
    (pictures.folder / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (pictures.folder / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (pictures.folder / "dog" / "notes.txt").write_text("good dogs")
    cached = pictures.land()
    assert len(cached.images) == 6
    assert pictures.logged("3 non-image file(s) skipped (.DS_Store, Thumbs.db, notes.txt)")
    assert sorted(cached.manifest["skipped_non_images"]) == ["cat/.DS_Store", "cat/Thumbs.db", "dog/notes.txt"]


def _truncated_jpeg(directory: Path) -> Path:
    whole = directory / "whole.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(whole)
    cut = directory / "broken.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    return cut


def test_a_truncated_jpeg_is_named_or_skipped_when_asked(pictures):
    pictures.add("cat", 4)
    pictures.add("dog", 4)
    broken = _truncated_jpeg(pictures.folder / "dog")
    message = refusal(pictures.land)
    assert message.startswith(f"{broken}: cannot be decoded as an image") and "skip_unreadable = true" in message
    assert pictures.caches() == set() and not list((pictures.data_root / "cache").glob(".*partial*"))

    cached = pictures.land(skip_unreadable=True)
    assert len(cached.images) == 8 and "dog/broken.jpg" not in cached.manifest["files"]
    assert pictures.logged(f"skipped (skip_unreadable = true): {broken}: cannot be decoded")
    assert cached.manifest["skipped_unreadable"][0].startswith(str(broken))
    assert np.bincount(cached.labels).tolist() == [4, 4]


def skipping_writer(root: Path, count: int, shape: tuple[int, int, int]) -> tuple[imagecache.CacheWriter, np.ndarray]:
    """A cache writer holding `count` distinct images, and a mask that skips every seventh (skip_unreadable)."""
    writer = imagecache.CacheWriter(root, "0123456789abcdef", count, shape)
    writer.images[:] = (np.arange(count, dtype=np.int64) % 251).astype(np.uint8).reshape(count, 1, 1, 1)
    return writer, np.arange(count) % 7 != 3


def commit(writer: imagecache.CacheWriter, keep: np.ndarray) -> Path:
    count = len(keep)
    return writer.commit(np.zeros(count, dtype=np.int64), np.full(count, imagecache.CARVE, dtype=np.uint8),
                         {"source": "pics", "classes": ["a"], "preprocessing": {}}, keep)


def test_dropping_skipped_pictures_copies_the_cache_a_slice_at_a_time(tmp_path, monkeypatch):
    """A split larger than RAM streams from disk: the copy without the skipped pictures never holds them all."""
    monkeypatch.setattr(imagecache, "COPY_BYTES", 1 << 20)
    shape = (3, 32, 32)
    writer, keep = skipping_writer(tmp_path, 4000, shape)  # 12.3 MB of images, 10.5 MB of them kept
    expected = np.asarray(writer.images)[keep].copy()
    tracemalloc.start()
    try:
        directory = commit(writer, keep)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20, f"{peak:,} bytes in memory at once"
    images = np.load(directory / "images.npy", mmap_mode="r")
    assert images.shape == (int(keep.sum()), *shape) and np.array_equal(images, expected)


def test_no_room_for_the_copy_without_the_skipped_pictures_names_what_both_need(tmp_path, monkeypatch):
    shape = (3, 8, 8)
    writer, keep = skipping_writer(tmp_path, 70, shape)  # 60 kept
    reserve = imagecache._reserved_memmap

    def full_disk(path: Path, size: tuple[int, ...]) -> np.memmap:
        if path.name == "kept.npy":
            raise OSError(errno.ENOSPC, "No space left on device")
        return reserve(path, size)

    monkeypatch.setattr(imagecache, "_reserved_memmap", full_disk)
    message = refusal(lambda: commit(writer, keep))
    assert f"it needs {byte_size((70 + 60) * 3 * 8 * 8)}," in message, message
    assert not list(tmp_path.rglob("*.npy"))


def test_skipping_every_picture_of_a_class_is_refused(pictures):
    pictures.add("cat", 3)
    (pictures.folder / "dog").mkdir()
    broken = _truncated_jpeg(pictures.folder / "dog")
    message = refusal(lambda: pictures.land(skip_unreadable=True))
    assert "class 'dog' has no readable pictures left" in message and str(broken) in message


def test_every_colour_mode_lands_as_rgb(pictures):
    pictures.add("plain", 2)
    odd = pictures.folder / "odd"
    odd.mkdir()
    Image.fromarray(np.full((20, 24), 40000, dtype=np.uint16)).save(odd / "deep.png")
    Image.new("CMYK", (24, 20), (0, 255, 255, 0)).save(odd / "print.jpg")
    palette = Image.new("P", (24, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(odd / "palette.png")
    Image.new("RGBA", (24, 20), (255, 0, 0, 0)).save(odd / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (24, 20), (0, 0, 250)).save(odd / "phone.jpg", exif=exif)
    cached = pictures.land()
    assert cached.images.shape == (7, 3, SIZE, SIZE) and cached.classes == ("odd", "plain")
    colours = {Path(rel).name: cached.images[i].reshape(3, -1).mean(axis=1).round() for i, rel in
               enumerate(cached.manifest["files"])}
    assert colours["deep.png"].tolist() == [156] * 3  # 40000 of 65535, scaled
    assert colours["print.jpg"][0] > 240 and colours["print.jpg"][1:].max() < 15
    assert colours["palette.png"].tolist() == [10, 200, 30]
    assert colours["alpha.png"].tolist() == [255, 255, 255]
    assert colours["phone.jpg"][2] > 240
    for relative, image in zip(cached.manifest["files"], cached.images, strict=True):
        assert np.array_equal(image, decoded(pictures.folder / relative))


def test_a_picture_over_the_pixel_cap_is_named(pictures):
    pictures.add("cat", 3)
    pictures.add("dog", 3, size=(40, 40))
    message = refusal(lambda: pictures.land(max_megapixels=0.001))
    assert "40x40" in message and str(pictures.folder / "dog") in message and "dataset.max_megapixels" in message


def test_a_108_megapixel_picture_is_refused_by_the_default_cap(pictures):
    pictures.add("cat", 3)
    pictures.add("dog", 3)
    huge = pictures.folder / "dog" / "huge.png"
    Image.new("1", (12_000, 9_000)).save(huge)  # tiny on disk, 108 million pixels decoded
    message = refusal(pictures.land)
    assert message.startswith(f"{huge}: 12000x9000 is 108 megapixels, over the cap of 100")


def test_class_names_with_spaces_and_accents_work(pictures):
    names = ["grüne Äpfel", "čaj s mlékem", "東京 夜景"]
    for name in names:
        pictures.add(name, 3)
    first = pictures.land()
    assert first.classes == tuple(sorted(names))
    again = pictures.land()  # the manifest read back from disk
    assert again.classes == first.classes and again.digest == first.digest
    manifest = json.loads((first.directory / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["classes"] == sorted(names)
    prepared = pictures.prepare()
    assert prepared.classes == tuple(sorted(names)) and len(prepared.train) + len(prepared.val) > 0


# --------------------------------------------------------------------------------------------------
# C. A dataset from elsewhere: it reads only pictures inside its folder, and its names are printed as they are


def private_photo(tmp_path: Path) -> Path:
    """One of the user's own pictures, beside the dataset folder (pics/): what a crafted dataset would pull in."""
    (tmp_path / "private").mkdir(exist_ok=True)
    path = tmp_path / "private" / "me.png"
    Image.new("RGB", (24, 20), (250, 200, 180)).save(path)
    return path


def test_a_linked_class_folder_or_picture_leading_outside_is_refused(pictures, tmp_path):
    photo = private_photo(tmp_path)
    pictures.add("cat", 3)
    pictures.add("dog", 3)
    (pictures.folder / "friends").symlink_to(photo.parent, target_is_directory=True)
    message = refusal(pictures.land)
    assert message.startswith(f"dataset.path: {pictures.folder / 'friends' / 'me.png'} leads to {photo.resolve()}, "
                              f"outside the dataset folder {pictures.folder.resolve()}")
    assert "follow_links = true" in message
    assert pictures.caches() == set()  # refused while listing: nothing decoded
    assert "friends/me.png" in folders.list_folder(pictures.folder, follow_links=True).relative  # asked for: read

    (pictures.folder / "friends").unlink()
    (pictures.folder / "cat" / "selfie.png").symlink_to(photo)
    message = refusal(pictures.land)
    assert message.startswith(f"dataset.path: {pictures.folder / 'cat' / 'selfie.png'} leads to {photo.resolve()}")
    assert pictures.caches() == set()
    assert "cat/selfie.png" in folders.list_folder(pictures.folder, follow_links=True).relative


def test_links_that_stay_inside_the_folder_and_a_linked_folder_itself_are_read(pictures, tmp_path):
    cats = pictures.add("cat", 3)
    pictures.add("dog", 3)
    (pictures.folder / "dog" / "alias.png").symlink_to(cats[0])  # the same picture, in another class
    assert "dog/alias.png" in pictures.land().manifest["files"]

    linked = tmp_path / "on-another-disk"  # the user's own link to their dataset
    linked.symlink_to(pictures.folder, target_is_directory=True)
    cached = folders.land_folder(FolderSource(str(linked), image_size=SIZE), tmp_path, pictures.data_root)
    assert len(cached.labels) == 7


def test_csv_rows_naming_pictures_outside_the_folder_are_refused(pictures, tmp_path):
    photo = private_photo(tmp_path)
    pictures.add("img", 4)
    table = pictures.folder / "labels.csv"
    for row in ("../private/me.png", str(photo), "img/../../private/me.png"):
        table.write_text(f"path,label\nimg/000.png,a\nimg/001.png,b\n{row},a\n")
        message = refusal(lambda: pictures.land(csv="labels.csv"))
        assert message.startswith(f"dataset.csv: {table} line 4 names {row!r}, outside the dataset folder "
                                  f"{pictures.folder}"), row

    (pictures.folder / "img" / "selfie.png").symlink_to(photo)
    table.write_text("path,label\nimg/000.png,a\nimg/001.png,b\nimg/selfie.png,a\n")
    message = refusal(lambda: pictures.land(csv="labels.csv"))
    assert message.startswith(f"dataset.csv: {table} line 4 names 'img/selfie.png', which leads to {photo.resolve()}")
    assert "follow_links = true" in message
    assert pictures.caches() == set()
    assert photo.resolve() in folders.list_csv(pictures.folder, "labels.csv", follow_links=True).files

    (pictures.folder / "lists").mkdir()  # a CSV one folder down names the pictures by ../, inside the folder
    (pictures.folder / "lists" / "labels.csv").write_text("path,label\n../img/000.png,a\n../img/001.png,b\n")
    assert pictures.land(csv="lists/labels.csv").classes == ("a", "b")


def test_channels_auto_reads_the_headers_of_the_formats_it_decodes_only(pictures):
    pictures.add("cat", 4, mode="L")
    pictures.add("dog", 4, mode="L")
    poster = pictures.folder / "dog" / "poster.png"  # a colour picture in a format no dataset reads
    Image.new("RGB", (24, 20), (200, 30, 30)).save(poster, format="SGI")
    cached = pictures.land(skip_unreadable=True)
    assert cached.images.shape[1] == 1 and cached.manifest["preprocessing"]["channels"] == "gray"
    (skipped,) = pictures.logged("skipped (skip_unreadable = true)")
    assert f"{poster}: cannot be decoded as an image in the formats read here" in skipped


def test_names_are_logged_without_their_control_characters(pictures):
    pictures.add("\x1b]0;owned\x07cat", 3)  # ESC ] ... BEL sets the terminal's title
    pictures.add("dog", 3)
    (pictures.folder / "dog" / "\x1b[2Jnotes.txt").write_text("ESC [2J clears the screen")
    cached = pictures.land()
    assert cached.classes == ("\x1b]0;owned\x07cat", "dog")  # the names themselves are kept
    assert pictures.logged("6 pictures in 2 classes: ]0;ownedcat 3, dog 3")
    assert pictures.logged("1 non-image file(s) skipped ([2Jnotes.txt)")
    assert not [line for line in pictures.lines if "\x1b" in line or "\x07" in line]


# --------------------------------------------------------------------------------------------------
# B through the CLI: exit code 2, one line, nothing already recorded lost

def write_folder_study(env: StudyEnv, folder: Path) -> None:
    """One trial on the folder's pictures at 16x16, with a small CNN."""
    env.write_study(dataset={"path": str(folder), "image_size": 16}, val_size=None, trials=1, timeout_minutes=5,
                    seed=0, sampler="random", pruner="none", epochs=1,
                    fixed={"cnn_channels": [4, 8], "batch_size": 8, "precision": "fp32", "augment": 0.0},
                    space={"lr": {"type": "categorical", "choices": [0.01]}, "dropout": None}, baseline=None)


def _flatten(folder: Path) -> None:
    for class_dir in [p for p in folder.iterdir() if p.is_dir()]:
        for path in class_dir.iterdir():
            path.rename(folder / f"{class_dir.name}-{path.name}")
        class_dir.rmdir()


def _add_huge(folder: Path) -> None:
    Image.new("1", (12_000, 9_000)).save(folder / "dog" / "huge.png")


def _link_outside(folder: Path) -> None:
    """A class folder that is a link to pictures outside the dataset folder."""
    elsewhere = folder.parent / "elsewhere"
    shutil.rmtree(elsewhere, ignore_errors=True)
    shutil.copytree(folder / "dog", elsewhere)
    (folder / "fish").symlink_to(elsewhere, target_is_directory=True)


def _split_without_test(folder: Path) -> None:
    (folder / "train").mkdir()
    (folder / "val").mkdir()
    for label in ("cat", "dog"):
        (folder / label).rename(folder / "train" / label)


BREAKAGES = [
    ("missing path", lambda f: shutil.rmtree(f), "does not exist or is not a folder"),
    ("no class subfolders", _flatten, "has no class subfolders"),
    ("single class", lambda f: shutil.rmtree(f / "dog"), "has a single class 'cat'"),
    ("empty class", lambda f: (f / "fish").mkdir(), "fish has no pictures"),
    ("truncated jpeg", lambda f: _truncated_jpeg(f / "cat"), "broken.jpg: cannot be decoded as an image"),
    ("huge picture", _add_huge, "huge.png: 12000x9000 is 108 megapixels"),
    ("train and val, no test", _split_without_test, "no test/"),
    ("linked class folder", _link_outside, "outside the dataset folder"),
]


@pytest.mark.faults  # README: What survives what
@pytest.mark.trained_values
def test_bad_folders_through_the_cli_exit_2_and_keep_the_recorded_trials(pictures, study_env, tmp_path, capsys):
    pictures.add("cat", 12)
    pictures.add("dog", 12)
    env = study_env.replace(root=pictures.data_root)
    write_folder_study(env, pictures.folder)
    assert env.run("search", "--device", "cpu") == 0, capsys.readouterr().err
    first_out = capsys.readouterr().out
    assert "tiny" in first_out and "16x16" in first_out  # the header names the image shape ("3x16x16")

    def recorded() -> list[tuple]:
        return [(t.number, t.state, t.values) for t in env.records()]

    before = recorded()
    assert [state for _, state, _ in before] == ["COMPLETE"]
    caches = pictures.caches()
    good = tmp_path / "good-pics"
    shutil.copytree(pictures.folder, good)
    for what, breakage, fragment in BREAKAGES:
        shutil.rmtree(pictures.folder, ignore_errors=True)
        shutil.copytree(good, pictures.folder)
        breakage(pictures.folder)
        code = env.run("search", "--device", "cpu", "--trials", "2")
        out, err = capsys.readouterr()
        assert code == 2, f"{what}: exit {code}\n{out}\n{err}"
        errors = [line for line in err.splitlines() if line.startswith("error:")]  # above it: landing's progress
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and fragment in errors[0], f"{what}: {err}"
        assert recorded() == before, what
        assert pictures.caches() == caches, what  # no half-written cache left behind either


@pytest.mark.faults  # README: What survives what
@pytest.mark.trained_values
def test_replay_after_a_picture_changed_says_the_digest_no_longer_matches(pictures, study_env, capsys):
    pictures.add("cat", 12)
    dogs = pictures.add("dog", 12)
    env = study_env.replace(root=pictures.data_root)
    write_folder_study(env, pictures.folder)
    assert env.run("search", "--device", "cpu") == 0, capsys.readouterr().err
    assert env.run("replay", "--device", "cpu", "--trial", "0") == 0  # unchanged pictures: identical
    capsys.readouterr()
    Image.new("RGB", (24, 20), (255, 255, 255)).save(dogs[0])  # one picture changes
    assert env.run("replay", "--device", "cpu", "--trial", "0") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "trial 0 was trained on pics with digest" in err and "restore the pictures" in err
    assert len(pictures.caches()) == 2  # the changed folder got a cache of its own; the old one is kept
