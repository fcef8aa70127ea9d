"""The soak: a real study on the tiny data, run by SOAK_WORKERS worker processes on Optuna's journal file and on
PostgreSQL, each with a real MLflow tracking server, while a chaos loop SIGKILLs a random worker mid-trial every
few seconds (once the MLflow server, once the coordinator) and restarts what it killed. When the budget is done it
prints the figures and checks what must survive: the budget exactly, no trial left RUNNING, one MLflow child run
with its whole history per finished trial, every killed trial retried from its checkpoint, the registry's champion
the best complete trial, and both databases whole.

`make soak` runs it (minutes; not part of `make test`, `test-faults` or `test-scale`). Knobs, from the environment:
SOAK_WORKERS (4), SOAK_TRIALS (each study's budget, 200), SOAK_MINUTES (how long the chaos goes on at most, 4),
SOAK_KILLS (how many kills at most, 30), SOAK_EPOCHS (epochs per trial), SOAK_SEED (the chaos loop's choices).

Restarting what was killed: a killed worker's trial is failed as stale by the others and its parameters run again;
a new search process joins the study in its place (the same command with one worker, as a second host would), so
SOAK_WORKERS processes keep training. A killed coordinator takes its workers with it (each fails its trial as
interrupted and queues it again); the same command runs again and resumes. A killed MLflow server is started
again on the same port and store. Any search that stops by itself before the budget is done is run again too,
and counted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import psycopg
import pytest
from conftest import StudyEnv, alive, descendants_command_lines, freeze, thaw, wait_until
from mlflow import MlflowClient
from optuna.trial import TrialState
from ui_process import free_port, wait_for_health

from pipeline import store
from pipeline.tracking import registry, study_run

pytestmark = pytest.mark.soak

WORKERS = int(os.environ.get("SOAK_WORKERS", 4))
TRIALS = int(os.environ.get("SOAK_TRIALS", 200))
MINUTES = float(os.environ.get("SOAK_MINUTES", 4))
KILLS = int(os.environ.get("SOAK_KILLS", 30))
EPOCHS = int(os.environ.get("SOAK_EPOCHS", 4))
SEED = int(os.environ.get("SOAK_SEED", 1))
KILL_INTERVAL = (2.0, 5.0)  # seconds between two kills, drawn uniformly
SERVER_KILL, COORDINATOR_KILL = 2, 4  # the chaos loop's steps (from 1) that kill the server, the coordinator
QUIET_END = 2 * WORKERS  # no kill once this few trials of the budget are left: the end is checked as it comes
STOP_SECONDS = 120  # a killed coordinator's workers have this long to close their trials and stop


# --------------------------------------------------------------------------------------------------
# Processes


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


@dataclass
class Search:
    """A search process the soak started: the coordinator (`--workers N`) or a process that joined the study."""

    kind: str  # "coordinator" or "joiner"
    process: subprocess.Popen
    log: Path
    killed: bool = False  # by the chaos loop
    noticed: bool = False  # its end has been looked at


class TrackingServer:
    """`python -m pipeline server` (what `make server` runs) on 127.0.0.1, over one backend store and artifact
    folder; killed outright with every process under it, and started again on the same port and store."""

    def __init__(self, backend: str, artifacts: Path, logs: Path):
        self.backend, self.artifacts, self.logs = backend, artifacts, logs
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> float:
        """Start it and wait until it answers; returns the seconds that took."""
        started = time.monotonic()
        self.starts += 1
        log = self.logs / f"server-{self.starts}.log"
        # The backend URL (PostgreSQL's holds a password) goes in the environment, as `make server BACKEND=` does.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--artifacts", str(self.artifacts)],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, MLFLOW_BACKEND_STORE_URI=self.backend))
        try:
            wait_for_health(self.port, timeout=180)
        except AssertionError:
            raise AssertionError(f"the MLflow server did not come back:\n{tail(log)}") from None
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL the server and every process under it at once (all stopped first, so none is told to shut down
        cleanly by its parent's death)."""
        tree = list(descendants_command_lines([self.process.pid]))
        for pid in tree:
            os.kill(pid, signal.SIGSTOP)
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


# --------------------------------------------------------------------------------------------------
# The chaos loop


@dataclass
class Kill:
    what: str  # "worker", "server" or "coordinator"
    at: float  # minutes into the soak
    pid: int
    cut: dict[int, int] = field(default_factory=dict)  # trials cut short: number -> epochs recorded when killed
    down_seconds: float = 0.0  # the server: from the kill until it answered again
    journal_locked: bool = False  # a worker killed holding Optuna's journal lock: every process waits out its grace


