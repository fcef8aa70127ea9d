"""A planned search, run to the study's clock: rung 0 (the study's own sampled trials), each later rung (the best of
the rung below, trained again at more images or epochs, in a companion study `<study>:rung<r>`), then the champion
phase at full fidelity (seeds.py). The plan (plan.py) and the minutes already spent are stored with the study: a
search killed and started again goes on with the same plan and the minutes left, on any machine.

The clock: the run's deadline is its start plus the minutes the study has left, less END_SECONDS for the report.
Each stage ends early enough to leave the later stages their planned time; a run that would not end by then is not
started, and a run still training at the deadline is stopped (its last epoch's checkpoint kept) and queued again to
run first next time.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from pipeline import store
from pipeline.data.loading import PreparedData
from pipeline.infra.concurrency import available_cores
from pipeline.search import calibration, loop, plan, seeds, sharing
from pipeline.search.champion import open_companion, rung_ranking, rung_suffix, stage_runs
from pipeline.search.clock import TrialClock
from pipeline.search.events import Listener
from pipeline.search.fidelity import FULL, Fidelity, subset_seed
from pipeline.search.objective import Objective, SearchTrials
from pipeline.search.plan_record import minutes_spent, reach, store_plan, stored
from pipeline.search.workers import devices
from pipeline.spec.stop_reason import StopReason
from pipeline.spec.studies import StudySpec

END_SECONDS = 20.0  # kept at the end for the champion's choice, the report page and MLflow's closing
SETUP_NOTED_SECONDS = 10.0  # a set-up shorter than this (imports, the data) goes unmentioned in the plan's notes


# --------------------------------------------------------------------------------------------------
# The plan and the clock, stored with the study


def make(spec: StudySpec, data: PreparedData, device: torch.device, workers: int, threads: int | None,
         root: Path, log: Any = None, minutes: float | None = None) -> plan.Plan:
    """The plan of `minutes` (the study's by default) for this study on this machine: its rates measured (or read
    from the cache), `workers` trials at once at rung 0 (on a GPU, several on one at their measured shared pace),
    all the threads later."""
    whole_threads = threads or available_cores()
    each_threads = max(whole_threads // workers, 1) if device.type == "cpu" else whole_threads
    each = calibration.rates(spec, data, device, each_threads, root, log)
    whole = each if each_threads == whole_threads else calibration.rates(spec, data, device, whole_threads, root, log)
    sharing_one = math.ceil(workers / devices(device.type))
    if device.type == "cuda" and sharing_one > 1:  # several trials on one GPU: each at its measured shared pace
        each = sharing.shared_rates(whole, sharing.measured_here(spec, data, device, threads, root, log), sharing_one)
    budget = plan.Budget(minutes or spec.minutes or 0.0, len(data.train), len(data.val), len(data.classes),
                         spec.epochs, workers, *champion_asked(spec), spec.trials, len(spec.baseline))
    return plan.make_plan(budget, each, whole)


def champion_asked(spec: StudySpec) -> tuple[int, int]:
    """The configurations x seeds the study's [champion] table asks for (2 x 2 without one)."""
    table = spec.confirmation
    return (table.top_k, table.seeds) if table is not None else (2, 2)


def current(spec: StudySpec, study: optuna.Study, make_plan: Any, setup_seconds: float = 0.0) -> plan.Plan:
    """The study's stored plan, or a new one (`make_plan(minutes)`, stored) when it has none or its minutes changed.
    A new plan is made for the minutes the study has left (raised from 30 to 45 after 30 spent: 15), less the
    `setup_seconds` this command spent before the search (a fresh clone's set-up counts against the minutes), and
    starts again from rung 0: more configurations, then the rungs above and a champion among them all."""
    found = stored(study)
    if found is not None and found.minutes == spec.minutes:
        return found
    minutes, spent, setup = spec.minutes or 0.0, minutes_spent(study), max(setup_seconds, 0.0) / 60
    left = max(minutes - spent - setup, 1.0)
    made = make_plan(left)
    why = ([f"the study spent {spent:.1f} of its {minutes:g} minutes before"] if spent > 0 else []) + (
        [f"the set-up before the search took {setup:.1f} min"] if setup_seconds >= SETUP_NOTED_SECONDS else [])
    note = (f"{'; '.join(why)}: this plan is for the {left:.1f} left",) if why else ()
    made = dataclasses.replace(made, minutes=minutes, warnings=made.warnings + note)  # the study's: found next time
    store_plan(study, made)
    reach(study, "")
    return made


