"""A trial's work survives a kill: each trial checkpoints at every epoch, the retry of a killed or interrupted
trial resumes its checkpoint (bit for bit) and runs before older queued trials, and SIGHUP stops a search or
its workers the way SIGTERM does."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from conftest import (
    StudyEnv,
    kill_search_mid_trial,
    mlflow_runs,
    proc_stat,
    signal_search_mid_trial,
    trial_runs,
    wait_until,
)
from optuna.trial import TrialState

from pipeline import store
from pipeline.data.recorded import study_data
from pipeline.search import events, loop, trial_files
from pipeline.search.stopping import TooManyFailures
from pipeline.spec import paths, studies

pytestmark = pytest.mark.trained_values  # make test-portable runs these as a CPU without AVX-512 would

EPOCHS = 12
LONG = 30  # epochs of a trial that a test stops part-way: a tiny epoch takes well under 0.1 s


def write_study(env: StudyEnv, trials: int = 2, epochs: int = EPOCHS, baselines: int = 1) -> None:
    """Random search, no pruner (an uninterrupted twin run must take the same decisions); the first
    `baselines` of two fixed trials queued."""
    env.write_study(trials=trials, epochs=epochs, sampler="random", pruner="none",
                    baseline=[{"lr": 3e-3, "dropout": 0.1}, {"lr": 5e-3, "dropout": 0.2}][:baselines])


def checkpoint_files(env: StudyEnv) -> list[str]:
    """Every file under the checkpoint folders of the env's store, temporary ones included."""
    folder = env.checkpoints().parent
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def saved_epochs(env: StudyEnv, number: int) -> int | None:
    """Epochs in trial `number`'s checkpoint (a file this test's own search wrote), None without one."""
    path = trial_files.checkpoint_path(env.checkpoints(), number)
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


@pytest.mark.faults  # README: What survives what
def test_a_checkpoint_the_trial_cannot_continue_is_replaced_and_the_trial_trains_from_the_start(study_env, capsys):
    """A damaged file where the trial's checkpoint goes: the trial is not failed for it; it warns, removes the file
    and trains from the start."""
    write_study(study_env, trials=1, epochs=1)
    folder = study_env.checkpoints()
    folder.mkdir(parents=True)
    torch.save(torch.zeros(3), trial_files.checkpoint_path(folder, 0))  # readable, but not a checkpoint
    assert study_env.run("search") == 0
    (trial,) = study_env.records()
    assert trial.state == "COMPLETE" and len(trial.history) == 1
    told = " ".join(capsys.readouterr().err.split())
    assert "trial 0:" in told and "not a checkpoint (Tensor)" in told and "trains from the start" in told
    assert checkpoint_files(study_env) == []


def test_two_stores_holding_a_study_of_one_name_sweep_only_their_own_checkpoints(study_env, tmp_path, capsys):
    """A test's store (or PostgreSQL) beside the local file, each with a study `tiny`: the search on one sweeps its
    own orphan, never the other's checkpoint of a trial with the same number."""
    other = study_env.replace(storage=f"sqlite:///{tmp_path}/other.db")
    write_study(study_env, trials=1, epochs=1)
    assert study_env.run("search") == 0  # trial 0 of this store is finished
    theirs = trial_files.checkpoint_path(other.checkpoints(), 0)  # the other store's trial 0, interrupted
    ours = trial_files.checkpoint_path(study_env.checkpoints(), 0)  # ours: an orphan
    for path in (theirs, ours):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"epochs of work")
    assert theirs.parent != ours.parent
    write_study(study_env, trials=2, epochs=1)
    assert study_env.run("search") == 0
    assert theirs.read_bytes() == b"epochs of work" and not ours.exists()
    assert "removed 1 checkpoint(s) no trial will resume: trial-0.pt" in capsys.readouterr().err


def test_a_checkpoint_the_version_before_keyed_folders_left_is_copied_for_the_trial_that_resumes_it(tmp_path):
    postgres = trial_files.checkpoint_folder(tmp_path, "postgresql://u:pw@db-host/optuna", "cnn")
    unkeyed = tmp_path / "checkpoints" / "cnn" / "trial-3.pt"  # where every store's trial 3 of `cnn` kept it
    unkeyed.parent.mkdir(parents=True)
    unkeyed.write_bytes(b"three epochs")
    trial_files.adopt_unkeyed(trial_files.checkpoint_path(postgres, 3))
    assert trial_files.checkpoint_path(postgres, 3).read_bytes() == b"three epochs" and unkeyed.exists()
    assert postgres == trial_files.checkpoint_folder(tmp_path, "postgresql://u:another-pw@db-host/optuna", "cnn")
    assert trial_files.checkpoint_folder(tmp_path, paths.DEFAULT_STORAGE, "cnn") == unkeyed.parent  # as before
    assert trial_files.checkpoint_folder(tmp_path, str(paths.DEFAULT_JOURNAL), "cnn") == unkeyed.parent


