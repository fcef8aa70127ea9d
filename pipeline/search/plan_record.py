"""A planned search's plan as stored with its study, the minutes its invocations have spent, and each stage of the
plan against what happened (the report page's "Plan and clock"). Torch-free: `make report` and `make studies` read
them without loading torch."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import optuna

from pipeline import store
from pipeline.search import plan
from pipeline.search.champion import stage_runs
from pipeline.search.events import Listener, TrialEnded
from pipeline.spec.studies import StudySpec

PLAN_KEY, SPENT_KEY = store.PLAN_ATTR, store.SPENT_ATTR  # the study's user attributes: the plan, the minutes spent
STAGE_KEY = "plan_stage"  # ...and the last stage a run of it started


def stored(study: optuna.Study) -> plan.Plan | None:
    found = study.user_attrs.get(PLAN_KEY)
    return plan.Plan.from_dict(found) if isinstance(found, dict) else None


def store_plan(study: optuna.Study, made: plan.Plan) -> None:
    study.set_user_attr(PLAN_KEY, made.as_dict())


def minutes_spent(study: optuna.Study) -> float:
    return float(study.user_attrs.get(SPENT_KEY, 0.0))


def add_spent(study: optuna.Study, seconds: float) -> None:
    study.set_user_attr(SPENT_KEY, minutes_spent(study) + seconds / 60)


class Ticker(Listener):
    """Adds the minutes this run spends to the study's, at every `tick()` and every trial's end, so that a run killed
    outright still leaves the minutes it used (all but those since the last tick) counted."""

    def __init__(self, study: optuna.Study, since: float | None = None):
        self.study, self.last = study, since or time.time()

    def tick(self) -> None:
        now = time.time()
        add_spent(self.study, now - self.last)
        self.last = now

    def trial_ended(self, trial: TrialEnded) -> None:
        self.tick()


def reached(study: optuna.Study) -> str | None:
    """The last stage of the plan a run of the study started (None: none yet): a resumed run goes on from there."""
    found = study.user_attrs.get(STAGE_KEY)
    return found if isinstance(found, str) else None


def reach(study: optuna.Study, stage: str) -> None:
    study.set_user_attr(STAGE_KEY, stage)


def passed(made: plan.Plan, study: optuna.Study, stage: str) -> bool:
    """Did a run of the study already go beyond stage `stage` (so a resumed run skips it)?"""
    names = [s.name for s in made.stages]
    last = reached(study)
    return last in names and names.index(stage) < names.index(last)


@dataclass(frozen=True)
class StageActual:
    """What a stage of the plan did: its runs that completed, a typical run's time, the stage's wall time."""

    stage: plan.Stage
    runs: int
    median_seconds: float | None  # of its completed runs
    wall_seconds: float | None  # from its first run's start to its last run's end

    @property
    def ratio(self) -> float | None:
        """Wall time against the plan's (1.0: on plan)."""
        return self.wall_seconds / self.stage.seconds if self.wall_seconds and self.stage.seconds else None


def actuals(spec: StudySpec, study: optuna.Study, made: plan.Plan) -> list[StageActual]:
    """Each stage of the plan against what happened (the report page's "Plan and clock")."""
    found = []
    for stage in made.stages:
        runs = stage_runs(study, stage.rung)
        done = [r for r in runs if r.state == "COMPLETE"]
        started = [r.started_at for r in runs if r.started_at is not None]
        ended = [r.completed_at for r in runs if r.completed_at is not None]
        wall = (max(ended) - min(started)).total_seconds() if started and ended else None
        median = statistics.median(r.seconds for r in done) if done else None
        found.append(StageActual(stage, len(done), median, wall))
    return found

