"""What a search is asked for (`SearchOptions`) and what it gives back (`SearchOutcome`): the contract between
`make search`'s command, its console view and its worker processes (what a search shows is events.SearchView)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import store
from pipeline.search import pareto, seeds
from pipeline.spec import paths
from pipeline.spec.stop_reason import StopReason


@dataclass(frozen=True)
class SearchOptions:
    storage: str | None = None  # Optuna storage URL or .journal file; None: STORAGE or the default
    fresh: bool = False
    workers: int | str = 1  # worker processes on this host, or workers.AUTO (`run_search` decides how many)
    worker: int | None = None  # set in a worker process started by a coordinator
    device: str = "auto"
    threads: int | None = None
    root: Path = paths.DATA_ROOT
    studies_dir: Path = paths.STUDIES_DIR
    tracking: bool = True
    worker_program: tuple[str, ...] = ()  # how a worker runs this program (see workers.worker_command)
    reports_dir: Path = paths.REPORTS_DIR  # the report page, refreshed at the end: reports/<study>.html
    exports_dir: Path = paths.EXPORTS_DIR  # where the page looks for the champion's export
    deadline: float | None = None  # a worker of a planned search: its coordinator's deadline (time.time())
    started: float | None = None  # when the command began (time.time()): a planned search's clock starts there

    @property
    def worker_count(self) -> int:
        """The number of worker processes, once decided (`run_search` decides WORKERS=auto before anything else)."""
        if isinstance(self.workers, str):
            raise ValueError(f"WORKERS={self.workers} is not decided yet")
        return self.workers


@dataclass
class SearchOutcome:
    study_name: str
    ran: int  # trials this invocation ran
    stop_reason: StopReason  # BUDGET, TIMEOUT, INTERRUPTED, FAILED
    seconds: float
    signal_number: int | None = None  # interrupted by this signal
    failure: str | None = None  # why the study stopped (failed)
    finished: int = 0  # finished trials of the study, all invocations
    decision: pareto.Choice | None = None  # the trial offered as champion, and (several objectives) why
    top: list[store.TrialRecord] = field(default_factory=list)  # the best complete trials (up to 5), or the front
    workers: int = 1
    resume_command: str = ""
    messages: list[str] = field(default_factory=list)  # what MLflow tracking has to say at the end
    champion: seeds.PhaseOutcome | None = None  # the champion phase's runs and table (studies with [champion])
    time_left: str | None = None  # a planned search: what a rerun does with the study's minutes left

    @property
    def best(self) -> store.TrialRecord | None:
        return self.decision.trial if self.decision is not None else None

    @property
    def stop_signal(self) -> signal.Signals:
        """The signal that interrupted the search: an INTERRUPTED outcome always has one (run_search records the
        stopping.Interrupted's)."""
        if self.stop_reason != StopReason.INTERRUPTED or self.signal_number is None:
            raise ValueError(f"a search that ended {self.stop_reason} was not interrupted by a signal")
        return signal.Signals(self.signal_number)