def test_complete_pruned_and_failed_trials_remove_their_checkpoints(study_env, tmp_path):
    write_study(study_env, trials=2, epochs=3)
    spec = studies.load("tiny", study_env.studies_dir)
    study = store.open_study(spec, store.make_storage(study_env.storage),
                             log=lambda line: None)
    folder = tmp_path / "checkpoints"
    listener = FailsAndPrunes(folder)
    loop.run(spec, study, study_data(spec, study_env.root, "cpu"), listener, threads=1, checkpoints=folder)
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
    checkpoint = trial_files.checkpoint_path(folder, 5)
    checkpoint.write_bytes(b"five epochs of work")

    assert loop.fail_dead_owners(study, folder) == [0]
    records = store.records(study)
    assert records[0].state == "FAIL" and records[0].fail_reason == "stale"
    if retries < store.MAX_RETRIES:
        (retry,) = [r for r in records if r.state == "WAITING"]
        assert (retry.retry_of, retry.first_attempt, retry.seed, retry.retries) == (0, 5, 1234, 1)
        assert checkpoint.is_file()  # kept for the retry
    else:
        assert len(records) == 1 and not checkpoint.exists()  # not retried again: its work is dropped


def identity(pid: int) -> dict:
    """Process `pid`'s boot id and start time, read from /proc here (not by the code under test)."""
    return {"boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "started": int(proc_stat(pid)[22 - 3])}  # field 22: the start time


def test_a_trials_owner_is_recorded_with_its_boot_id_and_start_time(study_env):
    write_study(study_env, trials=1, epochs=1, baselines=0)
    assert study_env.run("search") == 0
    (trial,) = study_env.records()
    assert trial.owner == {"host": socket.gethostname(), "pid": os.getpid(), **identity(os.getpid())}


def test_a_trial_whose_owners_pid_now_names_another_process_is_failed_and_pid_only_owners_work_as_before(tmp_path):
    """After a container restart (pids count from 1 again) or a reboot, a dead worker's pid may name a live process,
    this one included: its boot id and start time tell them apart. Owners recorded by pid alone (before the rest
    was) are judged by the pid, as they always were."""
    host = socket.gethostname()
    me, first = {"host": host, "pid": os.getpid(), **identity(os.getpid())}, {"host": host, "pid": 1, **identity(1)}
    owners = {
        "this process": (me, "RUNNING"),
        "process 1": (first, "RUNNING"),  # of this host or container: running
        "this pid, before a container restart": ({**me, "started": me["started"] - 1}, "FAIL"),
        "process 1, before a container restart": ({**first, "started": first["started"] + 1}, "FAIL"),
        "this pid and start time, before a reboot": ({**me, "boot_id": str(uuid.uuid4())}, "FAIL"),
        "this pid, recorded by pid alone": ({"host": host, "pid": os.getpid()}, "RUNNING"),
        "process 1, recorded by pid alone": ({"host": host, "pid": 1}, "RUNNING"),
        "a dead pid, recorded by pid alone": ({"host": host, "pid": dead_pid()}, "FAIL"),
    }
    study = optuna.create_study(storage=store.make_storage(f"sqlite:///{tmp_path}/o.db"))
    for owner, _ in owners.values():
        study.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={"owner": owner}))

    failed = loop.fail_dead_owners(study)
    states = {what: store.record(study, number).state for number, what in enumerate(owners)}
    assert states == {what: state for what, (_, state) in owners.items()}
    assert failed == [number for number, (_, state) in enumerate(owners.values()) if state == "FAIL"]


def test_a_retry_copied_by_optunas_heartbeat_starts_its_record_afresh(study_env):
    """Optuna's heartbeat retry copies the failed trial's record; without its checkpoint (another host) the retry
    trains from the start, and its record must say so, not repeat the old history and resume."""
    write_study(study_env, trials=2, epochs=1, baselines=0)
    assert study_env.run("search", "--trials", "1") == 0
    (first,) = study_env.records()
    copied = store.TrialNotes(seed=first.seed, first_attempt=7, history=[{"epoch": e} for e in range(1, 6)],
                              resumed_from_epoch=3)
    store.queue_trial(study_env.load(), first.sampled, copied)
    assert study_env.run("search", "--trials", "2") == 0
    retry = study_env.records()[1]
    assert retry.state == "COMPLETE" and retry.resumed_from_epoch == 0
    assert [h["epoch"] for h in retry.history] == [1]


