"""A trial's work survives a kill: each trial checkpoints at every epoch, and the retry of a killed or
interrupted trial resumes its checkpoint (bit for bit)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import optuna
import pytest
import torch
from conftest import StudyEnv
from optuna.trial import TrialState
from test_faults import kill_mid_trial

from pipeline import events, replay, search, store, studies

EPOCHS = 12


def write_study(env: StudyEnv, trials: int = 2, epochs: int = EPOCHS, baselines: int = 1) -> None:
    """Random search, no pruner (an uninterrupted twin run must take the same decisions); the first
    `baselines` of two fixed trials queued."""
    env.write_study(trials=trials, epochs=epochs, sampler="random", pruner="none",
                    baseline=[{"lr": 3e-3, "dropout": 0.1}, {"lr": 5e-3, "dropout": 0.2}][:baselines])


def checkpoint_files(env: StudyEnv) -> list[str]:
    """Every file under the env's checkpoint folders, temporary ones included."""
    folder = env.studies_dir / "checkpoints"
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def saved_epochs(env: StudyEnv, number: int) -> int | None:
    """Epochs in trial `number`'s checkpoint (a file this test's own search wrote), None without one."""
    path = search.checkpoint_path(env.studies_dir / "checkpoints" / "tiny", number)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["epoch"]
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------
# Checkpoints of trials that end for good are removed


class FailsAndPrunes(events.Listener):
    """Trial 0 fails at its second epoch, trial 1 is pruned there; notes which checkpoints exist at each epoch."""

    def __init__(self, folder):
        self.folder, self.seen = folder, []

    def epoch_ended(self, number: int, metrics) -> None:
        self.seen.append((number, metrics.epoch, sorted(p.name for p in self.folder.iterdir())))
        if metrics.epoch == 2 and number == 0:
            raise RuntimeError("a bug in trial 0")
        if metrics.epoch == 2 and number == 1:
            raise optuna.TrialPruned("pruned at epoch 2")


def test_complete_pruned_and_failed_trials_remove_their_checkpoints(study_env, tmp_path):
    write_study(study_env, trials=2, epochs=3)
    spec = studies.load("tiny", study_env.studies_dir)
    study = store.open_study(spec, store.make_storage(study_env.storage), log=lambda line: None)
    folder = tmp_path / "checkpoints"
    listener = FailsAndPrunes(folder)
    search.run(spec, study, replay.study_data(spec, study_env.root, "cpu"), listener, threads=1, checkpoints=folder)
    assert [t.state for t in study_env.records()] == ["FAIL", "PRUNED", "COMPLETE"]
    assert listener.seen == [(0, 1, ["trial-0.pt"]), (0, 2, ["trial-0.pt"]),  # written at every epoch
                             (1, 1, ["trial-1.pt"]), (1, 2, ["trial-1.pt"]),  # the failed trial's is gone
                             (2, 1, ["trial-2.pt"]), (2, 2, ["trial-2.pt"]), (2, 3, ["trial-2.pt"])]
    assert list(folder.iterdir()) == []  # the pruned and the complete trial's too


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("retries", [0, store.MAX_RETRIES], ids=["retried", "retried-too-often"])
def test_a_dead_processes_trial_is_requeued_with_its_seed_and_checkpoint_or_its_checkpoint_removed(tmp_path,
                                                                                                    retries):
    study = optuna.create_study(storage=store.make_storage(f"sqlite:///{tmp_path}/o.db"))
    study.add_trial(optuna.trial.create_trial(  # trial 0: a retry of trial 5, left RUNNING by a dead process
        state=TrialState.RUNNING, params={"lr": 0.01}, distributions={"lr": optuna.distributions.FloatDistribution(
            1e-4, 1e-1, log=True)},
        user_attrs={"seed": 1234, "first_attempt": 5, "retries": retries,
                    "owner": {"host": socket.gethostname(), "pid": dead_pid()}}))
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    checkpoint = search.checkpoint_path(folder, 5)
    checkpoint.write_bytes(b"five epochs of work")

    assert search.fail_dead_owners(study, folder) == [0]
    records = store.records(study)
    assert records[0].state == "FAIL" and records[0].fail_reason == "stale"
    if retries < store.MAX_RETRIES:
        (retry,) = [r for r in records if r.state == "WAITING"]
        assert (retry.retry_of, retry.first_attempt, retry.seed, retry.retries) == (0, 5, 1234, 1)
        assert checkpoint.is_file()  # kept for the retry
    else:
        assert len(records) == 1 and not checkpoint.exists()  # not retried again: its work is dropped


# --------------------------------------------------------------------------------------------------
# kill -9 mid-trial: the retry resumes the checkpoint and ends exactly as an uninterrupted run


@pytest.mark.faults
def test_kill_9_mid_trial_then_rerun_resumes_the_checkpoint_bit_for_bit(study_env, tmp_path, capsys):
    twin = study_env.replace(studies_dir=tmp_path / "twin" / "studies", storage=f"sqlite:///{tmp_path}/twin.db")
    for env in (study_env, twin):
        write_study(env)
    assert twin.run("search") == 0  # the same study, never interrupted
    assert checkpoint_files(twin) == []

    process = subprocess.Popen(study_env.command("search"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cut: dict[str, int] = {}

    def between_epochs() -> int | None:
        """A trial whose record shows as many epochs as its checkpoint holds: 1 <= k < the last, no write
        under way (the kill_mid_trial check runs again while the process is frozen)."""
        running = [t for t in study_env.records() if t.state == "RUNNING"]
        if not running or not 1 <= len(running[0].history) <= EPOCHS - 2 or any(
                name.endswith(".tmp") for name in checkpoint_files(study_env)):
            return None
        if saved_epochs(study_env, running[0].number) != len(running[0].history):
            return None
        cut.update(number=running[0].number, epochs=len(running[0].history))
        return process.pid

    try:
        kill_mid_trial(between_epochs)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed = study_env.records()[cut["number"]]
    assert killed.state == "RUNNING" and len(killed.history) == cut["epochs"]
    assert checkpoint_files(study_env) == [f"tiny/trial-{killed.number}.pt"]

    rerun = subprocess.run(study_env.command("search"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    trials = study_env.records()
    assert trials[killed.number].state == "FAIL" and trials[killed.number].fail_reason == "stale"
    (retry,) = [t for t in trials if t.retry_of == killed.number]
    assert retry.state == "COMPLETE" and retry.resumed_from_epoch == cut["epochs"]
    assert (retry.first_attempt, retry.seed, retry.sampled) == (killed.number, killed.seed, killed.sampled)
    assert f"(resumed from epoch {cut['epochs']})" in rerun.stdout
    uninterrupted = twin.records()[killed.number]
    assert (uninterrupted.sampled, uninterrupted.seed) == (retry.sampled, retry.seed)
    assert retry.history == uninterrupted.history and len(retry.history) == EPOCHS  # every epoch, bit for bit
    assert retry.values == uninterrupted.values
    reported = study_env.load().trials[retry.number].intermediate_values  # the resumed epochs told to Optuna too
    assert reported == twin.load().trials[killed.number].intermediate_values
    assert len(study_env.records(states=store.FINISHED)) == 2  # the budget completes
    assert checkpoint_files(study_env) == []  # no checkpoint and no temporary file left

    capsys.readouterr()
    assert study_env.run("replay", "--trial", str(retry.number)) == 0  # replay retrains it whole, from its seed
    assert "replayed identically" in capsys.readouterr().out
