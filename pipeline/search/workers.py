"""Several search workers on one host: start them, share out GPUs and CPU threads, relay their events.

A worker is an ordinary search process (`search ... --worker`) on the shared Optuna storage; instead of drawing its
own progress view it prints one event per line on stdout (`EventView`; events.to_line writes the line,
events.from_line reads it back), and the coordinating process (`coordinate`) hands them to one view of the whole
study. Which trial each worker runs is decided by Optuna's storage alone; nothing here schedules trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.infra.concurrency import available_cores, quiet_if_hung_up, stop_with_parent
from pipeline.infra.memory import GPU_WORKERS_ENV, HOST_WORKERS_ENV
from pipeline.search.events import (
    BatchDone,
    EpochEnded,
    SearchView,
    Shown,
    Status,
    StudyFailed,
    TrialEnded,
    TrialStarted,
    Waiting,
    Warned,
    WorkerDone,
    WorkerEvent,
    from_line,
    to_line,
)
from pipeline.spec.stop_reason import StopReason

if TYPE_CHECKING:
    from pipeline.search.options import SearchOptions, SearchOutcome
    from pipeline.spec.studies import StudySpec
    from pipeline.training.train import EpochMetrics

BATCH_EVENT_SECONDS = 0.25  # a few progress updates a second is plenty


@dataclass(frozen=True)
class WorkerPlan:
    index: int  # 1-based, as shown to the user
    threads: int  # torch CPU threads of this worker
    gpu: str | None  # its CUDA_VISIBLE_DEVICES entry; None without CUDA


def plan(workers: int, threads: int | None, gpus: list[str]) -> list[WorkerPlan]:
    """GPUs round robin (worker i gets gpus[i % len]); CPU threads split so the workers together use each
    core once (at least one thread each), unless `threads` says how many each gets."""
    each = threads_each(workers, threads)
    return [WorkerPlan(i + 1, each, gpus[i % len(gpus)] if gpus else None) for i in range(workers)]


def threads_each(workers: int, threads: int | None) -> int:
    """Torch CPU threads per worker: `threads` when given, else the cores split evenly (at least one)."""
    return threads or max(1, available_cores() // workers)


AUTO = "auto"
# WORKERS=auto on a CPU: at most this many workers, the cores split between them. Measured on 2 cores (make
# bench-workers: two 1-thread workers ran 1.26-1.6x the trials an hour of one 2-thread process, because small
# batches leave a second thread of one step idle much of the time); on more cores each worker gets several threads,
# so every worker's copy of the data stays affordable.
AUTO_CPU_WORKERS_MAX = 4


def auto_count(device_type: str, storage_url: str, threads: int | None, trials: int,
               per_gpu: int = 1) -> tuple[int, str]:
    """WORKERS=auto: how many worker processes run the study on this host, and why (shown at the start).

    `per_gpu` on each GPU where there are GPUs (more than one where several small trials on one were measured
    faster: sharing.py); on a CPU one worker per core (each with `threads`, default 1), up to
    AUTO_CPU_WORKERS_MAX; never more than the trial budget. A study in a SQLite file gets one process on a CPU:
    Optuna advises against several writers on one SQLite file, and that is where a study made before WORKERS=auto
    lives.
    """
    if device_type == "cuda":
        gpus = devices(device_type)
        count, why = per_gpu * gpus, (f"{per_gpu} per GPU on {gpus} GPU{'s' if gpus > 1 else ''}, measured faster "
                                      "than one each" if per_gpu > 1 else "one per GPU")
    elif device_type != "cpu":
        count, why = 1, f"one process on {device_type}"
    elif storage_url.startswith("sqlite:"):
        count, why = 1, ("one process: the study lives in a SQLite file, which Optuna advises against sharing "
                         "between processes (WORKERS=N chooses)")
    else:
        cores = available_cores()
        count = max(1, min(AUTO_CPU_WORKERS_MAX, cores // (threads or 1), trials))
        why = f"{cores} CPU cores, {threads_each(count, threads)} thread(s) each"
    count = max(1, min(count, trials))
    return count, f"WORKERS=auto: {count} worker{'s' if count > 1 else ''} ({why})"


def devices(device_type: str) -> int:
    """How many devices of this kind the workers share out: the visible GPUs (at least one); one of anything else."""
    return max(len(visible_gpus()), 1) if device_type == "cuda" else 1


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them (empty without CUDA)."""
    import torch  # only asked when the search runs on CUDA, when torch is loaded already

    if not torch.cuda.is_available():
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed or [str(i) for i in range(torch.cuda.device_count())]


