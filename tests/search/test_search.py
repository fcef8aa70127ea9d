"""The search through the real CLI on the tiny dataset: determinism, resume, interrupts, replay, failures."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from datetime import timedelta

import optuna
import pytest
import torch
from conftest import TINY_CLI, RecordingListener, mlflow_runs, signal_search_mid_trial

from pipeline import store
from pipeline.cli import main
from pipeline.commands.studies import study_states
from pipeline.search import seeds, trial_files
from pipeline.spec import hparams, studies
from pipeline.tracking import study_run
from pipeline.training import models

pytestmark = pytest.mark.trained_values  # make test-portable runs these as a CPU without AVX-512 would

BASELINE = {"lr": 3e-3, "dropout": 0.1}  # the tiny study's baseline (tests/tiny_study.py)


def test_search_runs_budget_and_records_seed_params_history(study_env, capsys):
    study_env.write_study(trials=3, epochs=2)
    assert study_env.run("search") == 0
    finished = study_env.records(states=store.FINISHED)
    assert len(finished) == 3
    for trial in finished:
        assert trial.seed == studies.derive_seed(7, trial.number)
        assert trial.params["lr"] == trial.sampled["lr"]
        assert trial.params["cnn_channels"] == [8, 16]
        assert 1 <= len(trial.history) <= 2
    first = study_env.records()[0]
    assert first.state == "COMPLETE" and first.sampled == BASELINE and first.baseline is True
    out = capsys.readouterr().out
    assert "top trials of tiny" in out and "make replay STUDY=tiny TRIAL=" in out


def test_a_search_trial_builds_its_model_once(study_env, monkeypatch):
    """The model whose size a trial records (and a size constraint checks) before training is the one it trains:
    one build per trial, not one to count and another to train."""
    study_env.write_study(trials=2, epochs=1)
    built = []
    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *args, **kwargs: built.append(args) or build(*args, **kwargs))
    assert study_env.run("search") == 0
    assert len(study_env.records(states=store.FINISHED)) == 2
    assert len(built) == 2


def test_studies_command_lists_progress_and_best(study_env, capsys):
    study_env.write_study(trials=2)
    study_env.write_study(name="other", trials=2)
    assert study_env.run("search") == 0
    best = max(r.values[0] for r in study_env.records() if r.state == "COMPLETE")
    states = {s.file: s for s in study_states(study_env.studies_dir, study_env.storage)}
    assert (states["tiny.toml"].done, states["tiny.toml"].trials, states["tiny.toml"].best) == (2, 2, [best])
    assert states["tiny.toml"].state == "done"
    assert (states["other.toml"].done, states["other.toml"].best, states["other.toml"].state) == (0, None,
                                                                                                  "not started")
    # `make studies` exists to print them: its table is what is under test here.
    capsys.readouterr()
    assert study_env.run("studies") == 0
    rows = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if "│" in line}
    assert "2/2" in rows["tiny"] and f"{best:.4f}" in rows["tiny"] and "done" in rows["tiny"]
    assert "0/2" in rows["other"] and "not started" in rows["other"]


def test_two_workers_share_the_budget_and_their_events_reach_this_view(study_env, capsys):
    """WORKERS=2: this process coordinates two worker processes (tests/tiny_cli.py) on the journal file."""
    study_env.write_study(trials=3)
    env = study_env.replace(storage=str(study_env.studies_dir / "optuna.journal"))
    assert main(env.args("search", "--workers", "2"), worker_program=[sys.executable, str(TINY_CLI),
                                                                      str(env.root)]) == 0
    finished = env.records(states=store.FINISHED)
    assert len(finished) == 3  # exactly the budget: a trial two workers raced for is recorded as surplus
    assert all(r.finished or r.fail_reason == "surplus" for r in env.records())
    owners = {t.owner["pid"] for t in finished}
    assert os.getpid() not in owners and 1 <= len(owners) <= 2  # the workers trained, not the coordinator
    out = capsys.readouterr().out
    for trial in finished:  # each worker's trial_end event, drawn here once
        assert len(re.findall(rf"^trial +{trial.number} {trial.state} .*\(worker [12]\)$", out, re.MULTILINE)) == 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="WORKERS=auto picks one process on one core")
def test_workers_auto_runs_one_worker_per_core_on_a_journal_and_one_process_on_sqlite(study_env, capsys):
    """The default, WORKERS=auto: one 1-thread worker per core (here up to 4) for a study on the journal file; the
    same study file on SQLite runs in this process alone, and says why."""
    study_env.write_study(trials=2)
    env = study_env.replace(storage=str(study_env.studies_dir / "optuna.journal"))
    program = [sys.executable, str(TINY_CLI), str(env.root)]
    assert main(env.args("search", "--workers", "auto"), worker_program=program) == 0
    out = capsys.readouterr().out
    assert "WORKERS=auto: 2 workers (" in out and "worker 2: pid" in out
    finished = env.records(states=store.FINISHED)
    assert len(finished) == 2 and os.getpid() not in {t.owner["pid"] for t in finished}
    assert {t.threads for t in finished} == {1}

    assert main(study_env.args("search", "--workers", "auto"), worker_program=program) == 0
    out = capsys.readouterr().out
    assert "WORKERS=auto: 1 worker (one process: the study lives in a SQLite file" in out and "worker 1:" not in out
    assert {t.owner["pid"] for t in study_env.records(states=store.FINISHED)} == {os.getpid()}


def test_two_fresh_runs_same_seed_identical_params_and_values(study_env, tmp_path):
    study_env.write_study(trials=4)
    other = study_env.replace(storage=f"sqlite:///{tmp_path}/other.db")
    assert study_env.run("search") == 0 and other.run("search") == 0
    first, second = study_env.load().trials, other.load().trials

    def summary(trials):
        return [(t.number, t.state, t.params, t.values, t.intermediate_values) for t in trials]

    assert summary(first) == summary(second)
    assert len({t.params["lr"] for t in first}) == 4  # the sampler did explore


def test_resume_continues_total_budget_and_reseeds(study_env):
    study_env.write_study(trials=2)
    assert study_env.run("search") == 0
    before = study_env.records()
    assert [r.number for r in before if r.finished] == [0, 1]
    study_env.write_study(trials=4)  # budgets may change between runs; the space may not
    assert study_env.run("search") == 0
    assert optuna.get_all_study_names(store.make_storage(study_env.storage)) == ["tiny"]  # resumed, no new version
    after = study_env.records()
    assert [r.number for r in after] == [0, 1, 2, 3] and all(r.finished for r in after)
    assert after[:2] == before  # the trials of the first run, as they were
    # Reseeded from the finished count: the resumed sampler does not replay trial 1's suggestion.
    assert after[2].sampled != after[1].sampled
    assert study_env.run("search") == 0  # budget already met: runs nothing more
    assert len(study_env.records()) == 4


def test_checkpoints_no_trial_will_resume_are_swept_the_others_kept(tmp_path, monkeypatch):
    study = optuna.create_study(storage=store.make_storage(f"sqlite:///{tmp_path}/s.db"), direction="maximize")
    study.tell(study.ask(), 0.5)  # trial 0 completed: nothing resumes its checkpoint
    study.ask()  # trial 1 running: it resumes its own
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # trial 2 interrupted...
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # trial 3 failed just now, nothing queued yet
    store.requeue(study, store.record(study, 2))  # ...trial 2 queued again: the retry (trial 4) resumes trial 2's
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("trial-0.pt", "trial-1.pt", "trial-2.pt", "trial-3.pt", "trial-9.pt", "trial-0.pt.tmp", "notes.txt"):
        (folder / name).write_bytes(b"kept unless an orphan")

    told = RecordingListener()
    removed = trial_files.sweep_checkpoints(study, folder, told)
    assert [p.name for p in removed] == ["trial-0.pt"]
    # trial 3 failed a moment ago: its retry may be on its way to the queue. trial-9: no trial of this study.
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "trial-0.pt.tmp", "trial-1.pt", "trial-2.pt",
                                                         "trial-3.pt", "trial-9.pt"]
    assert told.events == [("warning", "removed 1 checkpoint(s) no trial will resume: trial-0.pt")]
    assert trial_files.sweep_checkpoints(study, folder, told) == [] and len(told.events) == 1  # nothing more to say
    monkeypatch.setattr(trial_files, "SWEEP_GRACE", timedelta(0))  # as if trial 3 had failed long ago, with no retry
    assert [p.name for p in trial_files.sweep_checkpoints(study, folder, told)] == ["trial-3.pt"]
    assert trial_files.sweep_checkpoints(study, tmp_path / "none", told) == []  # no folder yet: nothing to do


def test_of_two_copies_of_a_champion_phase_run_running_at_once_exactly_one_trains(tmp_path):
    """Two processes finishing a search together may both queue the phase's missing run, and take both copies
    at the same moment: each then sees the other running. The one that started first trains."""
    companion = optuna.create_study(storage=store.make_storage(f"sqlite:///{tmp_path}/s.db"), direction="maximize")
    for _ in range(2):
        store.queue_trial(companion, {}, store.TrialNotes(confirmation_of=3, repeat=1))
    first, second = companion.ask(), companion.ask()  # both RUNNING now; `first` started earlier (or numbered lower)
    assert seeds.surplus_run(first) == ""
    assert seeds.surplus_run(second) == f"repeat 1 of trial 3 is already trial {first.number}"
    companion.tell(first, 0.99)
    store.queue_trial(companion, {}, store.TrialNotes(confirmation_of=3, repeat=1))
    assert "already trial" in seeds.surplus_run(companion.ask())  # a copy of a finished run: surplus


def test_a_search_sweeps_its_orphan_checkpoints_when_it_starts(study_env, capsys):
    study_env.write_study(trials=1)
    assert study_env.run("search") == 0
    orphan = study_env.checkpoints() / "trial-0.pt"  # as a run nobody resumes leaves it
    orphan.write_bytes(b"left behind")
    study_env.write_study(trials=2)
    capsys.readouterr()
    assert study_env.run("search") == 0
    assert not orphan.exists()
    assert "removed 1 checkpoint(s) no trial will resume: trial-0.pt" in capsys.readouterr().err


@pytest.mark.faults  # README: What survives what
def test_changed_search_space_is_refused_then_fresh_starts_v2(study_env, capsys):
    study_env.write_study(trials=1)
    assert study_env.run("search") == 0
    study_env.write_study(trials=1, space={"label_smoothing": {"type": "float", "low": 0.0, "high": 0.1}},
                          baseline=None)
    assert study_env.run("search") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "changed since study 'tiny' started (space.label_smoothing)" in err and "FRESH=1" in err
    assert len(study_env.records()) == 1  # the old study is untouched
    assert study_env.run("search", "--fresh") == 0
    assert len(study_env.records("tiny-v2")) == 1 and len(study_env.records()) == 1


@pytest.mark.faults  # README: What survives what
def test_new_baseline_is_enqueued_once_across_resumes(study_env):
    study_env.write_study(trials=1)
    assert study_env.run("search") == 0
    two_baselines = [BASELINE, {"lr": 5e-3, "dropout": 0.0}]
    study_env.write_study(trials=3, baseline=two_baselines)
    assert study_env.run("search") == 0
    study_env.write_study(trials=4, baseline=two_baselines)
    assert study_env.run("search") == 0
    params = [r.sampled for r in study_env.records()]
    assert params.count(BASELINE) == 1 and params.count({"lr": 5e-3, "dropout": 0.0}) == 1


@pytest.mark.faults  # README: What survives what
def test_divergent_trial_is_pruned_with_reason(study_env):
    study_env.write_study(trials=2, fixed={"optimizer": "sgd", "schedule": "none", "batch_norm": False},
                          space={"lr": {"type": "float", "low": 1e-3, "high": 1e5, "log": True}},  # holds 1e4
                          baseline=[{"lr": 1e4, "dropout": 0.0}])
    assert study_env.run("search") == 0
    trial, after = study_env.records()[:2]
    assert trial.state == "PRUNED" and trial.fail_reason == "diverged"
    assert "loss became" in trial.fail_detail
    assert after.finished  # the study went on


@pytest.mark.faults  # README: What survives what
def test_out_of_memory_trial_is_pruned_with_batch_size_and_study_continues(study_env):
    study_env.write_study(trials=2)

    def exhausted(module, inputs):  # the device's OOM error, raised by the first trial's training step
        if module.training and len(inputs[0]) == 50 and not exhausted.raised:
            exhausted.raised = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    exhausted.raised = False
    handle = torch.nn.modules.module.register_module_forward_pre_hook(exhausted)
    try:
        assert study_env.run("search") == 0
    finally:
        handle.remove()
    first, second = study_env.records()
    assert first.state == "PRUNED" and first.fail_reason == "oom"
    assert "batch_size 50" in first.fail_detail
    assert second.state == "COMPLETE"


@pytest.mark.faults  # README: What survives what
def test_three_consecutive_failures_stop_the_study(study_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    study_env.write_study(trials=5, model="resnet18", fixed={
        "cnn_channels": None, "pool": None, "head": None, "head_units": None, "resnet_mode": "finetune"})
    assert study_env.run("search") == 1
    assert "3 trials failed in a row" in " ".join(capsys.readouterr().err.split())  # why the study stopped
    trials = study_env.records()
    assert [t.state for t in trials] == ["FAIL"] * 3
    assert all("resnet18-f37072fd.pth" in t.fail_detail and "Traceback" in t.traceback for t in trials)


def _set_recorded_val_accuracy(storage: str, number: int, value: float) -> None:
    """Edit a recorded metric in the real database, as corruption or tampering would."""
    db = sqlite3.connect(storage.removeprefix("sqlite:///"))
    trial_id = db.execute("SELECT trial_id FROM trials WHERE number = ?", (number,)).fetchone()[0]
    first_epoch = f"{store.EPOCH_PREFIX}00001"  # each epoch is a record of its own (store.note_epoch)
    (raw,) = db.execute("SELECT value_json FROM trial_user_attributes WHERE trial_id = ? AND key = ?",
                        (trial_id, first_epoch)).fetchone()
    epoch = json.loads(raw)
    epoch["val_accuracy"] = value
    db.execute("UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = ?",
               (json.dumps(epoch), trial_id, first_epoch))
    db.commit()
    db.close()


def test_replay_identical_then_detects_an_altered_metric(study_env, capsys):
    study_env.write_study(trials=2, epochs=2)
    assert study_env.run("search") == 0
    # each run records the batch it evaluated at (the default), which its replay uses
    assert [r.eval_batch_size for r in study_env.records()] == [hparams.TRAIN_SPECS["eval_batch_size"].default] * 2
    assert study_env.run("replay", "--trial", "1") == 0
    assert "replayed identically" in capsys.readouterr().out  # replay's report is what is under test
    _set_recorded_val_accuracy(study_env.storage, 1, 0.123)
    assert study_env.run("replay", "--trial", "1") == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "epoch 1 val_accuracy: recorded 0.123, replayed" in out
    assert study_env.run("replay", "--trial", "9") == 2  # no such trial
    study_env.load().enqueue_trial(BASELINE)  # trial 2: queued, never run
    capsys.readouterr()
    assert study_env.run("replay", "--trial", "2") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "trial 2 of study 'tiny' is not a finished trial with recorded metrics; finished trials: [0, 1]" in err


def test_each_epoch_is_one_short_journal_append_so_the_journal_grows_with_the_epochs_not_their_square(study_env):
    journal = study_env.studies_dir.parent / "o.journal"
    env = study_env.replace(storage=str(journal))
    env.write_study(trials=1, epochs=40)
    assert env.run("search") == 0
    epoch_lines = [line for line in journal.read_text().splitlines() if '"val_accuracy":' in line]
    assert len(epoch_lines) == 40  # one append an epoch...
    assert max(map(len, epoch_lines)) < 2 * min(map(len, epoch_lines))  # ...holding that epoch alone
    (trial,) = env.records()
    assert [h["epoch"] for h in trial.history] == list(range(1, 41))
    assert env.run("replay", "--trial", "0") == 0  # the record reads back whole: it replays


def test_replay_trains_in_the_precision_the_trial_recorded_whatever_the_machine_setting_says(study_env, monkeypatch,
                                                                                            capsys):
    monkeypatch.setenv("PIPELINE_PRECISION", "fp32")
    study_env.write_study(trials=1, epochs=2)
    assert study_env.run("search") == 0
    assert study_env.records()[0].precision == "fp32"
    monkeypatch.setenv("PIPELINE_PRECISION", "bf16")  # "auto" now means bf16: the replay still trains in fp32
    capsys.readouterr()
    assert study_env.run("replay", "--trial", "0") == 0
    assert "replayed identically" in capsys.readouterr().out


@pytest.mark.faults  # README: What survives what
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_trial_then_resume_completes_budget(study_env, mlflow_store, signal_number):
    """A real process, a real SIGINT or SIGTERM after the first finished trial, then the same command again."""
    study_env.write_study(trials=3, epochs=30)
    command = study_env.command("search")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def mid_trial() -> int | None:
        """The search's pid while a trial has finished and the next one has an epoch behind it and at least
        two ahead: the signal lands in a trial, not between two."""
        trials = study_env.records()
        inside = any(t.finished for t in trials) and any(t.state == "RUNNING" and 1 <= len(t.history) <= 28
                                                        for t in trials)
        return process.pid if inside else None

    signal_search_mid_trial(process, mid_trial, signal_number)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal_number, err
    assert f"{signal.Signals(signal_number).name} received" in err  # what the user is told
    told = " ".join(err.split())
    assert "Resume with: MLFLOW_TRACKING_URI=" in told  # the same stores as this run
    assert f"make search STUDY=tiny STORAGE={study_env.storage}" in told
    interrupted = [t for t in study_env.records() if t.state == "FAIL"]
    assert len(interrupted) == 1 and interrupted[0].fail_reason == "interrupted"
    runs = {r.data.tags.get("trial_number", "parent"): r for r in mlflow_runs(mlflow_store)}
    cut = runs[str(interrupted[0].number)]
    assert cut.info.status == "FAILED" and cut.data.tags["fail_reason"] == "interrupted"
    assert runs["parent"].info.status == "KILLED"  # the study's run says the invocation was cut short

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    trials = study_env.records()
    finished = [t for t in trials if t.finished]
    assert len(finished) == 3
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    retried = [t for t in finished if t.retry_of == interrupted[0].number]
    assert len(retried) == 1 and retried[0].sampled == interrupted[0].sampled
    runs = mlflow_runs(mlflow_store)
    assert len(runs) == len(trials) + 1 and sum(study_run.PARENT_TAG not in r.data.tags for r in runs) == 1
    assert all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.parametrize("sampler", ["random", "gp", "cmaes"])
def test_every_single_objective_sampler_runs(study_env, sampler):
    study_env.write_study(trials=3, sampler=sampler)
    assert study_env.run("search") == 0
    trials = study_env.records()
    assert len(trials) == 3 and all(t.finished for t in trials)
    assert len({t.sampled["lr"] for t in trials}) == 3


def test_multi_objective_study_with_nsga2(study_env):
    study_env.write_study(trials=3, sampler="nsga2", pruner="none",
                          objectives=[{"metric": "val_accuracy"}, {"metric": "parameter_count"}])
    assert study_env.run("search") == 0
    study = study_env.load()
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert all(len(t.values) == 2 for t in study_env.records()) and study.best_trials


def test_no_baselines_starts_the_sampler_cold_and_workers_are_told(study_env, capsys):
    """BASELINES=off: none of the file's [[baseline]] trials is queued, by this process or by a worker."""
    from pipeline.search import workers
    from pipeline.search.options import SearchOptions
    from pipeline.spec import studies

    path = study_env.write_study(trials=2, baseline=[{"lr": 3e-3, "dropout": 0.1}, {"lr": 5e-3, "dropout": 0.2}])
    assert study_env.run("search", "--no-baselines") == 0
    assert "baseline trial queued" not in capsys.readouterr().out
    records = study_env.records()
    assert len(records) == 2 and not any(r.baseline for r in records)
    assert {r.sampled["lr"] for r in records}.isdisjoint({3e-3, 5e-3})
    cold = studies.with_overrides(studies.load(path), baseline=[])
    assert "--no-baselines" in workers.worker_command(cold, SearchOptions())
    assert "--no-baselines" not in workers.worker_command(studies.load(path), SearchOptions())
