"""The user's own pictures: an ImageFolder tree or a CSV list, decoded once into the image cache.

Layouts (torchvision's ImageFolder: one subfolder per class, its name is the class name):

    flowers/daisy/*.jpg, flowers/rose/*.jpg ...           the pipeline carves test and validation splits
    flowers/train/<class>/..., flowers/test/<class>/...   the splits as given (val/ optional, else carved)
    flowers/labels.csv with `path,label` rows             csv = "labels.csv" (paths relative to the CSV)

Every picture must resolve inside the dataset folder: a dataset from elsewhere could otherwise pull any file the
user can read (their own photos) into the cache, an export's mistakes grid and the report, through a linked
class folder or picture, or a CSV row like `../../Pictures/me.jpg`. `follow_links = true` lets links leave it.

The dataset digest covers every image's relative path, label and bytes, plus the preprocessing (size,
channels) and the carved test share, so a changed picture gives a new digest and a new cache. Files are
hashed once: an index beside the caches remembers each file's hash by its size and modification time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import functools
import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.data import imagecache
from pipeline.data.datasets import sha256_file
from pipeline.data.images import FORMATS, Preprocessing, decode_files, is_gray_mode
from pipeline.infra.concurrency import available_cores
from pipeline.infra.fileio import write_atomic
from pipeline.infra.text import print_to_stderr, printable
from pipeline.spec.errors import DataError
from pipeline.spec.sources import FolderSource

SPLIT_FOLDERS = {"train": imagecache.TRAIN, "val": imagecache.VAL, "test": imagecache.TEST}
DECODE_CHUNK = 64  # pictures per task sent to a decoding process
FOLLOW_LINKS_HINT = "or set follow_links = true in [dataset] if you trust where its links lead"


@dataclass(frozen=True)
class Listing:
    """The pictures of a source, in a fixed order (sorted relative paths)."""

    root: Path
    classes: tuple[str, ...]
    files: list[Path]  # absolute
    relative: list[str]  # POSIX paths relative to the root, what the digest records
    labels: list[int]
    split: list[int]  # imagecache.TRAIN / VAL / TEST / CARVE
    skipped: list[str]  # non-image files left out


def resolve_root(source: FolderSource, project_root: Path) -> Path:
    root = Path(source.path).expanduser()
    if not root.is_absolute():
        root = project_root / root
    if not root.is_dir():
        raise DataError(f"dataset.path: {root} does not exist or is not a folder; point path at a folder with one "
                        "subfolder per class (or run `make sample-images` for the example)")
    return root


@functools.cache
def _image_extensions() -> tuple[str, ...]:
    """The suffixes torchvision's ImageFolder takes for pictures."""
    from torchvision.datasets.folder import IMG_EXTENSIONS  # here: torchvision imports torch, this module must not

    return IMG_EXTENSIONS


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in _image_extensions() and not path.name.startswith(".")


