"""Images/s of our device-resident batches vs torchvision's DataLoader, side by side in one run.

    .venv/bin/python benchmarks/data_throughput.py [--dataset mnist] [--images 20000] [--workers 0]

Baseline: the reference-script pipeline, `datasets.MNIST(transform=Compose([ToTensor(), Normalize()]))`
through `DataLoader(batch_size=64, shuffle=True)`, and the same with `RandomRotation(10)` first.
Ours: `ResidentImages.batches(64)` on the CPU, plain and with the per-sample affine (rotation only, to
match, and the full rotation + translation + scale). Each side is timed over the same image count.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets as tv_datasets
from torchvision import transforms

from pipeline.data import datasets, landing, loading
from pipeline.data.arrays import load_arrays
from pipeline.data.augment import Augment
from pipeline.spec import paths, sources

BATCH = 64


def images_per_second(batches, limit: int) -> float:
    seen = 0
    started = time.perf_counter()
    for x, _ in batches:
        seen += len(x)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=sorted(sources.DATASETS))
    parser.add_argument("--images", type=int, default=20000, help="images drawn per measurement")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for the baseline")
    args = parser.parse_args()
    torch.set_num_threads(2)

    landing.land(args.dataset)
    info = sources.dataset_info(args.dataset)
    mean, std = datasets.normalisation_stats(info)
    tv_class = getattr(tv_datasets, info.folder)

    def baseline(rotate: bool):
        steps = [transforms.RandomRotation(10)] if rotate else []
        transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
        dataset = tv_class(paths.DATA_ROOT, train=True, download=False, transform=transform)
        return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=args.workers)

    arrays = load_arrays(args.dataset)
    ours = loading.ResidentImages(arrays.train_images, arrays.train_labels, mean, std, "cpu")

    def resident(augment):
        generator = torch.Generator().manual_seed(0)
        while True:  # as many epochs as the limit needs
            yield from ours.batches(BATCH, generator, augment)

    rows = [
        ("ToTensor+Normalize", baseline(False), resident(None)),
        ("+ RandomRotation(10)", baseline(True), resident(Augment(rotation=10, translate=0, scale=0))),
        ("+ full affine (ours: rot+shift+zoom)", baseline(True), resident(Augment())),
    ]
    print(f"{args.dataset}, batch {BATCH}, {args.images:,} images per measurement, CPU threads 2, "
          f"DataLoader workers {args.workers}")
    print(f"{'pipeline':40} {'torchvision img/s':>18} {'ours img/s':>12} {'ours/torchvision':>17}")
    for label, theirs_batches, ours_batches in rows:
        theirs = images_per_second(theirs_batches, args.images)
        mine = images_per_second(ours_batches, args.images)
        print(f"{label:40} {theirs:18,.0f} {mine:12,.0f} {mine / theirs:16.1f}x")


if __name__ == "__main__":
    main()
