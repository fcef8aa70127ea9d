"""The host's memory budget (pipeline/infra/memory.py): cgroup limits read as the kernel writes them. How workers
share the budget is tested with the data it places (tests/data/test_data.py) and under a real cgroup
(tests/test_memory_budget.py)."""

from __future__ import annotations

from pipeline.infra import memory


def test_cgroup_files_of_both_versions_read_as_the_kernel_writes_them(tmp_path):
    """This host may mount only one version with its memory controller (tests/test_memory_budget.py makes a real
    group there); the other's files, as the kernel writes them, are read here: limit, usage less the page cache."""
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    for folder, files in ((v2, {"memory.max": "1073741824\n", "memory.current": "600000000\n",
                                "memory.stat": "anon 300000000\nfile 290000000\nshmem 50000000\n"
                                               "active_file 100000000\ninactive_file 150000000\n"}),
                          (v1, {"memory.limit_in_bytes": "1073741824\n", "memory.usage_in_bytes": "600000000\n",
                                "memory.stat": "cache 250000000\nactive_file 1\ninactive_file 1\n"
                                               "total_active_file 100000000\ntotal_inactive_file 150000000\n"})):
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    for folder, version in ((v2, "cgroup2"), (v1, "cgroup")):
        cgroup = memory._read_cgroup(folder, *memory._CGROUP_FILES[version])
        assert (cgroup.limit, cgroup.used, cgroup.headroom) == (1073741824, 350_000_000, 1073741824 - 350_000_000)
    (v2 / "memory.max").write_text("max\n")  # no limit here (a limit above may still bind)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory._read_cgroup(v2, *memory._CGROUP_FILES["cgroup2"]) is None
    assert memory._read_cgroup(v1, *memory._CGROUP_FILES["cgroup"]) is None
