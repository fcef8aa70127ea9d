"""export-best and predict through the real CLI, on the tiny dataset with real stores and real processes."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    EXPORT_FIXED,
    StudyEnv,
    TrackedSearch,
    register_search,
    shared_tracked_env,
    tiny_test_pictures,
)
from mlflow import MlflowClient
from PIL import Image

from pipeline import store
from pipeline.cli import main
from pipeline.commands import export, predict, verify_export
from pipeline.data import datasets, imagecache, loading
from pipeline.data.images import Preprocessing, open_picture, prepare_picture
from pipeline.reports import plots
from pipeline.spec import hparams, sources
from pipeline.training import models

pytestmark = pytest.mark.trained_values  # make test-portable runs these as a CPU without AVX-512 would

NOT_SEARCHED = {"dropout": None}


def write_export_study(env: StudyEnv, trials: int = 2, baseline_lr: float = 1e-2) -> None:
    """The export tests' study: three epochs a trial; the sampled learning rates reach divergent ones."""
    env.write_study(trials=trials, seed=5, sampler="random", pruner="none", epochs=3,
                    fixed={"batch_size": 25, **EXPORT_FIXED},
                    space={"lr": {"type": "float", "low": 3e-3, "high": 1e4, "log": True}, **NOT_SEARCHED},
                    baseline=[{"lr": baseline_lr}])


@pytest.fixture(scope="module")
def shared_exported_search(tmp_path_factory, empty_mlflow_store) -> TrackedSearch:
    """One tracked search of the export study and its export, shared by this module's tests (they copy before they
    change it)."""
    base = tmp_path_factory.mktemp("searched")
    with shared_tracked_env(base, empty_mlflow_store) as (env, info):
        write_export_study(env)
        assert env.run("search") == 0
        assert env.run("export-best") == 0
    return TrackedSearch(env, info)


@pytest.fixture
def exported_search(shared_exported_search, monkeypatch) -> TrackedSearch:
    """The shared exported search in this test: its dataset registered, its MLflow store current."""
    register_search(shared_exported_search, monkeypatch)
    return shared_exported_search

def test_export_writes_a_verified_portable_model_and_logs_test_accuracy(exported_search):
    directory = exported_search.export
    assert sorted(p.name for p in directory.iterdir()) == sorted([
        "model.pt2", "weights.pt", "config.json", "metrics.json", "model_card.md", "confusion_matrix.png",
        "misclassified.png", "verify.py"])
    assert [p.name for p in directory.parent.iterdir()] == ["tiny"]  # no partial directories left
    config = json.loads((directory / "config.json").read_text())
    metrics = json.loads((directory / "metrics.json").read_text())
    best = store.leading_best(exported_search.env.load())
    assert config["trial_number"] == best.number and config["trial_seed"] == best.seed
    assert config["split_hash"] == best.split_hash == loading.prepare(
        "tiny", exported_search.env.root, "cpu", val_size=100).split_hash  # the split the trial was judged on
    assert config["source"].startswith("registered model 'tiny'")
    assert config["classes"] == [f"class{i}" for i in range(10)] and config["input_shape"] == [1, 28, 28]
    assert metrics["val_accuracy"] == pytest.approx(best.values[0])
    # Learned: far above chance (0.1 for 10 classes), on every arithmetic path (AVX2 fp32 channels_last gave 0.495)
    assert metrics["test_images"] == 200 and metrics["test_accuracy"] > 0.3
    assert set(metrics["test_per_class_accuracy"]) == set(config["classes"])
    assert metrics["cpu_latency_ms_batch1_median"] > 0 and metrics["cpu_throughput_images_per_s_batch256"] > 0

    # The model.pt2 alone, in a process of its own, scores exactly what metrics.json says.
    raw = exported_search.env.root / "Tiny" / "raw"
    done = subprocess.run([sys.executable, "-I", str(directory / "verify.py"), "--images",
                           str(raw / sources.TEST_IMAGES), "--labels", str(raw / sources.TEST_LABELS)],
                          capture_output=True, text=True, timeout=300, cwd=directory)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout)
    assert fresh["correct"] == metrics["test_correct"] and fresh["project_code_loaded"] is False

    # weights.pt is a plain state dict for the architecture in config.json.
    model = models.build_model(hparams.resolve_params(config["params"]), num_classes=10)
    model.load_state_dict(torch.load(directory / "weights.pt", weights_only=True))

    # The test figures went back to the champion's run and to the study's parent run.
    client = MlflowClient(exported_search.env.tracking_uri)
    champion = client.get_model_version_by_alias("tiny", "champion")
    run = client.get_run(champion.run_id)
    assert run.data.metrics["test_accuracy"] == metrics["test_accuracy"]
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["test_accuracy"] == metrics["test_accuracy"]
    card = (directory / "model_card.md").read_text()
    assert f"{metrics['test_accuracy']:.4f}" in card and "Limits" in card


