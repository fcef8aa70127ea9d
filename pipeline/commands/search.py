"""`make search` as one call: `run_search(spec, options, view) -> SearchOutcome`.

It opens the store, the study, the data and (unless it is off) MLflow tracking, runs the search loop
in this process or in worker processes, then the champion phase when the study has one, writes the study's
report page and closes the study's MLflow side. What it shows goes through `view`, an events.SearchView
(console/search_view.py draws it on the console, a worker's workers.EventView sends event lines to its
coordinator); the trial-level work is search/loop.py's, the MLflow side tracking/lifecycle.py's.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import optuna
import torch

from pipeline import store
from pipeline.data import loading
from pipeline.data.recorded import study_data
from pipeline.infra import urls
from pipeline.infra.urls import shown
from pipeline.search import loop, pareto, plan, plan_record, planned, seeds, sharing, workers
from pipeline.search.champion import Standings, rung_suffix
from pipeline.search.events import Listeners, SearchView
from pipeline.search.options import SearchOptions, SearchOutcome
from pipeline.search.stopping import Interrupted, StudyStopped, TooManyFailures
from pipeline.search.trial_files import checkpoint_folder
from pipeline.spec import paths
from pipeline.spec.errors import BadInput
from pipeline.spec.stop_reason import StopReason
from pipeline.spec.studies import StudySpec
from pipeline.tracking.lifecycle import Tracking
from pipeline.training.device import pick_device

TOP = 5  # trials in the end-of-search table


def run_search(spec: StudySpec, options: SearchOptions, view: SearchView) -> SearchOutcome:
    """Run or resume the study until its budget is reached, the time is spent or a signal arrives."""
    device = pick_device(options.device)
    options, why_workers = decide_workers(spec, options, device, view.say)
    user_tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")  # MLflow sets it for its own children once connected
    tracking = Tracking.connect(view.say) if options.tracking else Tracking.off()
    storage = store.open_storage(options.storage, spec.name, options.worker_count)
    # The data first: a missing or corrupt dataset stops here, before a study or an MLflow run is made. Before
    # any worker starts, too, so the data lands once; the coordinator of workers keeps it off the GPU.
    prepared = study_data(spec, options.root, device if options.worker_count == 1 else "cpu")
    salt = f"{socket.gethostname()}/worker{options.worker}" if options.worker is not None else ""
    study = store.open_study(spec, storage.backend,
                             fresh=options.fresh, log=view.say,
                             on_create=lambda new_study: tracking.start(spec, new_study, contested=False),
                             sampler_salt=salt)
    tracking.start(spec, study)  # joins the parent run the study's creator opened (a no-op for the creator)
    if options.worker is None:
        view.header(_header(spec, study, prepared, device, options, storage.url))
        if why_workers:
            view.say(why_workers)
    if options.worker_count > 1 and storage.url.startswith("sqlite:"):
        view.note(f"{options.worker_count} workers share the SQLite file {storage.url}: Optuna advises a journal file "
                  "(STORAGE=studies/optuna.journal) or PostgreSQL for parallel workers")
    listener = Listeners(view, tracking.listener)
    resume = resume_command(spec, options, storage.url, user_tracking_uri)
    outcome = SearchOutcome(study.study_name, 0, StopReason.BUDGET, 0.0, workers=options.worker_count,
                            resume_command=resume)
    started, status = time.monotonic(), "FINISHED"
    try:
        if spec.planned:
            _planned(spec, study, storage, prepared, device, options, view, tracking, outcome)
        elif options.worker_count > 1:
            del prepared  # each worker loads its own copy; the coordinator need not hold one for the whole run
            outcome.ran, outcome.stop_reason = _with_workers(spec, study, storage.url, device, options, view)
        else:  # one process: this one, on the data loaded above
            with view.running(spec, lambda: _status(study)):
                searched = loop.run(spec, study, prepared, listener, threads=options.threads,
                                    checkpoints=checkpoint_folder(options.studies_dir, storage.url, study.study_name))
            outcome.ran, outcome.stop_reason = searched.ran, searched.stop_reason
        if spec.confirmation is not None and options.worker is None and not spec.planned:  # run by the coordinator
            # After workers, this process trains the phase's runs itself: the data again, on the device.
            phase_data = prepared if options.worker_count == 1 else study_data(spec, options.root, device)
            outcome.champion = _champion_phase(spec, study, storage, phase_data, options, view, tracking)
    except Interrupted as exc:
        outcome.stop_reason, outcome.signal_number, status = StopReason.INTERRUPTED, exc.signal_number, "KILLED"
    except StudyStopped as exc:
        outcome.stop_reason, outcome.failure, status = StopReason.FAILED, str(exc), "FAILED"
    outcome.seconds = time.monotonic() - started
    decision = _standings(spec, study, outcome)
    view.ended(spec, outcome)
    if options.worker is None:  # a worker's coordinator writes the page and closes the study's MLflow side
        standings = outcome.champion.standings if outcome.champion is not None else None  # the phase's, once
        page = report_page(spec, study, storage.backend, options, view.warning, decision, standings)
        outcome.messages = tracking.finish(spec, study, storage.backend, status, decision, warn=view.warning,
                                           page=page, standings=standings)
        if page is not None:
            outcome.messages.append(f"report: {page}")
    return outcome


def _planned(spec: StudySpec, study: optuna.Study, storage: store.Storage, prepared: loading.PreparedData,
             device: torch.device, options: SearchOptions, view: SearchView, tracking: Tracking,
             outcome: SearchOutcome) -> None:
    """`outcome`'s runs, stop reason, champion phase and (a coordinator's, whatever ends it) what a rerun would do
    with the time left, from a planned search (`_planned_search`)."""
    try:
        outcome.ran, outcome.stop_reason, outcome.champion = _planned_search(spec, study, storage, prepared, device,
                                                                             options, view, tracking)
    finally:
        outcome.time_left = planned.time_left(spec, study) if options.worker is None else None


def _planned_search(spec: StudySpec, study: optuna.Study, storage: store.Storage, prepared: loading.PreparedData,
                    device: torch.device, options: SearchOptions, view: SearchView,
                    tracking: Tracking) -> tuple[int, StopReason, seeds.PhaseOutcome | None]:
    """A planned search (search/planned.py): the plan (made, or the study's), rung 0 here or on the workers, then
    (a coordinator) the later rungs and the champion phase on all the threads. The minutes it spends are added to
    the study's, whatever ends it."""
    if options.worker is not None:  # the coordinator made and stored the plan, and says the deadline
        made = plan_record.stored(study)
        if made is None or options.deadline is None:
            raise BadInput("a planned search's worker needs its coordinator's plan and deadline (--deadline)")
        searched = planned.rung_zero(spec, study, prepared, Listeners(view, tracking.listener), made,
                                     planned.RunClock(time.time(), options.deadline), options.threads,
                                     checkpoint_folder(options.studies_dir, storage.url, study.study_name))
        return searched.ran, searched.stop_reason, None
    clock = planned.RunClock.start(spec, study, options.started)
    made = planned.current(spec, study, lambda minutes: planned.make(
        spec, prepared, device, options.worker_count, options.threads, options.root, view.say, minutes),
        setup_seconds=time.time() - clock.started)
    for line in plan.table(made, datetime.fromtimestamp(clock.started - plan_record.minutes_spent(study) * 60)):
        view.say(line)
    ticker = plan_record.Ticker(study, since=clock.started)
    try:
        return _stages(spec, study, storage, prepared, device, options, view, tracking, made, clock, ticker)
    finally:
        ticker.tick()


def _stages(spec: StudySpec, study: optuna.Study, storage: store.Storage, prepared: loading.PreparedData,
            device: torch.device, options: SearchOptions, view: SearchView, tracking: Tracking, made: plan.Plan,
            clock: planned.RunClock, ticker: plan_record.Ticker) -> tuple[int, StopReason, seeds.PhaseOutcome | None]:
    """The plan's stages, each in turn while the clock has time; `ticker` counts the minutes they spend."""
    checkpoints = checkpoint_folder(options.studies_dir, storage.url, study.study_name)
    ran = 0
    if plan_record.passed(made, study, "rung 0"):
        view.say("rung 0 was done by an earlier run: the study goes on from where it was")
    elif options.worker_count > 1:
        plan_record.reach(study, "rung 0")
        del prepared  # each worker loads its own copy
        with_deadline = dataclasses.replace(options, deadline=clock.deadline)
        ran, _ = _with_workers(spec, study, storage.url, device, with_deadline, view)
        ticker.tick()
        prepared = study_data(spec, options.root, device)
    else:
        plan_record.reach(study, "rung 0")
        with view.running(spec, lambda: _status(study), total=made.rungs[0].configs, what="rung 0"):
            ran = planned.rung_zero(spec, study, prepared, Listeners(view, tracking.listener, ticker), made, clock,
                                    options.threads, checkpoints).ran
    for stage in made.rungs[1:]:
        if clock.seconds_left <= 0:
            return ran, StopReason.TIME, None
        if plan_record.passed(made, study, stage.name):
            continue
        plan_record.reach(study, stage.name)
        made, more = _later_rung(spec, study, storage, prepared, options, view, tracking, made, stage, clock, ticker)
        ran += more
    if clock.seconds_left <= 0:
        return ran, StopReason.TIME, None
    plan_record.reach(study, "champion")
    made, rates = planned.replanned(spec, study, made, made.champion, clock, prepared)
    view.say(made.warnings[-1])
    phase, phase_clock = planned.champion_phase(spec, study, storage.backend, made, rates, clock, prepared)
    view.say(phase.announcement())
    with view.running(spec, phase.status, total=len(phase.wanted), what="champion runs"):
        outcome = phase.run(prepared, Listeners(view, tracking.confirmations, ticker), options.threads,
                            checkpoint_folder(options.studies_dir, storage.url, phase.companion.study_name),
                            phase_clock)
    if outcome.stop_reason != StopReason.DONE:  # what a rerun does with the minutes: time_left, at the end
        chosen = ("the champion is the best of those with all their seeds" if outcome.standings.champion is not None
                  else "no configuration has all its seeds yet")
        view.note(f"champion phase: {outcome.standings.missing} run(s) would not end by the deadline: {chosen}")
    stop = StopReason.BUDGET if outcome.stop_reason == StopReason.DONE else StopReason.TIME
    return ran + outcome.ran, stop, outcome


def _later_rung(spec: StudySpec, study: optuna.Study, storage: store.Storage, prepared: loading.PreparedData,
                options: SearchOptions, view: SearchView, tracking: Tracking, made: plan.Plan, stage: plan.Stage,
                clock: planned.RunClock, ticker: plan_record.Ticker) -> tuple[plan.Plan, int]:
    """Rung `stage` (above 0), planned again as it starts, then widened while the plan made again after its runs
    gives it more configurations; the plan as it then stands and the runs trained."""
    checkpoints = checkpoint_folder(options.studies_dir, storage.url, study.study_name + rung_suffix(stage.rung or 0))
    again: tuple[plan.Plan, plan.Rates] | None = planned.replanned(spec, study, made, stage, clock, prepared)
    ran, wording = 0, "the best {} configurations again"
    while again is not None:
        made, rates = again
        stage = made.stage(stage.name)
        view.say(made.warnings[-1])
        view.say(f"{stage.name}: {wording.format(stage.configs)}, {stage.images:,} images x {stage.epochs} epochs")
        with view.running(spec, lambda: _status(study), total=stage.configs, what=stage.name):
            rung = planned.later_rung(spec, study, storage.backend, prepared,
                                      Listeners(view, tracking.confirmations, ticker), made, rates, stage, clock,
                                      options.threads, checkpoints)
        ran += rung.ran
        if rung.stop_reason == StopReason.TIME:
            view.note(f"{stage.name}: its next run would not end by the stage's end; the champion phase takes the "
                      "best of the runs done")
        if rung.stop_reason != StopReason.DONE:
            break
        again, wording = planned.widened(spec, study, made, stage, clock, prepared), "widened to the best {}"
    return made, ran


def report_page(spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage, options: SearchOptions,
                warn: Callable[[str], None], decision: pareto.Choice,
                standings: Standings | None = None) -> Path | None:
    """Refresh the study's report page (reportpage.py). A page that cannot be written only warns: every trial is
    saved, and `make report` tries again."""
    from pipeline.reports import reportpage  # plotly and the templates: only at the end of a search

    try:
        return reportpage.write(spec, study, storage, options.reports_dir, options.exports_dir, options.studies_dir,
                                decision, standings)
    except Exception as exc:
        warn(f"warning: the report page could not be written ({type(exc).__name__}: "
             f"{urls.error_line(exc, limit=200)}); `make report STUDY={spec.name}` tries again")
        return None


def _champion_phase(spec: StudySpec, study: optuna.Study, storage: store.Storage,
                    prepared: loading.PreparedData, options: SearchOptions, view: SearchView,
                    tracking: Tracking) -> seeds.PhaseOutcome:
    """The search's best configurations trained again over seeds (seeds.py), in this process."""
    phase = seeds.Phase(spec, study, storage.backend)
    view.say(phase.announcement())
    with view.running(spec, phase.status, total=len(phase.wanted), what="champion runs"):
        return phase.run(prepared, Listeners(view, tracking.confirmations), threads=options.threads,
                         checkpoints=checkpoint_folder(options.studies_dir, storage.url, phase.companion.study_name))


def decide_workers(spec: StudySpec, options: SearchOptions, device: torch.device,
                   log: Callable[[str], None] | None = None) -> tuple[SearchOptions, str]:
    """The options with a number of workers (WORKERS=auto decided here), and the line that says why ('' when the
    user chose). A worker process is one worker. `log` hears of a measurement the decision needs first."""
    if options.worker is not None:
        return dataclasses.replace(options, workers=1), ""
    if isinstance(options.workers, int):  # a number, not workers.AUTO
        if options.workers < 1:
            raise BadInput(f"WORKERS={options.workers}: expected a number of worker processes >= 1 or auto, "
                           "e.g. WORKERS=4")
        return options, ""
    url = store.storage_url(options.storage, spec.name, workers=2)  # where the study lives, or would with workers
    per_gpu = 1
    if device.type == "cuda" and spec.minutes and not url.startswith("sqlite:"):  # measured: search/sharing.py
        data = study_data(spec, options.root, "cpu")
        per_gpu = sharing.per_device(sharing.measured_here(spec, data, device, options.threads, options.root, log))
    count, why = workers.auto_count(device.type, url, options.threads, spec.trial_budget, per_gpu)
    return dataclasses.replace(options, workers=count), why


def resume_command(spec: StudySpec, options: SearchOptions, url: str, tracking_uri: str | None = None) -> str:
    """The command that continues this study: the same store, workers and tracking as this run.

    A store named by STORAGE or --storage is repeated (quoted, its password masked: the user's environment or
    shell history has it), and so is the user's MLFLOW_TRACKING_URI (`tracking_uri`, read before MLflow set it);
    the default ones need no mention.
    """
    parts = ["make search", f"STUDY={spec.name}"]
    if options.worker_count > 1:
        parts.append(f"WORKERS={options.worker_count}")
    if options.storage or os.environ.get("STORAGE"):
        parts.append(f"STORAGE={shlex.quote(urls.shown(url))}")
    if not options.tracking:
        parts.append("TRACKING=off")
    elif tracking_uri and tracking_uri != paths.DEFAULT_TRACKING_URI:
        parts.insert(0, f"MLFLOW_TRACKING_URI={shlex.quote(urls.shown(tracking_uri))}")
    return " ".join(parts)


def _status(study: optuna.Study) -> tuple[int, list[float] | None]:
    """What a progress view shows of the study: finished trials and the best values so far."""
    return store.finished_count(study), store.best_values(study)


def _standings(spec: StudySpec, study: optuna.Study, outcome: SearchOutcome) -> pareto.Choice:
    """The study's champion (decided once here, then shown, put on the page and registered; returned) and its top
    trials: the best five, or (several objectives) the front, most accurate first."""
    outcome.finished = store.finished_count(study)
    outcome.decision = decision = pareto.decide(spec, study)
    reverse = spec.directions[0] == "maximize"
    if len(spec.objectives) > 1:
        outcome.top = sorted(decision.front, key=lambda r: r.first_value, reverse=reverse)
    else:
        complete = store.records(study, (optuna.trial.TrialState.COMPLETE,))
        outcome.top = sorted(complete, key=lambda r: r.first_value, reverse=reverse)[:TOP]
    return decision


def _header(spec: StudySpec, study: optuna.Study, prepared: loading.PreparedData, device: torch.device,
            options: SearchOptions, url: str) -> str:
    shape = "x".join(map(str, prepared.input_shape))
    # With workers, each says where its data went on its own line ("worker N: data ...").
    placement = prepared.placement if options.worker_count == 1 else "placed by each worker, below"
    return (f"{study.study_name}: {spec.description or spec.name} | {prepared.dataset} "
            f"{len(prepared.train):,}/{len(prepared.val):,} images {shape} ({placement}, digest "
            f"{prepared.checksum}), {device}, sampler {spec.sampler}, "
            + (f"planned to {spec.minutes:g} min" if spec.planned else
               f"pruner {spec.pruner}, budget {spec.trial_budget} trials / {spec.timeout_minutes:g} min")
            + (f" | {options.worker_count} workers, storage {shown(url)}" if options.worker_count > 1 else ""))


def _with_workers(spec: StudySpec, study: optuna.Study, url: str, device: torch.device, options: SearchOptions,
                  view: SearchView) -> tuple[int, StopReason]:
    """WORKERS=N: N worker processes on the study, one view of all of them here.

    Ctrl-C (or SIGTERM/SIGHUP) is passed on to every worker, which fails and re-queues its running trial
    and stops; a second one makes them stop at once. Raises Interrupted or TooManyFailures like a search.
    """
    # GPUs are shared out when the device is left to us; `--device cuda:1` keeps every worker on that GPU.
    gpus = workers.visible_gpus() if device.type == "cuda" and options.device in ("auto", "cuda") else []
    plans = workers.plan(options.worker_count, options.threads, gpus)
    pool = workers.Workers(workers.worker_command(spec, options), plans, workers.storage_environment(url))
    for p in plans:
        gpu = f"CUDA_VISIBLE_DEVICES={p.gpu}, " if p.gpu is not None else ""
        view.say(f"worker {p.index}: pid {pool.processes[p.index].pid}, {gpu}"
                 f"{p.threads} thread{'s' if p.threads > 1 else ''}")
    coordinated = workers.coordinate(pool, view.workers_view(spec, lambda: _status(study), pool))
    if coordinated.signal_number is not None:
        raise Interrupted(coordinated.signal_number)
    if coordinated.failure is not None:
        raise TooManyFailures(coordinated.failure)
    if spec.planned:
        return coordinated.ran, StopReason.BUDGET
    if store.finished_count(study) < spec.trial_budget and StopReason.TIMEOUT not in coordinated.stop_reasons:
        raise TooManyFailures(f"every worker stopped before the budget was reached (exit codes "
                              f"{pool.exit_codes()}); see the lines above")
    timed_out = StopReason.TIMEOUT in coordinated.stop_reasons
    return coordinated.ran, StopReason.TIMEOUT if timed_out else StopReason.BUDGET
