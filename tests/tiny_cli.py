"""Run the real CLI in a real process with the tiny test dataset registered.

    python tests/tiny_cli.py DATA_ROOT search --study ... (any `python -m pipeline` arguments)

The tiny dataset's files must already be under DATA_ROOT (see conftest.write_tiny_dataset); their
checksums are taken from the files, as a user registering their own data would record them.
"""

import sys
from pathlib import Path

from pipeline.data import datasets
from pipeline.spec import sources


def register_tiny(root: Path) -> None:
    """Register the "tiny" dataset whose IDX files are under `root` (nothing when they are not there: the
    command works on the real datasets)."""
    raw = Path(root) / "Tiny" / "raw"
    if raw.is_dir():
        sources.DATASETS["tiny"] = sources.DatasetInfo(
            name="tiny", folder="Tiny", sha256={f: datasets.sha256_file(raw / f) for f in sources.FILES},
            classes=tuple(f"class{i}" for i in range(10)),
        )


if __name__ == "__main__":
    from pipeline.cli import main

    register_tiny(Path(sys.argv[1]))
    # Worker processes (WORKERS=N) run through this script too, so they see the tiny dataset.
    sys.exit(main(sys.argv[2:], worker_program=[sys.executable, __file__, sys.argv[1]]))
