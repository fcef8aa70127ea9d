"""spec: the built-in datasets a study may name, a study's dataset as data.prepare takes it, its directions, and the
search definition a folder study keeps its fingerprint by."""

from __future__ import annotations

import dataclasses
import json

import optuna
from tiny_study import write_study

from pipeline import store
from pipeline.spec import sources, studies


def test_the_builtin_datasets_are_the_idx_registrys_as_it_is_now_then_cifar(monkeypatch):
    assert sources.builtin_names() == ["fashion-mnist", "mnist", "cifar10", "cifar100"]
    monkeypatch.setitem(sources.DATASETS, "tiny", dataclasses.replace(sources.DATASETS["mnist"], name="tiny"))
    assert sources.builtin_names() == ["fashion-mnist", "mnist", "tiny", "cifar10", "cifar100"]


def test_a_folder_studys_definition_leaves_follow_links_out_unless_set(tmp_path):
    """Folder studies made before `follow_links` existed keep their fingerprint: the key is recorded only when true,
    and the recorded definition reads back as the same source."""
    folder = {"path": "~/pictures/flowers", "image_size": 48}
    spec = studies.load(write_study(tmp_path, dataset=folder))
    recorded = json.loads(json.dumps(spec.search_definition()))  # as the store keeps it
    assert "follow_links" not in recorded["dataset"] and recorded["dataset"]["path"] == "~/pictures/flowers"
    assert spec.fingerprint() == "29a9ab982ec979f3"
    assert studies.dataset_ref(recorded["dataset"]) == spec.data == sources.FolderSource(**folder)
    linked = studies.load(write_study(tmp_path, dataset={**folder, "follow_links": True}))
    assert linked.search_definition()["dataset"]["follow_links"] is True
    assert linked.fingerprint() != spec.fingerprint() and linked.data.follow_links
    assert studies.dataset_ref("mnist") == "mnist"


def test_a_studys_directions_are_optunas_as_written(tmp_path):
    spec = studies.load(write_study(tmp_path, dataset="mnist", sampler="nsga2", pruner="none",
                                    objectives=[{"metric": "val_loss"}, {"metric": "val_accuracy"}]))
    assert spec.directions == ["minimize", "maximize"]
    study = store.open_study(spec, store.make_storage(f"sqlite:///{tmp_path}/o.db"), log=lambda line: None)
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE, optuna.study.StudyDirection.MAXIMIZE]
