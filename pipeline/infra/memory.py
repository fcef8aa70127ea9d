"""How much memory data kept resident on the CPU may take in this process: the host's available memory (the
kernel's MemAvailable, or less where a memory cgroup leaves less), shared among the host's worker processes, each
of which holds its own copy. Torch-free: the coordinator of workers reads HOST_WORKERS_ENV from here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.infra.text import byte_size
from pipeline.spec.errors import BadInput

# On the CPU a split stays resident while it fits in this share of the memory still available (the kernel's
# MemAvailable, or less under a cgroup's limit), divided among the worker processes of the host: each holds a copy.
RAM_SHARE = 0.5
HOST_WORKERS_ENV = "PIPELINE_HOST_WORKERS"  # set by workers.Workers: how many worker processes share this host
GPU_WORKERS_ENV = "PIPELINE_GPU_WORKERS"  # ...and how many share a worker's GPU (several small trials on one)
# cgroup v1 states "no limit" as a number near 2**63 (v2 writes "max"); anything this large is no limit.
CGROUP_NO_LIMIT = 1 << 60


@dataclass(frozen=True)
class MemoryBudget:
    """What a split kept resident on the CPU may take in this process, and how that was reckoned (shown)."""

    available: int  # bytes the host can still give this process: MemAvailable, or a cgroup's headroom if smaller
    source: str  # where `available` came from (shown)
    processes: int  # worker processes on this host, each holding its own resident copy

    @property
    def bytes(self) -> int:
        return int(self.available * RAM_SHARE) // self.processes

    def __str__(self) -> str:
        shared = f", shared by {self.processes} workers" if self.processes > 1 else ""
        return f"{RAM_SHARE:.0%} of the {byte_size(self.available)} {self.source}{shared}"


def memory_budget(processes: int = 1) -> MemoryBudget:
    """This process's budget for resident data: RAM_SHARE of the memory still available, split `processes` ways.

    Available is the kernel's MemAvailable (free memory plus the page cache it can drop), or less where a memory
    cgroup above this process (a container's, a systemd slice's) leaves less room under its limit. Without /proc
    (not Linux) it is the physical memory.
    """
    available, source = _mem_available()
    for cgroup in memory_cgroups():
        if cgroup.headroom < available:
            available, source = cgroup.headroom, f"left under the memory limit of cgroup {cgroup.path}"
    return MemoryBudget(available, source, processes)


def host_workers() -> int:
    """How many worker processes on this host share its memory (HOST_WORKERS_ENV; 1 outside a coordinator's
    workers)."""
    return _workers(HOST_WORKERS_ENV, "on this host")


def gpu_workers() -> int:
    """How many worker processes share this process's GPU, each with its own copy of the data there
    (GPU_WORKERS_ENV; 1 outside a coordinator's workers)."""
    return _workers(GPU_WORKERS_ENV, "on this GPU")


def _workers(name: str, where: str) -> int:
    value = os.environ.get(name, "1")
    if not value.strip().isdigit() or int(value) < 1:
        raise BadInput(f"{name}={value!r}: expected the number of worker processes {where}, a whole "
                       "number >= 1 (a search's coordinator sets it for its workers); unset it")
    return int(value)


def _mem_available() -> tuple[int, str]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available"  # stated in kB
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of physical memory"


@dataclass(frozen=True)
class MemoryCgroup:
    """One memory cgroup this process is in (or under), as its files state it."""

    path: Path
    limit: int
    used: int  # charged to it, less its page cache: what the kernel cannot take back by reclaiming

    @property
    def headroom(self) -> int:
        return max(0, self.limit - self.used)


# The files of each cgroup version: limit, usage, and the prefix of memory.stat's page cache figures (v1's total_
# ones count the children too, as its usage does). The page cache (the memory-mapped image cache's pages among it)
# counts as available, as in MemAvailable: the kernel drops it before it kills. tmpfs and shared memory are not on
# the file lists, so they stay counted as used.
_CGROUP_FILES = {"cgroup2": ("memory.max", "memory.current", ""),
                 "cgroup": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_")}


def cgroup_mounts() -> dict[str, tuple[str, Path]]:
    """The memory cgroup hierarchies mounted here: version ("cgroup2", or v1's "cgroup" with the memory controller)
    -> (the hierarchy's path that is mounted, where it is mounted). OSError without /proc."""
    mounts: dict[str, tuple[str, Path]] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        tail = fields[fields.index("-") + 1:]  # filesystem type, source, super options
        if tail[0] == "cgroup2" or (tail[0] == "cgroup" and "memory" in tail[2].split(",")):
            mounts.setdefault(tail[0], (fields[3], Path(fields[4])))
    return mounts


def memory_cgroups() -> list[MemoryCgroup]:
    """Every memory cgroup with a limit that holds this process: its own and each ancestor (a limit anywhere above
    binds too), in cgroup v2 and v1 (both may be mounted), innermost first; none without /proc or cgroups."""
    try:
        membership = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = cgroup_mounts()
    except OSError:
        return []
    found = []
    for line in membership:  # "hierarchy:controllers:path"; v2's is "0::path"
        hierarchy, controllers, path = line.split(":", 2)
        version = "cgroup2" if hierarchy == "0" else "cgroup" if "memory" in controllers.split(",") else None
        if version not in mounts:
            continue
        root, mount_point = mounts[version]
        # The mount shows the hierarchy from `root` down (a container sees its own group as the root).
        inside = os.path.relpath(path, root) if (path + "/").startswith(root.rstrip("/") + "/") else "."
        directory = mount_point / inside
        while True:
            cgroup = _read_cgroup(directory, *_CGROUP_FILES[version])
            if cgroup is not None:
                found.append(cgroup)
            if directory == mount_point or mount_point not in directory.parents:
                break
            directory = directory.parent
    return found


def _read_cgroup(directory: Path, limit_file: str, usage_file: str, stat_prefix: str) -> MemoryCgroup | None:
    """The cgroup at `directory`, or None where it states no limit (or no memory files: the controller is off)."""
    try:
        limit_text = (directory / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= CGROUP_NO_LIMIT:
            return None
        usage = int((directory / usage_file).read_text())
        stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
        page_cache = int(stat[f"{stat_prefix}active_file"]) + int(stat[f"{stat_prefix}inactive_file"])
    except (OSError, ValueError, KeyError):
        return None
    return MemoryCgroup(directory, int(limit_text), max(0, usage - page_cache))
