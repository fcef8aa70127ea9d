"""The packages' layering (pyproject.toml's [tool.importlinter]) is enforced by import-linter: the tree as it is
keeps every contract, and one upward import planted in a copy of the tree, even inside a function, breaks the
layers contract and is named."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.spec import paths

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the `pipeline` package found at `root`, with `root`'s contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_every_package_imports_only_the_packages_below_it():
    done = lint_imports(paths.PROJECT_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout and "Contracts: 3 kept, 0 broken." in done.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers(tmp_path):
    shutil.copytree(paths.PROJECT_ROOT / "pipeline", tmp_path / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(paths.PROJECT_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    models = tmp_path / "pipeline" / "training" / "models.py"
    models.write_text(models.read_text() + "\n\ndef _planted():\n    from pipeline.commands import export\n\n"
                      "    return export\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "pipeline.training is not allowed to import pipeline.commands" in done.stdout
    assert "pipeline.training.models -> pipeline.commands.export" in done.stdout
