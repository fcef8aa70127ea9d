"""The suite's own guard (conftest.checkout_left_as_it_was): which files of the checkout it watches."""

from __future__ import annotations

from conftest import checkout_files


def test_the_guard_skips_tool_folders_at_the_root_only_and_caches_at_any_depth(tmp_path):
    for name in ["data/MNIST/raw/x", ".venv/bin/python", ".git/HEAD", ".mypy_cache/x", "README.md",
                 "pipeline/data/loading.py", "tests/data/test_cifar.py", "tests/data/__pycache__/x.pyc",
                 "pipeline/__pycache__/x.pyc", "pipeline.egg-info/PKG-INFO", "src/pipeline.egg-info/PKG-INFO"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert sorted(checkout_files(tmp_path)) == ["README.md", "pipeline/data/loading.py", "tests/data/test_cifar.py"]
