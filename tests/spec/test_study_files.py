"""Every shipped study file, end to end through the real CLI, on a tiny subset of its real dataset."""

from __future__ import annotations

import shutil

import optuna
import pytest
from conftest import require_real_dataset, require_sample_images

from pipeline import store
from pipeline.cli import main
from pipeline.spec import paths, sources, studies

pytestmark = pytest.mark.data


@pytest.mark.parametrize("name", studies.available())
def test_study_file_runs_end_to_end(name, tmp_path, imagenet_weights, mlflow_store, capsys, monkeypatch):
    spec = studies.load(name)
    root = []
    if spec.dataset in sources.CIFAR_DATASETS:
        # Not to be had offline: a tiny archive in the real format, big enough for the study's 5,000
        # validation images (the real one's loading code is the same).
        from cifar_archive import make_tiny_cifar

        root = ["--root", str(make_tiny_cifar(tmp_path / "data", monkeypatch, per_batch=1100).root)]
    elif isinstance(spec.dataset, str):
        require_real_dataset(spec.dataset)
    else:
        require_sample_images(spec)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    # The file as shipped, in a folder of the test's own: its checkpoints, report and exports go there, not
    # into the checkout (where they would replace the user's report and sweep the user's checkpoints).
    studies_dir = tmp_path / "studies"
    studies_dir.mkdir()
    shutil.copy(paths.STUDIES_DIR / f"{name}.toml", studies_dir)
    code = main(["search", "--study", name, "--storage", storage, "--studies-dir", str(studies_dir),
                 "--reports-dir", str(tmp_path / "reports"), "--exports-dir", str(tmp_path / "exports"),
                 "--trials", "2", "--epochs", "1", "--train-limit", "256", "--val-limit", "128", "--timeout", "5",
                 *(["--minutes", "3"] if spec.planned else []), *root])
    assert code == 0, capsys.readouterr().err
    finished = store.records(optuna.load_study(study_name=name, storage=storage), store.FINISHED)
    assert len(finished) == 2
    assert finished[0].baseline is True  # the file's first baseline ran first
    assert f"make search STUDY={name} STORAGE={storage}` continues" in capsys.readouterr().out  # the same store
