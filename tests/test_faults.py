"""Faults that really happen: kill -9, signals, kills during writes, concurrent runs, a full disk, bad images.

Each test does the thing for real (real processes, real signals, real files, real size limits) and asserts
what survives. `make test-faults` runs these and the other scenarios marked `faults` across the suite.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
import torch
from conftest import (
    TINY_CLI,
    freeze_mid_trial,
    kill_mid_trial,
    mlflow_runs,
    thaw,
    trial_runs,
    wait_until,
    write_two_lr_study,
)
from PIL import Image
from ui_process import free_port, wait_for_health

from pipeline import store
from pipeline.cli import main
from pipeline.tracking import study_run
from pipeline.training import models

pytestmark = pytest.mark.faults


def integrity_ok(url: str) -> bool:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --------------------------------------------------------------------------------------------------
# 1. kill -9 mid-trial, then the same command again


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_kill_9_mid_trial_then_rerun_fails_retries_and_completes(study_env, mlflow_store, tmp_path, storage):
    """The rerun finds the killed trial's process gone (same host): failed and queued again at once."""
    env = study_env.replace(storage=str(tmp_path / "studies" / "optuna.journal")) if storage == "journal" else study_env
    write_two_lr_study(env, trials=3, epochs=8)
    fast_heartbeat = dict(os.environ, PIPELINE_HEARTBEAT_SECONDS="1", PIPELINE_GRACE_SECONDS="3")
    process = subprocess.Popen(env.command("search"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=fast_heartbeat)

    def running_and_tracked() -> int | None:
        trials = env.records()
        running = [t.number for t in trials if t.state == "RUNNING"]
        tracked = {n for n, r in trial_runs(mlflow_store).items() if r.info.status == "RUNNING"}
        mid_trial = any(t.state == "COMPLETE" for t in trials) and any(n in tracked for n in running)
        return process.pid if mid_trial else None

    kill_mid_trial(running_and_tracked)
    process.wait()
    killed = next(t for t in env.records() if t.state == "RUNNING")
    finished_before = {t.number: t.values for t in env.records() if t.state == "COMPLETE"}
    assert trial_runs(mlflow_store)[killed.number].info.status == "RUNNING"  # as the kill left it

    rerun = subprocess.run(env.command("search"), capture_output=True, text=True, timeout=600, env=fast_heartbeat)
    assert rerun.returncode == 0, rerun.stderr
    trials = env.records()
    assert trials[killed.number].state == "FAIL"
    assert trials[killed.number].fail_reason == "stale"  # failed by the rerun's sweep of dead owners
    retried = [t for t in trials if t.number > killed.number and t.sampled == killed.sampled and t.finished]
    assert retried, "the killed trial's parameters were not run again"
    assert len([t for t in trials if t.finished]) == 3  # the budget, exactly
    assert {t.number: t.values for t in trials if t.number in finished_before} == finished_before
    cut = trial_runs(mlflow_store)[killed.number]
    assert cut.info.status == "FAILED" and cut.data.tags["fail_reason"] == "stale"
    assert all(r.info.status != "RUNNING" for r in mlflow_runs(mlflow_store))
    assert integrity_ok(mlflow_store) and (storage == "journal" or integrity_ok(env.storage))


# --------------------------------------------------------------------------------------------------
# 3. kill -9 while checkpoints are being written


def test_kill_9_during_checkpoint_writes_never_leaves_a_truncated_checkpoint(tiny_dataset, tmp_path):
    _, root = tiny_dataset
    checkpoint = tmp_path / "run.ckpt"

    def partial_checkpoints() -> list:
        return list(tmp_path.glob(".run.ckpt.*.tmp"))  # fileio.write_atomic's temporary name
    # A wide flatten head makes each checkpoint ~10 MB, so kills often land inside a write.
    train_command = [sys.executable, str(TINY_CLI), str(root), "train", "--dataset", "tiny", "--root", str(root),
                     "--model", "cnn", "--set", "cnn_channels=[16,32]", "--set", "head=flatten",
                     "--set", "head_units=1024", "--set", "epochs=40", "--set", "augment=0.0",
                     "--val-size", "100", "--threads", "1", "--checkpoint", str(checkpoint)]
    rng = random.Random(0)
    kills, mid_write, epoch = 0, 0, 0
    for round_ in range(6):
        process = subprocess.Popen(train_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: checkpoint.is_file(), "the first checkpoint", timeout=120)
        if round_ % 2:  # at a random moment
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # the moment the next checkpoint's temporary file appears: inside a write
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline and not partial_checkpoints():
                time.sleep(0.001)
        if process.poll() is None:
            process.kill()
            kills += 1
        process.wait()
        mid_write += bool(partial_checkpoints())  # the kill cut a write short: its temporary file is left
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # a whole file, every time
        assert state["epoch"] >= epoch and len(state["history"]) == state["epoch"]
        assert state["model"]["0.weight"].shape[0] == 16  # the weights are all there
        epoch = state["epoch"]
    assert kills >= 3 and epoch < 40
    assert mid_write >= 1, "no kill landed inside a checkpoint write"
    finished = subprocess.run(train_command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr  # resumes from the last whole checkpoint to the end
    printed = re.findall(r"^epoch \d+:", finished.stdout, re.MULTILINE)
    assert 0 < len(printed) <= 40 - epoch  # only the epochs the checkpoint did not have
    assert "best val accuracy" in finished.stdout


# --------------------------------------------------------------------------------------------------
# 9. two searches on the same study at once


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_searches_on_one_study_at_once_both_contribute_nothing_lost(study_env, mlflow_store, tmp_path, storage):
    env = study_env.replace(storage=str(tmp_path / "studies" / "optuna.journal")) if storage == "journal" else study_env
    write_two_lr_study(env, trials=6, epochs=2)
    first = subprocess.Popen(env.command("search"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(env.command("search"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [err for _, err in outputs]
    trials = env.records()
    finished = [t for t in trials if t.finished]
    assert {t.owner["pid"] for t in finished} == {first.pid, second.pid}  # each process ran trials of its own
    assert len(finished) == 6  # the budget exactly, though both may ask for a trial when 5 are done
    assert len({t.number for t in trials}) == len(trials)
    baseline_runs = [t for t in trials if t.baseline]
    assert len(baseline_runs) == 2  # each baseline queued once, not once per process
    recorded = mlflow_runs(mlflow_store)
    parents = [r for r in recorded if study_run.PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in recorded if study_run.PARENT_TAG in r.data.tags]
    assert len(children) == len([t for t in trials if t.state != "WAITING"])
    assert {r.data.tags[study_run.PARENT_TAG] for r in children} == {parents[0].info.run_id}


# --------------------------------------------------------------------------------------------------
# 10. a full disk (a real file-size limit) while the best model is being logged


def limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_fails_the_trial_keeps_the_rest_and_resumes(study_env, mlflow_store):
    # A flatten head of 1024 units: the model is ~3.2 MB, over the 2.5 MB limit; the databases stay under it.
    write_two_lr_study(study_env, trials=1, channels=[16, 16], head="flatten", head_units=1024)
    assert subprocess.run(study_env.command("search"), capture_output=True, text=True, timeout=300).returncode == 0
    first = study_env.records()[0]
    assert first.state == "COMPLETE"  # the weak baseline, its model logged

    limited = subprocess.run(study_env.command("search", "--trials", "2"), capture_output=True, text=True,
                             timeout=300, preexec_fn=limit_file_size(2_500_000))
    assert limited.returncode == 1, limited.stderr  # the study stops at once: every later trial would fail too
    assert "study stopped: a disk write failed for lack of space" in " ".join(limited.stderr.split())
    trials = study_env.records()
    full = trials[1]  # the strong baseline: a new best whose model does not fit
    assert full.state == "FAIL" and full.fail_reason == "disk_full"
    assert "File too large" in full.fail_detail
    assert trials[0].state == "COMPLETE" and trials[0].values == first.values
    by_trial = trial_runs(mlflow_store)
    assert by_trial[1].info.status == "FAILED" and by_trial[1].data.tags["fail_reason"] == "disk_full"
    assert by_trial[0].info.status == "FINISHED" and "model_uri" in by_trial[0].data.tags
    assert integrity_ok(study_env.storage) and integrity_ok(mlflow_store)

    resumed = subprocess.run(study_env.command("search", "--trials", "3"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr  # space is back: the study completes its budget
    assert len(study_env.records(states=store.FINISHED)) == 3
    best = store.leading_best(study_env.load())
    assert "model_uri" in trial_runs(mlflow_store)[best.number].data.tags


def test_disk_full_on_the_databases_stops_the_study_in_one_line_and_resumes(study_env, mlflow_store):
    """The databases themselves cannot grow: a file-size limit at the Optuna store's size, below the MLflow
    store's. The first write that needs room fails; the study stops there instead of failing trial after trial."""
    write_two_lr_study(study_env, trials=1)
    assert subprocess.run(study_env.command("search"), capture_output=True, text=True, timeout=300).returncode == 0
    first = study_env.records()[0]
    optuna_db = study_env.storage.removeprefix("sqlite:///")
    limit = os.path.getsize(optuna_db)
    assert os.path.getsize(mlflow_store.removeprefix("sqlite:///")) > limit  # MLflow's store cannot grow at all

    limited = subprocess.run(study_env.command("search", "--trials", "4"), capture_output=True, text=True,
                             timeout=300, preexec_fn=limit_file_size(limit))
    assert limited.returncode == 1, limited.stderr
    err = " ".join(limited.stderr.split())
    assert "study stopped: a disk write failed for lack of space" in err and "run the same command again" in err
    assert "Traceback" not in limited.stderr and "[SQL:" not in limited.stderr  # a line, not MLflow's dump
    trials = study_env.records()
    assert trials[0].values == first.values and trials[0].state == "COMPLETE"
    assert [t.fail_reason for t in trials[1:]] == ["disk_full"]  # one trial, not three in a row
    assert integrity_ok(study_env.storage) and integrity_ok(mlflow_store)

    resumed = subprocess.run(study_env.command("search", "--trials", "4"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert len(study_env.records(states=store.FINISHED)) == 4
    assert all(r.info.status != "RUNNING" for r in mlflow_runs(mlflow_store))


# --------------------------------------------------------------------------------------------------
# 11. a locked tracking store at start


def test_locked_tracking_store_fails_fast_before_training(study_env, mlflow_store, capsys):
    write_two_lr_study(study_env)
    lock = sqlite3.connect(mlflow_store.removeprefix("sqlite:///"), timeout=0)
    lock.execute("BEGIN EXCLUSIVE")  # another program holds the database
    try:
        started = time.monotonic()
        code = study_env.run("search")
        elapsed = time.monotonic() - started
    finally:
        lock.rollback()
        lock.close()
    assert code == 2 and elapsed < 60
    err = " ".join(capsys.readouterr().err.split())
    assert "MLflow tracking store" in err and "cannot be opened" in err and "locked" in err
    assert optuna.get_all_study_summaries(study_env.storage) == []  # nothing started


# --------------------------------------------------------------------------------------------------
# 13. predict with unreadable, empty, huge or wrong-mode images


def test_predict_reports_bad_images_by_name_and_classifies_the_rest(tmp_path, capsys, monkeypatch):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    params = {"model": "mlp", "mlp_widths": [16]}
    torch.save(models.build_model(params).state_dict(), export_dir / "weights.pt")
    (export_dir / "config.json").write_text(json.dumps({"dataset": "mnist", "mean": 0.13, "std": 0.31, "params": params,
                                                        "classes": [str(d) for d in range(10)]}))
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[5:23, 12:16] = 255
    good = {
        "gray.png": Image.fromarray(digit),
        "rgba.png": Image.fromarray(np.stack([digit] * 3 + [np.full_like(digit, 255)], axis=-1), "RGBA"),
        "cmyk.jpg": Image.fromarray(np.stack([digit] * 3, axis=-1)).convert("CMYK"),
        "palette.png": Image.fromarray(digit).convert("P"),
        "bilevel.png": Image.fromarray(digit).convert("1"),
        "sixteen_bit.png": Image.fromarray(digit.astype(np.uint16) * 256),
        "huge.png": Image.fromarray(np.kron(255 - digit, np.ones((200, 200), dtype=np.uint8))),  # 5600 x 5600
    }
    for name, image in good.items():
        image.save(tmp_path / name)
    Image.new("1", (14_000, 14_000)).save(tmp_path / "bomb.png")  # 196 megapixels: over predict's cap
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    truncated = (tmp_path / "gray.png").read_bytes()[:40]
    (tmp_path / "truncated.png").write_bytes(truncated)
    bad = ["bomb.png", "empty.png", "text.jpg", "truncated.png", "missing.png"]
    monkeypatch.chdir(tmp_path)  # short relative names keep each table row on one line
    paths = [*good, *bad]

    assert main(["predict", "--export", str(export_dir), *paths]) == 2
    out, err = capsys.readouterr()
    err = " ".join(err.split())
    assert "bomb.png: 14000x14000 is 196 megapixels, over the cap" in err  # refused before it is decoded
    for name in bad[1:]:  # each named with what is wrong with it
        assert f"{name}: cannot be decoded as an image" in err
    table_rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(table_rows) == len(good)  # every readable picture classified


# --------------------------------------------------------------------------------------------------
# 6. a corrupt dataset file, found by the search before anything trains


def test_corrupt_dataset_file_stops_the_search_before_anything_is_made(study_env, mlflow_store, capsys):
    """The data is checked before the study and its MLflow parent run exist: nothing is left half-made."""
    write_two_lr_study(study_env)
    labels = study_env.root / "Tiny" / "raw" / "t10k-labels-idx1-ubyte"
    payload = bytearray(labels.read_bytes())
    payload[-1] ^= 0xFF  # one flipped byte
    labels.write_bytes(bytes(payload))
    assert study_env.run("search") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(labels) in err and "SHA-256 mismatch, expected" in err and "make data" in err
    assert optuna.get_all_study_summaries(store.make_storage(study_env.storage)) == []  # no study was created
    assert mlflow_runs(mlflow_store) == []  # and no MLflow run


# --------------------------------------------------------------------------------------------------
# 11b. the tracking server dies in the middle of a search, then comes back


def test_tracking_server_lost_mid_search_stops_with_reasons_then_resumes(study_env, tmp_path):
    port = free_port()
    env = study_env.replace(tracking_uri=f"http://127.0.0.1:{port}")
    server_command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                      f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts"),
                      "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]

    def start_server() -> subprocess.Popen:
        server = subprocess.Popen(server_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        wait_for_health(port)
        return server

    write_two_lr_study(env, trials=4, epochs=20)  # trial 1 runs long enough to be caught before it ends
    quick_failures = dict(os.environ, MLFLOW_TRACKING_URI=env.tracking_uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    server, process = start_server(), None
    try:
        process = subprocess.Popen(env.command("search"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=quick_failures)

        def one_finished() -> int | None:
            """The search's pid while trial 0 has finished and no other trial has."""
            finished = [t.state for t in env.records() if t.finished]
            return process.pid if finished == ["COMPLETE"] else None

        freeze_mid_trial(one_finished)  # so trial 1 cannot end before the server does
        os.killpg(server.pid, signal.SIGKILL)  # the tracking server is gone, mid-search
        server.wait()
        thaw(process.pid)
        out, err = process.communicate(timeout=600)
        assert process.returncode == 1, err
        err = " ".join(err.split())  # what the user reads, in this order:
        assert "study stopped: 3 trials failed in a row" in err  # the reason comes first...
        assert "MLflow could not record the end of this run" in err  # ...then the tracking warning
        trials = env.records()
        failed = [t for t in trials if t.state == "FAIL"]
        assert len(failed) == 3 and all(t.fail_reason for t in failed)
        assert trials[0].state == "COMPLETE"  # what finished before is intact

        server = start_server()  # the same database: the server is back
        rerun = subprocess.run(env.command("search"), capture_output=True, text=True, timeout=600,
                               env=quick_failures)
        assert rerun.returncode == 0, rerun.stderr
        assert len(env.records(states=store.FINISHED)) >= 4
        statuses = [r.info.status for r in mlflow_runs(env.tracking_uri)]
        assert "RUNNING" not in statuses  # the run cut off with the server was closed as FAILED
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