class Soak:
    """N workers on one study, the chaos loop, and everything it killed started again."""

    def __init__(self, env: StudyEnv, server: TrackingServer, logs: Path):
        self.env, self.server, self.logs = env, server, logs
        self.rng = random.Random(SEED)
        self.searches: list[Search] = []
        self.kills: list[Kill] = []
        self.restarts: Counter[str] = Counter()  # what was started again, and why
        self.stopped_by_themselves: list[str] = []  # searches that ended before the budget without being killed
        self.skipped_last_retry: set[int] = set()  # trials passed over: their parameters may not be retried again
        self.started = time.monotonic()
        self.study: optuna.Study | None = None
        self.process_env = dict(os.environ, MLFLOW_TRACKING_URI=server.uri, COLUMNS="200")

    # ---- starting searches -----------------------------------------------------------------------

    def launch(self, kind: str) -> Search:
        """The coordinator: `make search` with SOAK_WORKERS workers. A joiner: the same command, one worker."""
        workers = WORKERS if kind == "coordinator" else 1
        log = self.logs / f"{kind}-{len(self.searches) + 1}.log"
        process = subprocess.Popen(self.env.command("search", "--workers", str(workers)), stdout=log.open("w"),
                                   stderr=subprocess.STDOUT, env=self.process_env, start_new_session=True)
        search = Search(kind, process, log)
        self.searches.append(search)
        return search

    @property
    def coordinator(self) -> Search:
        return next(s for s in reversed(self.searches) if s.kind == "coordinator")

    def workers(self) -> dict[int, Search]:
        """pid -> search of every live process that runs trials: the coordinator's workers and the joiners."""
        found: dict[int, Search] = {}
        coordinator = self.coordinator
        if coordinator.process.poll() is None:
            found |= {pid: coordinator for pid in descendants_command_lines([coordinator.process.pid])
                      if pid != coordinator.process.pid}
        found |= {s.process.pid: s for s in self.searches if s.kind == "joiner" and s.process.poll() is None}
        return found

    def minutes(self) -> float:
        return (time.monotonic() - self.started) / 60

    # ---- the study as the kills see it -------------------------------------------------------------

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        if self.study is None:
            self.study = wait_until(self.env.load, "the study to be created", timeout=300)
        return self.study.get_trials(deepcopy=False)

    def finished(self) -> int:
        return sum(t.state in store.FINISHED for t in self.trials())

    def mid_trial(self) -> dict[int, tuple[int, int]]:
        """pid -> (trial, epochs done) for each worker mid-trial: an epoch done and checkpointed, epochs to come,
        and a retry still allowed (a trial retried MAX_RETRIES times is given up by design: not this soak's
        question)."""
        workers, found = self.workers(), {}
        for t in self.trials():
            owner = t.user_attrs.get("owner") or {}
            epochs = len(t.intermediate_values)
            if t.state != TrialState.RUNNING or owner.get("pid") not in workers or not 1 <= epochs < EPOCHS:
                continue
            first, _ = store.first_attempt(t)
            if not (self.env.checkpoints() / f"trial-{first}.pt").is_file():
                continue
            if t.user_attrs.get("retries", 0) >= store.MAX_RETRIES:
                self.skipped_last_retry.add(t.number)
                continue
            found[owner["pid"]] = (t.number, epochs)
        return found

    def journal_lock(self) -> tuple[int, int] | None:
        """Optuna's lock on the journal file (a symbolic link beside it while a process appends), as (inode, time)."""
        try:
            found = os.lstat(f"{self.env.storage}.lock")
        except OSError:
            return None
        return found.st_ino, found.st_mtime_ns

    # ---- kills -----------------------------------------------------------------------------------

    def kill_worker(self) -> Kill | None:
        """SIGKILL a random worker, frozen mid-trial (checked again while frozen); a joiner takes its place."""
        candidates = self.mid_trial()
        if not candidates:
            return None
        pid = self.rng.choice(sorted(candidates))
        freeze(pid)
        try:
            still = self.mid_trial().get(pid)
        except Exception:  # frozen while holding a database lock: let it go on
            still = None
        if still is None or still[0] != candidates[pid][0]:
            thaw(pid)
            return None
        search = self.workers().get(pid)
        lock = self.journal_lock()
        os.kill(pid, signal.SIGKILL)
        if search is not None and search.kind == "joiner":
            search.killed = True
            search.process.wait()
        wait_until(lambda: not alive(pid), f"killed worker {pid} to be gone", timeout=30, ignore=())
        if lock is not None:
            time.sleep(1)  # a lock another process holds is released within milliseconds; the dead one's stays
        kill = Kill("worker", self.minutes(), pid, {still[0]: still[1]},
                    journal_locked=lock is not None and lock == self.journal_lock())
        if len(self.workers()) < WORKERS:
            self.launch("joiner")
            self.restarts["joiner for a killed worker"] += 1
        return kill

    def kill_coordinator(self) -> Kill | None:
        """SIGKILL the coordinator while one of its workers is mid-trial; when its workers have stopped (they fail
        their trials as interrupted and queue them again), run the same command again."""
        coordinator = self.coordinator
        if coordinator.process.poll() is not None:
            return None
        own = {pid for pid, s in self.workers().items() if s is coordinator}
        if not own & set(self.mid_trial()):
            return None
        cut = {t.number: len(t.intermediate_values) for t in self.trials()
               if t.state == TrialState.RUNNING and (t.user_attrs.get("owner") or {}).get("pid") in own}
        coordinator.killed = True
        coordinator.process.send_signal(signal.SIGKILL)
        coordinator.process.wait()
        kill = Kill("coordinator", self.minutes(), coordinator.process.pid, cut)
        wait_until(lambda: not any(alive(pid) for pid in own), "the killed coordinator's workers to stop",
                   timeout=STOP_SECONDS, ignore=())
        self.launch("coordinator")
        self.restarts["coordinator, killed"] += 1
        return kill

    def kill_server(self) -> Kill:
        """SIGKILL the MLflow server mid-search and start it again on the same port and store."""
        started = time.monotonic()
        pid = self.server.process.pid
        self.server.kill()
        self.server.start()
        return Kill("server", self.minutes(), pid, down_seconds=time.monotonic() - started)

    def chaos_step(self, step: int) -> Kill | None:
        if step == SERVER_KILL:
            return self.kill_server()
        if step == COORDINATOR_KILL:
            return self.kill_coordinator()
        return self.kill_worker()

    # ---- the run ---------------------------------------------------------------------------------

    def look_after_searches(self) -> None:
        """A search that ended by itself before the budget was done (not killed) is run again and counted."""
        for search in list(self.searches):
            code = search.process.poll()
            if code is None or search.killed or search.noticed:
                continue
            search.noticed = True
            if code != 0 and self.finished() < TRIALS:
                self.stopped_by_themselves.append(f"{search.kind} (exit {code}): {tail(search.log, 3)}")
                is_current = search.kind == "joiner" or search is self.coordinator
                if is_current and (search.kind == "coordinator" or len(self.workers()) < WORKERS):
                    self.launch(search.kind)
                    self.restarts[f"{search.kind}, stopped by itself"] += 1

    def run(self) -> None:
        self.launch("coordinator")
        step, next_kill = 0, time.monotonic() + self.rng.uniform(*KILL_INTERVAL)
        hard_stop = time.monotonic() + (MINUTES + 20) * 60
        while any(s.process.poll() is None for s in self.searches):
            assert time.monotonic() < hard_stop, "the soak ran past its time: " + self.where()
            self.look_after_searches()
            chaos = (len(self.kills) < KILLS and self.minutes() < MINUTES and self.finished() < TRIALS - QUIET_END)
            if chaos and time.monotonic() >= next_kill:
                kill = self.chaos_step(step + 1)
                if kill is not None:
                    self.kills.append(kill)
                    step += 1
                    next_kill = time.monotonic() + self.rng.uniform(*KILL_INTERVAL)
            time.sleep(0.5)
        self.look_after_searches()

    def where(self) -> str:
        return "\n".join(f"{s.kind} pid {s.process.pid} exit {s.process.poll()}:\n{tail(s.log)}"
                         for s in self.searches[-3:])

    def stop_everything(self) -> None:
        for search in self.searches:
            if search.process.poll() is None:
                for pid in descendants_command_lines([search.process.pid]):
                    thaw(pid)
                    os.kill(pid, signal.SIGKILL)
                search.process.wait()


