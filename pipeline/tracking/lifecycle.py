"""The study's MLflow life cycle across one invocation of `make search`: connect (or stay off), open or rejoin the
study's parent run, the listeners that log trials and champion-phase runs, and the end: runs of killed trials
closed, the report refreshed, the champion registered. The one place the search reaches MLflow; what it logs is
study_run.py's.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from pipeline import store
from pipeline.infra.urls import error_line, shown
from pipeline.search import champion, pareto
from pipeline.search.events import Listener, TrialEnded
from pipeline.spec.studies import StudySpec

if TYPE_CHECKING:  # annotations only: MLflow takes seconds to import, and only a tracked search needs it
    from pipeline.tracking.study_run import StudyRun

PARENT_SETTLE_SECONDS = 1.0


def evaluation_set(spec: StudySpec) -> str:
    """What a validation score was measured on: scores of different sets are not compared for the champion."""
    where = spec.dataset if isinstance(spec.dataset, str) else f"{spec.dataset.path}@{spec.dataset.image_size}"
    return f"{where}/val_size={spec.val_size}/val_limit={spec.val_limit}"


class Tracking:
    """The study's MLflow parent run across one invocation; `Tracking.off()` does nothing at every step."""

    def __init__(self, client: Any | None):
        self.client = client
        self.run: StudyRun | None = None  # once started

    @classmethod
    def connect(cls, say: Callable[[str], None]) -> Tracking:
        """Reach the tracking store now: an unreachable one stops the search before any training."""
        from pipeline.tracking import connection  # MLflow takes seconds to import: only when tracking is on

        uri = connection.tracking_uri()
        client = connection.connect(uri)
        say(f"tracking to MLflow at {shown(uri)}")
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
                if final is not None and final != self.run.parent_run_id:
                    self.run.adopt_parent(final)

    def finish(self, spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage, status: str,
               decision: pareto.Choice, warn: Callable[[str], None], page: Path | None = None,
               standings: champion.Standings | None = None) -> list[str]:
        """End of an invocation: close runs of killed trials, refresh the parent's report, register the champion
        (the champion phase's, else the best trial). `standings`: the champion phase's table when this invocation
        ran the phase (read from the stores otherwise). MLflow out of reach only warns: the trials are safe in
        Optuna and the next run catches up."""
        run = self.run
        if run is None:
            return []
        try:
            lines = self._finish(run, spec, study, storage, status, decision, page, standings)
        except Exception as exc:
            reason = error_line(exc, run.client.tracking_uri, limit=200)
            warn(f"warning: MLflow could not record the end of this run ({type(exc).__name__}: "
                      f"{reason}); the trials are saved in Optuna and the next run "
                      "brings MLflow up to date")
            return []
        return [*lines, f"MLflow: `make ui STUDY={spec.name}` shows the study's runs (experiment "
                        f"{study.study_name!r})"]

    @staticmethod
    def _finish(run: StudyRun, spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage,
                status: str, decision: pareto.Choice, page: Path | None,
                standings: champion.Standings | None) -> list[str]:
        from pipeline.tracking import report

        records = store.records(study)
        companion = champion.find_companion(storage, study.study_name) if spec.confirmation is not None else None
        closed = run.close_orphans(_ended(records))
        if companion is not None:
            closed += run.confirmations().close_orphans(_ended(store.records(companion)))
        lines = []
        if closed:
            lines.append(f"{closed} MLflow run(s) left RUNNING (a killed process, or MLflow out of reach) closed "
                         "with their trial's outcome")
        best = decision.trial
        if best is None or spec.confirmation is None:
            standings = None
        elif standings is None:  # the phase did not run in this invocation: its table as the stores hold it
            standings = champion.standings(spec, study, companion)
        counts = {state: sum(r.state == state for r in records) for state in ("COMPLETE", "PRUNED", "FAIL")}
        with tempfile.TemporaryDirectory() as tmp:
            report.write_report(spec, study, best, Path(tmp))
            if page is not None:
                shutil.copyfile(page, Path(tmp) / "report.html")
            if standings is not None:
                run.champion_standings(standings, Path(tmp))
            run.finish(Path(tmp), best.number if best else None, best.first_value if best else None, counts,
                       status)
        if standings is not None and standings.exported is not None:
            lines.append(run.register_confirmed(standings, evaluation_set(spec)))
        elif spec.planned:  # its trials are brief rung-0 runs: only the champion phase's choice is a champion
            lines.append("no champion registered yet: the champion phase has not all its runs; `make search "
                         f"STUDY={spec.name}` again completes it")
        elif best is not None:
            rule = decision.reason if spec.pareto_choice is not None else None
            lines.append(run.register_champion(best.number, best.first_value, evaluation_set(spec), rule))
        return lines


def _ended(records: list[store.TrialRecord]) -> dict[int, TrialEnded]:
    return {r.number: TrialEnded.of(r) for r in records if r.state in ("COMPLETE", "PRUNED", "FAIL")}