def _class_folders(directory: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes  # here: torchvision imports torch, this module must not

    try:
        classes, _ = find_classes(directory)
    except FileNotFoundError:
        classes = []
    return [c for c in classes if not c.startswith(".")]  # .ipynb_checkpoints and the like are no class


def _require_inside(root: Path, files: list[Path],
                    named: Callable[[int], str] | None = None) -> list[Path]:
    """The real paths of `files` (found under `root`), refusing the first whose real path lies outside `root`'s:
    through a linked folder or a linked picture. `named(i)` says how the message names file i (default: its path).
    Each folder is resolved once and each file only when it is a link itself: resolving every path takes far longer
    than listing it (rglob does not descend into linked folders below a class folder)."""
    real_root = root.resolve()
    reals = _real_paths(files)
    for i, (file, real) in enumerate(zip(files, reals, strict=True)):
        if not real.is_relative_to(real_root):
            raise DataError(f"{named(i) if named else f'dataset.path: {file}'} leads to {real}, outside the dataset "
                            f"folder {real_root}; a dataset reads only pictures inside its folder: copy the picture in "
                            f"instead of linking it, {FOLLOW_LINKS_HINT}")
    return reals


def _real_paths(files: list[Path]) -> list[Path]:
    """What `files` (absolute, without `..`) resolve to, each folder resolved once and a file only if it is a link."""
    real_folders: dict[Path, Path] = {}
    reals = []
    for file in files:
        if file.parent not in real_folders:
            real_folders[file.parent] = file.parent.resolve()
        reals.append(file.resolve() if file.is_symlink() else real_folders[file.parent] / file.name)
    return reals


def list_folder(root: Path, follow_links: bool = False) -> Listing:
    """Every picture under `root` in the ImageFolder layout (with or without train/val/test splits); unless
    `follow_links`, DataError for one that resolves outside `root`."""
    given = (root / "train").is_dir() and (root / "test").is_dir()
    top = _class_folders(root)
    if not given and top and set(top) <= set(SPLIT_FOLDERS):
        # train/ and val/ alone would otherwise become two classes named "train" and "val".
        raise DataError(f"dataset.path: {root} has {', '.join(f'{t}/' for t in top)} but no "
                        f"{' and '.join(f'{s}/' for s in ('train', 'test') if s not in top)}; a split layout needs "
                        "train/ and test/ (val/ optional), each with the same class subfolders")
    parts = [(root / name, code) for name, code in SPLIT_FOLDERS.items() if (root / name).is_dir()] if given \
        else [(root, imagecache.CARVE)]
    where = parts[0][0]
    classes = _class_folders(where) if given else top
    if not classes:
        raise DataError(f"dataset.path: {where} has no class subfolders; put each class's pictures in a subfolder "
                        "named after the class (e.g. flowers/daisy/1.jpg, flowers/rose/2.jpg)")
    if len(classes) < 2:
        raise DataError(f"dataset.path: {where} has a single class {classes[0]!r}; a classifier needs at least two "
                        "class subfolders")
    files, labels, split, skipped = [], [], [], []
    for directory, code in parts:
        extra = sorted(set(_class_folders(directory)) - set(classes))
        if extra:
            raise DataError(f"dataset.path: {directory} has classes {extra} that {where} lacks; every split must use "
                            "the training split's class folders")
        for label, name in enumerate(classes):
            class_dir = directory / name
            found = sorted(p for p in class_dir.rglob("*") if p.is_file()) if class_dir.is_dir() else []
            images = [p for p in found if _is_image(p)]
            if not follow_links:
                _require_inside(root, images)
            skipped += [str(p.relative_to(root)) for p in found if not _is_image(p)]
            if not images and code != imagecache.VAL:
                raise DataError(f"dataset.path: class folder {class_dir} has no pictures "
                                f"({', '.join(_image_extensions())}); add some or remove the folder")
            files += images
            labels += [label] * len(images)
            split += [code] * len(images)
    relative = [p.relative_to(root).as_posix() for p in files]
    return Listing(root, tuple(classes), files, relative, labels, split, skipped)


def list_csv(root: Path, csv_name: str, follow_links: bool = False) -> Listing:
    """Pictures named in a `path,label` CSV (paths relative to the CSV); classes sorted by name. DataError for a row
    naming a picture outside `root` (the dataset folder), or, unless `follow_links`, a link that leads out of it."""
    table = Path(csv_name).expanduser()
    table = table if table.is_absolute() else root / table
    inside = Path(os.path.abspath(root))
    if not table.is_file():
        raise DataError(f"dataset.csv: {table} does not exist; give a CSV file with `path,label` columns")
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"dataset.csv: {table} must have a header row with `path` and `label` columns, "
                            f"found {reader.fieldnames}")
        rows, lines = [], []
        for row in reader:
            path, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            if not path or not label:
                raise DataError(f"dataset.csv: {table} line {reader.line_num} needs both a path and a label, found "
                                f"path={path!r} label={label!r}; fix or remove the row")
            named = Path(os.path.abspath(table.parent / path))  # `..` and absolute paths taken as written
            if not named.is_relative_to(inside):
                raise DataError(f"dataset.csv: {table} line {reader.line_num} names {path!r}, outside the dataset "
                                f"folder {inside}; list only pictures inside it, by paths relative to the CSV")
            rows.append((path, label, named))
            lines.append(reader.line_num)
    listed = [named for _, _, named in rows]
    reals = _real_paths(listed) if follow_links else _require_inside(
        root, listed, lambda i: f"dataset.csv: {table} line {lines[i]} names {rows[i][0]!r}, which")
    rows = [(path, label, real) for (path, label, _), real in zip(rows, reals, strict=True)]
    classes = sorted({label for _, label, _ in rows})
    if len(classes) < 2:
        raise DataError(f"dataset.csv: {table} names {len(classes)} class(es); a classifier needs at least two")
    rows.sort()
    label_of = {name: i for i, name in enumerate(classes)}
    files, relative, skipped, labels = [], [], [], []
    for path, label, file in rows:
        if not file.is_file():
            raise DataError(f"dataset.csv: {table} lists {path!r}, which does not exist; fix the row or remove it")
        if not _is_image(file):
            skipped.append(path)
            continue
        files.append(file)
        relative.append(f"{path}|{label}")
        labels.append(label_of[label])
    return Listing(table.parent, tuple(classes), files, relative, labels, [imagecache.CARVE] * len(files), skipped)


