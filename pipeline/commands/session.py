"""`make search` as one call: `run_search(spec, options, view) -> SearchOutcome`.

It opens the store, the study, the data and (unless it is off) MLflow tracking, runs the search loop
in this process or in worker processes, then writes the study's report to MLflow and registers its
champion. What it shows goes through `view` (views.py draws it on the console, a worker's view sends
event lines to its coordinator); the trial-level work is search.py's, the MLflow side tracking.py's.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch

from pipeline import store
from pipeline.commands import replay
from pipeline.data import loading
from pipeline.infra import urls
from pipeline.infra.urls import hide_in, shown
from pipeline.search import champion, loop, pareto, workers
from pipeline.search.events import Listener, Listeners, TrialEnded
from pipeline.search.options import SearchOptions, SearchOutcome, SearchView
from pipeline.spec import hparams, paths
from pipeline.spec.errors import BadInput
from pipeline.spec.sources import DEFAULT_VAL_SIZE
from pipeline.spec.studies import StudySpec
from pipeline.training import train

PARENT_SETTLE_SECONDS = 1.0
TOP = 5  # trials in the end-of-search table


def run_search(spec: StudySpec, options: SearchOptions, view: SearchView) -> SearchOutcome:
    """Run or resume the study until its budget is reached, the time is spent or a signal arrives."""
    device = train.pick_device(options.device)
    options, why_workers = _decide_workers(spec, options, device)
    tracking = Tracking.connect(spec, view) if options.tracking else Tracking.off()
    storage = store.open_storage(options.storage, spec.name, options.workers)
    # The data first: a missing or corrupt dataset stops here, before a study or an MLflow run is made. Before
    # any worker starts, too, so the data lands once; the coordinator of workers keeps it off the GPU.
    prepared = replay.study_data(spec, options.root, device if options.workers == 1 else "cpu")
    salt = f"{socket.gethostname()}/worker{options.worker}" if options.worker is not None else ""
    study = store.open_study(spec, storage.backend, fresh=options.fresh, log=view.say,
                             on_create=lambda new_study: tracking.start(spec, new_study, contested=False),
                             sampler_salt=salt)
    tracking.start(spec, study)  # joins the parent run the study's creator opened (a no-op for the creator)
    if options.worker is None:
        view.header(_header(spec, study, prepared, device, options, storage.url))
        if why_workers:
            view.say(why_workers)
    if options.workers > 1 and storage.url.startswith("sqlite:"):
        view.note(f"{options.workers} workers share the SQLite file {storage.url}: Optuna advises a journal file "
                  "(STORAGE=studies/optuna.journal) or PostgreSQL for parallel workers")
    listener = Listeners(view, tracking.listener)
    resume = resume_command(spec, options, storage.url)
    outcome = SearchOutcome(study.study_name, 0, "budget", 0.0, workers=options.workers, resume_command=resume)
    started, status = time.monotonic(), "FINISHED"
    try:
        if options.workers > 1:
            prepared = None  # each worker loads its own copy; the coordinator need not hold one for the whole run
            outcome.ran, outcome.stop_reason = _with_workers(spec, study, storage.url, device, options, view)
        else:
            with view.running(spec, lambda: _status(study)):
                searched = loop.run(spec, study, prepared, listener, threads=options.threads,
                                    checkpoints=loop.checkpoint_folder(options.studies_dir, storage.url,
                                                                       study.study_name))
            outcome.ran, outcome.stop_reason = searched.ran, searched.stop_reason
        if spec.confirmation is not None and options.worker is None:  # a coordinator runs the phase itself
            if prepared is None:  # after workers: this process trains the phase's runs itself
                prepared = replay.study_data(spec, options.root, device)
            outcome.champion = _champion_phase(spec, study, storage, prepared, options, view, tracking)
    except loop.Interrupted as exc:
        outcome.stop_reason, outcome.signal_number, status = "interrupted", exc.signal_number, "KILLED"
    except loop.StudyStopped as exc:
        outcome.stop_reason, outcome.failure, status = "failed", str(exc), "FAILED"
    outcome.seconds = time.monotonic() - started
    _standings(spec, study, outcome)
    view.ended(spec, outcome)
    if options.worker is None:  # a worker's coordinator writes the page and closes the study's MLflow side
        page = report_page(spec, study, storage.backend, options, view.warning, outcome.decision)
        outcome.messages = tracking.finish(spec, study, storage.backend, status, outcome.decision, warn=view.warning,
                                           page=page)
        if page is not None:
            outcome.messages.append(f"report: {page}")
    return outcome


def report_page(spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage, options: SearchOptions,
                warn: Callable[[str], None], decision: pareto.Choice) -> Path | None:
    """Refresh the study's report page (reportpage.py). A page that cannot be written only warns: every trial is
    saved, and `make report` tries again."""
    from pipeline.reports import reportpage  # plotly and the templates: only at the end of a search

    try:
        return reportpage.write(spec, study, storage, options.reports_dir, options.exports_dir, options.studies_dir,
                                decision)
    except Exception as exc:
        warn(f"warning: the report page could not be written ({type(exc).__name__}: "
             f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); `make report STUDY={spec.name}` tries again")
        return None


def _champion_phase(spec: StudySpec, study: optuna.Study, storage: store.Storage,
                    prepared: loading.PreparedData, options: SearchOptions, view: SearchView,
                    tracking: Tracking) -> champion.PhaseOutcome:
    """The search's best configurations trained again over seeds (champion.py), in this process."""
    phase = champion.Phase(spec, study, storage.backend)
    view.say(phase.announcement())
    with view.running(spec, phase.status, total=len(phase.wanted), what="champion runs"):
        return phase.run(prepared, Listeners(view, tracking.confirmations), threads=options.threads,
                         checkpoints=loop.checkpoint_folder(options.studies_dir, storage.url,
                                                              phase.companion.study_name))


