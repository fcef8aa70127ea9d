"""infra/revision.py: the project's git revision, read without torch."""

from __future__ import annotations

import subprocess

from conftest import run_python

from pipeline.infra import revision
from pipeline.spec import paths


def test_git_commit_is_the_checkouts_head_and_says_whether_tracked_files_changed():
    head = subprocess.run(["git", "-C", str(paths.PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(paths.PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert revision.git_commit() == head + ("+dirty" if dirty else "")


def test_git_commit_outside_git_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "PROJECT_ROOT", tmp_path)
    assert revision.git_commit() == "unknown"


def test_reading_the_revision_loads_no_torch_nor_does_the_report_page_that_records_it():
    loaded = run_python("""
        import sys
        from pipeline.infra import revision
        revision.git_commit()
        print("torch" in sys.modules)
        from pipeline.reports import reportpage
        print("torch" in sys.modules)
    """)
    assert loaded.stdout.split() == ["False", "False"], loaded.stderr
