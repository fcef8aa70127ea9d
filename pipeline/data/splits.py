"""Stratified, seeded splits: the validation split carved from a training file (and a folder's test split), seeded
subsets for quick runs, and the hash of a split recorded with every result."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from pipeline.spec.errors import DataError
from pipeline.spec.sources import DEFAULT_VAL_SIZE

DEFAULT_SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    train_indices: torch.Tensor  # sorted int64 indices into the training file
    val_indices: torch.Tensor
    hash: str  # stable fingerprint of both index lists, recorded with every result


def split_hash(train_indices: torch.Tensor, val_indices: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(train_indices.to(torch.int64).numpy().astype("<i8").tobytes())
    digest.update(b"|")
    digest.update(val_indices.to(torch.int64).numpy().astype("<i8").tobytes())
    return digest.hexdigest()[:16]


def stratified_split(labels: torch.Tensor, val_size: int = DEFAULT_VAL_SIZE, seed: int = DEFAULT_SPLIT_SEED,
                     what: str = "validation split") -> Split:
    """Carve `val_size` validation indices with each class in proportion to its share of `labels`.

    Per-class quotas use largest remainders so they add up to exactly `val_size`.
    """
    n = len(labels)
    if not 0 < val_size < n:
        raise DataError(f"{what}: size {val_size} must be between 1 and {n - 1} (the set it is carved from has {n} "
                        "images); change val_size / the fractions in [dataset], or add pictures")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.to(torch.float64) * val_size / n
    quotas = exact.floor().to(torch.int64)
    remainder = val_size - int(quotas.sum())
    # Stable sort: ties in the fractional part go to the lower class, deterministically.
    order = torch.sort(exact - quotas, descending=True, stable=True).indices
    quotas[order[:remainder]] += 1

    generator = torch.Generator().manual_seed(seed)
    val_parts = []
    for cls, quota in zip(classes.tolist(), quotas.tolist(), strict=True):
        members = torch.nonzero(labels == cls).flatten()
        shuffled = members[torch.randperm(len(members), generator=generator)]
        val_parts.append(shuffled[:quota])
    val_indices = torch.sort(torch.cat(val_parts)).values
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val_indices] = True
    train_indices = torch.nonzero(~is_val).flatten()
    return Split(train_indices, val_indices, split_hash(train_indices, val_indices))


def seeded_subset(indices: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """A sorted random subset of `indices` (all of them when size is None or too large)."""
    if size is None or size >= len(indices):
        return indices
    generator = torch.Generator().manual_seed(seed)
    return torch.sort(indices[torch.randperm(len(indices), generator=generator)[:size]]).values


def stratified_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted positions of a stratified, seeded subset of `size` of the images whose labels are `labels` (every
    class in proportion to its share, as the validation split is carved): a search rung's training images. All
    positions when `size` covers them."""
    n = len(labels)
    if size >= n:
        return torch.arange(n)
    return stratified_split(labels.cpu(), size, seed, what="training subset").val_indices


def subset_hash(parent_hash: str, positions: torch.Tensor) -> str:
    """A training subset's fingerprint: the split it was taken from and the positions taken, recorded with a rung's
    results (replay rebuilds the subset and checks it)."""
    digest = hashlib.sha256(parent_hash.encode())
    digest.update(positions.to(torch.int64).numpy().astype("<i8").tobytes())
    return digest.hexdigest()[:16]