def _decide_workers(spec: StudySpec, options: SearchOptions, device: torch.device) -> tuple[SearchOptions, str]:
    """The options with a number of workers (WORKERS=auto decided here), and the line that says why ('' when the
    user chose). A worker process is one worker."""
    if options.worker is not None:
        return dataclasses.replace(options, workers=1), ""
    if options.workers != workers.AUTO:
        if options.workers < 1:
            raise BadInput(f"WORKERS={options.workers}: expected a number of worker processes >= 1 or auto, "
                           "e.g. WORKERS=4")
        return options, ""
    url = store.storage_url(options.storage, spec.name, workers=2)  # where the study lives, or would with workers
    count, why = workers.auto_count(device.type, url, options.threads, spec.trials)
    return dataclasses.replace(options, workers=count), why


def resume_command(spec: StudySpec, options: SearchOptions, url: str) -> str:
    """The command that continues this study: the same store, workers and tracking as this run.

    A store named by STORAGE or --storage is repeated (quoted, its password masked: the user's environment or
    shell history has it); the default one needs no mention.
    """
    parts = ["make search", f"STUDY={spec.name}"]
    if options.workers > 1:
        parts.append(f"WORKERS={options.workers}")
    if options.storage or os.environ.get("STORAGE"):
        parts.append(f"STORAGE={shlex.quote(urls.shown(url))}")
    if not options.tracking:
        parts.append("TRACKING=off")
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        parts.insert(0, f"MLFLOW_TRACKING_URI={shlex.quote(urls.shown(os.environ['MLFLOW_TRACKING_URI']))}")
    return " ".join(parts)


def _status(study: optuna.Study) -> tuple[int, list[float] | None]:
    """What a progress view shows of the study: finished trials and the best values so far."""
    return store.finished_count(study), store.best_values(study)


def _standings(spec: StudySpec, study: optuna.Study, outcome: SearchOutcome) -> None:
    """The study's champion (decided once here, then shown, put on the page and registered) and its top trials:
    the best five, or (several objectives) the front, most accurate first."""
    outcome.finished = store.finished_count(study)
    outcome.decision = pareto.decide(spec, study)
    reverse = spec.directions[0] == "maximize"
    if len(spec.objectives) > 1:
        outcome.top = sorted(outcome.decision.front, key=lambda r: r.values[0], reverse=reverse)
    else:
        complete = store.records(study, (optuna.trial.TrialState.COMPLETE,))
        outcome.top = sorted(complete, key=lambda r: r.values[0], reverse=reverse)[:TOP]


def _header(spec: StudySpec, study: optuna.Study, prepared: Any, device: torch.device, options: SearchOptions,
            url: str) -> str:
    shape = "x".join(map(str, prepared.input_shape))
    # With workers, each says where its data went on its own line ("worker N: data ...").
    placement = prepared.placement if options.workers == 1 else "placed by each worker, below"
    return (f"{study.study_name}: {spec.description or spec.name} | {prepared.dataset} "
            f"{len(prepared.train):,}/{len(prepared.val):,} images {shape} ({placement}, digest "
            f"{prepared.checksum}), {device}, sampler {spec.sampler}, "
            f"pruner {spec.pruner}, budget {spec.trials} trials / {spec.timeout_minutes:g} min"
            + (f" | {options.workers} workers, storage {shown(url)}" if options.workers > 1 else ""))


