"""The search through the real CLI on the tiny dataset: determinism, resume, interrupts, replay, failures."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline import reproducibility, search, tracking
from pipeline.cli import main

TINY_STUDY = """
description = "tiny search for tests"
dataset = "tiny"
model = "cnn"
trials = {trials}
timeout_minutes = 10
seed = 7
sampler = "tpe"
pruner = "median"
epochs = {epochs}
val_size = 100

[fixed]
cnn_channels = [8, 16]
pool = "every"
head = "gap"
head_units = 0
batch_size = 50
{extra_fixed}

[space]
lr = {{ type = "float", low = 1e-3, high = 1e-2, log = true }}
dropout = {{ type = "float", low = 0.0, high = 0.3 }}
{extra_space}
{baseline}
"""
BASELINE = """
[[baseline]]
lr = 3e-3
dropout = 0.1
"""


def write_study(directory: Path, name: str = "tiny", trials: int = 3, epochs: int = 1, extra_fixed: str = "",
                extra_space: str = "", baseline: str = BASELINE) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(TINY_STUDY.format(trials=trials, epochs=epochs, extra_fixed=extra_fixed,
                                      extra_space=extra_space, baseline=baseline))
    return path


@pytest.fixture
def env(tiny_dataset, tmp_path):
    """(studies dir, storage url, data root) for one test."""
    _, root = tiny_dataset
    return tmp_path / "studies", f"sqlite:///{tmp_path}/optuna.db", root


def run_cli(env, *args: str, study: str = "tiny") -> int:
    studies_dir, storage, root = env
    return main([args[0], "--study", study, "--studies-dir", str(studies_dir), "--storage", storage,
                 "--root", str(root), "--threads", "1", *args[1:]])


def load(storage: str, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def test_search_runs_budget_and_records_seed_params_history(env, capsys):
    write_study(env[0], trials=3, epochs=2)
    assert run_cli(env, "search") == 0
    study = load(env[1])
    finished = study.get_trials(states=search.FINISHED)
    assert len(finished) == 3
    for trial in finished:
        assert trial.user_attrs["seed"] == reproducibility.derive_seed(7, trial.number)
        assert trial.user_attrs["params"]["lr"] == trial.params["lr"]
        assert trial.user_attrs["params"]["cnn_channels"] == [8, 16]
        assert 1 <= len(trial.user_attrs["history"]) <= 2
    first = study.trials[0]
    assert first.params == {"lr": 3e-3, "dropout": 0.1} and first.user_attrs["baseline"] is True
    out = capsys.readouterr().out
    assert "trial   0 COMPLETE" in out and "top trials of tiny" in out and "make replay STUDY=tiny TRIAL=" in out


def test_studies_command_lists_progress_and_best(env, capsys):
    write_study(env[0], trials=2)
    write_study(env[0], name="other", trials=2)
    assert run_cli(env, "search") == 0
    capsys.readouterr()
    assert main(["studies", "--studies-dir", str(env[0]), "--storage", env[1]]) == 0
    rows = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if "│" in line}
    best = max(t.value for t in load(env[1]).trials if t.value is not None)
    assert "2/2" in rows["tiny"] and f"{best:.4f}" in rows["tiny"] and "done" in rows["tiny"]
    assert "0/2" in rows["other"] and "not started" in rows["other"]


def test_two_fresh_runs_same_seed_identical_params_and_values(env, tmp_path):
    write_study(env[0], trials=4)
    other = (env[0], f"sqlite:///{tmp_path}/other.db", env[2])
    assert run_cli(env, "search") == 0 and run_cli(other, "search") == 0
    first, second = load(env[1]).trials, load(other[1]).trials

    def summary(trials):
        return [(t.number, t.state, t.params, t.values, t.intermediate_values) for t in trials]

    assert summary(first) == summary(second)
    assert len({t.params["lr"] for t in first}) == 4  # the sampler did explore


def test_resume_continues_total_budget_and_reseeds(env, capsys):
    write_study(env[0], trials=2)
    assert run_cli(env, "search") == 0
    write_study(env[0], trials=4)  # budgets may change between runs; the space may not
    assert run_cli(env, "search") == 0
    study = load(env[1])
    assert len(study.get_trials(states=search.FINISHED)) == 4
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert "resuming study 'tiny': 2 of 4 trials finished" in capsys.readouterr().out
    assert run_cli(env, "search") == 0  # budget already met: runs nothing more
    assert len(load(env[1]).trials) == 4
@pytest.mark.faults  # README: What survives what
def test_changed_search_space_is_refused_then_fresh_starts_v2(env, capsys):
    write_study(env[0], trials=1)
    assert run_cli(env, "search") == 0
    write_study(env[0], trials=1, extra_space='label_smoothing = { type = "float", low = 0.0, high = 0.1 }',
                baseline="")
    assert run_cli(env, "search") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "changed since study 'tiny' started (space.label_smoothing)" in err and "FRESH=1" in err
    assert len(load(env[1]).trials) == 1  # the old study is untouched
    assert run_cli(env, "search", "--fresh") == 0
    assert len(load(env[1], "tiny-v2").trials) == 1 and len(load(env[1]).trials) == 1
@pytest.mark.faults  # README: What survives what
def test_new_baseline_is_enqueued_once_across_resumes(env):
    write_study(env[0], trials=1)
    assert run_cli(env, "search") == 0
    two_baselines = BASELINE + "\n[[baseline]]\nlr = 5e-3\ndropout = 0.0\n"
    write_study(env[0], trials=3, baseline=two_baselines)
    assert run_cli(env, "search") == 0
    write_study(env[0], trials=4, baseline=two_baselines)
    assert run_cli(env, "search") == 0
    params = [t.params for t in load(env[1]).trials]
    assert params.count({"lr": 3e-3, "dropout": 0.1}) == 1 and params.count({"lr": 5e-3, "dropout": 0.0}) == 1
@pytest.mark.faults  # README: What survives what
def test_divergent_trial_is_pruned_with_reason(env):
    path = write_study(env[0], trials=2, extra_fixed='optimizer = "sgd"\nschedule = "none"\nbatch_norm = false',
                       baseline="[[baseline]]\nlr = 1e4\ndropout = 0.0\n")
    path.write_text(path.read_text().replace("high = 1e-2", "high = 1e5"))  # let the space hold lr = 1e4
    assert run_cli(env, "search") == 0
    trial, after = load(env[1]).trials[:2]
    assert trial.state == TrialState.PRUNED and trial.user_attrs["fail_reason"] == "diverged"
    assert "loss became" in trial.user_attrs["fail_detail"]
    assert after.state in search.FINISHED  # the study went on
@pytest.mark.faults  # README: What survives what
def test_out_of_memory_trial_is_pruned_with_batch_size_and_study_continues(env):
    write_study(env[0], trials=2)

    def exhausted(module, inputs):  # the device's OOM error, raised by the first trial's training step
        if module.training and len(inputs[0]) == 50 and not exhausted.raised:
            exhausted.raised = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    exhausted.raised = False
    handle = torch.nn.modules.module.register_module_forward_pre_hook(exhausted)
    try:
        assert run_cli(env, "search") == 0
    finally:
        handle.remove()
    first, second = load(env[1]).trials
    assert first.state == TrialState.PRUNED and first.user_attrs["fail_reason"] == "oom"
    assert "batch_size 50" in first.user_attrs["fail_detail"]
    assert second.state == TrialState.COMPLETE
@pytest.mark.faults  # README: What survives what
def test_three_consecutive_failures_stop_the_study(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    path = write_study(env[0], trials=5)
    path.write_text(path.read_text().replace('model = "cnn"', 'model = "resnet18"').replace(
        'cnn_channels = [8, 16]\npool = "every"\nhead = "gap"\nhead_units = 0\n', 'resnet_mode = "finetune"\n'))
    assert run_cli(env, "search") == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "3 trials failed in a row" in err and "resnet18-f37072fd.pth" in err
    trials = load(env[1]).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all("Traceback" in t.user_attrs["traceback"] for t in trials)


def _set_recorded_val_accuracy(storage: str, number: int, value: float) -> None:
    """Edit a recorded metric in the real database, as corruption or tampering would."""
    db = sqlite3.connect(storage.removeprefix("sqlite:///"))
    trial_id = db.execute("SELECT trial_id FROM trials WHERE number = ?", (number,)).fetchone()[0]
    (raw,) = db.execute("SELECT value_json FROM trial_user_attributes WHERE trial_id = ? AND key = 'history'",
                        (trial_id,)).fetchone()
    history = json.loads(raw)
    history[0]["val_accuracy"] = value
    db.execute("UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = 'history'",
               (json.dumps(history), trial_id))
    db.commit()
    db.close()


def test_replay_identical_then_detects_an_altered_metric(env, capsys):
    write_study(env[0], trials=2, epochs=2)
    assert run_cli(env, "search") == 0
    assert run_cli(env, "replay", "--trial", "1") == 0
    assert "replayed identically" in capsys.readouterr().out
    _set_recorded_val_accuracy(env[1], 1, 0.123)
    assert run_cli(env, "replay", "--trial", "1") == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "epoch 1 val_accuracy: recorded 0.123, replayed" in out
    assert run_cli(env, "replay", "--trial", "9") == 2


@pytest.mark.faults  # README: What survives what
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_trial_then_resume_completes_budget(env, mlflow_store, signal_number):
    """A real process, a real SIGINT or SIGTERM after the first finished trial, then the same command again."""
    studies_dir, storage, root = env
    write_study(studies_dir, trials=3, epochs=6)
    command = [sys.executable, str(Path(__file__).parent / "tiny_cli.py"), str(root), "search", "--study", "tiny",
               "--studies-dir", str(studies_dir), "--storage", storage, "--root", str(root), "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until trial 0 has finished and trial 1 is running
        time.sleep(0.3)
        try:
            trials = load(storage).get_trials(deepcopy=False)
        except (KeyError, optuna.exceptions.StorageInternalError):
            continue
        if any(t.state in search.FINISHED for t in trials) and any(t.state == TrialState.RUNNING for t in trials):
            break
    process.send_signal(signal_number)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal_number, err
    assert f"{signal.Signals(signal_number).name} received" in err
    assert "Resume with: make search STUDY=tiny" in " ".join(err.split())
    interrupted = [t for t in load(storage).trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 1 and interrupted[0].user_attrs["fail_reason"] == "interrupted"
    runs = {r.data.tags.get("trial_number", "parent"): r for r in mlflow_runs(mlflow_store, "tiny")}
    cut = runs[str(interrupted[0].number)]
    assert cut.info.status == "FAILED" and cut.data.tags["fail_reason"] == "interrupted"
    assert runs["parent"].info.status == "KILLED"  # the study's run says the invocation was cut short

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    trials = load(storage).trials
    finished = [t for t in trials if t.state in search.FINISHED]
    assert len(finished) == 3
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    retried = [t for t in finished if t.user_attrs.get("retry_of") == interrupted[0].number]
    assert len(retried) == 1 and retried[0].params == interrupted[0].params
    runs = mlflow_runs(mlflow_store, "tiny")
    assert len(runs) == len(trials) + 1 and sum(tracking.PARENT_TAG not in r.data.tags for r in runs) == 1
    assert all(r.info.status != "RUNNING" for r in runs)


def mlflow_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    return list(client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000))


@pytest.mark.parametrize("sampler", ["random", "gp", "cmaes"])
def test_every_single_objective_sampler_runs(env, sampler):
    path = write_study(env[0], trials=3)
    path.write_text(path.read_text().replace('sampler = "tpe"', f'sampler = "{sampler}"'))
    assert run_cli(env, "search") == 0
    trials = load(env[1]).trials
    assert len(trials) == 3 and all(t.state in search.FINISHED for t in trials)
    assert len({t.params["lr"] for t in trials}) == 3


def test_multi_objective_study_with_nsga2(env):
    path = write_study(env[0], trials=3)
    objectives = 'objectives = [{ metric = "val_accuracy" }, { metric = "parameter_count" }]'
    path.write_text(path.read_text().replace('sampler = "tpe"', 'sampler = "nsga2"').replace(
        'pruner = "median"', f'pruner = "none"\n{objectives}'))
    assert run_cli(env, "search") == 0
    study = load(env[1])
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert all(len(t.values) == 2 for t in study.trials) and study.best_trials