def worker_environment(p: WorkerPlan, plans: list[WorkerPlan], environment: dict[str, str] | None) -> dict[str, str]:
    """Worker `p`'s environment: its threads, its GPU, and how many workers share the host and its GPU."""
    env = dict(os.environ, **(environment or {}), OMP_NUM_THREADS=str(p.threads), MKL_NUM_THREADS=str(p.threads),
               PYTHONUNBUFFERED="1")
    # Each worker decides alone whether its data stays resident, a copy in each: it must know how many copies this
    # host's memory holds (memory.memory_budget divides it among them), and its GPU's (loading._placement).
    env[HOST_WORKERS_ENV] = str(len(plans))
    if p.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = p.gpu
        env[GPU_WORKERS_ENV] = str(sum(1 for other in plans if other.gpu == p.gpu))
    return env


class Workers:
    """The running worker processes and the one queue their output lines arrive on."""

    def __init__(self, command: list[str], plans: list[WorkerPlan], environment: dict[str, str] | None = None):
        self.plans = plans
        self.lines: queue.Queue[tuple[int, WorkerEvent | str | None]] = queue.Queue()
        self.processes: dict[int, subprocess.Popen] = {}
        for p in plans:
            env = worker_environment(p, plans, environment)
            # Its own session: a Ctrl-C reaches the coordinator, which passes one SIGINT on to each worker
            # (a terminal would signal them all at once, and a second signal means "stop now").
            process = subprocess.Popen([*command, "--threads", str(p.threads), "--worker", str(p.index)], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                       start_new_session=True, preexec_fn=stop_with_parent)
            self.processes[p.index] = process
            threading.Thread(target=self._read, args=(p.index, process), daemon=True).start()

    def _read(self, index: int, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        try:
            for line in process.stdout:
                for item in from_line(line.rstrip("\n")):
                    self.lines.put((index, item))
        finally:  # whatever happens here, the coordinator must learn that this worker's output ended
            self.lines.put((index, None))  # it has exited or is about to

    def events(self, poll_seconds: float = 0.5) -> Iterator[tuple[int, WorkerEvent | str | None]]:
        """(worker, event | text line | None when it ended), until every worker has ended;
        (0, None) every `poll_seconds` when nothing arrived, so the caller can refresh its view."""
        open_ = set(self.processes)
        while open_:
            try:
                index, item = self.lines.get(timeout=poll_seconds)
            except queue.Empty:
                yield 0, None
                continue
            if item is None:
                open_.discard(index)
                self.processes[index].wait()
            yield index, item

    def signal_all(self, signal_number: int) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal_number)

    def exit_codes(self) -> dict[int, int | None]:
        return {index: p.poll() for index, p in self.processes.items()}


def worker_command(spec: StudySpec, options: SearchOptions) -> list[str]:
    """The command line of one worker: this program, the same study and budget (its storage comes in its
    environment: `storage_environment`)."""
    command = [*options.worker_program, "search", "--study", spec.name, "--studies-dir", str(options.studies_dir),
               "--root", str(options.root), "--device", options.device,
               "--timeout", str(spec.timeout_minutes), "--epochs", str(spec.epochs),
               "--tracking" if options.tracking else "--no-tracking"]
    if spec.trials is not None:  # a planned study's cap only when it has one (else its rung 0 runs to its time)
        command += ["--trials", str(spec.trials)]
    if spec.minutes is not None:  # a planned search's: the worker reads the plan from the study
        command += ["--minutes", str(spec.minutes)]
    if options.deadline is not None:
        command += ["--deadline", repr(options.deadline)]
    if not spec.baseline:  # BASELINES=off (or a file without any): a worker must not queue the file's
        command.append("--no-baselines")
    for flag, value in (("--train-limit", spec.train_limit), ("--val-limit", spec.val_limit)):
        if value is not None:
            command += [flag, str(value)]
    return command


def storage_environment(url: str) -> dict[str, str]:
    """How a worker learns the storage the coordinator chose: STORAGE in its environment, which replaces the
    user's own STORAGE (so every worker opens that very store) and, unlike a command-line argument, is not shown
    to every user of the host in the process list, password included."""
    return {"STORAGE": url}


# --------------------------------------------------------------------------------------------------
# In a worker: events out