# --------------------------------------------------------------------------------------------------
# Digest


def file_hashes(listing: Listing, cache_root: Path) -> list[str]:
    """SHA-256 of every file, reusing the hashes of files whose size and modification time are unchanged."""
    index_path = cache_root / "index" / f"{hashlib.sha256(str(listing.root).encode()).hexdigest()[:16]}.json"
    try:
        known = json.loads(index_path.read_text())
    except (OSError, ValueError):
        known = {}
    hashes, fresh = [], {}
    for file, rel in zip(listing.files, listing.relative, strict=True):
        stat = file.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = known.get(rel)
        sha = entry[2] if entry and entry[:2] == stamp else sha256_file(file)
        fresh[rel] = [*stamp, sha]
        hashes.append(sha)
    if fresh != known:
        write_atomic(index_path, json.dumps(fresh).encode())
    return hashes


def digest(listing: Listing, hashes: list[str], source: FolderSource) -> str:
    """The dataset's identity. test_fraction is in it (though it decodes nothing) because the carved test split
    follows it: a recorded digest then names the test split too, and the training-split statistics kept in the
    cache folder (keyed by the split hash, which counts rows of the training part) cannot mix two test splits."""
    identity = {"classes": listing.classes, "preprocessing": source.preprocessing_key(),
                "test_fraction": source.test_fraction,
                "files": [[rel, label, split, sha] for rel, label, split, sha in
                          zip(listing.relative, listing.labels, listing.split, hashes, strict=True)]}
    return hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Decoding


def _resolve_channels(listing: Listing, channels: str) -> str:
    """auto: gray when every picture is stored gray (read from the headers alone), else RGB."""
    if channels != "auto":
        return channels
    for file in listing.files:
        try:
            with Image.open(file, formats=FORMATS) as image:  # only the decoders that will decode it read its header
                if not is_gray_mode(image.mode):
                    return "rgb"
        except Exception:  # unreadable: the decoder reports it
            continue
    return "gray"


