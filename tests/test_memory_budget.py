"""The memory budget for resident data, under real memory limits: a memory cgroup each test makes (cgroup v2 where
its memory controller is on, else v1), real processes inside it, the kernel enforcing the limit.

Needs root and a writable memory cgroup hierarchy; skipped without them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import StudyEnv
from PIL import Image

from pipeline import store
from pipeline.data import loading
from pipeline.infra import memory
from pipeline.spec.sources import FolderSource

MB = 1_000_000


@dataclass
class MemoryGroup:
    """A memory cgroup this test made: its directory and its cgroup version ("cgroup2" or v1's "cgroup")."""

    path: Path
    version: str

    @property
    def limit_file(self) -> Path:
        return self.path / ("memory.max" if self.version == "cgroup2" else "memory.limit_in_bytes")

    def limit(self, nbytes: int) -> None:
        self.limit_file.write_text(str(nbytes))

    def stated_limit(self) -> int:
        """The limit as the kernel holds it (rounded down to whole pages)."""
        return int(self.limit_file.read_text())

    def enter(self) -> None:
        """In a child process before it runs its program (preexec_fn): move into this group."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def run(self, argv: list[str], timeout: float, **options) -> subprocess.CompletedProcess:
        """`argv` run inside this group (its children stay in it), its output captured."""
        return subprocess.run(argv, preexec_fn=self.enter, capture_output=True, text=True, timeout=timeout, **options)

    def pids(self) -> list[int]:
        return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this group."""
        events = self.path / ("memory.events" if self.version == "cgroup2" else "memory.oom_control")
        return int(re.search(r"^oom_kill (\d+)$", events.read_text(), re.MULTILINE)[1])


def _hierarchy() -> tuple[Path, str] | None:
    """Where a child memory cgroup can be made: the cgroup2 mount when its memory controller is on for children,
    else the v1 memory hierarchy's mount; None when neither is there."""
    found = {version: mount_point for version, (_, mount_point) in memory.cgroup_mounts().items()}
    v2 = found.get("cgroup2")
    if v2 is not None and "memory" in (v2 / "cgroup.subtree_control").read_text().split():
        return v2, "cgroup2"
    return (found["cgroup"], "cgroup") if "cgroup" in found else None


@pytest.fixture
def memory_group() -> Iterator[MemoryGroup]:
    """A fresh memory cgroup; on the way out every process the test left in it is killed and the group removed."""
    hierarchy = _hierarchy() if os.geteuid() == 0 else None
    if hierarchy is None:
        pytest.skip("needs root and a memory cgroup hierarchy (v2 with the memory controller on, or v1)")
    path = hierarchy[0] / f"pipeline-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    group = MemoryGroup(path, hierarchy[1])
    try:
        yield group
    finally:
        deadline = time.monotonic() + 60
        while group.pids() and time.monotonic() < deadline:
            for pid in group.pids():  # only processes this test started are in its group
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        path.rmdir()


# --------------------------------------------------------------------------------------------------
# The arithmetic, on the real files of a child group

PROBE = """
import json, os, sys
from pipeline.infra import memory

def seen():
    cgroups = memory.memory_cgroups()
    budget = memory.memory_budget(2)
    rss_anon = int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024
    return {"available": budget.available, "bytes": budget.bytes, "source": budget.source, "rss_anon": rss_anon,
            "cgroups": [[str(c.path), c.limit, c.used] for c in cgroups]}

first = seen()
ballast = bytearray(200_000_000)  # written (zeroed) pages: charged to the group, not reclaimable
with_ballast = seen()
with open(sys.argv[1], "wb") as file:  # page cache charged to the group, which the kernel can take back
    file.write(os.urandom(200_000_000))
    file.flush()
    os.fsync(file.fileno())
with open(sys.argv[1], "rb") as file:
    file.read()
with_page_cache = seen()
os.remove(sys.argv[1])  # 200 MB: not left in pytest's kept temporary folders
print(json.dumps({"first": first, "with_ballast": with_ballast, "with_page_cache": with_page_cache}))
"""


def test_the_budget_is_half_of_what_the_cgroup_leaves_divided_among_the_workers(memory_group, tmp_path):
    limit = 1_500_000_000  # torch's import alone takes about 300 MB; the probe adds 200 MB of its own
    if memory._mem_available()[0] < 3 * limit:
        pytest.skip("the host must have more memory available than the group's limit, for the limit to bind")
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    if kind == "tmpfs":
        pytest.skip("a file on tmpfs is memory, not page cache: the probe's file must be on a disk")
    memory_group.limit(limit)
    result = memory_group.run([sys.executable, "-c", PROBE, str(tmp_path / "page-cache")], timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    first, with_ballast, with_page_cache = seen["first"], seen["with_ballast"], seen["with_page_cache"]

    path, group_limit, used = first["cgroups"][0]
    assert (path, group_limit) == (str(memory_group.path), memory_group.stated_limit())  # its own group and limit
    # The group binds (the host has more available); the budget is RAM_SHARE of its headroom, halved for 2 workers.
    assert first["source"] == f"left under the memory limit of cgroup {memory_group.path}"
    assert abs(first["available"] - (group_limit - used)) < 5 * MB  # read a moment apart
    assert first["bytes"] == int(first["available"] * memory.RAM_SHARE) // 2
    # What this process holds is charged to the group, so it is not available.
    assert first["rss_anon"] - 5 * MB <= used < group_limit
    # Memory written since is no longer available; page cache (which the kernel drops before it kills) still is.
    assert with_ballast["available"] <= first["available"] - 190 * MB
    assert with_page_cache["available"] >= with_ballast["available"] - 20 * MB


def test_a_process_alone_with_plenty_of_memory_keeps_its_split_resident_and_says_why(tiny_dataset, monkeypatch):
    """As before: one process, a split far below half the memory available, resident; the reason is the budget."""
    monkeypatch.delenv(memory.HOST_WORKERS_ENV, raising=False)
    _, root = tiny_dataset
    logged = []
    prepared = loading.prepare("tiny", root, val_size=100, log=logged.append)
    assert prepared.mode == "resident" and not prepared.train.streamed
    assert re.fullmatch(r"resident \(the split's 470\.4 kB fits in [\d.]+ [GM]B: 50% of the [\d.]+ [GM]B "
                        r"(available|left under the memory limit of cgroup \S+)\)", prepared.placement)
    assert "shared by" not in prepared.placement and logged == []  # nothing said outside a coordinator's workers


# --------------------------------------------------------------------------------------------------
# A real search with two workers, under a limit one resident copy per worker would break

PICTURES = 800  # 512x512 RGB: a 566 MB training + validation split, 630 MB of cache
# Measured (2 workers, 1 thread each, the study below): the coordinator holds about 410 MB while its workers run and
# each worker about 600 MB while it streams; a resident copy adds 566 MB to each worker. 2.2 GB holds the first
# (1.6 GB) and not the second (2.8 GB).
LIMIT = 2_200_000_000


def _pictures(folder: Path) -> None:
    """PICTURES noise pictures in two classes, as BMP (fast to write and to decode, the same size on disk)."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
    for index in range(PICTURES):
        pixels = rng.integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "ab"[index % 2] / f"{index}.bmp")


@pytest.mark.faults  # README: What survives what
def test_two_workers_under_a_memory_limit_stream_and_finish_the_budget_unkilled(memory_group, study_env, tmp_path):
    if memory._mem_available()[0] < 2 * LIMIT:
        pytest.skip("the host must have more memory available than the group's limit, for the limit to bind")
    folder = tmp_path / "pictures"
    try:
        _two_workers_under_the_limit(memory_group, study_env, folder)
    finally:  # 1.3 GB of pictures and cache: not left behind in pytest's kept temporary folders
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(study_env.root / "cache", ignore_errors=True)


def _two_workers_under_the_limit(memory_group: MemoryGroup, study_env: StudyEnv, folder: Path) -> None:
    _pictures(folder)
    # Landed here, outside the group, as `make data` or an earlier search would: the limit is on the search.
    loading.prepare(FolderSource(str(folder), image_size=512), study_env.root, val_size=None, resident_bytes=1)

    # A one-epoch MLP on 3x512x512 inputs: little compute per byte, small batches (a float batch is 3 MB an image).
    study_env.write_study(
        dataset={"path": str(folder), "image_size": 512}, val_size=None, trials=2, epochs=1, model="mlp",
        sampler="random", pruner="none", baseline=None,
        fixed={"cnn_channels": None, "pool": None, "head": None, "head_units": None, "mlp_widths": [4],
               "batch_size": 8, "eval_batch_size": 8, "precision": "fp32", "augment": 0.0},
        space={"lr": {"type": "categorical", "choices": [0.01]}, "dropout": None})
    env = study_env.replace(storage=str(study_env.studies_dir / "optuna.journal"))
    memory_group.limit(LIMIT)
    result = memory_group.run(env.command("search", "--workers", "2"), timeout=540)

    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert memory_group.oom_kills() == 0, out[-3000:]
    assert not re.search(r"worker \d \(pid \d+\) ended", out)  # none ended before the budget was reached
    placements = re.findall(r"^worker ([12]): data (.*)$", result.stdout, re.MULTILINE)
    assert sorted(index for index, _ in placements) == ["1", "2"], out[-3000:]
    for _, placement in placements:  # each worker chose alone, knowing it shares the host with another
        assert placement.startswith("streamed from the memory-mapped cache (the split's 566.2 MB exceeds ")
        assert placement.endswith(f"left under the memory limit of cgroup {memory_group.path}, shared by 2 workers)")
    assert len(env.records(states=store.FINISHED)) == 2
