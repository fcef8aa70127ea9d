"""The usual tutorial script's parts, as the benchmarks' reference sides run them: torchvision's MNIST through
per-sample transforms, and a plain loop (no resident data, fp32, one optimizer step per DataLoader batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms

from pipeline.spec import paths


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader) -> None:
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def correct_count(model: torch.nn.Module, loader: DataLoader) -> int:
    """How many of the loader's images the model classifies right."""
    model.eval()
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)


def mnist_subsets(train_indices: torch.Tensor, val_indices: torch.Tensor, mean: tuple[float, ...],
                  std: tuple[float, ...], rotate: bool) -> tuple[Subset, Subset]:
    """torchvision's MNIST (from data/, never downloaded) through per-sample transforms: RandomRotation(10) when
    `rotate` (training only), ToTensor, Normalize; the training and validation images of the given indices."""
    normalise = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose([transforms.RandomRotation(10), *normalise] if rotate else normalise)

    def subset(transform: transforms.Compose, indices: torch.Tensor) -> Subset:
        return Subset(tv_datasets.MNIST(paths.DATA_ROOT, train=True, download=False, transform=transform),
                      indices.tolist())

    return subset(train_tf, train_indices), subset(transforms.Compose(normalise), val_indices)
