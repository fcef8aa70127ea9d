"""Scale-out for real: worker processes on one study, Optuna's journal file, PostgreSQL on loopback, an MLflow
tracking server, and kill -9 of a worker mid-trial. `make test-scale` runs these (it installs PostgreSQL).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests
from conftest import (
    StudyEnv,
    freeze_when,
    kill_mid_trial,
    mlflow_runs,
    thaw,
    thread_status,
    trial_runs,
    wait_until,
    write_two_lr_study,
)
from mlflow import MlflowClient
from optuna.trial import TrialState
from ui_process import free_port, wait_for_health

from pipeline import store

pytestmark = pytest.mark.scale
FAST_HEARTBEAT = {"PIPELINE_HEARTBEAT_SECONDS": "1", "PIPELINE_GRACE_SECONDS": "3"}


@pytest.fixture
def journal_env(study_env, tmp_path) -> StudyEnv:
    """The study env on Optuna's journal file (the local workers' storage); tracked when the test asks for
    `mlflow_store`."""
    return study_env.replace(storage=str(tmp_path / "studies" / "optuna.journal"))


@pytest.fixture
def postgres_env(study_env, tmp_path, postgresql_server, request) -> Iterator[StudyEnv]:
    """The study env on an Optuna database and an MLflow server (`make server` over its own PostgreSQL
    database) on loopback: its `tracking_uri`."""
    suffix = re.sub(r"\W", "_", request.node.name)[-40:].lower()
    optuna_url = postgresql_server.create_database(f"optuna_{suffix}")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend", postgresql_server.create_database(f"mlflow_{suffix}"),
         "--artifacts", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_health(port)
        yield study_env.replace(storage=optuna_url, tracking_uri=f"http://127.0.0.1:{port}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def check_budget_exactly_run(env: StudyEnv, trials: int) -> list[store.TrialRecord]:
    """Exactly `trials` finished trials, each number once, each with one child run under the one parent run."""
    mlflow_uri = env.tracking_uri
    records = env.records()
    finished = [t for t in records if t.finished]
    assert len(finished) == trials
    numbers = [t.number for t in records]
    assert len(numbers) == len(set(numbers))
    all_runs = mlflow_runs(mlflow_uri)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    child_trials = [int(r.data.tags["trial_number"]) for r in children]
    assert len(child_trials) == len(set(child_trials))  # no trial tracked twice
    assert {n for n in child_trials if n in {t.number for t in finished}} == {t.number for t in finished}
    assert all(r.info.status != "RUNNING" for r in all_runs)
    return finished


def run_two_workers(env: StudyEnv, trials: int = 8) -> None:
    write_two_lr_study(env, trials=trials, epochs=1)
    coordinator = subprocess.Popen(env.command("search", "--workers", "2"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, MLFLOW_TRACKING_URI=env.tracking_uri))
    out, err = coordinator.communicate(timeout=600)
    assert coordinator.returncode == 0, out + err
    finished = check_budget_exactly_run(env, trials)
    assert len([r for r in mlflow_runs(env.tracking_uri) if "mlflow.parentRunId" in r.data.tags]) == trials
    owners = {t.owner["pid"] for t in finished}
    assert len(owners) == 2 and coordinator.pid not in owners  # both worker processes ran trials


def test_two_local_workers_on_the_journal_file_run_exactly_the_budget(journal_env, mlflow_store):
    run_two_workers(journal_env)
    assert os.path.getsize(journal_env.storage) > 0  # the study lives in the journal file


def test_two_workers_on_postgresql_with_an_mlflow_server_run_exactly_the_budget(postgres_env):
    run_two_workers(postgres_env)


def test_kill_9_of_a_local_worker_mid_trial_is_swept_retried_and_the_budget_completes(journal_env, mlflow_store):
    env = journal_env
    write_two_lr_study(env, trials=6, epochs=10)
    coordinator = subprocess.Popen(env.command("search", "--workers", "2"), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=dict(os.environ, **FAST_HEARTBEAT))
    victim: dict = {}

    def worker_mid_trial() -> int | None:  # a worker's trial has finished an epoch; another trial has finished
        trials = env.load().get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        if not (running and any(t.state == TrialState.COMPLETE for t in trials)):
            return None
        victim.update(number=running[0].number, pid=running[0].user_attrs["owner"]["pid"])
        return victim["pid"]

    kill_mid_trial(worker_mid_trial)
    output, _ = coordinator.communicate(timeout=600)
    assert coordinator.returncode == 0, output
    assert f"(pid {victim['pid']}) ended (SIGKILL)" in output  # the coordinator tells the user

    trials = env.records()
    killed = trials[victim["number"]]
    assert killed.state == "FAIL" and killed.fail_reason == "stale"  # the sweep
    retried = [t for t in trials if t.retry_of == killed.number]
    assert len(retried) == 1 and retried[0].finished and retried[0].sampled == killed.sampled
    assert retried[0].owner["pid"] != victim["pid"]  # the surviving worker ran it
    check_budget_exactly_run(env, 6)
    cut = trial_runs(mlflow_store)[killed.number]
    assert cut.info.status == "FAILED" and cut.data.tags["fail_reason"] == "stale"


def test_kill_9_of_a_worker_on_another_host_is_failed_by_the_heartbeat_and_retried(postgres_env):
    """Two hosts on PostgreSQL: one search in its own UTS namespace, so its host name differs and the local
    sweep cannot see it; only Optuna's heartbeat can tell it died."""
    env = postgres_env
    write_two_lr_study(env, trials=5, epochs=10)
    process_env = dict(os.environ, MLFLOW_TRACKING_URI=env.tracking_uri, **FAST_HEARTBEAT)
    here = subprocess.Popen(env.command("search"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=process_env)
    other_host = subprocess.Popen(
        ["unshare", "--map-root-user", "--uts", "sh", "-c", 'hostname other-host && exec "$@"', "sh",
         *env.command("search")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=process_env)

    killed_number: list[int] = []

    def other_host_mid_trial() -> int | None:
        trials = env.load().get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values
                   and t.user_attrs["owner"]["host"] == "other-host"]
        if not (running and any(t.state == TrialState.COMPLETE for t in trials)):
            return None
        killed_number[:] = [running[0].number]
        return other_host.pid

    kill_mid_trial(other_host_mid_trial)
    other_host.wait()
    killed = env.records()[killed_number[0]]
    output, _ = here.communicate(timeout=600)
    assert here.returncode == 0, output

    assert env.records()[killed.number].state == "FAIL"
    assert env.records()[killed.number].fail_reason is None  # not the local sweep: the heartbeat
    # Optuna's heartbeat retry names the failed trial in a system attribute (no TrialRecord field).
    retried = [t for t in env.load().trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state in store.FINISHED and retried[0].params == killed.sampled
    check_budget_exactly_run(env, 5)
    cut = trial_runs(env.tracking_uri)[killed.number]
    assert cut.info.status == "FAILED" and cut.data.tags["fail_reason"] == "stale"


def test_several_workers_need_a_positive_count(journal_env):
    write_two_lr_study(journal_env)
    done = subprocess.run(journal_env.command("search", "--workers", "0"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "--workers 0: expected a whole number >= 1" in done.stderr
    assert not os.path.exists(journal_env.storage)  # refused before anything was opened or recorded


def signal_pending(pid: int, number: int) -> bool:
    """Is signal `number` waiting for process `pid` (frozen: a stopped process takes no signal)? Sent to the
    process (ShdPnd) or handed to one of its threads (SigPnd)."""
    return any(int(mask, 16) >> (number - 1) & 1
               for field in ("SigPnd", "ShdPnd") for mask in thread_status(pid, field))


def test_ctrl_c_stops_every_worker_cleanly_and_the_study_resumes(journal_env, mlflow_store):
    env = journal_env
    write_two_lr_study(env, trials=4, epochs=30)  # long trials: both workers are mid-trial most of the time
    coordinator = subprocess.Popen(env.command("search", "--workers", "2"), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)

    def mid_trial() -> dict[int, int]:  # trial -> worker pid, for trials with epochs both done and to come
        assert coordinator.poll() is None, coordinator.communicate()[0]  # it ended before it could be stopped
        return {t.number: t.user_attrs["owner"]["pid"] for t in env.load().get_trials(deepcopy=False)
                if t.state == TrialState.RUNNING and 0 < len(t.intermediate_values) < 25}

    interrupted: dict[int, int] = {}

    def both_mid_trial() -> tuple[int, ...]:
        """The two workers' pids while each is mid-trial; `interrupted` holds what the last check saw."""
        interrupted.clear()
        interrupted.update(mid_trial())
        return tuple(interrupted.values()) if len(interrupted) == 2 else ()

    frozen: tuple[int, ...] = ()
    try:
        frozen = freeze_when(both_mid_trial)  # no trial ends between the check and the signal
        coordinator.send_signal(signal.SIGINT)  # what Ctrl-C does to the command: it passes it on to the workers
        wait_until(lambda: all(signal_pending(pid, signal.SIGINT) for pid in frozen),
                   "the SIGINT passed on to both frozen workers", ignore=())
    except BaseException:
        coordinator.kill()
        raise
    finally:
        for pid in frozen:
            thaw(pid)  # each finds the signal waiting for it
    output, _ = coordinator.communicate(timeout=120)
    assert coordinator.returncode == 128 + signal.SIGINT, output
    assert "SIGINT received" in output
    for pid in interrupted.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # no worker outlives the command
    trials = env.records()
    for number in interrupted:
        assert trials[number].state == "FAIL" and trials[number].fail_reason == "interrupted"
        assert any(t.state == "WAITING" and t.retry_of == number for t in trials)
    by_trial = trial_runs(mlflow_store)
    assert all(by_trial[number].info.status == "FAILED" for number in interrupted)
    assert all(by_trial[number].data.tags["fail_reason"] == "interrupted" for number in interrupted)
    parent = next(r for r in mlflow_runs(mlflow_store) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "KILLED"
    assert all(r.info.status != "RUNNING" for r in mlflow_runs(mlflow_store))

    resumed = subprocess.run(env.command("search", "--workers", "2"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    finished = check_budget_exactly_run(env, 4)
    assert {t.retry_of for t in finished} >= set(interrupted)  # the interrupted ones ran again


def test_two_hosts_at_once_share_the_study_the_parent_run_and_the_champion(postgres_env):
    """The README's many-hosts set-up: the same command on two hosts at once, ending at about the same time."""
    env = postgres_env
    write_two_lr_study(env, trials=6, epochs=1)
    process_env = dict(os.environ, MLFLOW_TRACKING_URI=env.tracking_uri)
    hosts = [subprocess.Popen(env.command("search"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=process_env) for _ in range(2)]
    outputs = [host.communicate(timeout=600)[0] for host in hosts]
    assert [host.returncode for host in hosts] == [0, 0], outputs
    assert not any("could not record" in output for output in outputs), outputs  # e.g. the champion alias
    finished = check_budget_exactly_run(env, 6)
    best = max((t for t in finished if t.state == "COMPLETE"), key=lambda t: (t.values[0], -t.number))
    champion = MlflowClient(env.tracking_uri).get_model_version_by_alias("tiny", "champion")
    assert float(champion.tags["objective_value"]) == best.values[0]


def test_the_tracking_server_answers_by_its_host_name_and_listed_names_only(tmp_path):
    """MLflow 3 refuses unknown Host headers; training hosts reach `make server` by the server's host name."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "server", "--host", "127.0.0.1", "--port", str(port), "--backend",
         f"sqlite:///{tmp_path}/server.db", "--artifacts", str(tmp_path / "artifacts"),
         "--allowed-hosts", "mlflow.lab"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_health(port)
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        name = socket.gethostname()
        for host, status in ((f"{name}:{port}", 200), (name, 200), ("mlflow.lab", 200), (f"127.0.0.1:{port}", 200),
                             (f"elsewhere.example:{port}", 403)):
            assert requests.get(url, headers={"Host": host}, timeout=30).status_code == status, host
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