def send(event: WorkerEvent) -> None:
    """In a worker: one event line for the coordinator."""
    # One write, not print's two (the text, then its newline): a warning on stderr, which shares the pipe, cannot
    # then land between an event and its line's end (whole only up to the pipe's atomic size, PIPE_BUF).
    try:
        sys.stdout.write(to_line(event) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The coordinator is gone (killed outright; its death signal stops this worker at the next safe point).
        # Nobody reads these lines any more: they go nowhere, so that failing and queuing the trial again is not
        # cut short by a write that raises.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class EventView(SearchView):
    """A worker's view of its search: every event as a line for the coordinator, nothing on the console."""

    def __init__(self) -> None:
        self.last_batch = 0.0

    def trial_started(self, trial: TrialStarted) -> None:
        send(dataclasses.replace(trial, data=None))  # the prepared tensors stay here

    def batch_done(self, done: int, total: int) -> None:
        if time.monotonic() - self.last_batch > BATCH_EVENT_SECONDS or done == total:
            self.last_batch = time.monotonic()
            send(BatchDone(done, total))

    def epoch_ended(self, number: int, metrics: EpochMetrics) -> None:
        send(EpochEnded(number, metrics.epoch, metrics.val_accuracy, metrics.val_loss, metrics.epoch_seconds))

    def trial_ended(self, trial: TrialEnded) -> None:
        send(trial)

    def waiting(self) -> None:
        send(Waiting())

    def warning(self, message: str) -> None:
        send(Warned(message))

    def say(self, message: str) -> None:
        pass  # the coordinator speaks for the study

    def note(self, message: str) -> None:
        send(Warned(message))

    def header(self, text: str) -> None:
        pass

    def running(self, spec: StudySpec, status: Status, total: int | None = None,
                what: str = "trials") -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def workers_view(self, spec: StudySpec, status: Status, pool: Workers) -> WorkersView:
        raise AssertionError("a worker does not start workers")

    def ended(self, spec: StudySpec, outcome: SearchOutcome) -> None:
        if outcome.stop_reason == StopReason.FAILED:
            send(StudyFailed(outcome.failure))
        elif outcome.stop_reason in (StopReason.BUDGET, StopReason.TIMEOUT, StopReason.TIME):
            send(WorkerDone(outcome.ran, outcome.stop_reason))


# --------------------------------------------------------------------------------------------------
# In the coordinator: events in


class WorkersView(Protocol):
    """What the coordinator shows (console/workers_view.py draws it)."""

    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: Any) -> Any: ...
    def worker_ended(self, index: int, process: subprocess.Popen, unexpected: bool) -> None: ...
    def worker_line(self, index: int, text: str) -> None: ...
    def show(self, index: int, event: Shown) -> None: ...


@dataclass
class Coordinated:
    """What the workers reported between them."""

    ran: int = 0
    stop_reasons: set[StopReason] = field(default_factory=set)  # BUDGET, TIMEOUT
    failure: str | None = None  # a worker's TooManyFailures message
    signal_number: int | None = None  # the first stop signal this process received


def coordinate(pool: Workers, view: WorkersView) -> Coordinated:
    """Relay every worker's events to `view` until they have all ended.

    Ctrl-C (or SIGTERM/SIGHUP) is passed on to every worker, which fails and re-queues its running trial and
    stops; a second one makes them stop at once. A worker's TooManyFailures stops the others too.
    """
    result, received = Coordinated(), []

    def on_signal(signal_number: int, _frame: Any) -> None:
        if signal_number == signal.SIGHUP:
            quiet_if_hung_up()  # the terminal may be gone: the workers' lines must not stop this process
        received.append(signal_number)
        pool.signal_all(signal_number)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with view:
            for index, item in pool.events():
                if index == 0:
                    continue  # nothing arrived for a moment
                match item:
                    case None:
                        code = pool.processes[index].returncode
                        view.worker_ended(index, pool.processes[index],
                                          unexpected=bool(code) and not received and result.failure is None)
                    case str():  # a worker's own line (an error message, a library's warning)
                        view.worker_line(index, item)
                    case StudyFailed(failure=failure):
                        if result.failure is None:
                            result.failure = failure
                            pool.signal_all(signal.SIGTERM)  # the study stops: the other workers stop too
                    case WorkerDone(ran=ran, stop_reason=stop_reason):
                        result.ran += ran
                        result.stop_reasons.add(stop_reason)
                    case _:
                        view.show(index, item)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    result.signal_number = received[0] if received else None
    return result