def _progress_bar() -> Progress:
    """The decoding bar (count, images/s, elapsed) on stderr; off when stderr is no terminal, gone when done."""
    console = Console(stderr=True)
    return Progress(TextColumn("decoding {task.fields[name]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
                    disable=not console.is_terminal, transient=True)


def decode_into_cache(listing: Listing, source: FolderSource, key: str, data_root: Path,
                      log: Callable[[str], None] = print_to_stderr) -> Path:
    """Decode every picture once (all cores, a progress bar with images/s) into a new cache folder."""
    channels = _resolve_channels(listing, source.channels)
    preprocessing = Preprocessing(source.image_size, channels)
    count = len(listing.files)
    writer = imagecache.CacheWriter(data_root, key, count, preprocessing.shape)
    keep = np.ones(count, dtype=bool)
    errors: list[str] = []
    chunks = [list(range(i, min(i + DECODE_CHUNK, count))) for i in range(0, count, DECODE_CHUNK)]
    progress = _progress_bar()
    started = time.perf_counter()
    workers = max(1, min(available_cores(), len(chunks)))
    try:
        tasks = [([str(listing.files[i]) for i in chunk], preprocessing, source.max_megapixels) for chunk in chunks]
        with progress, contextlib.ExitStack() as stack:
            if workers > 1:
                # spawn, not fork: the parent may hold torch's thread pools, which a forked child must not inherit.
                pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context("spawn")))
                decoded = pool.map(decode_files, tasks)
            else:  # one chunk (or one core): a process would only add its start-up
                decoded = map(decode_files, tasks)
            task = progress.add_task("decode", total=count, name=listing.root.name, rate="")
            done = 0
            for chunk, results in zip(chunks, decoded, strict=True):
                for i, result in zip(chunk, results, strict=True):
                    if isinstance(result, str):
                        keep[i] = False
                        errors.append(result)
                    else:
                        writer.images[i] = result
                done += len(chunk)
                rate = done / max(time.perf_counter() - started, 1e-9)
                progress.update(task, completed=done, rate=f"{rate:,.0f} images/s")
        if errors and not source.skip_unreadable:
            raise DataError(f"{errors[0]}; fix or remove it, or set skip_unreadable = true in [dataset] to skip "
                            f"unreadable pictures ({len(errors)} in all)")
        labels = np.asarray(listing.labels)
        readable = np.bincount(labels[keep], minlength=len(listing.classes))
        emptied = [name for name, n in zip(listing.classes, readable, strict=True) if n == 0]
        if emptied:
            raise DataError(f"dataset.path: class {emptied[0]!r} has no readable pictures left after skipping "
                            f"{len(errors)} unreadable one(s) (first: {errors[0]}); add readable pictures to it")
        seconds = time.perf_counter() - started
        log(f"decoded {int(keep.sum()):,} pictures of {listing.root} at {source.image_size}x{source.image_size} "
            f"{channels} in {seconds:.1f} s ({count / max(seconds, 1e-9):,.0f} images/s, {workers} "
            f"process{'es' if workers > 1 else ''})")
        for line in errors:
            log(f"skipped (skip_unreadable = true): {printable(line)}")
        manifest = {
            "source": str(listing.root), "classes": list(listing.classes), "preprocessing": preprocessing.as_dict(),
            "folder": asdict(source), "skipped_non_images": listing.skipped, "skipped_unreadable": errors,
            "files": [rel for rel, k in zip(listing.relative, keep, strict=True) if k],
        }
        return writer.commit(labels, np.asarray(listing.split), manifest, keep)
    except BaseException:
        writer.abandon()
        raise


def land_folder(source: FolderSource, project_root: Path, data_root: Path,
                log: Callable[[str], None] = print_to_stderr) -> imagecache.CachedImages:
    """The folder's cache, decoding it first when its digest has none yet."""
    root = resolve_root(source, project_root)
    listing = (list_csv(root, source.csv, source.follow_links) if source.csv
               else list_folder(root, source.follow_links))
    if listing.skipped:
        shown = ", ".join(sorted({printable(Path(s).name, one_line=True) for s in listing.skipped})[:5])
        log(f"{root}: {len(listing.skipped)} non-image file(s) skipped ({shown})")
    key = digest(listing, file_hashes(listing, Path(data_root) / "cache"), source)
    cached = imagecache.open_cache(imagecache.cache_dir(data_root, key))
    if cached is None:
        counts = Counter(listing.labels)
        log(f"{root}: {len(listing.files):,} pictures in {len(listing.classes)} classes: "
            + ", ".join(f"{printable(name, one_line=True)} {counts[i]:,}" for i, name in enumerate(listing.classes)))
        cached = imagecache.open_committed(decode_into_cache(listing, source, key, data_root, log))
    return cached