def _with_workers(spec: StudySpec, study: optuna.Study, url: str, device: torch.device, options: SearchOptions,
                  view: SearchView) -> tuple[int, str]:
    """WORKERS=N: N worker processes on the study, one view of all of them here.

    Ctrl-C (or SIGTERM/SIGHUP) is passed on to every worker, which fails and re-queues its running trial
    and stops; a second one makes them stop at once. Raises Interrupted or TooManyFailures like a search.
    """
    # GPUs are shared out when the device is left to us; `--device cuda:1` keeps every worker on that GPU.
    gpus = workers.visible_gpus() if device.type == "cuda" and options.device in ("auto", "cuda") else []
    plans = workers.plan(options.workers, options.threads, gpus)
    pool = workers.Workers(workers.worker_command(spec, options), plans, workers.storage_environment(url))
    for p in plans:
        gpu = f"CUDA_VISIBLE_DEVICES={p.gpu}, " if p.gpu is not None else ""
        view.say(f"worker {p.index}: pid {pool.processes[p.index].pid}, {gpu}"
                 f"{p.threads} thread{'s' if p.threads > 1 else ''}")
    coordinated = workers.coordinate(pool, view.workers_view(spec, lambda: _status(study), pool))
    if coordinated.signal_number is not None:
        raise loop.Interrupted(coordinated.signal_number)
    if coordinated.failure is not None:
        raise loop.TooManyFailures(coordinated.failure)
    if store.finished_count(study) < spec.trials and "timeout" not in coordinated.stop_reasons:
        raise loop.TooManyFailures(f"every worker stopped before the budget was reached (exit codes "
                                     f"{pool.exit_codes()}); see the lines above")
    return coordinated.ran, "timeout" if "timeout" in coordinated.stop_reasons else "budget"


# --------------------------------------------------------------------------------------------------
# MLflow: the one place the search reaches it


def evaluation_set(spec: StudySpec) -> str:
    """What a validation score was measured on: scores of different sets are not compared for the champion."""
    where = spec.dataset if isinstance(spec.dataset, str) else f"{spec.dataset.path}@{spec.dataset.image_size}"
    return f"{where}/val_size={spec.val_size}/val_limit={spec.val_limit}"


