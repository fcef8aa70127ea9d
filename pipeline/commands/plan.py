"""`make plan STUDY=x [MINUTES=n]`: the plan a search of the study would make on this machine, printed without
training (search/plan.py; the rates are measured once and cached)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pipeline.commands.search import decide_workers
from pipeline.data.recorded import study_data
from pipeline.search import plan, planned
from pipeline.search.options import SearchOptions
from pipeline.spec.errors import BadInput
from pipeline.spec.studies import StudySpec
from pipeline.training.device import pick_device, pick_precision


def plan_study(spec: StudySpec, options: SearchOptions, log: Callable[[str], None] = print) -> list[str]:
    """The lines of the study's plan here: the same workers, data, rates and arithmetic a search would use."""
    if spec.minutes is None:
        raise BadInput(f"studies/{spec.name}.toml has no minutes to plan: add `minutes = 30` to it, or give "
                       "MINUTES=30")
    device = pick_device(options.device)
    options, why = decide_workers(spec, options, device, log)
    data = study_data(spec, options.root, device if options.worker_count == 1 else "cpu")
    made = planned.make(spec, data, device, options.worker_count, options.threads, Path(options.root), log)
    precision = pick_precision(spec.fixed.get("precision", "auto"), device)
    head = [f"{spec.name}: {spec.minutes:g} minutes on {device} ({precision}), {options.worker_count} worker(s) at "
            f"rung 0 and {made.threads} thread(s) after; {len(data.train):,} training images"]
    return head + ([why] if why else []) + plan.table(made, datetime.now())
