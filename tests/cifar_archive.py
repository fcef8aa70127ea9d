"""A tiny CIFAR-10 archive in the real format: `cifar-10-python.tar.gz` holding `cifar-10-batches-py/`'s five
training batches, test batch and meta file, each a protocol-2 pickle of the originals' dict layout.

The real checksums cannot match a tiny archive, so the fixture states the archive's own (as a user
registering a mirror would); everything else (extraction, verification, the restricted unpickler, the
cache, the search) runs for real.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import cifar

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
PER_BATCH, TEST_IMAGES = 60, 100
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# One colour per class, far apart, so a small CNN learns them in an epoch.
PALETTE = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30], [230, 30, 230],
                    [30, 230, 230], [240, 240, 240], [20, 20, 20], [240, 140, 20], [120, 60, 160]], dtype=np.int16)


def images_of(labels: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [n, 3, 32, 32]: the class colour plus noise, and a dark top-left corner that shows orientation."""
    rng = np.random.default_rng(seed)
    pixels = PALETTE[labels][:, :, None, None] + rng.integers(-20, 21, size=(len(labels), 3, 32, 32))
    pixels[:, :, :4, :4] = 0
    return np.clip(pixels, 0, 255).astype(np.uint8)


def batch_pickle(record: dict) -> bytes:
    """Pickled as the originals were: protocol 2, numpy's array rebuilt by `numpy.core.multiarray._reconstruct`
    (Python 2's numpy; numpy 2 writes `numpy._core`, same-length text in protocol 2's GLOBAL opcode)."""
    return pickle.dumps(record, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


@dataclasses.dataclass
class TinyCifar:
    """A data root holding the tiny archive, what its images are, and the checksums that were stated for it."""

    root: Path
    archive: Path
    members: dict[str, bytes]  # batch file name -> its bytes
    images: np.ndarray  # uint8 [N, 3, 32, 32], training batches in order, then the test batch
    labels: np.ndarray
    monkeypatch: pytest.MonkeyPatch

    @property
    def folder(self) -> Path:
        return self.root / FOLDER

    def trust(self, **changes) -> None:
        """State the checksums of these files (or `changes`) as the expected ones."""
        info = cifar.info("cifar10")
        expected = {"archive_sha256": hashlib.sha256(self.archive.read_bytes()).hexdigest(),
                    "files": {name: hashlib.md5(payload).hexdigest() for name, payload in self.members.items()},
                    **changes}
        self.monkeypatch.setitem(cifar.INFOS, "cifar10", dataclasses.replace(info, **expected))

    def write_archive(self) -> None:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, payload in {**self.members, "readme.html": b"<html></html>"}.items():
                entry = tarfile.TarInfo(f"{FOLDER}/{name}")
                entry.size, entry.mtime = len(payload), 1234567890
                tar.addfile(entry, io.BytesIO(payload))
        self.archive.write_bytes(buffer.getvalue())


def make_tiny_cifar(root: Path, monkeypatch: pytest.MonkeyPatch, per_batch: int = PER_BATCH) -> TinyCifar:
    """`<root>/cifar-10-python.tar.gz`: 5 x `per_batch` training and 100 test images, its checksums stated."""
    rng = np.random.default_rng(0)
    members, all_images, all_labels = {}, [], []
    for index, name in enumerate([*TRAIN_BATCHES, "test_batch"]):
        count = per_batch if name != "test_batch" else TEST_IMAGES
        labels = rng.permutation(np.arange(count) % 10)
        images = images_of(labels, seed=index)
        members[name] = batch_pickle({
            b"batch_label": f"{'testing' if name == 'test_batch' else 'training'} batch".encode(),
            b"labels": labels.tolist(),  # a list of ints, as in the originals
            b"data": images.reshape(count, 3 * 32 * 32),  # R plane, G plane, B plane, each row-major
            b"filenames": [f"tiny_{index}_{i}.png".encode() for i in range(count)],
        })
        all_images.append(images)
        all_labels.append(labels)
    members["batches.meta"] = batch_pickle({b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                                            b"label_names": [n.encode() for n in NAMES]})
    root.mkdir(parents=True, exist_ok=True)
    tiny = TinyCifar(root, root / ARCHIVE, members, np.concatenate(all_images), np.concatenate(all_labels),
                     monkeypatch)
    tiny.write_archive()
    tiny.trust()
    return tiny