def time_left(spec: StudySpec, study: optuna.Study) -> str:
    """What a rerun does with the study's minutes, in plain figures."""
    minutes, spent = spec.minutes or 0.0, minutes_spent(study)
    left = minutes - spent
    if left * 60 <= END_SECONDS + plan.RESERVE_SECONDS:
        return (f"the study has spent its {minutes:g} minutes ({spent:.1f} min in all): a rerun with "
                f"MINUTES={minutes + 15:g} gives it 15 more, for more configurations and a champion among them")
    return (f"the study has {left:.1f} of its {minutes:g} minutes left: a rerun goes on where this one stopped "
            "(an interrupted run first) and ends on time")


@dataclass(frozen=True)
class RunClock:
    """This invocation's clock: when it started and when it must end (both `time.time()`)."""

    started: float
    deadline: float

    @classmethod
    def start(cls, spec: StudySpec, study: optuna.Study, started: float | None = None) -> RunClock:
        """The clock of a run that began at `started` (default: now; `make search` passes its own start, so that the
        set-up before this process counts too) and has the minutes the study has left."""
        began = min(started or time.time(), time.time())
        left = (spec.minutes or 0.0) * 60 - minutes_spent(study) * 60
        return cls(began, began + max(left - END_SECONDS, 0.0))

    @property
    def seconds_left(self) -> float:
        return max(self.deadline - time.time(), 0.0)

    def stage_end(self, made: plan.Plan, stage: str) -> float:
        """When stage `stage` must end for the later stages to get their planned time."""
        return self.deadline - made.after(stage)

    def trial_clock(self, rates: plan.Rates | None, data: PreparedData, made: plan.Plan, stage: str) -> TrialClock:
        assert rates is not None, "a stored plan carries its rates"
        return TrialClock(rates, len(data.val), self.stage_end(made, stage), self.deadline)


def replanned(spec: StudySpec, study: optuna.Study, made: plan.Plan, stage: plan.Stage, clock: RunClock,
              data: PreparedData) -> tuple[plan.Plan, plan.Rates]:
    """The plan made again as `stage` (a rung above 0, or the champion phase) starts, stored (plan.replan): the time
    left, the rates the runs so far corrected, and the sizes of the configurations it and the later stages will
    train (the best of the stage below), where the first plan could only assume the space's largest."""
    again, rates = _made_again(spec, study, stored(study) or made, stage, clock, data)  # stored: with earlier notes
    store_plan(study, again)
    return again, rates


def widened(spec: StudySpec, study: optuna.Study, made: plan.Plan, stage: plan.Stage, clock: RunClock,
            data: PreparedData) -> tuple[plan.Plan, plan.Rates] | None:
    """The plan made again when rung `stage` has trained its configurations, stored, if it gives the rung more of
    them (None otherwise): the rung's own runs, on all the threads, measured the later stages better than rung 0's
    could, and minutes the champion phase turns out not to need go to the next-best configurations of the rung
    below rather than sit unused at the end."""
    again, rates = _made_again(spec, study, stored(study) or made, stage, clock, data)
    if again.stage(stage.name).configs <= stage.configs:
        return None
    store_plan(study, again)
    return again, rates