class Tracking:
    """The study's MLflow parent run across one invocation; `Tracking.off()` does nothing at every step."""

    def __init__(self, client: Any | None):
        self.client = client
        self.run: Any | None = None  # tracking.StudyRun once started

    @classmethod
    def connect(cls, spec: StudySpec, view: SearchView) -> Tracking:
        """Reach the tracking store now: an unreachable one stops the search before any training."""
        from pipeline.tracking import connection

        uri = connection.tracking_uri()
        client = connection.connect(uri)
        view.say(f"tracking to MLflow at {shown(uri)}")
        return cls(client)

    @classmethod
    def off(cls) -> Tracking:
        return cls(None)

    @property
    def listener(self) -> Listener:
        return self.run if self.run is not None else Listener()

    @property
    def confirmations(self) -> Listener:
        """The champion phase's runs: child runs of the same parent, tagged as confirmations of their trial."""
        return self.run.confirmations() if self.run is not None else Listener()

    def start(self, spec: StudySpec, study: optuna.Study, contested: bool = True) -> None:
        """Open (or reopen) the study's parent run; its id lives in the study so every invocation finds it.

        `contested=False` for the study's creator, whom nobody can have raced yet. Otherwise two processes
        that both found none may have made one each: the last recorded wins, the other steps aside.
        """
        if self.client is None or self.run is not None:
            return
        from pipeline.tracking import study_run

        recorded = store.parent_run_id(study)
        self.run = study_run.StudyRun(self.client, study.study_name, spec.name, spec.metrics[0], spec.directions[0],
                                     recorded, spec.description)
        if self.run.parent_run_id != recorded:
            store.record_parent_run_id(study, self.run.parent_run_id)
            if contested:
                time.sleep(PARENT_SETTLE_SECONDS)
                final = store.parent_run_id(study)  # read from the storage, not cached
                if final != self.run.parent_run_id:
                    self.run.adopt_parent(final)

    def finish(self, spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage, status: str,
               decision: pareto.Choice, warn: Callable[[str], None], page: Path | None = None) -> list[str]:
        """End of an invocation: close runs of killed trials, refresh the parent's report, register the champion
        (the champion phase's, else the best trial). MLflow out of reach only warns: the trials are safe in Optuna
        and the next run catches up."""
        if self.run is None:
            return []
        try:
            lines = self._finish(spec, study, storage, status, decision, page)
        except Exception as exc:
            reason = hide_in(str(exc).splitlines()[0][:200], self.client.tracking_uri)
            warn(f"warning: MLflow could not record the end of this run ({type(exc).__name__}: "
                      f"{reason}); the trials are saved in Optuna and the next run "
                      "brings MLflow up to date")
            return []
        return [*lines, f"MLflow: `make ui STUDY={spec.name}` shows the study's runs (experiment "
                        f"{study.study_name!r})"]

    def _finish(self, spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage,
                status: str, decision: pareto.Choice, page: Path | None) -> list[str]:
        from pipeline.tracking import report

        records = store.records(study)
        companion = champion.find_companion(storage, study.study_name) if spec.confirmation is not None else None
        closed = self.run.close_orphans(_ended(records))
        if companion is not None:
            closed += self.run.confirmations().close_orphans(_ended(store.records(companion)))
        lines = []
        if closed:
            lines.append(f"{closed} MLflow run(s) left RUNNING (a killed process, or MLflow out of reach) closed "
                         "with their trial's outcome")
        best = decision.trial
        standings = champion.standings(spec, study, companion) if spec.confirmation is not None and best else None
        counts = {state: sum(r.state == state for r in records) for state in ("COMPLETE", "PRUNED", "FAIL")}
        with tempfile.TemporaryDirectory() as tmp:
            report.write_report(spec, study, best, Path(tmp))
            if page is not None:
                shutil.copyfile(page, Path(tmp) / "report.html")
            if standings is not None:
                self.run.champion_standings(standings, Path(tmp))
            self.run.finish(Path(tmp), best.number if best else None, best.values[0] if best else None, counts,
                            status)
        if standings is not None and standings.exported is not None:
            lines.append(self.run.register_confirmed(standings, evaluation_set(spec)))
        elif best is not None:
            rule = decision.reason if spec.pareto_choice is not None else None
            lines.append(self.run.register_champion(best.number, best.values[0], evaluation_set(spec), rule))
        return lines


def _ended(records: list[store.TrialRecord]) -> dict[int, TrialEnded]:
    return {r.number: loop.trial_ended(r) for r in records if r.state in ("COMPLETE", "PRUNED", "FAIL")}



# --------------------------------------------------------------------------------------------------
# make train: one training run, no study


@dataclass(frozen=True)
class TrainOptions:
    dataset: Any  # a dataset name or a sources.FolderSource
    root: Path = paths.DATA_ROOT
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    val_size: int | None = DEFAULT_VAL_SIZE
    train_limit: int | None = None
    val_limit: int | None = None
    checkpoint: Path | None = None  # saved every epoch; resumed when it exists


class TrainView(Protocol):
    def header(self, text: str) -> None: ...
    def batch_done(self, done: int, total: int) -> None: ...
    def epoch_ended(self, metrics: train.EpochMetrics) -> None: ...


def train_one(params: dict[str, Any], options: TrainOptions, view: TrainView) -> train.TrainResult:
    """`make train`: train `params` once on the dataset and return the result (history, best epoch, model)."""
    resolved = hparams.resolve_params(params)  # bad parameters stop here, before the data is loaded
    device = train.pick_device(options.device)
    prepared = loading.prepare(options.dataset, options.root, device, val_size=options.val_size,
                            train_limit=options.train_limit, val_limit=options.val_limit)
    view.header(f"{resolved['model']} on {prepared.dataset} ({len(prepared.train):,} train / "
                f"{len(prepared.val):,} val, {'x'.join(map(str, prepared.input_shape))} {prepared.placement}, split "
                f"{prepared.split_hash}), {device}, precision {train.pick_precision(resolved['precision'], device)}, "
                f"seed {options.seed}")
    return train.fit(params, prepared, device, callbacks=[view.epoch_ended], seed=options.seed,
                     checkpoint=options.checkpoint, threads=options.threads, on_batch=view.batch_done)
