"""CIFAR from a tiny archive in the real format (the `tiny_cifar` fixture, tests/cifar_archive.py): landing,
verification, the restricted unpickler, the offline message, and a search end to end."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from cifar_archive import ARCHIVE, FOLDER, NAMES, PER_BATCH, TEST_IMAGES, batch_pickle
from conftest import refusal

from pipeline.cli import main
from pipeline.data import cifar, imagecache, loading


def test_the_pickles_are_in_the_original_format(tiny_cifar):
    payload = tiny_cifar.members["data_batch_1"]
    assert payload[:2] == b"\x80\x02" and b"cnumpy.core.multiarray\n_reconstruct\n" in payload
    assert pickle.loads(payload, encoding="bytes")[b"data"].shape == (PER_BATCH, 3072)


def test_lands_from_the_archive_with_the_right_channel_order(tiny_cifar):
    lines = []
    cached = cifar.land_cifar("cifar10", tiny_cifar.root, lines.append)
    assert any("extracting" in line for line in lines)
    assert sorted(p.name for p in tiny_cifar.folder.iterdir()) == sorted(tiny_cifar.members)  # no readme
    assert not list(tiny_cifar.root.glob(".*partial*"))
    assert cached.classes == tuple(NAMES)
    assert cached.images.shape == (5 * PER_BATCH + TEST_IMAGES, 3, 32, 32)
    assert np.array_equal(cached.images, tiny_cifar.images) and np.array_equal(cached.labels, tiny_cifar.labels)
    assert cached.split.tolist() == [imagecache.TRAIN] * 5 * PER_BATCH + [imagecache.TEST] * TEST_IMAGES
    # The cache's name follows the batches' bytes (existing caches keep being found).
    md5s = "".join(hashlib.md5(tiny_cifar.members[m]).hexdigest() for m in sorted(tiny_cifar.members))
    assert cached.digest == cached.directory.name == "cifar10-" + hashlib.sha256(md5s.encode()).hexdigest()[:12]

    # The layout itself, read straight from a row: red plane, then green, then blue, each row by row.
    row = pickle.loads(tiny_cifar.members["data_batch_1"], encoding="bytes")[b"data"][7]
    image = cached.images[7]
    assert image[0, 0, 5] == row[5] and image[0, 1, 0] == row[32]
    assert image[1, 0, 5] == row[1024 + 5] and image[2, 31, 31] == row[3071]
    red_class = np.flatnonzero(cached.labels == 0)[0]  # airplane is red here
    r, g, b = cached.images[red_class, :, 8:, 8:].reshape(3, -1).mean(axis=1)
    assert r > 200 and g < 60 and b < 60
    assert cached.images[:, :, :4, :4].max() == 0  # the dark corner is top-left: nothing transposed


def test_lands_again_from_the_extracted_batches(tiny_cifar):
    first = cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None)
    tiny_cifar.archive.unlink()
    again = cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None)  # the cache, found by the batches
    assert again.directory == first.directory
    shutil.rmtree(first.directory)
    lines = []
    rebuilt = cifar.land_cifar("cifar10", tiny_cifar.root, lines.append)  # batches only: no archive, no cache
    assert not lines and rebuilt.digest == first.digest
    assert np.array_equal(rebuilt.images, tiny_cifar.images)


def test_a_corrupted_batch_is_refused_by_name(tiny_cifar):
    cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None)
    batch = tiny_cifar.folder / "data_batch_3"
    payload = bytearray(batch.read_bytes())
    payload[5000] ^= 0xFF  # one pixel
    batch.write_bytes(bytes(payload))
    message = refusal(lambda: cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None))
    assert message.startswith(f"{batch}: MD5") and f"delete {tiny_cifar.folder}" in message

    batch.unlink()
    message = refusal(lambda: cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None))
    assert message.startswith(f"{batch}: missing") and str(tiny_cifar.archive) in message


def test_a_wrong_archive_is_refused_by_sha256_or_md5(tiny_cifar):
    tiny_cifar.trust(archive_sha256="0" * 64)
    message = refusal(lambda: cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None))
    assert message.startswith(f"{tiny_cifar.archive}: SHA-256") and "expected " + "0" * 64 in message
    tiny_cifar.trust(archive_sha256=None, archive_md5="f" * 32)  # only torchvision's MD5 known (as CIFAR-100)
    message = refusal(lambda: cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None))
    assert message.startswith(f"{tiny_cifar.archive}: MD5") and "download it again from https://" in message
    assert not tiny_cifar.folder.exists()  # nothing extracted from an archive that failed its check

    tiny_cifar.trust(archive_sha256=None, archive_md5=hashlib.md5(tiny_cifar.archive.read_bytes()).hexdigest())
    assert len(cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None).images) == 400


def test_an_archive_without_every_batch_is_refused_and_leaves_nothing(tiny_cifar):
    del tiny_cifar.members["data_batch_4"]
    tiny_cifar.write_archive()
    tiny_cifar.trust(files={**cifar.info("cifar10").files, "data_batch_4": "0" * 32})
    message = refusal(lambda: cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None))
    assert f"has no {FOLDER}/data_batch_4" in message
    assert sorted(p.name for p in tiny_cifar.root.iterdir()) == [ARCHIVE]  # no half-extracted folder


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_nothing_present_and_no_network_says_where_to_put_the_archive(tiny_cifar):
    """The real URL is not used: on a machine with internet it would download 163 MB. A closed local port
    refuses at once, as an unreachable host does here (DNS fails in well under a second offline)."""
    url = f"http://127.0.0.1:{_closed_port()}/{ARCHIVE}"
    tiny_cifar.trust(url=url)
    tiny_cifar.archive.unlink()
    started = time.monotonic()
    message = refusal(lambda: cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None))
    assert time.monotonic() - started < 10
    assert message.startswith("cifar10: not on this machine and the download failed")
    assert message.endswith(f"put it at {tiny_cifar.archive}") and url in message
    assert sorted(p.name for p in tiny_cifar.root.iterdir()) == []  # no .partial file left


def test_a_silent_server_times_out_instead_of_hanging(tiny_cifar):
    """A host that accepts the connection and then says nothing: the download gives up after DOWNLOAD_TIMEOUT."""
    with socket.socket() as server:  # listening, never accepting: the kernel completes the handshake, then nothing
        server.bind(("127.0.0.1", 0))
        server.listen()
        tiny_cifar.trust(url=f"http://127.0.0.1:{server.getsockname()[1]}/{ARCHIVE}")
        tiny_cifar.archive.unlink()
        tiny_cifar.monkeypatch.setattr(cifar, "DOWNLOAD_TIMEOUT", 1)
        started = time.monotonic()
        message = refusal(lambda: cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None))
    assert time.monotonic() - started < 10 and "timed out" in message and "put it at" in message
    assert not list(tiny_cifar.root.iterdir())


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_batch_that_calls_anything_else_is_refused_and_never_runs(tiny_cifar, tmp_path):
    """Its checksum is stated as matching (a tampered mirror and list): the unpickler is the last line."""
    marker = tmp_path / "pwned"
    tiny_cifar.members["data_batch_2"] = pickle.dumps({b"data": _Payload(marker), b"labels": []}, protocol=2)
    assert b"system" in tiny_cifar.members["data_batch_2"]
    tiny_cifar.write_archive()
    tiny_cifar.trust()
    message = refusal(lambda: cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None))
    assert message.startswith(f"{tiny_cifar.folder / 'data_batch_2'}: not a CIFAR batch")
    assert f"{os.system.__module__}.system is not allowed" in message
    assert not marker.exists()
    assert not any(d.name.startswith("cifar10-") for d in (tiny_cifar.root / "cache").glob("*"))


@pytest.mark.parametrize("record, fragment", [
    ({b"labels": [0]}, "no b'data'"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "expected uint8 [n, 3072]"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels outside 0-9"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
])
def test_a_batch_with_the_wrong_contents_is_refused_by_name(tiny_cifar, record, fragment):
    tiny_cifar.members["test_batch"] = batch_pickle(record)
    tiny_cifar.write_archive()
    tiny_cifar.trust()
    message = refusal(lambda: cifar.land_cifar("cifar10", tiny_cifar.root, lambda line: None))
    assert message.startswith(str(tiny_cifar.folder / "test_batch")) and fragment in message


def test_prepare_uses_cifars_own_test_split(tiny_cifar):
    prepared = loading.prepare("cifar10", tiny_cifar.root, "cpu", val_size=50, log=lambda line: None)
    assert (len(prepared.train), len(prepared.val), prepared.test_count) == (250, 50, TEST_IMAGES)
    assert prepared.input_shape == (3, 32, 32) and prepared.classes == tuple(NAMES)
    assert prepared.default_augment_policy == "natural" and len(prepared.mean) == 3


@pytest.mark.trained_values
def test_search_end_to_end_on_the_tiny_archive(study_env, tiny_cifar, capsys):
    env = study_env.replace(root=tiny_cifar.root)
    env.write_study(dataset="cifar10", trials=1, seed=0, sampler="random", pruner="none", epochs=1, val_size=50,
                    fixed={"batch_size": 16, "precision": "fp32", "augment": 0.0},
                    space={"lr": {"type": "categorical", "choices": [0.01]}, "dropout": None}, baseline=None)
    code = env.run("search", "--device", "cpu")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "cifar10 250/50 images 3x32x32" in out  # the header: what the search trains on (no record holds it)
    (trial,) = env.records()
    accuracy = trial.values[0]
    with capsys.disabled():
        print(f"\ntiny CIFAR-10 end to end: trial {trial.number} val_accuracy {accuracy:.4f} "
              f"(50 validation images, 1 epoch) {json.dumps(trial.sampled)}")
    assert trial.state == "COMPLETE"
    assert accuracy > 0.3  # ten colours: far above chance (0.1) after one epoch


def test_make_data_lands_cifar_and_says_what_it_holds(tiny_cifar, capsys):
    assert main(["data", "--dataset", "cifar10", "--root", str(tiny_cifar.root)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "cifar10: 300 train + 100 test images 3x32x32, 10 classes" in out
    assert (tiny_cifar.root / FOLDER).is_dir()  # extracted from the archive