# --------------------------------------------------------------------------------------------------
# What is left, checked


def all_runs(client: MlflowClient, experiment_id: str) -> list:
    """Every run of the experiment, page by page (a soak has more than one page of runs)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def retries_of(trials: list[store.TrialRecord], system: dict[int, dict], number: int) -> list[store.TrialRecord]:
    """The attempts that ran trial `number`'s parameters again: queued by our sweep or interrupt (`retry_of`) or by
    Optuna's heartbeat (`failed_trial`); surplus copies (budget already taken when they were picked) left out."""
    return [t for t in trials if (t.retry_of == number or system[t.number].get("failed_trial") == number)
            and t.fail_reason != "surplus" and t.state != "WAITING"]


def last_attempt(trials: list[store.TrialRecord], system: dict[int, dict], number: int) -> store.TrialRecord:
    by_number = {t.number: t for t in trials}
    attempt = by_number[number]
    while attempt.state == "FAIL" and (again := retries_of(trials, system, attempt.number)):
        attempt = again[0]
    return attempt


def journal_check(path: Path, study_name: str) -> str:
    """Every line whole JSON ending in a newline, and the whole journal loaded again by Optuna itself."""
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the journal's last line has no newline"
    for number, line in enumerate(lines[:-1], start=1):
        try:
            json.loads(line)
        except ValueError:
            raise AssertionError(f"journal line {number} is not an entry: {line[:80]!r}") from None
    reloaded = optuna.load_study(study_name=study_name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path))))
    torn = sorted(p.name for p in path.parent.glob(f"{path.name}.torn-*"))
    return (f"{len(lines) - 1:,} entries, all JSON; Optuna reloads {len(reloaded.trials)} trials"
            + (f"; torn last lines mended: {len(torn)}" if torn else ""))


