"""MLflow tracking through the real CLI: parent and child runs, statuses, stepped metrics, the champion, `ui`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import requests
import torch
from conftest import mlflow_runs, trial_runs, write_tracking_study
from mlflow import MlflowClient
from ui_process import free_port, start_ui, stop_ui, wait_for_health

from pipeline import store
from pipeline.commands import server
from pipeline.data import loading
from pipeline.spec import hparams
from pipeline.tracking import registry, study_run

pytestmark = pytest.mark.trained_values  # make test-portable runs these as a CPU without AVX-512 would

def runs_of(uri: str) -> tuple[list, list]:
    """(parent runs, child runs) of the tiny study's experiment."""
    runs = mlflow_runs(uri)
    return ([r for r in runs if study_run.PARENT_TAG not in r.data.tags],
            [r for r in runs if study_run.PARENT_TAG in r.data.tags])


def test_search_records_one_parent_one_child_per_trial_with_statuses_metrics_and_params(tracked_env_failing_at_lr,
                                                                                        mlflow_store):
    env = tracked_env_failing_at_lr
    write_tracking_study(env, trials=4)
    assert env.run("search") == 0
    study, trials = env.load(), env.records()
    client = MlflowClient(mlflow_store)
    parents, children = runs_of(mlflow_store)
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert store.parent_run_id(study) == parent.info.run_id
    assert len(children) == len(trials)
    assert all(r.data.tags[study_run.PARENT_TAG] == parent.info.run_id for r in children)
    runs = trial_runs(mlflow_store)
    assert sorted(runs) == [t.number for t in trials]
    prepared = loading.prepare("tiny", env.root, "cpu", val_size=100)
    expected_status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for trial in trials:
        run = runs[trial.number]
        assert run.info.status == expected_status[trial.state], trial.number
        assert run.data.tags["optuna_state"] == trial.state
        assert run.data.params["lr"] == str(trial.sampled["lr"])
        assert run.data.params["trial_seed"] == str(trial.seed)
        assert run.data.params["cnn_channels"] == "[8, 16]"
        for key in ("dataset_checksum", "split_hash", "git_commit", "torch_version", "optuna_version"):
            assert run.data.params[key]
        assert int(run.data.tags["parameter_count"]) > 0
        # The dataset it trained on, as a run input (the UI's Dataset column): the data's own digest.
        (logged,) = run.inputs.dataset_inputs
        assert logged.dataset.name == "tiny" and logged.dataset.digest == prepared.checksum
        assert run.data.params["dataset_digest"] == run.data.params["dataset_checksum"] == prepared.checksum
        assert [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "training")]
        profile = json.loads(logged.dataset.profile)
        assert profile["image_size"] == "1x28x28" and profile["classes"] == list(prepared.classes)
        assert (profile["train_images"], profile["val_images"], profile["test_images"]) == (
            len(prepared.train), len(prepared.val), 200)

    # The forced outcomes: trial 1 diverged (PRUNED -> KILLED), trial 2 failed with its traceback logged.
    assert trials[1].state == "PRUNED" and runs[1].data.tags["fail_reason"] == "diverged"
    assert trials[2].state == "FAIL" and runs[2].data.tags["fail_reason"] == "RuntimeError"
    traceback_file = mlflow.artifacts.download_artifacts(run_id=runs[2].info.run_id, artifact_path="traceback.txt")
    assert "Traceback" in Path(traceback_file).read_text() and "injected failure" in Path(traceback_file).read_text()

    # One metric value per epoch, stepped by epoch, equal to what Optuna recorded.
    for trial in trials:
        logged = client.get_metric_history(runs[trial.number].info.run_id, "val_accuracy")
        assert [m.step for m in logged] == [h["epoch"] for h in trial.history]
        assert [m.value for m in logged] == pytest.approx([h["val_accuracy"] for h in trial.history])
        for key in study_run.EPOCH_METRICS:
            assert len(client.get_metric_history(runs[trial.number].info.run_id, key)) == len(trial.history)

    # Models only for trials that were the best so far when they completed.
    best_so_far, improving = None, set()
    for trial in trials:
        if trial.state == "COMPLETE" and (best_so_far is None or trial.values[0] > best_so_far):
            best_so_far = trial.values[0]
            improving.add(trial.number)
    assert {n for n, r in runs.items() if "model_uri" in r.data.tags} == improving

    # The parent's report.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_params.json", "confusion_matrix.png", "report.html"} <= artifacts
    logged_page = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="report.html"))
    assert logged_page.read_bytes() == (env.reports / "tiny.html").read_bytes()  # the page the search wrote
    best = store.leading_best(study)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best.values[0])
    best_params = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="best_params.json")).read_text())
    assert best_params["trial"] == best.number
    assert best_params["params"]["lr"] == best.sampled["lr"]


