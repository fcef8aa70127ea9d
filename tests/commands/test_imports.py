"""Commands that train nothing answer without importing torch (seconds), and a search without tracking without
importing MLflow (seconds too): each checked in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import TINY_CLI, write_tiny_dataset

from pipeline.spec import paths

# Runs first in the fresh interpreter: notes who imports torch first, so a regression names the culprit.
WATCH = '''
import json, sys, traceback

class _TorchWatch:
    stack = None

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and _TorchWatch.stack is None:
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<frozen")]
            _TorchWatch.stack = "".join(traceback.format_list(frames))
        return None

sys.meta_path.insert(0, _TorchWatch())
rc = None
'''
# Runs last: one line the test reads back.
REPORT = '''
torchy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "functorch"))
print("RESULT " + json.dumps({"rc": rc, "torch": torchy, "first_import": _TorchWatch.stack,
                             "pipeline": sorted(m for m in sys.modules if m.startswith("pipeline")),
                             "mlflow": sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")}))
'''


def run_fresh(code: str) -> dict:
    """Run `code` (which may set `rc`) in a new interpreter at the project root; what REPORT printed."""
    env = {k: v for k, v in os.environ.items() if k != "STORAGE"} | {"COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", WATCH + code + REPORT], cwd=paths.PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["output"] = done.stdout + done.stderr
    return result


def assert_no_torch(result: dict) -> None:
    torchy = result["torch"]
    packages = sorted(m for m in torchy if "." not in m)
    assert not torchy, (f"torch was imported ({len(torchy)} modules: {', '.join(packages)}, ...); "
                        f"pipeline modules loaded: {', '.join(result['pipeline'])}\n"
                        f"torch was first imported from:\n{result['first_import']}")


def test_loading_every_study_file_imports_no_torch():
    result = run_fresh('''
from pipeline.spec import studies
names = studies.available()
assert "cnn" in names, names
studies.load("cnn")
for name in names:
    studies.load(name)
print("loaded", len(names))
''')
    assert_no_torch(result)
    assert f"loaded {len(list(paths.STUDIES_DIR.glob('*.toml')))}" in result["output"]


def test_studies_command_imports_no_torch(tmp_path):
    result = run_fresh(f'''
from pipeline import cli
rc = cli.main(["studies", "--storage", "sqlite:///{tmp_path}/x.db"])
''')
    assert result["rc"] == 0, result["output"]
    assert "cnn.toml" in result["output"] and "not started" in result["output"]
    assert_no_torch(result)
    assert "pipeline.data.landing" not in result["pipeline"]  # numpy and the archive readers: `make data` only


def test_search_of_an_unknown_study_exits_2_without_torch():
    result = run_fresh('''
from pipeline import cli
rc = cli.main(["search", "--study", "nope"])
''')
    assert result["rc"] == 2, result["output"]
    assert "no study 'nope'" in result["output"]
    assert_no_torch(result)


def test_data_command_on_landed_files_imports_no_torch(tmp_path):
    root = tmp_path / "data"
    write_tiny_dataset(root)
    result = run_fresh(f'''
sys.path.insert(0, {str(TINY_CLI.parent)!r})
from tiny_cli import register_tiny
from pipeline import cli

register_tiny({str(root)!r})
rc = cli.main(["data", "--dataset", "tiny", "--root", {str(root)!r}])
''')
    assert result["rc"] == 0, result["output"]
    assert "tiny: 600 train + 200 test images" in result["output"]
    assert_no_torch(result)


def test_the_search_command_imports_no_mlflow_until_tracking_connects():
    """TRACKING=off, and every worker's start before it connects, need no MLflow."""
    result = run_fresh('''
from pipeline.commands import search
from pipeline.tracking.lifecycle import Tracking
Tracking.off()
''')
    assert "pipeline.commands.search" in result["pipeline"] and "pipeline.tracking.lifecycle" in result["pipeline"]
    assert result["mlflow"] == [], f"MLflow was imported ({len(result['mlflow'])} modules)"
