"""Split, subsets, device-resident batches and augmentation."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import loading, splits
from pipeline.data.augment import Augment, NaturalAugment, make_augment
from pipeline.infra import memory
from pipeline.spec import sources
from pipeline.spec.errors import BadInput, DataError


def _indexed_images(n: int) -> torch.Tensor:
    """Images whose first two pixels spell their own index, so batches can be traced back."""
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    idx = torch.arange(n)
    images[:, 0, 0] = (idx // 256).to(torch.uint8)
    images[:, 0, 1] = (idx % 256).to(torch.uint8)
    return images


def _decode_indices(batch: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    pixels = torch.round((batch[:, 0, 0, :2] * std + mean) * 255).to(torch.int64)
    return pixels[:, 0] * 256 + pixels[:, 1]


def test_every_training_index_exactly_once_per_epoch():
    n = 1000
    split = loading.ResidentImages(_indexed_images(n), torch.zeros(n, dtype=torch.int64), mean=0.1, std=0.3)
    generator = torch.Generator().manual_seed(3)
    epochs = []
    for _ in range(2):
        seen = torch.cat([_decode_indices(x, 0.1, 0.3) for x, _ in split.batches(64, generator)])
        assert sorted(seen.tolist()) == list(range(n))
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert not torch.equal(epochs[0], torch.arange(n))


def test_same_seed_same_batches_bit_for_bit():
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,))
    split = loading.ResidentImages(images, labels, mean=0.13, std=0.31)
    augment = Augment()

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return [(x.clone(), y.clone()) for _ in range(2) for x, y in split.batches(32, generator, augment)]

    first, second, other = run(7), run(7), run(8)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0][0], other[0][0])


def test_unshuffled_batches_keep_order_and_last_partial_batch():
    n = 70
    split = loading.ResidentImages(_indexed_images(n), torch.arange(n) % 10, mean=0.0, std=1.0)
    batches = list(split.batches(32))
    assert [len(y) for _, y in batches] == [32, 32, 6]
    assert torch.equal(torch.cat([_decode_indices(x, 0.0, 1.0) for x, _ in batches]), torch.arange(n))
    assert [len(y) for _, y in split.batches(32, torch.Generator().manual_seed(0), drop_last=True)] == [32, 32]


def test_batches_are_normalised_float():
    images = torch.full((10, 28, 28), 255, dtype=torch.uint8)
    split = loading.ResidentImages(images, torch.zeros(10, dtype=torch.int64), mean=0.5, std=0.25)
    x, _ = next(split.batches(10))
    assert x.dtype == torch.float32 and x.shape == (10, 1, 28, 28)
    assert torch.allclose(x, torch.full_like(x, 2.0))


def test_augmentation_changes_each_sample_keeps_shape_dtype_range():
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(16, 1, 28, 28)
    images[:, :, 8:20, 10:18] = 1.0  # the same bar in every sample
    warped = Augment().apply(images.clone(), generator)
    assert warped.shape == images.shape and warped.dtype == images.dtype
    assert warped.min() >= 0.0 and warped.max() <= 1.0
    changed = (warped - images).abs().flatten(1).sum(1)
    assert (changed > 1.0).all()  # every sample moved
    # ...and each differently: a per-sample affine, not one transform for the batch
    assert len({tuple(w.flatten()[::7].tolist()) for w in warped}) == 16
    # Ink is roughly conserved (10% zoom changes area by at most ~21%).
    assert ((warped.flatten(1).sum(1) / images.flatten(1).sum(1)) - 1).abs().max() < 0.35


def test_augmentation_strength_zero_is_off_and_scales_linearly():
    assert Augment.from_strength(0) is None
    assert Augment.from_strength(2.0) == Augment(rotation=20.0, translate=0.2, scale=0.2)


def test_stratified_split_sizes_proportions_and_hash():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    split = splits.stratified_split(labels, val_size=100, seed=0)
    assert len(split.val_indices) == 100 and len(split.train_indices) == 900
    assert torch.bincount(labels[split.val_indices]).tolist() == [60, 30, 10]
    assert set(split.val_indices.tolist()).isdisjoint(split.train_indices.tolist())
    again = splits.stratified_split(labels, val_size=100, seed=0)
    assert again.hash == split.hash and torch.equal(again.val_indices, split.val_indices)
    assert splits.stratified_split(labels, val_size=100, seed=1).hash != split.hash


def test_stratified_split_quotas_add_up_with_remainders():
    labels = torch.tensor([0] * 7 + [1] * 7 + [2] * 7)
    split = splits.stratified_split(labels, val_size=10, seed=0)
    counts = torch.bincount(labels[split.val_indices]).tolist()
    assert sum(counts) == 10 and max(counts) - min(counts) <= 1
@pytest.mark.faults  # README: What survives what
def test_prepare_refuses_a_corrupt_file_naming_it(tiny_dataset):
    info, root = tiny_dataset
    path = info.raw_dir(root) / sources.TRAIN_LABELS
    path.write_bytes(path.read_bytes()[:-1] + b"\x09")
    with pytest.raises(DataError, match="SHA-256 mismatch") as err:
        loading.prepare("tiny", root, val_size=100)
    assert str(path) in str(err.value)


def test_prepare_tiny_dataset(tiny_dataset):
    info, root = tiny_dataset
    prepared = loading.prepare("tiny", root, val_size=100, train_limit=200)
    assert len(prepared.train) == 200 and len(prepared.val) == 100
    assert prepared.classes == info.classes and prepared.checksum == info.checksum
    full = loading.prepare("tiny", root, val_size=100)
    assert len(full.train) == 500
    assert full.split_hash != prepared.split_hash  # a subset is recorded as a different split
    assert loading.prepare("tiny", root, val_size=100).split_hash == full.split_hash


def test_natural_augment_flips_only_left_right_and_crops_within_the_padding():
    images = torch.rand(64, 3, 12, 10)
    flips = NaturalAugment(padding=0, flip=True, jitter=0.0)
    out = flips.apply(images.clone(), torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, x.flip(2)) for o, x in zip(out, images, strict=True)]
    kept = [torch.equal(o, x) for o, x in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 10 < sum(flipped) < 54
    crops = NaturalAugment(padding=2, flip=False, jitter=0.0)
    out = crops.apply(images.clone(), torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    for o, p in zip(out, padded, strict=True):
        assert any(torch.equal(o, p[:, dy:dy + 12, dx:dx + 10]) for dy in range(5) for dx in range(5))
    assert not torch.equal(out, images)


def test_natural_augment_is_seeded_and_keeps_pixels_in_range():
    images = torch.rand(32, 3, 16, 16)
    policy = make_augment("natural", 1.0, 16)
    first = policy.apply(images.clone(), torch.Generator().manual_seed(3))
    again = policy.apply(images.clone(), torch.Generator().manual_seed(3))
    other = policy.apply(images.clone(), torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1 and first.shape == images.shape
    gray = make_augment("natural", 1.0, 16).apply(torch.rand(8, 1, 16, 16), torch.Generator().manual_seed(0))
    assert gray.shape == (8, 1, 16, 16)
    assert make_augment("none", 1.0, 16) is None and make_augment("natural", 0.0, 16) is None
    assert isinstance(make_augment("digits", 1.0, 28), Augment)  # the affine, never flips


def test_natural_jitter_is_brightness_then_contrast_then_saturation():
    """The one-matrix jitter equals the three adjustments applied one after the other."""
    images = torch.rand(16, 3, 8, 8)
    augment = NaturalAugment(padding=0, flip=False, jitter=0.4)
    out = augment.apply(images.clone(), torch.Generator().manual_seed(5))
    draws = torch.rand(16, 6, generator=torch.Generator().manual_seed(5))
    b, c, s = (1 + (draws[:, 3:] * 2 - 1) * 0.4).unbind(1)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    x = images * b.view(-1, 1, 1, 1)
    mean = (x * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * c.view(-1, 1, 1, 1) + mean
    gray = (x * weights).sum(1, keepdim=True)
    x = gray + (x - gray) * s.view(-1, 1, 1, 1)
    assert torch.allclose(out, x.clamp(0, 1), atol=1e-5)


def test_a_worker_shares_the_memory_budget_with_the_others_and_says_where_its_data_went(tiny_dataset, monkeypatch):
    """HOST_WORKERS_ENV (a coordinator sets it for its workers) divides the budget and makes prepare say the
    placement, which the coordinator shows as the worker's line."""
    _, root = tiny_dataset
    monkeypatch.setenv(memory.HOST_WORKERS_ENV, "3")
    logged = []
    prepared = loading.prepare("tiny", root, val_size=100, log=logged.append)
    assert prepared.mode == "resident"  # 470 kB: far below a third of half of any memory this runs in
    assert prepared.placement.endswith(", shared by 3 workers)") and logged == [f"data {prepared.placement}"]
    assert memory.MemoryBudget(available=6_000, source="available", processes=3).bytes == 1_000  # half, a third each
    alone = loading.prepare("tiny", root, val_size=100, log=logged.append, processes=1)  # the caller says how many
    assert "shared by" not in alone.placement and len(logged) == 1  # and nothing more is said


@pytest.mark.parametrize("value", ["two", "0", "-1", ""])
def test_a_bad_host_workers_value_is_refused_in_one_line(tiny_dataset, monkeypatch, value):
    _, root = tiny_dataset
    monkeypatch.setenv(memory.HOST_WORKERS_ENV, value)
    with pytest.raises(BadInput) as raised:
        loading.prepare("tiny", root, val_size=100)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{memory.HOST_WORKERS_ENV}={value!r}: expected")
