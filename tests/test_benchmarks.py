"""The benchmarks are run by hand (make bench-*), not by the suite: each must at least load and read its
arguments, so an API it calls that moved away is found here, not on the day someone measures."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from pipeline.paths import PROJECT_ROOT

BENCHMARKS = sorted(p for p in (PROJECT_ROOT / "benchmarks").glob("*.py") if p.stem != "reference_loop")


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_each_benchmark_loads_and_reads_its_arguments(script: Path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))  # as `python benchmarks/x.py` has it: its siblings import
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out
