"""export-best killed outright, while writing and between the two renames of its swap; the next export-best
finds what it left and finishes or removes it.

Where the kill has to land between two renames microseconds apart, the process kills itself right after the
rename in question (its os.rename wrapped in that process only): what is left on disk is exactly what a kill at
that point leaves.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import run_python, wait_until


def old_export(out: Path) -> Path:
    """An export already in place (its content is all the tidying looks at: a marker)."""
    destination = out / "tiny"
    destination.mkdir(parents=True)
    (destination / "marker").write_text("old")
    return destination


@pytest.mark.faults
def test_an_export_killed_while_writing_leaves_a_partial_folder_the_next_export_removes(pristine_search, tmp_path,
                                                                                        capsys):
    # the champion retrained: no MLflow
    env = pristine_search.env.replace(exports=tmp_path / "exports", tracking_uri=None)
    destination = old_export(env.exports)
    process = subprocess.Popen(env.command("export-best", "--force"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    partial = env.exports / f".tiny.partial-{process.pid}"
    wait_until(lambda: (partial / "config.json").is_file() or process.poll() is not None, "the export being written")
    os.killpg(process.pid, signal.SIGKILL)  # it, and a verifying child if it got that far
    process.wait()
    assert partial.is_dir() and (destination / "marker").read_text() == "old"  # as the kill left them

    assert env.run("export-best") == 2  # the export in place is kept (no --force)...
    err = " ".join("".join(capsys.readouterr()).split())
    assert f"removed {partial}, left by a killed export-best (pid {process.pid})" in err
    assert "already exists" in err
    assert sorted(p.name for p in env.exports.iterdir()) == ["tiny"]  # ...and the leftover is gone
    assert (destination / "marker").read_text() == "old"


KILL_AFTER = {"the previous export moved aside": r"\.tiny\.replaced-\d+", "the new export moved in": "tiny"}


@pytest.mark.faults
@pytest.mark.parametrize("point", KILL_AFTER)
def test_an_export_killed_mid_swap_is_finished_by_the_next_export(pristine_search, tmp_path, capsys, point):
    """`--force` over an existing export swaps by two renames; a kill after either one leaves the new export
    (verified before the swap starts) and the old one beside it. The next export-best puts the new one in place."""
    env = pristine_search.env.replace(exports=tmp_path / "exports", tracking_uri=None)
    destination = old_export(env.exports)
    killed = run_python("""
        import os, re, signal, sys
        from pathlib import Path
        from pipeline.commands import export
        destination, kill_after = Path(sys.argv[1]), sys.argv[2]
        partial = destination.parent / f".tiny.partial-{os.getpid()}"  # written and verified
        partial.mkdir()
        (partial / "marker").write_text("new")
        rename = os.rename

        def rename_then_die(source, target):
            rename(source, target)
            if re.fullmatch(kill_after, Path(target).name):
                os.kill(os.getpid(), signal.SIGKILL)

        os.rename = rename_then_die
        export._move_into_place(partial, destination, force=True)
    """, str(destination), KILL_AFTER[point])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(p.name for p in env.exports.iterdir())
    assert any(".replaced-" in name for name in left)  # the state the kill left

    assert env.run("export-best") == 2  # an export is in place: not replaced without --force
    err = " ".join("".join(capsys.readouterr()).split())
    assert "left by a killed export-best" in err and "already exists" in err
    assert sorted(p.name for p in env.exports.iterdir()) == ["tiny"]
    assert (destination / "marker").read_text() == "new"