def test_champion_alias_loads_and_scores_as_the_trial_reported(tracked_env_failing_at_lr, mlflow_store):
    write_tracking_study(tracked_env_failing_at_lr, trials=3)
    assert tracked_env_failing_at_lr.run("search") == 0
    best = store.leading_best(tracked_env_failing_at_lr.load())
    client = MlflowClient(mlflow_store)
    version = client.get_model_version_by_alias("tiny", "champion")
    assert version.tags["trial_number"] == str(best.number)

    info = mlflow.models.get_model_info("models:/tiny@champion")
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 28, 28)  # a batch of normalised images
    assert info.metadata["classes"][0] == "class0" and len(info.metadata["mean"]) == 1 and info.metadata["mean"][0] > 0
    assert info.metadata["input_shape"] == [1, 28, 28] and info.metadata["preprocessing"]["image_size"] == 28
    model = mlflow.pytorch.load_model("models:/tiny@champion")  # a torch.export program: no project code needed
    prepared = loading.prepare("tiny", tracked_env_failing_at_lr.root, "cpu", val_size=100)
    correct = 0
    for images, labels in prepared.val.batches(64):
        correct += (model(images).argmax(1) == labels).sum().item()
    assert correct / len(prepared.val) == pytest.approx(best.values[0], abs=1 / len(prepared.val))


def test_resume_adds_children_under_the_same_parent(tracked_env_failing_at_lr, mlflow_store):
    write_tracking_study(tracked_env_failing_at_lr, trials=2)
    assert tracked_env_failing_at_lr.run("search") == 0
    first_parent = store.parent_run_id(tracked_env_failing_at_lr.load())
    assert tracked_env_failing_at_lr.run("search", "--trials", "3") == 0
    parents, children = runs_of(mlflow_store)
    assert [p.info.run_id for p in parents] == [first_parent] and parents[0].info.status == "FINISHED"
    # 2 finished + the failing baseline, then one more
    assert len(children) == len(tracked_env_failing_at_lr.records()) == 4
    assert {r.data.tags[study_run.PARENT_TAG] for r in children} == {first_parent}


def test_champion_alias_moves_only_to_a_better_model(tracked_env_failing_at_lr, mlflow_store):
    client = MlflowClient(mlflow_store)
    write_tracking_study(tracked_env_failing_at_lr, trials=2)
    assert tracked_env_failing_at_lr.run("search") == 0
    first = client.get_model_version_by_alias("tiny", "champion")
    client.set_model_version_tag("tiny", first.version, "objective_value", "1.5")  # unbeatable
    assert tracked_env_failing_at_lr.run("search", "--fresh") == 0
    assert client.get_model_version_by_alias("tiny", "champion").version == first.version
    assert len(client.search_model_versions("name = 'tiny'")) == 2

    client.set_model_version_tag("tiny", first.version, "objective_value", "-1.0")  # beaten by anything
    assert tracked_env_failing_at_lr.run("search", "--fresh") == 0
    champion = client.get_model_version_by_alias("tiny", "champion")
    assert champion.version != first.version and champion.tags["study"] == "tiny-v3"

    # Scores on another validation split are not comparable: the newer study's best takes over.
    client.set_model_version_tag("tiny", champion.version, "objective_value", "1.5")
    write_tracking_study(tracked_env_failing_at_lr, trials=2, val_size=150)
    assert tracked_env_failing_at_lr.run("search", "--fresh") == 0
    moved = client.get_model_version_by_alias("tiny", "champion")
    assert moved.tags["study"] == "tiny-v4" and "val_size=150" in moved.tags["evaluation_set"]


@pytest.mark.faults  # README: What survives what
def test_unreachable_tracking_server_fails_fast_before_training(study_env, monkeypatch, capsys):
    port = free_port()  # nothing listens on it
    env = study_env.replace(tracking_uri=f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env.tracking_uri)
    write_tracking_study(env, trials=2)
    started = time.monotonic()
    assert env.run("search") == 2
    assert time.monotonic() - started < 15
    err = " ".join(capsys.readouterr().err.split())
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in err and "MLFLOW_TRACKING_URI" in err
    assert optuna.get_all_study_summaries(env.storage) == []  # nothing started, nothing trained


def test_no_tracking_flag_runs_without_mlflow(tracked_env_failing_at_lr, mlflow_store):
    write_tracking_study(tracked_env_failing_at_lr, trials=1)
    assert tracked_env_failing_at_lr.run("search", "--no-tracking") == 0
    assert MlflowClient(mlflow_store).get_experiment_by_name("tiny") is None
    assert store.parent_run_id(tracked_env_failing_at_lr.load()) is None


