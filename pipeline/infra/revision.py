"""The project's git revision, recorded with every study run, exported model and report.

Torch-free, so that `make report` (which records it) loads no torch for it.
"""

from __future__ import annotations

import subprocess

from pipeline.spec import paths


def git_commit() -> str:
    """The project's commit, `+dirty` when tracked files have uncommitted changes; `unknown` outside git."""
    root = str(paths.PROJECT_ROOT)
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