SENTINEL = "S3NTINEL-pw"


def test_a_password_quoted_in_an_mlflow_error_reaches_no_record_output_or_trials_csv(study_env, mlflow_store,
                                                                                      monkeypatch, capfd):
    """MLflow quotes the tracking URL it was given, login included, in its errors ("API request to
    http://admin:secret@host/... failed"). The study's parent run is opened, then the server (a URL with a login;
    nothing listens there) is out of reach: every trial fails to open its MLflow run and three in a row stop the
    study. The error is kept and shown everywhere with the password masked."""
    from mlflow import MlflowClient

    from pipeline.console import search_view
    from pipeline.tracking import connection, report, study_run

    write_study(study_env, trials=4, epochs=1, baselines=0)
    spec = studies.load("tiny", study_env.studies_dir)
    study = store.open_study(spec, store.make_storage(study_env.storage),
                             log=lambda line: None)
    run = study_run.StudyRun(connection.connect(mlflow_store), study.study_name, spec.name, spec.metrics[0],
                            spec.directions[0], None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:{SENTINEL}@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not after MLflow's back-off
    run.client = MlflowClient(connection.tracking_uri())
    view = search_view.SearchView()
    with pytest.raises(TooManyFailures) as stopped:
        loop.run(spec, study, study_data(spec, study_env.root, "cpu"), events.Listeners(view, run), threads=1)
    view.ended(spec, SimpleNamespace(stop_reason="failed", failure=str(stopped.value)))  # what the CLI shows
    (study_env.reports / "table").mkdir(parents=True)
    report.write_report(spec, study, None, study_env.reports / "table")
    table = (study_env.reports / "table" / "trials.csv").read_text()

    out, err = capfd.readouterr()
    shown = "".join((out + err).split())  # a console may fold a long line anywhere
    assert SENTINEL not in str([(t.user_attrs, t.system_attrs) for t in study.get_trials()])
    assert SENTINEL not in shown
    assert SENTINEL not in table
    failed = study_env.records()
    assert [t.state for t in failed] == ["FAIL"] * 3
    masked = "http://admin:***@127.0.0.1:9/api/2.0/mlflow/runs/create"  # the error itself is kept
    assert all(masked in t.fail_detail and masked in t.traceback for t in failed)
    assert masked in shown and "3trialsfailedinarow" in shown and masked in table


# --------------------------------------------------------------------------------------------------
# kill -9 mid-trial: the retry resumes the checkpoint and ends exactly as an uninterrupted run


@pytest.mark.faults
def test_kill_9_mid_trial_then_rerun_resumes_the_checkpoint_bit_for_bit(study_env, tmp_path, capsys):
    twin = study_env.replace(studies_dir=tmp_path / "twin" / "studies", storage=f"sqlite:///{tmp_path}/twin.db")
    for env in (study_env, twin):
        write_study(env, epochs=LONG)
    assert twin.run("search") == 0  # the same study, never interrupted
    assert checkpoint_files(twin) == []

    process = subprocess.Popen(study_env.command("search"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cut: dict[str, int] = {}

    def between_epochs() -> int | None:
        """A trial whose record shows as many epochs as its checkpoint holds: 1 <= k < the last, no write
        under way (the kill_mid_trial check runs again while the process is frozen)."""
        running = [t for t in study_env.records() if t.state == "RUNNING"]
        if not running or not 1 <= len(running[0].history) <= LONG - 2 or any(
                name.endswith(".tmp") for name in checkpoint_files(study_env)):
            return None
        if saved_epochs(study_env, running[0].number) != len(running[0].history):
            return None
        cut.update(number=running[0].number, epochs=len(running[0].history))
        return process.pid

    kill_search_mid_trial(process, between_epochs)
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
    assert retry.history == uninterrupted.history and len(retry.history) == LONG  # every epoch, bit for bit
    assert retry.values == uninterrupted.values
    reported = study_env.load().trials[retry.number].intermediate_values  # the resumed epochs told to Optuna too
    assert reported == twin.load().trials[killed.number].intermediate_values
    assert len(study_env.records(states=store.FINISHED)) == 2  # the budget completes
    assert checkpoint_files(study_env) == []  # no checkpoint and no temporary file left

    capsys.readouterr()
    assert study_env.run("replay", "--trial", str(retry.number)) == 0  # replay retrains it whole, from its seed
    assert "replayed identically" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# SIGHUP: a stop like SIGTERM; the interrupted trial runs first next time


@pytest.mark.faults
def test_sighup_mid_trial_stops_requeues_and_the_retry_runs_before_the_queued_baseline(study_env, mlflow_store):
    write_study(study_env, trials=2, epochs=LONG, baselines=2)  # trials 0 and 1: the two baselines, queued
    process = subprocess.Popen(study_env.command("search"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)

    def mid_trial() -> int | None:
        """The search's pid while trial 0 runs with an epoch behind it and at least one ahead (so it stops at
        a batch, never by finishing)."""
        first = study_env.records()[:1]
        running = bool(first) and first[0].state == "RUNNING" and 1 <= len(first[0].history) <= LONG - 2
        return process.pid if running else None

    signal_search_mid_trial(process, mid_trial, signal.SIGHUP)  # what a dropped SSH session sends
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGHUP, err
    err = " ".join(err.split())
    assert "SIGHUP received" in err and f"make search STUDY=tiny STORAGE={study_env.storage}" in err
    interrupted, baseline, retry = study_env.records()
    assert interrupted.state == "FAIL" and interrupted.fail_reason == "interrupted" and interrupted.history
    assert baseline.state == "WAITING" and baseline.baseline  # the second baseline never started
    assert retry.state == "WAITING" and retry.retry_of == 0 and retry.number == 2
    assert saved_epochs(study_env, 0) >= len(interrupted.history)  # its checkpoint stays for the retry
    cut = trial_runs(mlflow_store)[0]
    assert cut.info.status == "FAILED" and cut.data.tags["fail_reason"] == "interrupted"
    parent = next(r for r in mlflow_runs(mlflow_store) if "trial_number" not in r.data.tags)
    assert parent.info.status == "KILLED"

    rerun = subprocess.run(study_env.command("search"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    _, baseline, retry = study_env.records()
    assert retry.state == baseline.state == "COMPLETE"
    assert retry.completed_at < baseline.completed_at  # queued later, run first
    assert retry.resumed_from_epoch >= len(interrupted.history)
    assert retry.history[:len(interrupted.history)] == interrupted.history
    assert checkpoint_files(study_env) == []
    assert all(r.info.status != "RUNNING" for r in mlflow_runs(mlflow_store))


class Terminal:
    """A real pseudo-terminal as a command's controlling terminal (the command leads its own session, as a
    login shell's job would through its shell); what it writes is read as it comes. `hang_up()` closes it the
    way a dropped SSH connection does: the kernel sends SIGHUP and the terminal fails every later write."""

    def __init__(self, command: list[str]):
        self.master, follower = os.openpty()
        self.process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower,
                                        start_new_session=True, preexec_fn=self._control)
        os.close(follower)
        self.output, self.open = bytearray(), True
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @staticmethod
    def _control() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def _read(self) -> None:
        while self.open:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the command has closed its end
                    return
                self.output += chunk

    def hang_up(self) -> None:
        self.open = False
        self.reader.join()
        os.close(self.master)


@pytest.mark.faults
@pytest.mark.parametrize("workers", [1, 2], ids=["search", "two-workers"])
def test_terminal_hang_up_stops_the_search_and_every_worker_cleanly(study_env, tmp_path, workers):
    """The terminal goes away mid-trial: the search (or the workers' coordinator, which passes SIGHUP on to the
    workers in their own sessions) stops as for SIGTERM, although nothing can be written to the terminal."""
    env = study_env.replace(storage=str(tmp_path / "optuna.journal")) if workers > 1 else study_env
    write_study(env, trials=4, epochs=LONG)  # several chances to find every worker mid-trial at once
    terminal = Terminal(env.command("search", *(["--workers", str(workers)] if workers > 1 else [])))

    def mid_trial() -> list[store.TrialRecord]:
        assert terminal.process.poll() is None, terminal.output.decode(errors="replace")
        running = [t for t in env.records() if t.state == "RUNNING" and 1 <= len(t.history) <= LONG // 2]
        return running if len(running) == workers else []

    try:
        cut = wait_until(mid_trial, f"{workers} trial(s) in the middle of their epochs", interval=0.05)
        terminal.hang_up()
        assert terminal.process.wait(timeout=60) == 128 + signal.SIGHUP  # a clean stop, not a write error
    finally:
        terminal.process.kill()
    trials = env.records()
    assert not [t for t in trials if t.state == "RUNNING"]
    for trial in cut:
        assert trials[trial.number].state == "FAIL" and trials[trial.number].fail_reason == "interrupted"
        assert [t.state for t in trials if t.retry_of == trial.number] == ["WAITING"]
        assert saved_epochs(env, trial.number) >= len(trial.history)  # kept for the retry
        with pytest.raises(ProcessLookupError):
            os.kill(trial.owner["pid"], 0)  # no worker outlives the hang-up
