"""The study's report page: `reports/<study>.html`, one self-contained file that tells the study's story.

`make report STUDY=cnn` writes it, and every search refreshes it at its end (and logs it to the study's MLflow
parent run). Top to bottom: what was searched, the budget used, Optuna's figures (history, importances, parallel
coordinates, intermediate values with the pruned trials marked and why each was pruned), the top trials, the Pareto
front (several objectives), the champion (with the champion phase's mean and interval; once exported, its test
figures), and provenance.

The figures are Optuna's own visualisation functions (plotly), the page a Jinja2 template; plotly.js, the figures'
data and the export's PNGs are inlined, so the page opens offline, from a file, with no request to anywhere.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna

from pipeline import store
from pipeline.infra import fileio, revision
from pipeline.infra.urls import error_line
from pipeline.search import champion, pareto, plan_record
from pipeline.search.pruning import PruneReason
from pipeline.spec import paths, studies, tables
from pipeline.spec.studies import StudySpec

TEMPLATE = Path(__file__).with_name("report_page.html.j2")
TOP_TRIALS = 10
ACCURACY_LEVELS = (0.9, 0.95, 0.98, 0.99, 0.993, 0.995, 0.996, 0.997)  # "time to X% validation accuracy"
FIGURE_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass
class Figure:
    title: str
    html: str = ""  # the plotly div (its script included)
    missing: str = ""  # why it is not drawn (e.g. importances need two complete trials that differ)


@dataclass
class Page:
    """Everything the template shows."""

    spec: StudySpec
    study_name: str
    generated: str
    study_file: str
    fingerprint: str
    space: list[dict[str, str]]
    budget: dict[str, Any]
    levels: list[dict[str, str]]
    figures: dict[str, Figure]
    pruned: list[dict[str, Any]]
    top: list[dict[str, Any]]
    pareto_rows: list[dict[str, Any]]
    champion: dict[str, Any]
    provenance: dict[str, str]
    replays: dict[str, dict[str, Any]]
    plan: dict[str, Any] | None = None  # a planned search's stages, planned against what happened
    plotly_js: str = ""


def write(spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage,
          directory: Path = paths.REPORTS_DIR, exports: Path = paths.EXPORTS_DIR,
          studies_dir: Path = paths.STUDIES_DIR, decision: pareto.Choice | None = None,
          standings: champion.Standings | None = None) -> Path:
    """Write `directory/<study file>.html` (atomically: a reader never sees half a page); return its path.
    `decision`: the study's champion as the search decided it (pareto.decide), else decided here; `standings`: the
    champion phase's table as the search's phase left it, else read here."""
    page = build(spec, study, storage, exports, studies_dir, decision or pareto.decide(spec, study), standings)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec.name}.html"
    fileio.write_atomic(path, render(page).encode())
    return path


def render(page: Page) -> str:
    import jinja2

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                                     loader=jinja2.FileSystemLoader(TEMPLATE.parent))
    return environment.get_template(TEMPLATE.name).render(page=page)


def build(spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage, exports: Path,
          studies_dir: Path, decision: pareto.Choice, standings: champion.Standings | None = None) -> Page:
    from plotly.offline import get_plotlyjs

    records = store.records(study)
    best, table = _chosen(spec, study, storage, decision, standings)
    study_file = studies.study_path(spec.name, studies_dir)
    return Page(
        spec=spec, study_name=study.study_name,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        study_file=study_file.read_text() if study_file.is_file() else "(the study file is not on this machine)",
        fingerprint=study.user_attrs.get("fingerprint", spec.fingerprint()),
        space=_space(spec), budget=_budget(records, best), levels=_levels(records),
        figures=_figures(spec, study, records), pruned=_pruned(records), top=_top(spec, records),
        pareto_rows=_front_rows(spec, decision) if len(spec.objectives) > 1 else [],
        champion=_champion(spec, study, best, decision.reason, table, exports), provenance=_provenance(best),
        replays=store.replays(study), plan=_plan(spec, study), plotly_js=get_plotlyjs(),
    )


def _plan(spec: StudySpec, study: optuna.Study) -> dict[str, Any] | None:
    """A planned search's stages as planned and as they went: runs, a typical run's time, the stage's wall time."""
    made = plan_record.stored(study)
    if made is None:
        return None
    rows = []
    for found in plan_record.actuals(spec, study, made):
        s = found.stage
        rows.append({"stage": s.name, "shape": f"{s.images:,} x {s.epochs}", "runs": f"{found.runs} of {s.runs}",
                     "each": f"{s.seconds_each:.1f} s", "median": _seconds(found.median_seconds),
                     "planned": f"{s.seconds / 60:.1f} min", "wall": _seconds(found.wall_seconds, minutes=True),
                     "ratio": "-" if found.ratio is None else f"{found.ratio:.2f}"})
    return {"minutes": made.minutes, "spent": plan_record.minutes_spent(study), "rows": rows,
            "warnings": list(made.warnings)}


def _seconds(seconds: float | None, minutes: bool = False) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if minutes else f"{seconds:.1f} s"