def test_ui_serves_the_study_runs_over_rest(tracked_env_failing_at_lr, mlflow_store):
    write_tracking_study(tracked_env_failing_at_lr, trials=2)
    assert tracked_env_failing_at_lr.run("search") == 0
    experiment_id = MlflowClient(mlflow_store).get_experiment_by_name("tiny").experiment_id
    port = free_port()
    process, url = start_ui(tracked_env_failing_at_lr, "tiny", port)
    try:
        assert url == f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
        response = requests.post(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
                                 json={"experiment_ids": [experiment_id], "max_results": 100}, timeout=30)
        response.raise_for_status()
        runs = response.json()["runs"]
        names = sorted(r["info"]["run_name"] for r in runs)
        trials = [t for t in tracked_env_failing_at_lr.records() if t.state != "WAITING"]  # the third baseline waits
        assert names == sorted(["tiny", *(f"trial-{t.number:04d}" for t in trials)])
    finally:
        stop_ui(process, port)


def test_ui_for_a_study_never_tracked_exits_2(tracked_env_failing_at_lr, capsys):
    write_tracking_study(tracked_env_failing_at_lr, trials=1)
    assert tracked_env_failing_at_lr.run("search", "--no-tracking") == 0
    assert tracked_env_failing_at_lr.run("ui") == 2
    assert "has no MLflow experiment" in capsys.readouterr().err


def test_search_tracks_to_make_server_over_http(study_env, tmp_path, monkeypatch):
    """`make server` + MLFLOW_TRACKING_URI=http://...: runs, artifacts (proxied) and the registry over HTTP."""
    port = free_port()
    make_server = subprocess.Popen(  # `make server`, on loopback
        [sys.executable, "-m", "pipeline", "server", "--host", "127.0.0.1", "--port", str(port), "--backend",
         f"sqlite:///{tmp_path}/server.db", "--artifacts", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_health(port)
        env = study_env.replace(tracking_uri=f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env.tracking_uri)
        write_tracking_study(env, trials=2)
        assert env.run("search") == 0
        parents, children = runs_of(env.tracking_uri)
        assert len(parents) == 1 and len(children) == 2 and parents[0].info.status == "FINISHED"
        assert any((tmp_path / "server-artifacts").rglob("model.pt2"))  # the server stored the best model
        model = mlflow.pytorch.load_model("models:/tiny@champion")  # downloaded through the server
        assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    finally:
        stop_ui(make_server, port)  # SIGTERM stops its mlflow server with it: the port is free again


def test_champion_matches_runs_logged_before_parameters_were_added():
    """A store written before `augment_policy`, `unfreeze_epoch` and `input_size` existed still exports."""
    params = hparams.resolve_params({"model": "cnn", "lr": 0.05})
    logged = {k: registry.param_value(v) for k, v in params.items()} | {"trial_seed": "7"}
    old_run = {k: v for k, v in logged.items() if k not in ("augment_policy", "unfreeze_epoch", "input_size")}
    version = registry.ChampionVersion("m", "1", "m", 0, "run", None, "models:/m/1", old_run)
    assert version.matches(params, 7)  # missing keys: the run trained at their defaults
    assert not version.matches(params, 8)  # another seed
    assert not version.matches(params | {"unfreeze_epoch": 2}, 7)  # missing, and not the default
    assert not version.matches(params | {"lr": 0.01}, 7)  # logged, and different
    differs = registry.ChampionVersion("m", "1", "m", 0, "run", None, "models:/m/1",
                                       old_run | {"augment_policy": "natural"})
    assert not differs.matches(params, 7)  # logged with another value than the trial's


def test_the_tracking_server_answers_mlflows_defaults_this_hosts_names_and_the_listed_ones(monkeypatch):
    """`make server`'s Host allow-list (a real server refusing other names: tests/test_scale.py)."""
    monkeypatch.setattr(server.socket, "gethostname", lambda: "trainbox")
    monkeypatch.setattr(server.socket, "getfqdn", lambda: "trainbox.lab.example")
    defaults = server.get_default_allowed_hosts()  # MLflow's own: localhost, private addresses
    assert "localhost:*" in defaults and "10.*" in defaults
    ours = ["trainbox", "trainbox.lab.example", "trainbox:*", "trainbox.lab.example:*"]
    assert server.allowed_hosts(" mlflow.lab, ,10.0.0.7:5000").split(",") == [*defaults, *ours, "mlflow.lab",
                                                                                 "10.0.0.7:5000"]
    assert server.allowed_hosts(None).split(",") == [*defaults, *ours]