def sqlite_check(path: Path) -> str:
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = sum(db.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] for table in tables)
    return f"PRAGMA integrity_check ok, no foreign key broken, {len(tables)} tables, {rows:,} rows"


def postgres_check(url: str) -> str:
    """amcheck: every table's heap (verify_heapam) and every B-tree index with all its heap tuples
    (bt_index_check); then every row of every table read."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        tables = [r[0] for r in db.execute("SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON "
                                           "n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname = 'public'")]
        indexes = [r[0] for r in db.execute(
            "SELECT c.oid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON "
            "a.oid = c.relam JOIN pg_namespace n ON n.oid = c.relnamespace WHERE a.amname = 'btree' AND "
            "n.nspname = 'public'")]
        for table in tables:
            damage = db.execute("SELECT * FROM verify_heapam(%s::regclass)", (table,)).fetchall()
            assert damage == [], f"{table}: {damage[:3]}"
        for index in indexes:
            db.execute("SELECT bt_index_check(%s::regclass, true)", (index,))
        rows = sum(len(db.execute(f"SELECT * FROM {table}").fetchall()) for table in tables)
    return f"amcheck ok ({len(tables)} heaps, {len(indexes)} B-tree indexes), {rows:,} rows read"


def mlflow_problems(client: MlflowClient, study: optuna.Study, trials: list[store.TrialRecord]) -> tuple[list, list]:
    """(every run of the study's experiment, what is wrong): each finished trial has exactly one child run whose
    metric histories hold each epoch of its Optuna record once, with the same values; each child run's status is its
    trial's (FINISHED, KILLED, FAILED)."""
    runs = all_runs(client, client.get_experiment_by_name(study.study_name).experiment_id)
    children: dict[int, list] = {}
    for run in runs:
        if study_run.PARENT_TAG in run.data.tags:
            children.setdefault(int(run.data.tags["trial_number"]), []).append(run)
    problems = []
    for t in trials:
        runs_of = children.get(t.number, [])
        if t.finished and len(runs_of) != 1:
            problems.append(f"trial {t.number} ({t.state}): {len(runs_of)} child runs")
            continue
        problems += [f"trial {t.number} ({t.state}): its run is {r.info.status}" for r in runs_of
                     if r.info.status != study_run.RUN_STATUS.get(t.state, "FAILED")]
        for key in ("val_loss", "val_accuracy", "train_loss") if t.finished else ():
            points = sorted((m.step, m.value) for m in client.get_metric_history(runs_of[0].info.run_id, key))
            expected = [(epoch + 1, row[key]) for epoch, row in enumerate(t.history)]
            if points != expected:
                problems.append(f"trial {t.number} ({t.state}) {key}: MLflow has steps {[s for s, _ in points]}, "
                                f"Optuna's record {len(expected)} epochs")
    return runs, problems


@dataclass
class Retries:
    """What became of the trials the kills cut short."""

    cut: int = 0
    retried: int = 0
    checkpointed: int = 0  # failed after at least one checkpointed epoch
    resumed: int = 0  # ...whose retry resumed from that checkpoint (epoch > 0)
    by_coordinator: Counter = field(default_factory=Counter)  # how a killed coordinator's workers left theirs
    problems: list[str] = field(default_factory=list)


def retry_figures(kills: list[Kill], study: optuna.Study, trials: list[store.TrialRecord]) -> Retries:
    """Each trial a kill cut short failed, ran again exactly once with its seed (resuming its checkpoint when it had
    one), and its last attempt finished. A killed worker's trial is failed by the others' sweep (stale) or, on
    PostgreSQL, maybe by Optuna's heartbeat (no reason of ours). A killed coordinator's workers should fail theirs as
    interrupted: any FAIL passes as long as the parameters ran again (`by_coordinator` shows which)."""
    system = {t.number: t.system_attrs for t in study.get_trials(deepcopy=False)}
    by_number = {t.number: t for t in trials}
    cut = {number: (kill, epochs) for kill in kills for number, epochs in kill.cut.items()}
    found = Retries(cut=len(cut))
    for number, (kill, epochs) in sorted(cut.items()):
        killed = by_number[number]
        if kill.what == "coordinator":
            found.by_coordinator[f"{killed.state} {killed.fail_reason or ''}".strip()] += 1
            if killed.state != "FAIL":
                continue  # its worker finished the trial before it took the signal
        expected = ("stale", None) if kill.what == "worker" else (killed.fail_reason,)
        again = retries_of(trials, system, number)
        if killed.state != "FAIL" or killed.fail_reason not in expected or len(again) != 1:
            found.problems.append(f"trial {number} (killed with its {kill.what}): {killed.state} "
                                  f"{killed.fail_reason}, {len(again)} retries")
            continue
        found.retried += 1
        found.checkpointed += epochs >= 1
        retry, final = again[0], last_attempt(trials, system, number)
        if retry.resumed_from_epoch >= epochs >= 1:
            found.resumed += 1
        elif epochs >= 1:
            found.problems.append(f"trial {number}: killed after {epochs} checkpointed epochs, its retry "
                                  f"{retry.number} resumed from epoch {retry.resumed_from_epoch}")
        if not final.finished or final.seed != killed.seed:
            found.problems.append(f"trial {number}: its last attempt {final.number} is {final.state} (seed "
                                  f"{final.seed}, first {killed.seed})")
    return found


def integrity(databases: dict[str, str], study_name: str) -> dict[str, str]:
    """Each store's check, by name: its verdict, or FAILED and why."""
    verdicts = {}
    for name, where in databases.items():
        try:
            verdicts[name] = (journal_check(Path(where), study_name) if where.endswith(".journal")
                              else sqlite_check(Path(where.removeprefix("sqlite:///")))
                              if where.startswith("sqlite:") else postgres_check(where))
        except Exception as exc:
            verdicts[name] = f"FAILED: {type(exc).__name__}: {exc}"
    return verdicts


def check_and_report(soak: Soak, storage: str, databases: dict[str, str]) -> None:
    """Print the figures, then assert each property (every figure is printed before the first assertion)."""
    minutes, study = soak.minutes(), soak.env.load()
    trials = store.records(study)
    states = Counter(t.state for t in trials)
    finished = [t for t in trials if t.finished]
    client = MlflowClient(soak.server.uri)
    runs, run_problems = mlflow_problems(client, study, trials)
    parents = [r for r in runs if study_run.PARENT_TAG not in r.data.tags]
    retries = retry_figures(soak.kills, study, trials)
    cut = {number for kill in soak.kills for number in kill.cut}
    other_failures = Counter(t.fail_reason or "stale (heartbeat)" for t in trials
                             if t.state == "FAIL" and t.number not in cut)
    best = store.leading_best(study)
    try:
        champion = client.get_model_version_by_alias("tiny", registry.CHAMPION)
        chosen = f"trial {champion.tags['trial_number']} ({champion.tags['objective_value']})"
    except Exception as exc:  # no registered model, or no alias
        champion, chosen = None, f"none ({type(exc).__name__}: {exc})"
    verdicts = integrity(databases, study.study_name)
    kinds = Counter(k.what for k in soak.kills)

    print(f"\n===== soak on {storage}: {WORKERS} workers, budget {TRIALS} trials of {EPOCHS} epochs, "
          f"{minutes:.1f} minutes =====")
    print(f"trials: {len(finished)} finished ({states['COMPLETE']} complete, {states['PRUNED']} pruned), "
          f"{states['FAIL']} failed, {states['RUNNING']} running, {states['WAITING']} waiting; "
          f"{len(trials)} trial numbers")
    print(f"kills: {len(soak.kills)} ({kinds['worker']} workers, {kinds['server']} MLflow server, "
          f"{kinds['coordinator']} coordinator) over {max((k.at for k in soak.kills), default=0):.1f} minutes; "
          f"server down {', '.join(f'{k.down_seconds:.1f} s' for k in soak.kills if k.what == 'server')}; "
          f"workers killed holding the journal's lock: {sum(k.journal_locked for k in soak.kills)}")
    print(f"trials cut short by a kill: {retries.cut}; retried {retries.retried}; resumed from a checkpoint epoch "
          f"> 0: {retries.resumed} of the {retries.checkpointed} with one; trials passed over as on their last "
          f"retry: {len(soak.skipped_last_retry)}")
    print(f"trials the coordinator's kill cut short, as its workers left them: {dict(retries.by_coordinator)}")
    print(f"other failed trials: {dict(other_failures)}")
    print(f"restarts: {dict(soak.restarts)}; search processes {len(soak.searches)}")
    for line in soak.stopped_by_themselves:
        print(f"stopped by itself: {line}")
    print(f"MLflow: {len(parents)} parent run(s), {len(runs) - len(parents)} child runs; problems "
          f"{len(run_problems)}")
    print(f"champion: {chosen}; the best complete trial: {f'trial {best.number} ({best.values[0]})' if best else None}")
    for name, verdict in verdicts.items():
        print(f"{name}: {verdict}")
    for problem in (run_problems + retries.problems)[:20]:
        print(f"  problem: {problem}")

    assert len(finished) == TRIALS, "the budget is not exact"
    assert len({t.number for t in trials}) == len(trials)
    assert states["RUNNING"] == 0, "trials left RUNNING"
    assert len(parents) == 1 and all(r.info.status != "RUNNING" for r in runs), "MLflow runs left RUNNING"
    assert not run_problems, run_problems[:10]
    assert kinds["worker"] and kinds["server"] and kinds["coordinator"], "the chaos loop did not kill each kind"
    assert not retries.problems, retries.problems[:10]
    assert champion is not None and best is not None
    assert float(champion.tags["objective_value"]) == best.values[0], "the champion is not the best complete trial"
    assert int(champion.tags["trial_number"]) == best.number
    assert all(not verdict.startswith("FAILED") for verdict in verdicts.values()), verdicts


# --------------------------------------------------------------------------------------------------
# The soak, on each storage


@pytest.fixture(autouse=True)
def only_when_asked_for(request) -> None:
    """Minutes of chaos run only when the marker expression names `soak` (`make soak`): an expression that merely
    does not exclude it (`not browser and not faults and not scale`) does not start it."""
    expression = request.config.getoption("markexpr") or ""
    if "soak" not in expression.replace("not soak", ""):
        pytest.skip("the soak runs with `make soak` (pytest -m soak)")


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_soak_kills_workers_the_server_and_the_coordinator_and_nothing_is_lost(storage, study_env, tmp_path,
                                                                               request):
    logs = tmp_path / "logs"
    logs.mkdir()
    if storage == "journal":
        env = study_env.replace(storage=str(tmp_path / "studies" / "optuna.journal"))
        backend_file = tmp_path / "mlruns" / "mlflow.db"
        backend_file.parent.mkdir()
        # The schema, made once per session (the fixture is asked for here: a skipped soak makes none).
        backend_file.write_bytes(request.getfixturevalue("empty_mlflow_store").read_bytes())
        backend = f"sqlite:///{backend_file}"
    else:
        server = request.getfixturevalue("postgresql_server")
        env = study_env.replace(storage=server.create_database("optuna_soak"))
        backend = server.create_database("mlflow_soak")
    tracking_server = TrackingServer(backend, tmp_path / "artifacts", logs)
    tracking_server.start()
    env = env.replace(tracking_uri=tracking_server.uri)
    # Random search on the tiny CNN, judged by validation loss: a continuous value, so one trial is the best.
    env.write_study(trials=TRIALS, epochs=EPOCHS, timeout_minutes=120, sampler="random", pruner="median",
                    objectives=[{"metric": "val_loss"}], fixed={"precision": "fp32", "augment": 0.0})
    soak = Soak(env, tracking_server, logs)
    try:
        soak.run()
        assert soak.coordinator.process.returncode == 0, soak.where()
        check_and_report(soak, storage, {"Optuna storage": env.storage, "MLflow store": backend})
    finally:
        soak.stop_everything()
        tracking_server.stop()