# --------------------------------------------------------------------------------------------------
# What was searched, the budget


def _space(spec: StudySpec) -> list[dict[str, str]]:
    rows = []
    for key, param in spec.space.items():
        if isinstance(param, tables.CategoricalParam):
            values = ", ".join(json.dumps(c) for c in param.choices)
        else:
            values = f"{param.low:g} .. {param.high:g}" + (" (log)" if param.log else "") + (
                f" step {param.step:g}" if getattr(param, "step", None) not in (None, 1) else "")
        when = ", ".join(f"{k} in {v}" for k, v in (param.when or {}).items())
        rows.append({"name": key, "type": param.type, "range": values, "when": when})
    return rows


def _budget(records: list[store.TrialRecord], best: store.TrialRecord | None) -> dict[str, Any]:
    counts = {state: sum(r.state == state for r in records) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING",
                                                                         "WAITING")}
    started = [r.started_at for r in records if r.started_at is not None]
    ended = [r.completed_at for r in records if r.completed_at is not None]
    first = min(started) if started else None
    wall = (max(ended) - first).total_seconds() if first and ended else 0.0
    to_best = (best.completed_at - first).total_seconds() if best and best.completed_at and first else None
    return {"counts": counts, "trials": len(records), "wall_minutes": wall / 60,
            "trial_minutes": sum(r.seconds for r in records) / 60,
            "to_best_minutes": None if to_best is None else to_best / 60,
            "best": best.number if best else None}


def _levels(records: list[store.TrialRecord]) -> list[dict[str, str]]:
    """Minutes from the study's first trial to the first trial whose best epoch reached each accuracy level."""
    started = [r.started_at for r in records if r.started_at is not None]
    done = sorted(((r.completed_at, r) for r in records if r.finished and r.history and r.completed_at is not None),
                  key=lambda finished: finished[0])
    if not started or not done:
        return []
    first, rows = min(started), []
    best_seen = max((max(h["val_accuracy"] for h in r.history) for _, r in done), default=0.0)
    for level in ACCURACY_LEVELS:
        hit = next(((at, r) for at, r in done if max(h["val_accuracy"] for h in r.history) >= level), None)
        if hit is None and level > best_seen + 0.02:
            continue  # far beyond what the study reached: not worth a row
        rows.append({"level": f"{level:.1%}",
                     "minutes": f"{(hit[0] - first).total_seconds() / 60:.1f}" if hit else "not reached",
                     "trial": str(hit[1].number) if hit else "-"})
    return rows


# --------------------------------------------------------------------------------------------------
# Optuna's figures


def _figures(spec: StudySpec, study: optuna.Study, records: list[store.TrialRecord]) -> dict[str, Figure]:
    from optuna import visualization as vis

    metric = spec.metrics[0]
    several = len(spec.objectives) > 1
    target = (lambda t: t.values[0]) if several else None
    # A custom target reads as "lower is better" to the importance evaluator: flip a maximised one.
    flip = -1.0 if spec.directions[0] == "maximize" else 1.0
    importance_target = (lambda t: flip * t.values[0]) if several else None
    drawings: dict[str, tuple[str, Callable[[], Any]]] = {
        "history": ("Optimisation history", lambda: vis.plot_optimization_history(study, target=target,
                                                                                   target_name=metric)),
        "importances": ("Parameter importances", lambda: vis.plot_param_importances(
            study, target=importance_target, target_name=metric)),
        "parallel": ("Parallel coordinates", lambda: vis.plot_parallel_coordinate(study, target=target,
                                                                                   target_name=metric)),
        "intermediate": ("Intermediate values (dashed: pruned)", lambda: _intermediate(study, records, several)),
    }
    if several:
        drawings["pareto"] = ("Pareto front", lambda: vis.plot_pareto_front(
            study, target_names=spec.metrics, include_dominated_trials=True))
    figures = {}
    for key, (title, draw) in drawings.items():
        try:
            with warnings.catch_warnings():  # small studies draw degenerate axes: the figure is still right
                warnings.simplefilter("ignore")
                figure = draw()
        except Exception as exc:  # e.g. importances need two complete trials that differ
            figures[key] = Figure(title, missing=error_line(exc))
            continue
        figure.update_layout(title=None, margin={"t": 30, "l": 60, "r": 20, "b": 50}, height=460)
        figures[key] = Figure(title, figure.to_html(full_html=False, include_plotlyjs=False, config=FIGURE_CONFIG))
    return figures


def _intermediate(study: optuna.Study, records: list[store.TrialRecord], several: bool) -> Any:
    """Optuna's intermediate-values plot; pruned trials dashed. A multi-objective study has no intermediate values
    in Optuna (its reports take one objective): its curves come from the histories its trials record."""
    import plotly.graph_objects as go

    state = {r.number: r.state for r in records}
    if not several:
        figure = optuna.visualization.plot_intermediate_values(study)
        for trace in figure.data:
            number = int(str(trace.name).removeprefix("Trial"))
            if state.get(number) == "PRUNED":
                trace.line = {"dash": "dash"}
        return figure
    figure = go.Figure()
    for r in records:
        if r.history:
            figure.add_trace(go.Scatter(x=[h["epoch"] for h in r.history], y=[h["val_accuracy"] for h in r.history],
                                        mode="lines+markers", name=f"Trial{r.number}",
                                        line={"dash": "dash"} if r.state == "PRUNED" else None))
    figure.update_layout(xaxis_title="Step", yaxis_title="val_accuracy")
    return figure


