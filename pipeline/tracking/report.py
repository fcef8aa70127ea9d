"""The study's tables, refreshed on its MLflow parent run after every invocation: trials.csv and best_params.json
(the figures are on the report page, reportpage.py, logged beside them as report.html)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from pipeline import store
from pipeline.spec.studies import StudySpec

# Long per-trial attributes that would swamp the table; each is in the trial's own MLflow run.
REPORT_EXCLUDED_COLUMNS = ("user_attrs_history", "user_attrs_traceback", "user_attrs_params")


def write_report(spec: StudySpec, study: optuna.Study, best: store.TrialRecord | None, directory: Path) -> None:
    """trials.csv and best_params.json (of `best`, the study's champion trial) in `directory`."""
    frame = study.trials_dataframe(multi_index=False)
    frame.drop(columns=[c for c in REPORT_EXCLUDED_COLUMNS if c in frame.columns]).to_csv(
        directory / "trials.csv", index=False)
    if best is not None:
        summary = {"study": study.study_name, "trial": best.number, "objectives": spec.metrics,
                   "values": best.values, "seed": best.seed, "params": best.params or best.sampled}
        (directory / "best_params.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
