"""Images/s of a folder of JPEGs: torchvision's ImageFolder + DataLoader vs our decoded cache, side by side.

    .venv/bin/python benchmarks/folder_throughput.py [--per-class 600] [--epochs 5] [--workers 2]

The tree: `pipeline.data.sample_images`, JPEGs only, 64-128 px, 5 classes, written once under data/bench-images/.
Baseline: `ImageFolder` with Resize(32), CenterCrop(32), RandomHorizontalFlip, ToTensor, Normalize through
`DataLoader(batch_size=64, shuffle=True, num_workers=2)`: every epoch decodes every JPEG again.
Ours: `folders.land_folder` on a cold cache (that digest's cache folder removed first) decodes every picture
once; then each epoch is `ResidentImages.batches(64)` of the training split with the natural augmentation
(random crop, flip, colour jitter) at strength 1, from `data.prepare`. Each side runs one untimed epoch
first; rates are mean +- sd over the timed epochs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

from pipeline.data import folders, imagecache, loading, sample_images
from pipeline.data.augment import make_augment
from pipeline.spec.paths import DATA_ROOT, PROJECT_ROOT
from pipeline.spec.sources import FolderSource

BATCH = 64
SIZE = 32
TREE = DATA_ROOT / "bench-images"  # benchmark-only: no study reads it
SIZES = (64, 128)


def epoch_rate(batches) -> float:
    """Images/s of one pass over `batches` (an iterable started inside the timing, as a trainer starts it)."""
    seen = 0
    started = time.perf_counter()
    for x, _ in batches:
        seen += len(x)
    return seen / (time.perf_counter() - started)


def spread(rates: list[float]) -> str:
    sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
    return f"{statistics.mean(rates):,.0f} +- {sd:,.0f}"


def cold_landing(source: FolderSource) -> float:
    """Seconds to land `source` after its decoded cache is removed (the file-hash index stays warm)."""
    root = folders.resolve_root(source, PROJECT_ROOT)
    listing = folders.list_folder(root)
    key = folders.digest(listing, folders.file_hashes(listing, DATA_ROOT / "cache"), source)
    shutil.rmtree(imagecache.cache_dir(DATA_ROOT, key), ignore_errors=True)
    started = time.perf_counter()
    folders.land_folder(source, PROJECT_ROOT, DATA_ROOT, log=lambda message: None)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=600, help="JPEGs per class (5 classes)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs timed per side (after one untimed)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the baseline")
    args = parser.parse_args()
    torch.set_num_threads(2)
    # Others' processes on these cores slow the 2-thread tensor ops most (the threads wait for each other).
    load = os.getloadavg()[0]

    sample_images.write(TREE, args.per_class, seed=1, sizes=SIZES, jpeg_only=True)
    source = FolderSource(path=str(TREE), image_size=SIZE)
    landing = cold_landing(source)
    prepared = loading.prepare(source, DATA_ROOT, "cpu", val_size=None, log=lambda message: None)
    count = args.per_class * len(sample_images.CLASSES)

    transform = transforms.Compose([transforms.Resize(SIZE), transforms.CenterCrop(SIZE),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(prepared.mean, prepared.std)])
    loader = DataLoader(ImageFolder(str(TREE), transform=transform), batch_size=BATCH, shuffle=True,
                        num_workers=args.workers)
    epoch_rate(loader)  # warm-up, untimed: worker start-up code paths, the files into the page cache
    theirs = [epoch_rate(loader) for _ in range(args.epochs)]

    augment = make_augment("natural", 1.0, SIZE)
    generator = torch.Generator().manual_seed(0)
    epoch_rate(prepared.train.batches(BATCH, generator, augment))  # warm-up, untimed: first-call allocations
    ours = [epoch_rate(prepared.train.batches(BATCH, generator, augment)) for _ in range(args.epochs)]
    plain = [epoch_rate(prepared.train.batches(BATCH, generator)) for _ in range(args.epochs)]

    theirs_mean, ours_mean = statistics.mean(theirs), statistics.mean(ours)
    # Landing pays for itself once the epochs it saves add up to its own time.
    saved_per_epoch = count / theirs_mean - count / ours_mean
    print(f"{TREE.relative_to(PROJECT_ROOT)}: {count:,} JPEGs {SIZES[0]}-{SIZES[1]} px in "
          f"{len(sample_images.CLASSES)} classes -> {SIZE}x{SIZE} {prepared.preprocessing.channels}, batch {BATCH}, "
          f"CPU threads 2, DataLoader workers {args.workers}, {args.epochs} epochs per side (mean +- sd)")
    print(f"load average before this run: {load:.1f} on {os.cpu_count()} cores")
    print(f"{'pipeline':44} {'torchvision img/s':>18} {'ours img/s':>18} {'ours/torchvision':>17}")
    print(f"{'epoch with augmentation (see the docstring)':44} {spread(theirs):>18} {spread(ours):>18} "
          f"{ours_mean / theirs_mean:16.1f}x")
    print(f"{'epoch without augmentation (ours only)':44} {'-':>18} {spread(plain):>18} "
          f"{statistics.mean(plain) / theirs_mean:16.1f}x")
    print(f"{'first landing, cold cache (decode once)':44} {'-':>18} {count / landing:18,.0f}   "
          f"({landing:.1f} s for {count:,} pictures)")
    payback = f"{landing / saved_per_epoch:.1f} epochs" if saved_per_epoch > 0 else "never (ours is not faster)"
    print(f"landing pays for itself after {payback} (a DataLoader epoch of all {count:,} takes "
          f"{count / theirs_mean:.1f} s)")


if __name__ == "__main__":
    main()