# --------------------------------------------------------------------------------------------------
# Tables


def _pruned(records: list[store.TrialRecord]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        if r.state != "PRUNED":
            continue
        reason = PruneReason.from_dict(r.prune_reason)
        rows.append({"trial": r.number, "why": r.fail_reason or "pruned",
                     "epoch": reason.epoch if reason else len(r.history),
                     "value": f"{reason.value:.4f}" if reason else "-",
                     "compared": f"{reason.compared_with:.4f}" if reason else "-",
                     "rule": reason.rule if reason else (r.fail_detail or "(recorded before prune reasons were)")})
    return rows


def _values(spec: StudySpec, values: list[float] | None) -> dict[str, str]:
    shown = {}
    for metric, value in zip(spec.metrics, values or [], strict=False):
        shown[metric] = f"{value:,.0f}" if metric in ("parameter_count", "flops_per_image") else f"{value:.4f}"
    return shown


def _top(spec: StudySpec, records: list[store.TrialRecord]) -> list[dict[str, Any]]:
    complete = [r for r in records if r.state == "COMPLETE" and r.values]
    complete.sort(key=lambda r: r.first_value, reverse=spec.directions[0] == "maximize")
    return [{"trial": r.number, "values": _values(spec, r.values), "minutes": f"{r.seconds / 60:.1f}",
             "params": ", ".join(f"{k}={_short(v)}" for k, v in r.sampled.items()),
             "feasible": r.feasible} for r in complete[:TOP_TRIALS]]


def _front_rows(spec: StudySpec, choice: pareto.Choice) -> list[dict[str, Any]]:
    chosen = choice.trial.number if choice.trial else None
    ordered = sorted(choice.front, key=lambda r: r.first_value, reverse=spec.directions[0] == "maximize")
    return [{"trial": r.number, "values": _values(spec, r.values), "chosen": r.number == chosen,
             "params": ", ".join(f"{k}={_short(v)}" for k, v in r.sampled.items())} for r in ordered]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------------
# The champion, provenance


def _chosen(spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage, decision: pareto.Choice,
            standings: champion.Standings | None) -> tuple[store.TrialRecord | None, champion.Standings | None]:
    """The champion's search trial (the champion phase's choice over seeds when the study has one) and that phase's
    table (`standings` when given)."""
    best = decision.trial
    if spec.confirmation is None or best is None:
        return best, None
    table = standings or champion.standings(spec, study, champion.find_companion(storage, study.study_name))
    return (table.champion.trial if table.champion is not None else best), table


def _champion(spec: StudySpec, study: optuna.Study, best: store.TrialRecord | None, rule: str,
              table: champion.Standings | None, exports: Path) -> dict[str, Any]:
    """`rule`: how a multi-objective study's champion was picked from its front ('' for one objective)."""
    found: dict[str, Any] = {"trial": best.number if best else None,
                             "values": _values(spec, best.values) if best else {},
                             "params": best.params if best else None, "rule": rule, "phase": None, "export": None}
    if table is not None:
        found["phase"] = {"seeds": table.seeds, "reason": table.reason, "rows": table.rows()}
    found["export"] = _export(exports / spec.name, study.study_name)
    return found


def _export(directory: Path, study_name: str) -> dict[str, Any] | None:
    """The export's test figures and pictures, when `make export-best` wrote one for this study version."""
    try:
        config = json.loads((directory / "config.json").read_text())
        metrics = json.loads((directory / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("study") != study_name:
        return None  # an export of another version of the study file

    def picture(name: str) -> str:
        path = directory / name
        return base64.b64encode(path.read_bytes()).decode() if path.is_file() else ""

    return {"trial": config.get("trial_number"), "repeat": config.get("repeat", 0),
            "test_accuracy": metrics.get("test_accuracy"), "test_correct": metrics.get("test_correct"),
            "test_images": metrics.get("test_images"), "latency_ms": metrics.get("cpu_latency_ms_batch1_median"),
            "confusion": picture("confusion_matrix.png"), "mistakes": picture("misclassified.png"),
            "path": str(directory)}


def _provenance(best: store.TrialRecord | None) -> dict[str, str]:
    found = {"code (this report)": revision.git_commit(), "python": platform.python_version()}
    for package in ("torch", "torchvision", "optuna", "mlflow", "plotly"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    if best is not None:
        found |= {"dataset digest": best.dataset_digest or "-", "split hash": best.split_hash or "-",
                  "champion trial ran on": f"{best.device}, {best.precision}, {best.threads} threads, seed {best.seed}"}
    return found
