"""Scale-out: how workers share GPUs and cores, which default store a study goes to, the rule that keeps two racing
workers inside the trial budget, and a coordinator relaying real worker processes (stand-ins that train nothing).
The event lines themselves are tests/search/test_events.py's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import store
from pipeline.search import events, objective, workers
from pipeline.search.events import BatchDone, TrialEnded, TrialStarted, Waiting
from pipeline.spec import paths, studies
from pipeline.spec.stop_reason import StopReason

CORES = len(os.sched_getaffinity(0))


def test_cpu_threads_are_split_so_workers_use_each_core_once():
    plans = workers.plan(2, None, [])
    assert [p.index for p in plans] == [1, 2]
    assert all(p.threads == max(1, CORES // 2) and p.gpu is None for p in plans)
    assert all(p.threads == 1 for p in workers.plan(CORES * 3, None, []))  # never below one thread
    assert all(p.threads == 3 for p in workers.plan(2, 3, []))  # --threads wins


def test_gpus_are_assigned_round_robin():
    plans = workers.plan(5, None, ["2", "5"])
    assert [p.gpu for p in plans] == ["2", "5", "2", "5", "2"]


@pytest.fixture
def default_stores(tmp_path, monkeypatch):
    """The two default stores moved into a temporary folder, and no STORAGE in the environment."""
    sqlite_url = f"sqlite:///{tmp_path}/optuna.db"
    monkeypatch.setattr(paths, "DEFAULT_STORAGE", sqlite_url)
    monkeypatch.setattr(paths, "DEFAULT_JOURNAL", tmp_path / "optuna.journal")
    monkeypatch.delenv("STORAGE", raising=False)
    return sqlite_url, str(tmp_path / "optuna.journal")


def test_a_new_study_with_several_workers_goes_to_the_journal_and_is_found_there_later(default_stores):
    sqlite_url, journal = default_stores
    assert store.storage_url(None, "cnn") == sqlite_url  # one worker: SQLite
    assert store.storage_url(None, "cnn", workers=4) == journal
    optuna.create_study(study_name="cnn", storage=store.make_storage(journal))
    assert store.storage_url(None, "cnn") == journal  # export-best, replay, ui and a later search find it
    assert store.storage_url(None, "mlp") == sqlite_url
    assert store.storage_url("postgresql://db/optuna", "cnn") == "postgresql://db/optuna"  # STORAGE wins


def test_a_study_already_in_sqlite_stays_there_with_several_workers(default_stores):
    sqlite_url, _ = default_stores
    optuna.create_study(study_name="cnn-v2", storage=store.make_storage(sqlite_url))
    assert store.storage_url(None, "cnn", workers=4) == sqlite_url


def budget_of(trials: int) -> studies.StudySpec:
    spec = studies.load("smoke")
    return spec.model_copy(update={"trials": trials})


def test_of_two_trials_started_at_once_for_the_last_slot_the_later_number_is_surplus(tmp_path):
    """Budget 3: one trial finished, then three workers each ask for a trial at the same moment."""
    study = optuna.create_study(storage=store.make_storage(f"sqlite:///{tmp_path}/s.db"))
    spec = budget_of(3)
    first = study.ask()
    study.tell(first, 0.5)
    racing = [study.ask() for _ in range(3)]  # numbers 1, 2, 3: all RUNNING at once
    assert [bool(objective.surplus_trial(spec, t)) for t in racing] == [False, False, True]


def test_a_queued_trial_found_surplus_goes_back_to_the_queue(tmp_path):
    study = optuna.create_study(storage=store.make_storage(f"sqlite:///{tmp_path}/s.db"))
    spec = budget_of(1)
    study.ask()  # the budget's only trial, running
    study.enqueue_trial({"lr": 0.01}, user_attrs={"retry_of": 0})
    queued = study.ask()  # takes the queued parameters
    assert objective.surplus_trial(spec, queued)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == 0
    assert waiting[0].system_attrs["fixed_params"] == {"lr": 0.01}  # still runs if the running trial fails


# --------------------------------------------------------------------------------------------------
# Coordinating worker processes: what a worker's EventView sends is what the coordinator's view is shown

# A stand-in worker: a real process that speaks through the real EventView, without training anything.
# Worker 1 and 2 each run one trial; worker 3 dies without a word; with FAILS set, worker 1 stops the
# study (too many failures) while worker 2 waits forever.
FAKE_WORKER = '''
import os, sys, time
from types import SimpleNamespace
from pipeline.search.events import TrialEnded, TrialStarted
from pipeline.search.workers import EventView

index = int(sys.argv[sys.argv.index("--worker") + 1])
view = EventView()
if os.environ.get("FAILS"):
    if index == 2:
        time.sleep(600)
    view.ended(None, SimpleNamespace(stop_reason="failed", failure="3 trials failed in a row"))
    sys.exit(1)
if index == 3:
    sys.exit(3)
view.trial_started(TrialStarted(10 + index, {"lr": 0.1}, seed=1, parameter_count=10, data=None))
print("a line of its own")
view.batch_done(4, 4)
view.trial_ended(TrialEnded(10 + index, "COMPLETE", [0.5], 1.0, {"lr": 0.1}))
view.ended(None, SimpleNamespace(stop_reason="budget", ran=1))
'''


class RecordingWorkersView:
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def worker_ended(self, index, process, unexpected) -> None:
        self.seen.append(("ended", index, process.returncode, unexpected))

    def worker_line(self, index, text) -> None:
        self.seen.append(("line", index, text))

    def show(self, index, event) -> None:
        self.seen.append(("event", index, event))


def coordinate_fake_workers(count: int, monkeypatch, fails: bool = False):
    if fails:
        monkeypatch.setenv("FAILS", "1")
    pool = workers.Workers([sys.executable, "-c", FAKE_WORKER], workers.plan(count, 1, []))
    view = RecordingWorkersView()
    return workers.coordinate(pool, view), view.seen


def test_the_coordinator_relays_each_workers_events_lines_and_end(monkeypatch):
    result, seen = coordinate_fake_workers(3, monkeypatch)
    assert (result.ran, result.failure, result.signal_number) == (2, None, None)
    assert result.stop_reasons == {StopReason.BUDGET}
    for index in (1, 2):
        number = 10 + index
        assert [s for s in seen if s[1] == index] == [
            ("event", index, TrialStarted(number, {"lr": 0.1}, seed=1, parameter_count=10, data=None)),
            ("line", index, "a line of its own"),
            ("event", index, BatchDone(4, 4)),
            ("event", index, TrialEnded(number, "COMPLETE", [0.5], 1.0, {"lr": 0.1})),
            ("ended", index, 0, False),
        ]
    assert [s for s in seen if s[1] == 3] == [("ended", 3, 3, True)]  # died on its own: the user is told


def test_a_worker_stopping_the_study_stops_the_others(monkeypatch):
    result, seen = coordinate_fake_workers(2, monkeypatch, fails=True)
    assert result.failure == "3 trials failed in a row" and result.ran == 0
    ended = {s[1]: s[2:] for s in seen if s[0] == "ended"}
    assert ended[2] == (-signal.SIGTERM, False)  # stopped by the coordinator, not a surprise to report
    assert ended[1] in ((1, False), (-signal.SIGTERM, False))  # the SIGTERM may reach it before its exit


def test_auto_workers_take_the_cores_of_a_cpu_unless_the_study_lives_in_a_sqlite_file():
    count, why = workers.auto_count("cpu", "/x/optuna.journal", None, trials=100)
    assert count == max(1, min(workers.AUTO_CPU_WORKERS_MAX, CORES))
    assert why.startswith(f"WORKERS=auto: {count} worker")
    assert workers.auto_count("cpu", "postgresql://db.example/optuna", None, 100)[0] == count
    one, why = workers.auto_count("cpu", "sqlite:///x/optuna.db", None, 100)
    assert one == 1 and "SQLite" in why and "WORKERS=N" in why
    one, why = workers.auto_count("cpu", "/x/optuna.journal", None, trials=1)  # never more than the budget...
    assert one == 1 and f"{CORES} thread(s) each" in why  # ...and the one worker gets every core, as plan() gives
    assert workers.auto_count("cpu", "/x/optuna.journal", CORES, 100)[0] == 1  # --threads of every core: one
    assert workers.auto_count("mps", "/x/optuna.journal", None, 100)[0] == 1


# A worker whose stderr (the same pipe as its stdout) glues a library's warning to an event line, then prints an
# event line cut short, then ends normally.
CUT_SHORT = events.to_line(BatchDone(2, 4))[:-5]
GLUED_WORKER = f'''
import sys
from pipeline.search.events import BatchDone, WorkerDone, to_line
from pipeline.search.workers import send
from pipeline.spec.stop_reason import StopReason
sys.stdout.write(to_line(BatchDone(1, 2)))
sys.stdout.flush()
sys.stderr.write("UserWarning: from a library, password http://admin:S3NTINEL-pw@db-host:5000 quoted\\n")
sys.stderr.flush()
print()
print({CUT_SHORT!r})
send(WorkerDone(1, StopReason.BUDGET))
'''

# A real coordinator in a process of its own, so that one that never returns (as it once did) fails the test at its
# time bound instead of hanging the suite; it prints what its view is shown, one repr a line.
COORDINATOR = '''
import sys
from pipeline.search import workers

class PrintingView:
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        pass
    def worker_ended(self, index, process, unexpected):
        print(repr(("ended", index, process.returncode, unexpected)), flush=True)
    def worker_line(self, index, text):
        print(repr(("line", index, text)), flush=True)
    def show(self, index, event):
        print(repr(("event", index, event)), flush=True)

pool = workers.Workers([sys.executable, "-c", sys.argv[1]], workers.plan(1, 1, []))
result = workers.coordinate(pool, PrintingView())
print(repr(("ran", result.ran, sorted(result.stop_reasons))), flush=True)
'''


def test_the_coordinator_ends_and_shows_the_text_of_a_malformed_event_line():
    """A line that is not a whole event must not stop the coordinator reading (it used to wait forever for the
    worker's end): the event glued to a warning is kept, the rest is shown as text, and the worker's end is seen."""
    try:
        done = subprocess.run([sys.executable, "-c", COORDINATOR, GLUED_WORKER], capture_output=True, text=True,
                              timeout=120)  # bounded: the old coordinator never returned
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the coordinator did not end; it showed: {exc.stdout or ''}") from None
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [repr(shown) for shown in [
        ("event", 1, BatchDone(1, 2)),
        # as the worker wrote it: the view masks the password as it prints (tests/console/test_views.py)
        ("line", 1, "UserWarning: from a library, password http://admin:S3NTINEL-pw@db-host:5000 quoted"),
        ("line", 1, CUT_SHORT),
        ("ended", 1, 0, False),
        ("ran", 1, [StopReason.BUDGET]),
    ]]


def test_a_worker_whose_coordinator_is_gone_sends_into_nothing(monkeypatch):
    """The coordinator killed outright: the worker's next event finds a broken pipe, which it must not raise (it
    is failing and queuing its trial again); the events after that go to /dev/null."""
    read_end, write_end = os.pipe()
    os.close(read_end)

    class GonePipe:
        def write(self, text: str) -> int:
            return os.write(write_end, text.encode())  # BrokenPipeError: nobody reads

        def flush(self) -> None:
            pass

        def fileno(self) -> int:
            return write_end

    monkeypatch.setattr(sys, "stdout", GonePipe())
    try:
        workers.send(Waiting())  # raises nothing
        assert os.path.realpath(f"/proc/self/fd/{write_end}") == os.devnull  # the pipe's end now writes nowhere
        workers.send(Waiting())
    finally:
        os.close(write_end)


@pytest.mark.faults  # README: What survives what
def test_a_coordinator_killed_outright_leaves_each_interrupted_trial_queued_again(study_env):
    """kill -9 of the coordinator while its four workers are mid-trial: each worker gets its parent's death signal
    (once per thread of the coordinator that exits) and a pipe nobody reads; every trial it ran is failed as
    interrupted and queued again, none lost to a second signal or a broken pipe (found by `make soak`)."""
    from conftest import wait_until

    env = study_env.replace(storage=str(study_env.studies_dir.parent / "optuna.journal"))
    env.write_study(trials=8, epochs=40, sampler="random", pruner="none", fixed={"augment": 0.0})
    coordinator = subprocess.Popen(env.command("search", "--workers", "4"), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)

    def all_mid_trial() -> tuple[int, ...]:
        running = [t for t in env.load().get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        owners = tuple((t.user_attrs.get("owner") or {}).get("pid") for t in running
                       if 1 <= len(t.intermediate_values) < 30)
        return owners if len(owners) == 4 and None not in owners else ()

    try:
        pids = wait_until(all_mid_trial, "four workers mid-trial", timeout=300)
    finally:
        coordinator.kill()
        coordinator.wait()

    def gone(pid: int) -> bool:
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(lambda: all(gone(pid) for pid in pids), "the workers to stop", timeout=120)
    records = env.records()
    failed = [r for r in records if r.state == "FAIL"]
    assert [(r.number, r.fail_reason) for r in failed] == [(r.number, "interrupted") for r in failed] and failed
    assert not [r for r in records if r.state == "RUNNING"]
    queued_again = {r.retry_of for r in records if r.state == "WAITING"}
    assert queued_again == {r.number for r in failed}  # each one's parameters run again, from its checkpoint


def test_a_planned_studys_worker_gets_its_minutes_and_deadline_and_no_cap_it_was_not_given():
    """A planned study's rung 0 runs to its stage's end: a worker told `--trials 20` (the unplanned default) stopped
    after 20 configurations of a plan that wanted 200."""
    from pipeline.search import workers
    from pipeline.search.options import SearchOptions
    from pipeline.spec import studies

    spec = studies.load("cnn")
    command = workers.worker_command(spec, SearchOptions(deadline=1_700_000_000.5))
    assert "--trials" not in command
    assert command[command.index("--minutes") + 1] == "30.0"
    assert float(command[command.index("--deadline") + 1]) == 1_700_000_000.5
    capped = workers.worker_command(studies.with_overrides(spec, trials=50), SearchOptions())
    assert capped[capped.index("--trials") + 1] == "50"