def test_export_fails_and_leaves_nothing_when_the_written_model_is_corrupt(exported_search, tmp_path, monkeypatch,
                                                                          capsys):
    real_write = export.write_export

    def write_then_corrupt(champion, spec, root, directory, threads):  # bit rot between writing and verifying
        metrics = real_write(champion, spec, root, directory, threads)
        payload = bytearray((directory / "model.pt2").read_bytes())
        payload[len(payload) // 2:len(payload) // 2 + 64] = bytes(64)
        (directory / "model.pt2").write_bytes(bytes(payload))
        return metrics

    monkeypatch.setattr(export, "write_export", write_then_corrupt)
    assert exported_search.env.replace(exports=tmp_path / "exports").run("export-best") == 1
    assert "export failed, nothing written" in capsys.readouterr().err
    assert list((tmp_path / "exports").iterdir()) == []


def test_verify_detects_a_corrupted_model_file(exported_search, tmp_path):
    directory = shutil.copytree(exported_search.export, tmp_path / "copy")
    assert export.verify(directory, exported_search.env.root)["correct"] == json.loads(
        (directory / "metrics.json").read_text())["test_correct"]
    (directory / "model.pt2").write_bytes((directory / "model.pt2").read_bytes()[:5000])  # truncated
    with pytest.raises(export.ExportFailed, match="could not be re-evaluated"):
        export.verify(directory, exported_search.env.root)


@pytest.mark.faults  # README: What survives what
def test_existing_export_needs_force_then_is_replaced(exported_search, tmp_path, capsys):
    env = exported_search.env.replace(exports=tmp_path / "exports")
    shutil.copytree(exported_search.export, env.exports / "tiny")
    marker = env.exports / "tiny" / "model_card.md"
    marker.write_text("old")
    assert env.run("export-best") == 2
    assert "already exists; pass FORCE=1" in capsys.readouterr().err
    assert marker.read_text() == "old"
    assert env.run("export-best", "--force") == 0
    assert marker.read_text() != "old" and [p.name for p in env.exports.iterdir()] == ["tiny"]


def test_without_a_registry_the_best_trial_is_retrained_and_exported(exported_search, tmp_path):
    assert exported_search.env.replace(exports=tmp_path / "exports").run("export-best", "--no-tracking") == 0
    config = json.loads((tmp_path / "exports" / "tiny" / "config.json").read_text())
    best = store.leading_best(exported_search.env.load())
    assert config["trial_number"] == best.number and "retrained" in config["source"]
    shared = json.loads((exported_search.export / "metrics.json").read_text())
    retrained = json.loads((tmp_path / "exports" / "tiny" / "metrics.json").read_text())
    assert retrained["test_correct"] == shared["test_correct"]  # deterministic training: the same model


def test_trial_recorded_without_its_split_hash_exports_the_split_it_was_judged_on(exported_search, tmp_path):
    """Trials from before the split was recorded: config.json names the split of the data the champion was built
    for, which is the one the trial saw."""
    storage = shutil.copy(exported_search.env.storage.removeprefix("sqlite:///"), tmp_path / "optuna.db")
    with contextlib.closing(sqlite3.connect(storage)) as db, db:
        db.execute("DELETE FROM trial_user_attributes WHERE key = 'split_hash'")
    env = exported_search.env.replace(storage=f"sqlite:///{storage}", exports=tmp_path / "exports")
    assert store.leading_best(env.load()).split_hash is None
    assert env.run("export-best") == 0
    config = json.loads((env.exports / "tiny" / "config.json").read_text())
    assert config["split_hash"] == json.loads((exported_search.export / "config.json").read_text())["split_hash"]


def test_champion_from_another_optuna_storage_is_refused(exported_search, tmp_path, capsys):
    """The registry's champion must match the trial the storage holds under its name and number."""
    other = exported_search.env.replace(studies_dir=tmp_path / "studies", storage=f"sqlite:///{tmp_path}/other.db",
                            exports=tmp_path / "exports")  # the same MLflow store and registry
    write_export_study(other, baseline_lr=5e-3)  # same study name, trial 0 with another learning rate
    assert other.run("search", "--no-tracking") == 0
    assert other.run("export-best") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has other params or seed (was the storage replaced?)" in err
    assert not (other.exports / "tiny").exists()


@pytest.mark.faults  # README: What survives what
def test_study_without_a_finished_trial_exits_2(study_env, mlflow_store, capsys):
    write_export_study(study_env, trials=1, baseline_lr=1e4)  # the only trial diverges: pruned, nothing complete
    assert study_env.run("search") == 0
    assert [r.state for r in study_env.records()] == ["PRUNED"]
    assert study_env.run("export-best") == 2
    assert "has no complete trial to export" in capsys.readouterr().err
    assert not study_env.exports.exists() or list(study_env.exports.iterdir()) == []


@pytest.mark.faults  # README: What survives what
def test_unknown_or_unrun_study_exits_2(study_env, mlflow_store, capsys):
    study_env.studies_dir.mkdir()
    assert study_env.run("export-best", study="nope") == 2
    write_export_study(study_env)
    assert study_env.run("export-best") == 2
    assert "has not been run yet" in capsys.readouterr().err


def test_predict_returns_the_labels_of_correctly_classified_test_images(exported_search, tmp_path, capsys, monkeypatch):
    directory = exported_search.export
    config = json.loads((directory / "config.json").read_text())
    raw = exported_search.env.root / "Tiny" / "raw"
    images = torch.from_numpy(datasets.read_idx(raw / sources.TEST_IMAGES).copy())
    labels = datasets.read_idx(raw / sources.TEST_LABELS)
    model = torch.export.load(str(directory / "model.pt2")).module()
    predicted = verify_export.logits(model, images, config["mean"], config["std"], 100).argmax(1).numpy()
    right = np.flatnonzero(predicted == labels)[:5]
    monkeypatch.chdir(tmp_path)  # short relative names keep each table row on one line
    paths = []
    for index in right:
        paths.append(f"test{index}.png")
        Image.fromarray(images[index].numpy()).save(paths[-1])
    Path("broken.png").write_bytes(b"this is not a picture")

    capsys.readouterr()
    assert main(["predict", "--export", str(directory), *paths, "broken.png"]) == 2
    out, err = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == len(right)
    for index, row in zip(right, rows, strict=True):
        cells = [c.strip() for c in row.split("│") if c.strip()]
        assert cells[0].endswith(f"test{index}.png") and cells[1] == f"class{labels[index]}"
    assert "broken.png: cannot be decoded as an image" in " ".join(err.split())


def test_predict_reads_exports_written_before_preprocessing_was_recorded(exported_search, tmp_path):
    """An export of the previous version: scalar mean/std, no `preprocessing`, an MNIST-like dataset."""
    old = shutil.copytree(exported_search.export, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    config.pop("preprocessing")
    config.update(mean=config["mean"][0], std=config["std"][0], input_shape=[1, 28, 28], dataset="mnist")
    (old / "config.json").write_text(json.dumps(config))
    paths = tiny_test_pictures(exported_search.env.root, 20, tmp_path)

    assert predict.export_preprocessing(config) == Preprocessing(28, "gray", "mnist")  # the old digit centring
    before, errors = predict.predict(old, paths)
    now, _ = predict.predict(exported_search.export, paths)
    assert not errors and len(before) == len(paths)
    # 28x28 digit-like pictures pass both preparations unchanged, so the old export predicts as the new one.
    assert [p.top for p in before] == [p.top for p in now]


def test_pictures_are_converted_the_way_mnist_looks():
    mnist = Preprocessing(28, "gray", "mnist")
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255  # a bright "1" on black, slightly off-centre
    assert np.array_equal(prepare_picture(Image.fromarray(digit), mnist), digit[None])  # 28x28 kept as is

    photo = np.full((300, 200, 3), 240, dtype=np.uint8)  # a dark stroke on white paper, RGB, any size
    photo[40:260, 60:100] = 10
    converted = prepare_picture(Image.fromarray(photo), mnist)
    assert converted.shape == (1, 28, 28) and converted.dtype == np.uint8
    converted = converted[0]
    assert converted[0].max() == 0 and converted[:, 0].max() == 0  # dark background
    rows, cols = np.nonzero(converted > 30)
    assert rows.max() - rows.min() + 1 <= 20  # fitted into MNIST's 20x20 box
    mass = converted.astype(float)
    row_centre, col_centre = ((axis * mass).sum() / mass.sum() for axis in np.indices(mass.shape))
    assert abs(row_centre - 14) <= 1.0 and abs(col_centre - 14) <= 1.0  # centred by its centre of mass


# --------------------------------------------------------------------------------------------------
# Your own pictures: an RGB folder, exported, verified from the image cache, and predicted

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}
SIZES = [(16, 16), (24, 20), (20, 32), (40, 40)]


def write_picture_folder(directory: Path, per_class: int = 30) -> None:
    """One subfolder per class: a square of the class's colour on a noisy gray background, PNG and JPEG, mixed sizes."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (directory / name).mkdir(parents=True)
        for i in range(per_class):
            width, height = SIZES[i % len(SIZES)]
            pixels = rng.integers(90, 160, size=(height, width, 3))
            top, left = height // 4, width // 4
            pixels[top:height - top, left:width - left] = np.clip(
                np.array(colour) + rng.integers(-25, 26, size=(height - 2 * top, width - 2 * left, 3)), 0, 255)
            image = Image.fromarray(pixels.astype(np.uint8))
            image.save(directory / name / (f"{i:02d}.png" if i % 2 else f"{i:02d}.jpg"))


def test_folder_of_rgb_pictures_exports_verifies_and_predicts_its_class_names(study_env, mlflow_store, tmp_path,
                                                                             monkeypatch, capsys):
    pictures, root = tmp_path / "pictures", study_env.root
    write_picture_folder(pictures)
    study_env.write_study(trials=1, seed=5, sampler="random", pruner="none", epochs=3, val_size=None,
                          dataset={"path": str(pictures), "image_size": 16}, fixed={"batch_size": 16, **EXPORT_FIXED},
                          space={"lr": {"type": "float", "low": 1e-2, "high": 2e-2, "log": True}, **NOT_SEARCHED},
                          baseline=None)
    assert study_env.run("search") == 0
    assert study_env.run("export-best") == 0  # it exists: it was verified

    directory = study_env.exports / "tiny"
    config = json.loads((directory / "config.json").read_text())
    metrics = json.loads((directory / "metrics.json").read_text())
    assert config["input_shape"] == [3, 16, 16] and len(config["mean"]) == len(config["std"]) == 3
    assert config["mean"][0] > config["mean"][1]  # red and gray pictures: more red than green on average
    assert config["preprocessing"] == {"image_size": 16, "channels": "rgb", "style": "photo"}
    assert config["classes"] == sorted(COLOURS) and config["dataset"] == "pictures"
    cache = imagecache.open_cache(imagecache.cache_dir(root, config["dataset_checksum"]))
    rows = np.load(directory / export.TEST_ROWS, allow_pickle=False)
    assert metrics["test_images"] == len(rows) == 9  # 10% of 90 pictures, carved stratified
    assert "28x28" not in (directory / "model_card.md").read_text()
    assert "16x16 RGB" in (directory / "model_card.md").read_text()

    # verify.py in a fresh, isolated process: the cache's .npy files and the export's test rows.
    done = subprocess.run([sys.executable, "-I", str(directory / "verify.py"), "--images",
                           str(cache.directory / "images.npy"), "--labels", str(cache.directory / "labels.npy"),
                           "--rows", str(directory / export.TEST_ROWS)],
                          capture_output=True, text=True, timeout=300, cwd=directory)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["correct"] == metrics["test_correct"]

    # predict prepares a picture exactly as it was landed for training (one function), and names a class.
    picture = pictures / "blue" / "05.png"
    preprocessing = predict.export_preprocessing(config)
    landed = cache.images[cache.manifest["files"].index("blue/05.png")]
    assert np.array_equal(open_picture(picture, preprocessing), landed)
    monkeypatch.chdir(tmp_path)
    predictions, errors = predict.predict(directory, [picture])
    assert not errors and predictions[0].top[0][0] == "blue"  # the class's folder name

    # The trial's MLflow run names the dataset it trained on by the same digest.
    client = MlflowClient(mlflow_store)
    run = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                             "tags.trial_number = '0'")[0]
    (logged,) = run.inputs.dataset_inputs
    profile = json.loads(logged.dataset.profile)
    assert logged.dataset.digest == config["dataset_checksum"] and logged.dataset.name == "pictures"
    assert profile["image_size"] == "3x16x16" and profile["classes"] == config["classes"]
    assert profile["test_images"] == 9 and profile["train_images"] + profile["val_images"] == 81

    # A picture changes: exporting the champion again refuses (its weights came from the old pictures).
    Image.new("RGB", (20, 20), (0, 0, 0)).save(picture)
    capsys.readouterr()
    assert study_env.run("export-best", "--force") == 2
    assert "trial 0 was trained on pictures with digest" in " ".join(capsys.readouterr().err.split())
    assert json.loads((directory / "metrics.json").read_text()) == metrics  # the verified export is untouched


def test_mistakes_grid_draws_rgb_and_gray_images(tmp_path):
    labels, predicted = np.array([0, 1, 1]), np.array([1, 1, 0])
    confidence = np.array([0.9, 0.8, 0.7])
    for shape in ((3, 3, 12, 12), (3, 1, 12, 12), (3, 12, 12)):
        images = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
        path = tmp_path / f"grid{len(shape)}-{shape[1]}.png"
        assert plots.mistakes_grid(images, labels, predicted, confidence, ["a", "b"], path, "t") == 2
        assert path.stat().st_size > 0