def _made_again(spec: StudySpec, study: optuna.Study, made: plan.Plan, stage: plan.Stage, clock: RunClock,
                data: PreparedData) -> tuple[plan.Plan, plan.Rates]:
    later = _later_runs(study, made)  # read once: the rates and the margin both depend on them
    rates = later_rates(spec, study, made, len(data.val), later)
    assert rates is not None, "a stored plan carries its rates"
    measured = _measured(later)
    below = rung_ranking(spec, study, stage.rung)
    asked = champion_asked(spec)
    promoted = below[:math.ceil(len(below) / plan.KEEP)] if stage.rung is not None else below
    sizes = sorted(r.flops_per_image for r in promoted if r.flops_per_image) or [rates.promoted_flops]
    largest = max((r.flops_per_image or 0 for r in promoted[:asked[0]]), default=0) or sizes[-1]
    costs = {s.name: rates.run_seconds(s.images, s.epochs, len(data.val),
                                       largest if s.rung is None else sizes[len(sizes) // 2])
             for s in made.stages if s.rung != 0}
    done = sum(r.state == "COMPLETE" for r in stage_runs(study, stage.rung))
    now = plan.Now(clock.seconds_left, costs, len(below), done, measured)
    return plan.replan(made, stage.name, now, asked, spec.trials), rates


def corrected(rates: plan.Rates | None, runs: list[store.TrialRecord], val_images: int) -> plan.Rates | None:
    """`rates` scaled by how long the study's completed runs at them took against their estimates (the median ratio):
    the machine as it runs today, not only as the calibration's few batches saw it. Unchanged without such runs."""
    if rates is None:
        return None
    ratios = []
    for run in runs:
        if run.state != "COMPLETE" or not run.fidelity or run.resumed_from_epoch or run.seconds <= 0:
            continue
        estimate = rates.run_seconds(run.fidelity["images"], run.fidelity["epochs"], val_images,
                                     run.flops_per_image)
        ratios.append(run.seconds / estimate)
    return rates.scaled(1 / statistics.median(ratios)) if ratios else rates


def later_rates(spec: StudySpec, study: optuna.Study, made: plan.Plan, val_images: int,
                runs: list[store.TrialRecord] | None = None) -> plan.Rates | None:
    """The rates of the later stages (all the threads), corrected by the study's completed runs at them (`runs`,
    read from the study when not given), else (none yet) by how far rung 0's runs were from their own estimates."""
    runs = _later_runs(study, made) if runs is None else runs
    if _measured(runs):
        return corrected(made.whole, runs, val_images)
    if made.each is None or made.whole is None:
        return made.whole
    first = corrected(made.each, store.records(study), val_images)
    assert first is not None
    return carried_over(made.each, first, made.whole)


def _later_runs(study: optuna.Study, made: plan.Plan) -> list[store.TrialRecord]:
    """The runs of the stages after rung 0 (on all the threads)."""
    return [run for stage in made.stages if stage.rung != 0 for run in stage_runs(study, stage.rung)]


def _measured(runs: list[store.TrialRecord]) -> bool:
    """Whether any of `runs` completed, a measure of the machine at its rung."""
    return any(r.state == "COMPLETE" and r.fidelity for r in runs)


def carried_over(each: plan.Rates, first: plan.Rates, whole: plan.Rates) -> plan.Rates:
    """The rates on all the threads (`whole`), given that rung 0's trials ran at `first` where `each` was measured.
    Slower than measured carries over (a busy or throttled machine), faster does not: in two 30-minute runs rung 0's
    single-thread runs beat their estimates while the champion phase's runs on all the threads took the
    calibration's time or more (8% and 18% over the estimates so corrected)."""
    factor = each.at(None).train_seconds_per_image / first.at(None).train_seconds_per_image
    return whole.scaled(min(factor, 1.0))


def fidelity(spec: StudySpec, stage: plan.Stage) -> Fidelity:
    return Fidelity(stage.rung if stage.rung is not None else FULL, stage.images, stage.epochs, subset_seed(spec))


# --------------------------------------------------------------------------------------------------
# The stages


@dataclass(frozen=True)
class RungBudget:
    """Rung 0's budget (loop.Budget): trials until the stage's end (the plan expects `stage.configs` of them; faster
    trials than measured make more), none started that would not end by then, at most `cap` (the study's `trials`)."""

    cap: int | None
    seconds: float  # to the stage's end
    typical: float  # seconds a typical trial of the rung takes
    what: str = "trial"

    def reached(self, study: optuna.Study) -> StopReason | None:
        return StopReason.BUDGET if self.cap is not None and store.finished_count(study) >= self.cap else None

    def next(self, study: optuna.Study, deadline: float) -> loop.Next | StopReason:
        if time.monotonic() + self.typical > deadline:
            return StopReason.TIME
        if self.cap is not None and store.taken_count(study) >= self.cap:
            return loop.Next.WAIT  # other workers hold the last trials: if one of theirs fails, it is redone
        return loop.Next.TRIAL


def rung_zero(spec: StudySpec, study: optuna.Study, data: PreparedData, listener: Listener, made: plan.Plan,
              clock: RunClock, threads: int | None, checkpoints: Path | None) -> loop.LoopOutcome:
    """The study's sampled (and queued) trials at rung 0, until the rung has its configurations or its time."""
    stage = made.rungs[0]
    trial_clock = clock.trial_clock(made.each, data, made, stage.name)
    cap = spec.trials if spec.trials is not None else 1_000_000  # Optuna's surplus check wants a number
    objective = Objective(spec, data, SearchTrials(spec, cap), listener, threads, checkpoints=checkpoints,
                          fidelity=fidelity(spec, stage), clock=trial_clock)
    budget = RungBudget(spec.trials, max(trial_clock.stage_end - time.time(), 0.0), stage.seconds_each)
    return loop.run_trials(study, objective, budget)


class RungRuns:
    """A later rung's rules for the objective (objective.Role): only queued runs train, none is pruned, no model is
    kept (the champion phase trains the ones worth keeping)."""

    prunes = False

    def surplus(self, trial: optuna.Trial) -> str:
        return seeds.surplus_run(trial)

    def keep_model(self, *_: Any) -> None:
        pass


def later_rung(spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage, data: PreparedData,
               listener: Listener, made: plan.Plan, rates: plan.Rates, stage: plan.Stage, clock: RunClock,
               threads: int | None, checkpoints: Path | None) -> loop.LoopOutcome:
    """Rung r > 0 of plan `made` (as `replanned` made it when the rung started): the best `stage.configs` of what
    rung r-1 finished, trained again at this rung's fidelity, at `rates`."""
    assert stage.rung is not None and stage.rung > 0
    trials = rung_ranking(spec, study, stage.rung)[:stage.configs]
    rung = fidelity(spec, stage)
    companion = open_companion(spec, storage, study.study_name, rung_suffix(stage.rung))
    seeds.queue_missing(companion, [seeds.QueuedRun(t, 0, t.seed if t.seed is not None else 0, rung) for t in trials])
    trial_clock = clock.trial_clock(rates, data, made, stage.name)
    objective = Objective(spec, data, RungRuns(), listener, threads, checkpoints=checkpoints, clock=trial_clock)
    needs = {t.number: trial_clock.estimate(stage.images, stage.epochs, t.flops_per_image) for t in trials}
    budget = seeds.PhaseBudget(needs, max(trial_clock.stage_end - time.time(), 0.0) / 60, what=f"rung {stage.rung} run")
    return loop.run_trials(companion, objective, budget)


def champion_phase(spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage, made: plan.Plan,
                   rates: plan.Rates, clock: RunClock, data: PreparedData) -> tuple[seeds.Phase, TrialClock]:
    """The champion phase of plan `made` (as `replanned` made it when the phase started): its candidates at full
    fidelity, queued, and the clock its runs keep to."""
    return seeds.Phase(spec, study, storage, fidelity(spec, made.champion)), clock.trial_clock(rates, data, made,
                                                                                               "champion")
