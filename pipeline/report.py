"""The study's report, refreshed on its MLflow parent run after every invocation: trials.csv,
best_params.json and Optuna's plots as PNG."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import optuna
from optuna.visualization import matplotlib as optuna_plots

from pipeline import store
from pipeline.studies import StudySpec

# Long per-trial attributes that would swamp the table; each is in the trial's own MLflow run.
REPORT_EXCLUDED_COLUMNS = ("user_attrs_history", "user_attrs_traceback", "user_attrs_params")


def write_report(spec: StudySpec, study: optuna.Study, directory: Path) -> list[str]:
    """trials.csv, best_params.json and Optuna's plots as PNG in `directory`; returns why any plot was left out."""
    frame = study.trials_dataframe(multi_index=False)
    frame.drop(columns=[c for c in REPORT_EXCLUDED_COLUMNS if c in frame.columns]).to_csv(
        directory / "trials.csv", index=False)
    best = store.leading_best(study)
    if best is not None:
        summary = {"study": study.study_name, "trial": best.number, "objectives": spec.metrics,
                   "values": best.values, "seed": best.seed, "params": best.params or best.sampled}
        (directory / "best_params.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return _plots(spec, study, directory)


def _plots(spec: StudySpec, study: optuna.Study, directory: Path) -> list[str]:
    metric = spec.metrics[0]
    target = (lambda t: t.values[0]) if len(spec.objectives) > 1 else None
    # A custom target is read as "lower is better" by the importance evaluator: flip a maximised one.
    flip = -1.0 if spec.directions[0] == "maximize" else 1.0
    importance_target = (lambda t: flip * t.values[0]) if target is not None else None
    figures = {
        "optimization_history.png": lambda: optuna_plots.plot_optimization_history(study, target=target,
                                                                                   target_name=metric),
        "param_importances.png": lambda: optuna_plots.plot_param_importances(study, target=importance_target,
                                                                             target_name=metric),
        "parallel_coordinate.png": lambda: optuna_plots.plot_parallel_coordinate(study, target=target,
                                                                                 target_name=metric),
        "intermediate_values.png": lambda: optuna_plots.plot_intermediate_values(study),
    }
    matplotlib.use("Agg")  # Optuna draws through pyplot: headless, whatever the environment says
    skipped = []
    for name, draw in figures.items():
        try:
            with warnings.catch_warnings():  # small studies draw degenerate axes; the figure is still right
                warnings.simplefilter("ignore")
                axes = draw()
        except Exception as exc:  # e.g. importances need two complete trials that differ
            skipped.append(f"{name} left out: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.savefig(directory / name, dpi=100, bbox_inches="tight")
        plt.close(figure)
    return skipped
